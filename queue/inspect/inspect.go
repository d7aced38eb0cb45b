// Package inspect reads qmail's own queue (/var/qmail/queue) to show who is
// sending right now: each message's sender, recipients left and done, size,
// queue time, and its origin from the Received lines qmail-queue and
// qmail-smtpd wrote (a local uid, or a network client's IP, HELO and
// authenticated login). It replaces grepping the queue by hand.
//
// It is safe on a live queue: it only opens files for reading, and a message
// whose files vanish or are still being written while it reads is left out
// rather than reported as an error. The layout it reads is qmail 1.03's
// (docs/qmail.md §4): the message id is the inode number of mess/<split>/<id>,
// split directories hold <id % split>/<id>, info/local/remote hold
// NUL-terminated records, and todo/<id> holds the envelope until qmail-send
// has preprocessed the message.
package inspect

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultDir is where qmail keeps its queue.
const DefaultDir = "/var/qmail/queue"

// Origin kinds: how qmail-queue was invoked (docs/qmail.md §2.2).
const (
	KindUID     = "uid"     // "invoked by uid N": a local user or script
	KindNetwork = "network" // "invoked from network": qmail-smtpd or relay
	KindAlias   = "alias"   // "invoked by alias": a .qmail forward of alias
	KindBounce  = "bounce"  // "invoked for bounce": qmail-send's bounce
	KindUnknown = "unknown" // no qmail-queue Received line found
)

// Origin is where a queued message came from, per its Received lines.
type Origin struct {
	Kind     string `json:"kind"`
	QP       int    `json:"qp,omitempty"`      // qmail-queue's pid, as in qmail-send's log
	UID      *int   `json:"uid,omitempty"`     // KindUID
	Account  string `json:"account,omitempty"` // the uid's name in the passwd file
	Host     string `json:"host,omitempty"`    // KindNetwork: remote host, "unknown" without DNS
	HELO     string `json:"helo,omitempty"`    // empty when not given or equal to Host
	IP       string `json:"ip,omitempty"`
	AuthUser string `json:"auth_user,omitempty"` // SMTP AUTH login (protocol ESMTPA/ESMTPSA)
	Ident    string `json:"ident,omitempty"`     // RFC 1413 answer in an unauthenticated line
	Protocol string `json:"protocol,omitempty"`  // SMTP, ESMTPA, ESMTPSA …
}

// Recipient is one envelope recipient.
type Recipient struct {
	Addr   string `json:"addr"`
	Remote bool   `json:"remote"` // from remote/…; false for local/… and todo
	Done   bool   `json:"done"`
}

// Message is one message in the queue.
type Message struct {
	ID uint64 `json:"id"`
	// Preprocessed is false while only todo/<id> holds the envelope; such
	// a message has no queue time yet and its recipients are not split
	// into local and remote.
	Preprocessed bool        `json:"preprocessed"`
	QueueTime    time.Time   `json:"queue_time,omitzero"` // mtime of info/<split>/<id>
	Sender       string      `json:"sender"`              // "" for the null sender
	Left         int         `json:"left"`                // recipients not yet delivered
	Done         int         `json:"done"`
	Recipients   []Recipient `json:"recipients,omitempty"` // only when Reader.Recipients
	Size         int64       `json:"size"`                 // bytes of mess/<split>/<id>
	Bouncing     bool        `json:"bouncing,omitempty"`   // bounce/<id> exists
	Origin       Origin      `json:"origin"`
	PHPScript    string      `json:"php_script,omitempty"` // X-PHP-Originating-Script
	SenderID     string      `json:"sender_id,omitempty"`  // X-Sender-Id, relay's identity id
}

// Stats says how a read went.
type Stats struct {
	Listed   int   // message files found in mess/
	Skipped  int   // vanished, or not yet committed (no todo and no info)
	Failed   int   // could not be read for another reason (see Err)
	Err      error // the first such error
	Messages int   // read and returned (before keep)
}

// Reader reads one qmail queue directory. The zero value reads DefaultDir.
type Reader struct {
	Dir        string            // default DefaultDir
	Accounts   map[uint32]string // uid -> account name, for Origin.Account
	Recipients bool              // keep each recipient's address, not only the counts
	Workers    int               // parallel readers; default GOMAXPROCS
}

