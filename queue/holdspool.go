package queue

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	bolt "go.etcd.io/bbolt"

	"relay/internal/boltsafe"
)

// Errors of the hold spool; test with errors.Is.
var (
	ErrHeldNotFound = errors.New("no such held message")
	ErrHeldBadID    = errors.New("malformed held message id")
	ErrHeldBusy     = errors.New("held message is being released or deleted")
	// ErrNotRemoved: the message was handed off but its record could not
	// be removed; it must not be handed off again (remove it with Delete).
	ErrNotRemoved = errors.New("held message was handed off but not removed from the spool")
)

// holdBucket holds id -> JSON HeldMeta. Bucket names of package queue start
// with "hold." because the DB is shared with package policy.
var holdBucket = []byte("hold.meta")

// maxHeaderBytes bounds how much of a message is read as its header (for
// the subject and for Header).
const maxHeaderBytes = 64 << 10

// HoldSpool is the hold (quarantine) spool: each message is a file
// dir/<id> in qmail's stored form, its metadata a record in bbolt. A
// message is in the spool once Put returns: the file and the directory are
// fsynced before the record is committed. It is also the release queue of
// over_limit = "queue" (HeldMeta.Queue), which relay empties itself.
//
// A released message loses its file first, right after the hand-off
// succeeded, and then its record: a record without its file is a message
// that was handed off (nothing else removes the file first), and OpenHold
// drops such records. So a crash hands a message off twice only if it
// comes between the hand-off's success (qmail-queue's exit 0) and the
// unlink of the file: one system call.
type HoldSpool struct {
	dir   string
	db    *bolt.DB
	seq   atomic.Uint32
	count atomic.Int64
	// Released lists the records OpenHold found without their file and
	// dropped: messages handed off just before a crash.
	Released []string

	mu   sync.Mutex
	busy map[string]bool // ids being released or deleted
}

// OpenHold opens (creating, mode 0700) the spool directory dir with its
// metadata in db. Message files left without metadata by a crash during Put
// are removed.
func OpenHold(dir string, db *bolt.DB) (*HoldSpool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	s := &HoldSpool{dir: dir, db: db, busy: make(map[string]bool)}
	known := make(map[string]bool)
	err := boltsafe.Update(db, func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(holdBucket)
		if err != nil {
			return err
		}
		var gone []string
		err = b.ForEach(func(k, _ []byte) error {
			id := string(k)
			if _, err := os.Lstat(s.path(id)); validHeldID(id) && errors.Is(err, os.ErrNotExist) {
				gone = append(gone, id) // handed off just before a crash
				return nil
			}
			known[id] = true
			return nil
		})
		if err != nil {
			return err
		}
		for _, id := range gone {
			if err := b.Delete([]byte(id)); err != nil {
				return err
			}
		}
		s.Released = gone
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("hold spool: %w", err)
	}
	s.count.Store(int64(len(known)))
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("hold spool: %w", err)
	}
	// A message file without a record is left by a crash between the file
	// and the commit (never acknowledged) or between removing the record
	// and the file; but it is also what a lost or replaced database leaves
	// of mail that was answered 250. It is moved aside, never deleted.
	for _, e := range entries {
		if name := e.Name(); validHeldID(name) && !known[name] && e.Type().IsRegular() {
			if err := os.MkdirAll(filepath.Join(dir, OrphanDir), 0o700); err != nil {
				return nil, fmt.Errorf("hold spool: %w", err)
			}
			if err := os.Rename(filepath.Join(dir, name), filepath.Join(dir, OrphanDir, name)); err != nil {
				return nil, fmt.Errorf("hold spool: %w", err)
			}
		}
	}
	return s, nil
}

// OrphanDir is where OpenHold moves message files that have no record, for
// an admin to look at.
const OrphanDir = "orphans"

