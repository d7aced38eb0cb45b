package admin

import (
	"context"
	"io"
	"time"

	"relay/policy"
	"relay/queue"
)

// Sender states (docs/design.md §6).
const (
	StateOK        = policy.StateOK
	StateThrottled = policy.StateThrottled
	StateSuspended = policy.StateSuspended
	StateAll       = policy.StateAll
	StateActive    = policy.StateActive
)

// The admin shows policy's own views; these names keep the API's types in
// one place. Their JSON is the API's JSON.
type (
	Sender      = policy.Sender
	Usage       = policy.Usage
	Suspension  = policy.Suspension
	Event       = policy.Event
	EventFilter = policy.EventFilter
)

// Policy is what the admin needs from the policy engine (*policy.Engine).
// Suspend, Unsuspend and Reset must be durable when they return and record
// their own events.
type Policy interface {
	Senders(state string) []Sender // state: ok, throttled, suspended or all
	Sender(id string) (Sender, bool)
	Suspend(id, reason string) error
	Unsuspend(id string) error
	Reset(id string) error
	Events(EventFilter) []Event // newest first
	RecordEvent(Event) error    // durable when it returns
}

// Held is what the admin needs from the hold spool (*queue.HoldSpool with
// its hand-off bound to Release). Unknown ids are reported with
// queue.ErrHeldNotFound or an error wrapping fs.ErrNotExist (answered 404).
type Held interface {
	List() ([]queue.HeldMeta, error)
	Get(id string) (queue.HeldMeta, error)
	Open(id string) (io.ReadCloser, error)
	// Release hands the message off with its original envelope, uncounted,
	// and removes it from the spool once the hand-off succeeded.
	Release(ctx context.Context, id string) (queue.Receipt, error)
	Delete(id string) error
}

// HeldSummary is one line of GET /api/held.
type HeldSummary struct {
	ID         string    `json:"id"`
	Time       time.Time `json:"time"`
	From       string    `json:"from"`
	Rcpts      int       `json:"rcpts"`
	Identities []string  `json:"identities"`
	Reason     string    `json:"reason"`
	Subject    string    `json:"subject"`
	Size       int64     `json:"size"`
	// Queue: the message waits in this identity's release queue and relay
	// releases it itself; "" for mail held for an admin.
	Queue string `json:"queue,omitempty"`
}

// HeldMessage is GET /api/held/{id}: the envelope, why it was held, and the
// header block. The raw message is GET /api/held/{id}?raw=1.
type HeldMessage struct {
	queue.HeldMeta
	Headers string `json:"headers"`
}

// summarize turns spool metadata into a list line.
func summarize(m queue.HeldMeta) HeldSummary {
	return HeldSummary{ID: m.ID, Time: m.Time, From: m.From, Rcpts: len(m.To), Identities: m.Identities,
		Reason: m.Reason, Subject: m.Subject, Size: m.Size, Queue: m.Queue}
}
