package queue

import "time"

// HeldMeta describes one message in the hold spool.
type HeldMeta struct {
	ID         string    `json:"id"`
	Time       time.Time `json:"time"`
	From       string    `json:"from"`
	To         []string  `json:"to"`
	Identities []string  `json:"identities"`
	Reason     string    `json:"reason"` // the decision text that held it
	Subject    string    `json:"subject"`
	Size       int64     `json:"size"`
	// Queue is the identity whose release queue the message waits in
	// (over_limit = "queue", or a pace): relay releases it itself. Empty
	// for mail held for an admin.
	Queue string `json:"queue,omitempty"`
	// Paced: a pace queued it (not a cap).
	Paced bool `json:"paced,omitempty"`
}