// Put stores a message with its envelope and identities (meta.From, To,
// Identities, Reason; Time defaults to now). It sets ID, Size and Subject
// and returns the stored meta only once the message is durable. On failure
// nothing is left behind; a failure to read msg is returned wrapped.
func (s *HoldSpool) Put(meta HeldMeta, msg io.Reader) (HeldMeta, error) {
	if meta.Time.IsZero() {
		meta.Time = time.Now()
	}
	meta.Time = meta.Time.UTC()
	var f *os.File
	for {
		meta.ID = s.newID()
		var err error
		f, err = os.OpenFile(s.path(meta.ID), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err == nil {
			break
		}
		if !errors.Is(err, os.ErrExist) {
			return HeldMeta{}, fmt.Errorf("hold spool: %w", err)
		}
	}
	committed := false
	defer func() {
		if !committed {
			f.Close()
			os.Remove(s.path(meta.ID))
		}
	}()
	src := &readTracker{r: msg}
	head := &boundedBuffer{max: maxHeaderBytes}
	if _, err := io.Copy(f, io.TeeReader(src, head)); err != nil {
		if src.err != nil {
			return HeldMeta{}, readError(src.err)
		}
		return HeldMeta{}, fmt.Errorf("hold spool: %w", err)
	}
	meta.Size = src.n
	meta.Subject = parseSubject(head.b)
	if err := f.Sync(); err != nil {
		return HeldMeta{}, fmt.Errorf("hold spool: %w", err)
	}
	if err := f.Close(); err != nil {
		return HeldMeta{}, fmt.Errorf("hold spool: %w", err)
	}
	if err := syncDir(s.dir); err != nil {
		return HeldMeta{}, fmt.Errorf("hold spool: %w", err)
	}
	val, err := json.Marshal(meta)
	if err != nil {
		return HeldMeta{}, err
	}
	err = boltsafe.Update(s.db, func(tx *bolt.Tx) error {
		return tx.Bucket(holdBucket).Put([]byte(meta.ID), val)
	})
	if err != nil {
		return HeldMeta{}, fmt.Errorf("hold spool: %w", err)
	}
	committed = true
	s.count.Add(1)
	return meta, nil
}

// List returns every held message, newest first.
func (s *HoldSpool) List() ([]HeldMeta, error) {
	var list []HeldMeta
	err := boltsafe.View(s.db, func(tx *bolt.Tx) error {
		c := tx.Bucket(holdBucket).Cursor()
		for k, v := c.Last(); k != nil; k, v = c.Prev() {
			var m HeldMeta
			if err := json.Unmarshal(v, &m); err != nil {
				return fmt.Errorf("held message %q: %w", k, err)
			}
			list = append(list, m)
		}
		return nil
	})
	return list, err
}

// Get returns one held message's metadata.
func (s *HoldSpool) Get(id string) (HeldMeta, error) {
	if !validHeldID(id) {
		return HeldMeta{}, ErrHeldBadID
	}
	var m HeldMeta
	err := boltsafe.View(s.db, func(tx *bolt.Tx) error {
		v := tx.Bucket(holdBucket).Get([]byte(id))
		if v == nil {
			return ErrHeldNotFound
		}
		return json.Unmarshal(v, &m)
	})
	return m, err
}

// Open returns the raw message as stored (LF line ends).
func (s *HoldSpool) Open(id string) (io.ReadCloser, error) {
	if _, err := s.Get(id); err != nil {
		return nil, err
	}
	f, err := os.Open(s.path(id))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrHeldNotFound
	}
	return f, err
}

// Header returns a held message's header, up to and including the empty
// line that ends it, at most 64 KiB.
func (s *HoldSpool) Header(id string) ([]byte, error) {
	rc, err := s.Open(id)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, maxHeaderBytes))
	if err != nil {
		return nil, err
	}
	if i := bytes.Index(b, []byte("\n\n")); i >= 0 {
		b = b[:i+2]
	} else if bytes.HasPrefix(b, []byte("\n")) {
		b = b[:1]
	}
	return b, nil
}

// Release hands a held message to h with its original envelope, then
// removes it from the spool. If the hand-off fails the message stays. If
// it succeeds but the removal fails, the receipt comes back with an error
// wrapping ErrNotRemoved: the message went out and must not be released
// again.
func (s *HoldSpool) Release(ctx context.Context, id string, h Handoff) (Receipt, error) {
	return s.ReleaseWith(ctx, id, h, nil)
}

