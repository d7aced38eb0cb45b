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

// ReleaseQueue describes one identity's release queue (over_limit =
// "queue", pace) for the admin page and API.
type ReleaseQueue struct {
	Identity   string    `json:"identity"`
	Messages   int       `json:"messages"`
	Recipients int       `json:"recipients"`
	Paced      int       `json:"paced"` // of Messages, those a pace queued
	Oldest     time.Time `json:"oldest"`
	State      string    `json:"state"`            // ready, waiting for a window, paced, suspended, retrying after a failed hand-off, releasing
	Detail     string    `json:"detail,omitempty"` // what it waits for, or its last failure
	NextTry    time.Time `json:"next_try"`
	DrainsBy   time.Time `json:"drains_by"` // an estimate from the identity's own caps and pace
}
