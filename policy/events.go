package policy

import (
	"sync"
	"time"
)

// Event kinds.
const (
	EventThrottleStart = "throttle_start" // first over-limit event after an hour without one
	EventOverLimit     = "over_limit"     // a message of the identity was refused or held over a cap
	EventSuspended     = "suspended"
	EventUnsuspended   = "unsuspended"
	EventHeld          = "held"     // a message went to the hold spool
	EventReset         = "reset"    // an admin cleared the counters
	EventReleased      = "released" // held mail released (recorded by package admin)
	EventReload        = "reload"   // configuration reloaded (recorded by package admin)
	EventObserve       = "observe"  // observe mode: what enforce mode would have done
	// EventRefused: mail refused before any cap was asked, because who
	// sent it cannot be known (a web server's message without qmail's
	// "invoked by uid" line first; recorded by package relay).
	EventRefused = "refused"
)

// Event is one entry of the event log shown on the admin page.
type Event struct {
	Seq      uint64    `json:"seq"`
	Time     time.Time `json:"time"`
	Kind     string    `json:"kind"`
	Identity string    `json:"identity,omitempty"`
	Account  string    `json:"account,omitempty"`
	Script   string    `json:"script,omitempty"`
	Detail   string    `json:"detail,omitempty"`
}

// EventFilter selects events; empty fields match everything.
type EventFilter struct {
	Identity string
	Kind     string
	Limit    int // at most this many, newest first; 0: all kept
}

// maxEvents is how many events are kept, in memory and in bbolt.
const maxEvents = 10000

// eventLog is the newest maxEvents events in a ring, plus those not yet
// written to bbolt.
type eventLog struct {
	mu      sync.Mutex
	ring    []Event // len <= maxEvents
	start   int     // index of the oldest event once the ring is full
	nextSeq uint64
	pending []Event // recorded on the mail path, written at the next flush
}

// add assigns the next sequence number and keeps the event. It returns the
// event as stored.
func (l *eventLog) add(ev Event, pending bool) Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.addLocked(ev, pending)
}

func (l *eventLog) addLocked(ev Event, pending bool) Event {
	l.nextSeq++
	ev.Seq = l.nextSeq
	if len(l.ring) < maxEvents {
		l.ring = append(l.ring, ev)
	} else {
		l.ring[l.start] = ev
		l.start = (l.start + 1) % maxEvents
	}
	if pending {
		l.pending = append(l.pending, ev)
	}
	return ev
}

// takePending hands over the events waiting for bbolt.
func (l *eventLog) takePending() []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	p := l.pending
	l.pending = nil
	return p
}

// query returns matching events, newest first.
func (l *eventLog) query(f EventFilter) []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Event
	for i := len(l.ring) - 1; i >= 0; i-- {
		ev := l.ring[(l.start+i)%len(l.ring)]
		if (f.Identity != "" && ev.Identity != f.Identity) || (f.Kind != "" && ev.Kind != f.Kind) {
			continue
		}
		out = append(out, ev)
		if f.Limit > 0 && len(out) == f.Limit {
			break
		}
	}
	return out
}

// load appends an event read back from bbolt, oldest first.
func (l *eventLog) load(ev Event) {
	l.nextSeq = ev.Seq - 1
	l.addLocked(ev, false)
}
