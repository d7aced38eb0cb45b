// Package policy decides whether a message may pass: it names every identity
// a message is attributed to, counts recipients and messages per identity in
// sliding windows against the configured caps and the mailing-list
// allowlist, suspends repeat offenders, records events, and keeps all of it
// in bbolt.
package policy

import "time"

// Identity is one sender identity of a message (docs/design.md §3).
type Identity struct {
	ID      string // "user:alice", "uid:local:1001", "uid:web1:33", "script:web1:33:form.php", "ip:1.2.3.4", "sender:a@b", "domain:b"
	Kind    string // one of config.IdentityKinds
	Account string // account name where known (passwd), for uid and script identities
	Script  string // X-PHP-Originating-Script path, for uid and script identities
}

// Action is what a decision tells the SMTP front end to do.
type Action int

// Actions. Accept to Reject are in order of severity; Queue came later.
const (
	Accept       Action = iota
	TooManyRcpts        // this recipient is over max_rcpts_per_msg: 452 4.5.3, the message goes on
	Hold                // 250, but into the hold spool
	Defer               // 451 4.7.1
	Reject              // 550 5.7.1 (over a cap with over_limit = "reject", or suspended)
	// Queue is 250, into the release queue (the hold spool, marked with
	// Decision.Identity), which relay empties itself as that identity's
	// windows and pace allow: over a cap with over_limit or the allow
	// entry's action "queue", over a pace, or behind mail of the identity
	// that waits already.
	Queue
)

// Decision is the outcome of one check.
type Decision struct {
	Action    Action
	Identity  string        // the identity whose cap fired ("" on Accept)
	Limit     string        // "500 recipients/1h", "50 recipients per message", "suspended"
	RetryIn   time.Duration // when the next slot frees up (0 if unknown)
	Suspended bool          // the identity is suspended
	Observed  bool          // observe mode: Action is Accept, WouldBe is what enforce would have done
	WouldBe   Action
	// Err is set when policy could not decide because its counters could
	// not be read (a damaged relay.db); Action is then Defer, and the
	// front end answers its own temporary error, not a cap's text.
	Err error
	// Paced: the identity's pace decided (Queue, or the over_limit reply
	// when its release queue is full).
	Paced bool
	// Behind is how many messages of Identity wait in its release queue
	// when the message is queued behind them rather than over a cap.
	Behind int64
}

// Checker starts policy transactions; *Engine implements it.
type Checker interface {
	Begin(ids []Identity) Tx
	// NoteEvent keeps an event the SMTP front end saw outside any
	// decision (EventRefused); it is written with the next flush.
	NoteEvent(ev Event)
}

// Tx is one message's passage through policy. Recipients are reserved as they
// are accepted so parallel sessions cannot together pass a cap; nothing is
// charged until Commit.
type Tx interface {
	// Check tells whether any identity is suspended (called at MAIL).
	Check() Decision
	// AddRcpt checks one more recipient against every identity and reserves it.
	AddRcpt() Decision
	// AddIdentities adds identities learned from the headers at DATA
	// (uid:<webserver>:<uid>, script) and checks them for all recipients so far.
	AddIdentities(ids ...Identity) Decision
	// Message checks and reserves one message against every identity's msgs caps.
	Message() Decision
	// Recheck is called at the end of DATA, before the hand-off is
	// confirmed: when the transaction's reservations lapsed
	// (reserve_timeout) it checks and reserves them again; else Accept.
	Recheck() Decision
	// Commit charges the reservations: the hand-off succeeded.
	Commit()
	// Held records that the message went to the hold spool under holdID and
	// releases the reservations without charging them.
	Held(holdID string)
	// Abort releases every reservation (RSET, disconnect, failed hand-off).
	Abort()
	// Identities lists the identities of the transaction, strongest first.
	Identities() []Identity
	// SetSample gives the message's Message-ID and Subject (at DATA), quoted
	// in notifications about its identities.
	SetSample(messageID, subject string)
}
