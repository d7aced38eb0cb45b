package queue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"relay/internal/fakeqq"
)

func openTestDB(t *testing.T, path string) *bolt.DB {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return db
}

func newTestSpool(t *testing.T) (*HoldSpool, string, *bolt.DB) {
	t.Helper()
	dir := t.TempDir()
	db := openTestDB(t, filepath.Join(dir, "relay.db"))
	t.Cleanup(func() { db.Close() })
	s, err := OpenHold(filepath.Join(dir, "hold"), db)
	if err != nil {
		t.Fatal(err)
	}
	return s, dir, db
}

const heldMsg = "Received: from unknown (HELO c) (127.0.0.1)\n  by mail.example.test with SMTP; 28 Nov 2026 02:41:53 -0000\n" +
	"From: a@example.test\nSubject: =?UTF-8?B?Q2hlYXAg4oKs?=\n  pills\nTo: x@y\n\nbody line\n.dot\n"

func TestHoldPutGetList(t *testing.T) {
	s, _, _ := newTestSpool(t)
	in := HeldMeta{From: "a@example.test", To: []string{"x@y", "z@w"}, Identities: []string{"user:alice", "ip:127.0.0.1"}, Reason: "over 100 recipients/1m"}
	m1, err := s.Put(in, strings.NewReader(heldMsg))
	if err != nil {
		t.Fatal(err)
	}
	if !validHeldID(m1.ID) || m1.Size != int64(len(heldMsg)) || m1.Subject != "Cheap € pills" || m1.Time.IsZero() {
		t.Fatalf("meta %+v", m1)
	}
	m2, err := s.Put(HeldMeta{From: "b@example.test", To: []string{"q@r"}}, strings.NewReader("Subject: second\n\nx\n"))
	if err != nil {
		t.Fatal(err)
	}
	if s.Count() != 2 {
		t.Errorf("Count = %d", s.Count())
	}
	list, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].ID != m2.ID || list[1].ID != m1.ID {
		t.Fatalf("List not newest first: %+v", list)
	}
	got, err := s.Get(m1.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.From != in.From || strings.Join(got.To, ",") != "x@y,z@w" || strings.Join(got.Identities, ",") != "user:alice,ip:127.0.0.1" ||
		got.Reason != in.Reason || got.Subject != m1.Subject || !got.Time.Equal(m1.Time) {
		t.Errorf("Get = %+v, want %+v", got, m1)
	}
	rc, err := s.Open(m1.ID)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(rc)
	rc.Close()
	if string(raw) != heldMsg {
		t.Errorf("Open = %q", raw)
	}
	head, err := s.Header(m1.ID)
	if err != nil {
		t.Fatal(err)
	}
	if want := heldMsg[:strings.Index(heldMsg, "\n\n")+2]; string(head) != want {
		t.Errorf("Header = %q, want %q", head, want)
	}
	fi, err := os.Stat(s.path(m1.ID))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("file %v %v", fi, err)
	}
}