func (r *Reader) dir() string {
	if r.Dir == "" {
		return DefaultDir
	}
	return r.Dir
}

// Read lists the queue. keep, when not nil, chooses which messages are
// returned (it runs in parallel and must not keep m's pointer). Messages are
// ordered by queue time, oldest first, then by id; not yet preprocessed ones
// come last. The error is about the queue as a whole (not there, not
// readable); trouble with single messages is counted in Stats.
func (r *Reader) Read(ctx context.Context, keep func(m *Message) bool) ([]Message, Stats, error) {
	l, err := openLayout(r.dir())
	if err != nil {
		return nil, Stats{}, err
	}
	defer l.close()
	var ids []uint64
	for s := range l.split {
		names, err := readNames(filepath.Join(l.dir, "mess", strconv.Itoa(s)))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, Stats{}, err
		}
		for _, n := range names {
			if id, err := strconv.ParseUint(n, 10, 64); err == nil {
				ids = append(ids, id)
			}
		}
	}

	workers := r.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	workers = max(1, min(workers, len(ids)))
	type result struct {
		msgs  []Message
		stats Stats
	}
	results := make([]result, workers)
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			res := &results[w]
			buf := make([]byte, 0, maxHeader)
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= len(ids) {
					return
				}
				m, err := r.readMessage(l, ids[i], buf)
				switch {
				case err == nil:
					res.stats.Messages++
					if keep == nil || keep(&m) {
						res.msgs = append(res.msgs, m)
					}
				case errors.Is(err, fs.ErrNotExist) || errors.Is(err, errNotCommitted):
					res.stats.Skipped++
				default:
					res.stats.Failed++
					if res.stats.Err == nil {
						res.stats.Err = err
					}
				}
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, Stats{}, err
	}

	st := Stats{Listed: len(ids)}
	var msgs []Message
	for _, res := range results {
		msgs = append(msgs, res.msgs...)
		st.Skipped += res.stats.Skipped
		st.Failed += res.stats.Failed
		st.Messages += res.stats.Messages
		if st.Err == nil {
			st.Err = res.stats.Err
		}
	}
	slices.SortFunc(msgs, compareMessages)
	return msgs, st, nil
}

func compareMessages(a, b Message) int {
	if a.Preprocessed != b.Preprocessed {
		if a.Preprocessed {
			return -1
		}
		return 1
	}
	if c := a.QueueTime.Compare(b.QueueTime); c != 0 {
		return c
	}
	switch {
	case a.ID < b.ID:
		return -1
	case a.ID > b.ID:
		return 1
	}
	return 0
}

// errNotCommitted marks a mess file with neither todo nor info: qmail-queue
// is still writing it, or qmail-send is removing it.
var errNotCommitted = errors.New("message not committed")

// readMessage reads one message. Any fs.ErrNotExist means a file went away
// while reading: the message was delivered or removed, and is skipped.
//
// The mess file is opened first and held: while it is open its inode, which
// is the message id, cannot be given to a new message, so every file named
// after the id that is read afterwards belongs to this message (qmail-send
// removes mess last, after info, local and remote). Then the envelope is
// read, because its files are qmail's commit points (docs/qmail.md §4): todo/<id>
// appears only once qmail-queue has written and synced mess, and while todo
// exists it is the envelope (qmail-send may be half-way through writing
// info/local/remote); once todo is gone, info/local/remote are complete. A
// mess file with neither todo nor info is still being written and is
// skipped. Last, a mess file unlinked meanwhile (no links left) means the
// message was finished while being read, and it is skipped too.
func (r *Reader) readMessage(l *layout, id uint64, buf []byte) (Message, error) {
	m := Message{ID: id}
	name := strconv.FormatUint(id, 10)
	mess, err := openAt(l.dirOf(l.mess, id), name)
	if err != nil {
		return m, &fs.PathError{Op: "open", Path: l.path("mess", id), Err: err}
	}
	defer unix.Close(mess)

	env, err := r.readEnvelope(l, id, name)
	if err != nil {
		return m, err
	}
	m.Preprocessed, m.QueueTime = env.preprocessed, env.queued
	m.Sender, m.Left, m.Done, m.Recipients = env.sender, env.left, env.done, env.recipients

	var st unix.Stat_t
	if _, err := ignoringEINTR(func() (int, error) { return 0, unix.Fstat(mess, &st) }); err != nil {
		return m, &fs.PathError{Op: "stat", Path: l.path("mess", id), Err: err}
	}
	if st.Nlink == 0 {
		return m, fs.ErrNotExist
	}
	m.Size = st.Size
	hdr, err := readHeader(fdReader(mess), buf)
	if err != nil {
		return m, &fs.PathError{Op: "read", Path: l.path("mess", id), Err: err}
	}
	h := parseHeader(hdr)
	m.Origin, m.PHPScript, m.SenderID = h.origin, h.phpScript, h.senderID
	if m.Origin.UID != nil {
		m.Origin.Account = r.Accounts[uint32(*m.Origin.UID)]
	}
	if bounce := l.dirOf(l.bounce, id); bounce != noDir {
		var bst unix.Stat_t
		if unix.Fstatat(bounce, name, &bst, unix.AT_SYMLINK_NOFOLLOW) == nil {
			m.Bouncing = true
		}
	}
	return m, nil
}