// ReleaseWith is Release where the record's removal is the function
// commit is given, for commit to run in a bbolt transaction of its own
// choosing (relay's releaser charges policy in the same one); nil commit
// runs it alone. The file is unlinked, and the directory synced, before
// commit is called.
func (s *HoldSpool) ReleaseWith(ctx context.Context, id string, h Handoff, commit func(remove func(*bolt.Tx) error) error) (Receipt, error) {
	if err := s.claim(id); err != nil {
		return Receipt{}, err
	}
	defer s.unclaim(id)
	meta, err := s.Get(id)
	if err != nil {
		return Receipt{}, err
	}
	f, err := os.Open(s.path(id))
	if errors.Is(err, os.ErrNotExist) {
		return Receipt{}, ErrHeldNotFound
	}
	if err != nil {
		return Receipt{}, fmt.Errorf("hold spool: %w", err)
	}
	r, err := h.Deliver(ctx, Envelope{From: meta.From, To: meta.To}, f)
	f.Close()
	if err != nil {
		return Receipt{}, err
	}
	// It went out. The file goes first: from now on the message is never
	// handed off again, whatever happens to the record (see HoldSpool).
	var errs []error
	if err := os.Remove(s.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	} else if err := syncDir(s.dir); err != nil {
		errs = append(errs, err) // a power loss could bring the file back
	}
	remove := func(btx *bolt.Tx) error {
		b := btx.Bucket(holdBucket)
		if b.Get([]byte(id)) == nil {
			return ErrHeldNotFound
		}
		return b.Delete([]byte(id))
	}
	if commit == nil {
		commit = func(remove func(*bolt.Tx) error) error { return boltsafe.Update(s.db, remove) }
	}
	if err := commit(remove); err != nil {
		errs = append(errs, err)
	} else {
		s.count.Add(-1)
	}
	if len(errs) > 0 {
		return r, fmt.Errorf("%w: %s (%s): %w", ErrNotRemoved, id, r.Reply, errors.Join(errs...))
	}
	return r, nil
}

// Delete removes a held message without handing it off.
func (s *HoldSpool) Delete(id string) error {
	if err := s.claim(id); err != nil {
		return err
	}
	defer s.unclaim(id)
	return s.remove(id)
}

// Count is the number of held messages.
func (s *HoldSpool) Count() int { return int(s.count.Load()) }

func (s *HoldSpool) remove(id string) error {
	err := boltsafe.Update(s.db, func(tx *bolt.Tx) error {
		b := tx.Bucket(holdBucket)
		if b.Get([]byte(id)) == nil {
			return ErrHeldNotFound
		}
		return b.Delete([]byte(id))
	})
	if err != nil {
		return err
	}
	s.count.Add(-1)
	if err := os.Remove(s.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// claim marks id as being released or deleted, so that two admin actions
// on one message cannot both hand it off.
func (s *HoldSpool) claim(id string) error {
	if !validHeldID(id) {
		return ErrHeldBadID
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.busy[id] {
		return ErrHeldBusy
	}
	s.busy[id] = true
	return nil
}

func (s *HoldSpool) unclaim(id string) {
	s.mu.Lock()
	delete(s.busy, id)
	s.mu.Unlock()
}

// path is the file of a validated id.
func (s *HoldSpool) path(id string) string { return filepath.Join(s.dir, id) }

// newID returns a new id: 16 hex digits of Unix nanoseconds and 8 of a
// counter, so ids sort by time and are safe as file names.
func (s *HoldSpool) newID() string {
	return fmt.Sprintf("%016x-%08x", uint64(time.Now().UnixNano()), s.seq.Add(1))
}

// validHeldID reports whether id has the form newID makes. Every id that
// reaches a path is checked with it.
func validHeldID(id string) bool {
	if len(id) != 25 || id[16] != '-' {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if i != 16 && !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// maxSubject bounds the subject kept in the metadata.
const maxSubject = 998

// parseSubject returns the first Subject field of a message header (LF or
// CRLF line ends), unfolded (RFC 5322 §2.2.3), with RFC 2047 encoded words
// decoded where the charset is known, control characters replaced by
// spaces and runs of white space collapsed to one space. It reads only up to the empty line that ends the header.
func parseSubject(header []byte) string {
	var value []byte
	in := false
	for len(header) > 0 {
		line := header
		if i := bytes.IndexByte(header, '\n'); i >= 0 {
			line, header = header[:i], header[i+1:]
		} else {
			header = nil
		}
		line = bytes.TrimSuffix(line, []byte("\r"))
		if len(line) == 0 {
			break // end of header
		}
		if line[0] == ' ' || line[0] == '\t' {
			if in {
				value = append(value, line...)
			}
			continue
		}
		if in {
			break
		}
		name, v, ok := bytes.Cut(line, []byte(":"))
		if ok && strings.EqualFold(string(bytes.TrimRight(name, " \t")), "subject") {
			in = true
			value = append(value, v...)
		}
	}
	s := strings.TrimSpace(string(value))
	if d, err := new(mime.WordDecoder).DecodeHeader(s); err == nil {
		s = d
	}
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, strings.ToValidUTF8(s, "\uFFFD"))
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > maxSubject {
		cut := maxSubject
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut]
	}
	return s
}