func TestHoldReleaseToQmailQueue(t *testing.T) {
	bin := fakeqq.Build(t)
	s, _, _ := newTestSpool(t)
	m, err := s.Put(HeldMeta{From: "", To: []string{"x@y", "z@w"}}, strings.NewReader(heldMsg))
	if err != nil {
		t.Fatal(err)
	}

	// A failing hand-off keeps the message.
	failing, failDir := fakeQueue(t, bin, "FAKEQQ_EXIT=71")
	_, err = s.Release(context.Background(), m.ID, failing)
	wantError(t, err, 451, [3]int{4, 3, 0}, "mail server temporarily rejected message (#4.3.0)")
	if len(fakeqq.Calls(t, failDir)) != 1 {
		t.Fatal("the failing qmail-queue was not called")
	}
	if _, err := s.Get(m.ID); err != nil || s.Count() != 1 {
		t.Fatalf("message lost after a failed release: %v", err)
	}

	q, dir := fakeQueue(t, bin)
	r, err := s.Release(context.Background(), m.ID, q)
	if err != nil {
		t.Fatal(err)
	}
	if r.QP == 0 {
		t.Errorf("receipt %+v", r)
	}
	calls := fakeqq.Calls(t, dir)
	if len(calls) != 1 {
		t.Fatalf("%d calls", len(calls))
	}
	if string(calls[0].Message) != heldMsg || string(calls[0].Envelope) != "F\x00Tx@y\x00Tz@w\x00\x00" {
		t.Errorf("released %q with envelope %q", calls[0].Message, calls[0].Envelope)
	}
	if _, err := s.Get(m.ID); !errors.Is(err, ErrHeldNotFound) {
		t.Errorf("Get after release: %v", err)
	}
	if _, err := os.Stat(s.path(m.ID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("file left after release: %v", err)
	}
	if s.Count() != 0 {
		t.Errorf("Count = %d", s.Count())
	}
	if _, err := s.Release(context.Background(), m.ID, q); !errors.Is(err, ErrHeldNotFound) {
		t.Errorf("second release: %v", err)
	}
}

func TestHoldDelete(t *testing.T) {
	s, _, _ := newTestSpool(t)
	m, err := s.Put(HeldMeta{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(m.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.path(m.ID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("file left: %v", err)
	}
	if err := s.Delete(m.ID); !errors.Is(err, ErrHeldNotFound) {
		t.Errorf("second delete: %v", err)
	}
	if _, err := s.Open(m.ID); !errors.Is(err, ErrHeldNotFound) {
		t.Errorf("open deleted: %v", err)
	}
	if l, _ := s.List(); len(l) != 0 || s.Count() != 0 {
		t.Errorf("list %v count %d", l, s.Count())
	}
}

func TestHoldBadIDs(t *testing.T) {
	s, dir, _ := newTestSpool(t)
	secret := filepath.Join(dir, "secret")
	os.WriteFile(secret, []byte("x"), 0o600)
	for _, id := range []string{"", "../secret", "..", "/etc/passwd", "0000000000000000-0000000g", "0000000000000000/00000000",
		"0000000000000000-000000000", "00000000000000000000000000", "0000000000000000-0000000\x00", "0000000000000000-0000000A"} {
		if _, err := s.Get(id); !errors.Is(err, ErrHeldBadID) {
			t.Errorf("Get(%q) = %v", id, err)
		}
		if _, err := s.Open(id); !errors.Is(err, ErrHeldBadID) {
			t.Errorf("Open(%q) = %v", id, err)
		}
		if _, err := s.Header(id); !errors.Is(err, ErrHeldBadID) {
			t.Errorf("Header(%q) = %v", id, err)
		}
		if _, err := s.Release(context.Background(), id, &QmailQueue{Path: "/bin/false"}); !errors.Is(err, ErrHeldBadID) {
			t.Errorf("Release(%q) = %v", id, err)
		}
		if err := s.Delete(id); !errors.Is(err, ErrHeldBadID) {
			t.Errorf("Delete(%q) = %v", id, err)
		}
	}
	if _, err := os.Stat(secret); err != nil {
		t.Fatal("a file outside the spool was touched")
	}
	if _, err := s.Get("0000000000000000-00000000"); !errors.Is(err, ErrHeldNotFound) {
		t.Errorf("well-formed unknown id: %v", err)
	}
}

func TestHoldSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	dbPath := filepath.Join(dir, "relay.db")
	spoolDir := filepath.Join(dir, "hold")
	db := openTestDB(t, dbPath)
	s, err := OpenHold(spoolDir, db)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i := range 3 {
		m, err := s.Put(HeldMeta{From: "a@b", To: []string{"c@d"}}, strings.NewReader(fmt.Sprintf("Subject: %d\n\nx\n", i)))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	// A crash between the file and the commit leaves a file without meta.
	orphan := "0000000000000001-00000001"
	os.WriteFile(filepath.Join(spoolDir, orphan), []byte("x"), 0o600)
	os.WriteFile(filepath.Join(spoolDir, "README"), []byte("admin's note"), 0o600)
	db.Close()

	db = openTestDB(t, dbPath)
	defer db.Close()
	s, err = OpenHold(spoolDir, db)
	if err != nil {
		t.Fatal(err)
	}
	if s.Count() != 3 {
		t.Errorf("Count after restart = %d", s.Count())
	}
	list, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 || list[0].ID != ids[2] || list[2].ID != ids[0] || list[0].Subject != "2" {
		t.Fatalf("list after restart %+v", list)
	}
	if _, err := os.Stat(filepath.Join(spoolDir, orphan)); !errors.Is(err, os.ErrNotExist) {
		t.Error("orphan file left among the held messages")
	}
	if b, err := os.ReadFile(filepath.Join(spoolDir, OrphanDir, orphan)); err != nil || string(b) != "x" {
		t.Errorf("orphan file not kept in %s/: %v", OrphanDir, err)
	}
	if _, err := os.Stat(filepath.Join(spoolDir, "README")); err != nil {
		t.Error("a file that is not a spool file was removed")
	}
}

func TestHoldPutReaderFailure(t *testing.T) {
	s, _, _ := newTestSpool(t)
	_, err := s.Put(HeldMeta{From: "a@b", To: []string{"c@d"}}, &failingReader{data: []byte("Subject: x\n\npart")})
	if !errors.Is(err, errBadData) {
		t.Fatalf("error = %v", err)
	}
	if e, _ := os.ReadDir(s.dir); len(e) != 0 {
		t.Errorf("spool holds %d files after a failed put", len(e))
	}
	if l, _ := s.List(); len(l) != 0 || s.Count() != 0 {
		t.Errorf("list %v count %d", l, s.Count())
	}
}

func TestHoldPutCommitFailure(t *testing.T) {
	s, dir, db := newTestSpool(t)
	ro := openTestDB(t, filepath.Join(dir, "other.db"))
	ro.Close()
	s.db = ro // closed: the commit fails
	_, err := s.Put(HeldMeta{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
	if err == nil {
		t.Fatal("Put succeeded without its metadata")
	}
	s.db = db
	if e, _ := os.ReadDir(s.dir); len(e) != 0 {
		t.Errorf("spool holds %d files after a failed commit", len(e))
	}
}

// blockingHandoff blocks until released, to hold a Release in flight.
type blockingHandoff struct{ started, release chan struct{} }

func (b blockingHandoff) Deliver(ctx context.Context, env Envelope, msg io.Reader) (Receipt, error) {
	close(b.started)
	<-b.release
	return Receipt{Reply: "ok"}, nil
}

func TestHoldReleaseIsExclusive(t *testing.T) {
	s, _, _ := newTestSpool(t)
	m, err := s.Put(HeldMeta{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
	if err != nil {
		t.Fatal(err)
	}
	h := blockingHandoff{started: make(chan struct{}), release: make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		_, err := s.Release(context.Background(), m.ID, h)
		done <- err
	}()
	<-h.started
	if err := s.Delete(m.ID); !errors.Is(err, ErrHeldBusy) {
		t.Errorf("Delete during release: %v", err)
	}
	if _, err := s.Release(context.Background(), m.ID, h); !errors.Is(err, ErrHeldBusy) {
		t.Errorf("second Release during release: %v", err)
	}
	close(h.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if s.Count() != 0 {
		t.Errorf("Count = %d", s.Count())
	}
}

func TestParseSubject(t *testing.T) {
	cases := map[string]string{
		"Subject: hello\n\nSubject: body\n":           "hello",
		"From: a\nsubject:   spaced  \nTo: b\n\n":     "spaced",
		"Subject: folded\n line\n\tthree\nX: y\n\n":   "folded line three",
		"Subject: =?ISO-8859-1?Q?caf=E9?=\r\n\r\n":    "café",
		"Subject: =?x-unknown?Q?raw?=\n\n":            "=?x-unknown?Q?raw?=",
		"From: a\n\nSubject: in body\n":               "",
		"Subject: ctl\x01chars\x7f\n\n":               "ctl chars",
		"X-Subject: no\nSubject : obsolete space\n\n": "obsolete space",
		"Subject: first\nSubject: second\n\n":         "first",
		"Subject: bad utf8 \xff\n\n":                  "bad utf8 \uFFFD",
		"":                                            "",
		"Subject: no end of header":                   "no end of header",
	}
	for in, want := range cases {
		if got := parseSubject([]byte(in)); got != want {
			t.Errorf("parseSubject(%q) = %q, want %q", in, got, want)
		}
	}
	long := "Subject: " + strings.Repeat("é", 1000) + "\n\n"
	if got := parseSubject([]byte(long)); len(got) > maxSubject || !strings.HasPrefix(got, "éé") || strings.ContainsRune(got, '\uFFFD') {
		t.Errorf("long subject cut badly: %d bytes", len(got))
	}
}

func FuzzParseSubject(f *testing.F) {
	f.Add([]byte(heldMsg))
	f.Add([]byte("Subject: =?UTF-8?Q?a?=\n b\n\n"))
	f.Add([]byte("\n\n"))
	f.Fuzz(func(t *testing.T, header []byte) {
		s := parseSubject(header)
		if len(s) > maxSubject {
			t.Fatalf("subject of %d bytes", len(s))
		}
		if strings.ContainsAny(s, "\r\n\x00") {
			t.Fatalf("subject %q has control characters", s)
		}
	})
}

func FuzzValidHeldID(f *testing.F) {
	f.Add("0000000000000000-00000000")
	f.Add("../x")
	f.Fuzz(func(t *testing.T, id string) {
		if validHeldID(id) && (strings.ContainsAny(id, "/.\x00") || filepath.Base(id) != id) {
			t.Fatalf("unsafe id %q accepted", id)
		}
	})
}

// recordingHandoff takes every message and counts them.
type recordingHandoff struct{ n int }

func (h *recordingHandoff) Deliver(ctx context.Context, env Envelope, msg io.Reader) (Receipt, error) {
	if _, err := io.Copy(io.Discard, msg); err != nil {
		return Receipt{}, err
	}
	h.n++
	return Receipt{Reply: "ok"}, nil
}

// TestReleaseWithCommit: the record's removal runs in the caller's
// transaction, after the file is gone; when that transaction fails the
// message is reported handed off but not removed (never handed off
// again), and Delete removes the record.
func TestReleaseWithCommit(t *testing.T) {
	s, _, db := newTestSpool(t)
	m, err := s.Put(HeldMeta{From: "a@b", To: []string{"c@d"}, Queue: "sender:a@b"}, strings.NewReader(heldMsg))
	if err != nil {
		t.Fatal(err)
	}
	h := &recordingHandoff{}
	var fileGone bool
	_, err = s.ReleaseWith(context.Background(), m.ID, h, func(remove func(*bolt.Tx) error) error {
		_, statErr := os.Stat(s.path(m.ID))
		fileGone = errors.Is(statErr, os.ErrNotExist)
		return errors.New("disk full")
	})
	if !errors.Is(err, ErrNotRemoved) || !fileGone || h.n != 1 {
		t.Fatalf("err %v, file gone before the commit %v, hand-offs %d", err, fileGone, h.n)
	}
	if _, err := s.Release(context.Background(), m.ID, h); !errors.Is(err, ErrHeldNotFound) || h.n != 1 {
		t.Fatalf("a second release of a handed-off message: %v, hand-offs %d", err, h.n)
	}
	if err := s.Delete(m.ID); err != nil || s.Count() != 0 {
		t.Fatalf("Delete: %v, count %d", err, s.Count())
	}

	m, err = s.Put(HeldMeta{From: "a@b", To: []string{"c@d"}, Queue: "sender:a@b"}, strings.NewReader(heldMsg))
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.ReleaseWith(context.Background(), m.ID, h, func(remove func(*bolt.Tx) error) error {
		return db.Update(func(btx *bolt.Tx) error {
			if err := remove(btx); err != nil {
				return err
			}
			return btx.Bucket(holdBucket).Put([]byte("marker"), []byte("x"))
		})
	})
	if err != nil || s.Count() != 0 {
		t.Fatalf("release: %v, count %d", err, s.Count())
	}
	if l, _ := s.List(); len(l) != 0 {
		t.Fatalf("still listed: %+v", l)
	}
}

// TestHoldDropsReleasedRecords: a crash after a release unlinked the
// message file but before the record went leaves a record without its
// file; OpenHold drops it (it was handed off) and says so.
func TestHoldDropsReleasedRecords(t *testing.T) {
	dir := t.TempDir()
	dbPath := filepath.Join(dir, "relay.db")
	db := openTestDB(t, dbPath)
	s, err := OpenHold(filepath.Join(dir, "hold"), db)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for range 3 {
		m, err := s.Put(HeldMeta{From: "a@b", To: []string{"c@d"}, Queue: "sender:a@b"}, strings.NewReader(heldMsg))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	os.Remove(s.path(ids[1])) // what a release does first
	db.Close()
	db = openTestDB(t, dbPath)
	defer db.Close()
	s, err = OpenHold(filepath.Join(dir, "hold"), db)
	if err != nil {
		t.Fatal(err)
	}
	l, _ := s.List()
	if len(l) != 2 || s.Count() != 2 || len(s.Released) != 1 || s.Released[0] != ids[1] {
		t.Fatalf("after restart: list %d, count %d, released %v", len(l), s.Count(), s.Released)
	}
	for _, m := range l {
		if m.Queue != "sender:a@b" {
			t.Errorf("queue mark lost: %+v", m)
		}
	}
}