// readEnvelope reads todo/<id>, or info, local and remote once qmail-send
// has preprocessed the message. A todo that appears while info is read
// means the message was not committed when todo was first looked for and
// is being preprocessed now: info may be half-written, so todo is used.
func (r *Reader) readEnvelope(l *layout, id uint64, name string) (envelope, error) {
	todoDir := l.dirOf(l.todo, id)
	for attempt := 0; ; attempt++ {
		todo, _, err := readAt(todoDir, name)
		if err == nil {
			return parseTodo(todo, r.Recipients), nil
		}
		if err != unix.ENOENT {
			return envelope{}, &fs.PathError{Op: "read", Path: l.path("todo", id), Err: err}
		}
		if attempt > 0 {
			return envelope{}, errNotCommitted
		}
		env, err := r.readPreprocessed(l, id, name)
		if err != nil {
			return env, err
		}
		if todoDir == noDir {
			return env, nil
		}
		var st unix.Stat_t
		if err := unix.Fstatat(todoDir, name, &st, 0); err == unix.ENOENT {
			return env, nil
		}
	}
}

// readPreprocessed reads info/<id> (the sender; its mtime is the queue
// time) and local/<id> and remote/<id> (the recipients).
func (r *Reader) readPreprocessed(l *layout, id uint64, name string) (envelope, error) {
	info, mtime, err := readAt(l.dirOf(l.info, id), name)
	if err == unix.ENOENT {
		return envelope{}, errNotCommitted
	}
	if err != nil {
		return envelope{}, &fs.PathError{Op: "read", Path: l.path("info", id), Err: err}
	}
	sender, ok := parseInfo(info)
	if !ok {
		return envelope{}, errNotCommitted // info still being written
	}
	env := envelope{sender: sender, preprocessed: true, queued: time.Unix(mtime.Sec, 0).UTC()} // qmail keeps seconds
	for _, ch := range [...]struct {
		sub    string
		dirs   []int
		remote bool
	}{{"local", l.local, false}, {"remote", l.remote, true}} {
		data, _, err := readAt(l.dirOf(ch.dirs, id), name)
		if err == unix.ENOENT {
			continue
		}
		if err != nil {
			return envelope{}, &fs.PathError{Op: "read", Path: l.path(ch.sub, id), Err: err}
		}
		addRecipients(&env, data, ch.remote, r.Recipients)
	}
	return env, nil
}

// ReceivedLines returns the Received fields of message id as stored (the
// old "for f in queue/mess/*/*; grep Received" loop), topmost first.
func (r *Reader) ReceivedLines(id uint64) ([]string, error) {
	split, err := SplitOf(r.dir())
	if err != nil {
		return nil, err
	}
	f, err := os.Open(filepath.Join(r.dir(), "mess", strconv.FormatUint(id%uint64(split), 10), strconv.FormatUint(id, 10)))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("message %d is not in the queue", id)
		}
		return nil, err
	}
	defer f.Close()
	hdr, err := readHeader(f, nil)
	if err != nil {
		return nil, err
	}
	return receivedLines(hdr), nil
}
