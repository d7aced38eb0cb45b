package inspect

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
)

// lifecycle takes one message through qmail's whole life, step by step, the
// way qmail-queue and qmail-send change the files (docs/qmail.md §4), writing
// files in pieces so a reader can see them half-written.
func lifecycle(dir string, k int) error {
	name := func(sub string, id uint64, split bool) string {
		if !split {
			return filepath.Join(dir, sub, strconv.FormatUint(id, 10))
		}
		return filepath.Join(dir, sub, strconv.FormatUint(id%qmailSplit, 10), strconv.FormatUint(id, 10))
	}
	writeInPieces := func(path, data string) error {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o640)
		if err != nil {
			return err
		}
		half := len(data) / 2
		if _, err := f.WriteString(data[:half]); err != nil {
			f.Close()
			return err
		}
		if _, err := f.WriteString(data[half:]); err != nil {
			f.Close()
			return err
		}
		return f.Close()
	}
	sender := "u" + strconv.Itoa(k) + "@example.com"
	// qmail-queue: pid file, linked as mess, message written after the link.
	tmp := filepath.Join(dir, "pid", "q."+strconv.Itoa(k))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return err
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return err
	}
	id := st.Ino
	if err := os.Link(tmp, name("mess", id, true)); err != nil {
		f.Close()
		return err
	}
	if err := os.Remove(tmp); err != nil {
		f.Close()
		return err
	}
	mess := messFile([]string{"Received: (qmail " + strconv.Itoa(k) + " invoked by uid " + strconv.Itoa(k) + "); " + date})
	for i := 0; i < len(mess); i += 16 {
		if _, err := f.WriteString(mess[i:min(i+16, len(mess))]); err != nil {
			f.Close()
			return err
		}
	}
	f.Close()
	env := "u" + strconv.Itoa(k) + "\x00p1\x00F" + sender + "\x00Ta@x.test\x00Tb@x.test\x00Tc@x.test\x00"
	if err := writeInPieces(name("intd", id, false), env); err != nil {
		return err
	}
	if err := os.Link(name("intd", id, false), name("todo", id, false)); err != nil {
		return err
	}
	// qmail-send: preprocess, then drop todo and intd.
	if err := writeInPieces(name("info", id, true), "F"+sender+"\x00"); err != nil {
		return err
	}
	if err := writeInPieces(name("remote", id, true), "Ta@x.test\x00Tb@x.test\x00Tc@x.test\x00"); err != nil {
		return err
	}
	if err := os.Remove(name("todo", id, false)); err != nil {
		return err
	}
	if err := os.Remove(name("intd", id, false)); err != nil {
		return err
	}
	// Deliveries mark recipients done in place.
	rf, err := os.OpenFile(name("remote", id, true), os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	for _, off := range []int64{0, 10, 20} {
		if _, err := rf.WriteAt([]byte("D"), off); err != nil {
			rf.Close()
			return err
		}
	}
	rf.Close()
	// Done: remote, info, then mess go.
	for _, p := range []string{name("remote", id, true), name("info", id, true), name("mess", id, true)} {
		if err := os.Remove(p); err != nil {
			return err
		}
	}
	return nil
}

// TestQueueChangingUnderReader reads the queue over and over while messages
// go through their whole life in it. No read may fail, and every message
// returned must be internally consistent.
func TestQueueChangingUnderReader(t *testing.T) {
	dir := newQueue(t)
	const writers, perWriter = 2, 150
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	done := make(chan struct{})
	for w := range writers {
		wg.Go(func() {
			for i := range perWriter {
				if err := lifecycle(dir, 1000+w*perWriter+i); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	go func() { wg.Wait(); close(done) }()

	r := &Reader{Dir: dir, Recipients: true}
	reads, seen := 0, 0
	for running := true; running; reads++ {
		select {
		case <-done:
			running = false
		default:
		}
		msgs, st, err := r.Read(context.Background(), nil)
		if err != nil {
			t.Fatalf("read %d: %v", reads, err)
		}
		if st.Failed != 0 {
			t.Fatalf("read %d: %d failed: %v", reads, st.Failed, st.Err)
		}
		for _, m := range msgs {
			seen++
			if m.Origin.UID == nil || m.Sender != "u"+strconv.Itoa(*m.Origin.UID)+"@example.com" {
				t.Errorf("message %d: sender %q does not match origin %+v", m.ID, m.Sender, m.Origin)
			}
			if n := m.Left + m.Done; n != 3 && !(m.Preprocessed && n == 0) {
				t.Errorf("message %d: %d recipients, want 3 (or 0 once done): %+v", m.ID, n, m)
			}
			if !m.Preprocessed && m.Left != 3 {
				t.Errorf("message %d: todo with %d left", m.ID, m.Left)
			}
		}
	}
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%d reads saw %d messages in flight", reads, seen)
	msgs, _, err := r.Read(context.Background(), nil)
	if err != nil || len(msgs) != 0 {
		t.Errorf("after the run: %d messages, err %v", len(msgs), err)
	}
}

// TestHalfWrittenAndVanished covers single states directly: a recipients
// file with its last record still being written, and a message whose
// mess file went away after its envelope was read.
func TestHalfWrittenAndVanished(t *testing.T) {
	dir := newQueue(t)
	id := addMessage(t, dir, fixtureMsg{mess: messFile([]string{localQQLine}), info: "a@b.test", queued: t1})
	split := strconv.FormatUint(id%qmailSplit, 10)
	writeFile(t, filepath.Join(dir, "remote", split, strconv.FormatUint(id, 10)), "Tone@x.test\x00Dtwo@x.test\x00Tthr")
	gone := addMessage(t, dir, fixtureMsg{mess: messFile([]string{localQQLine}), info: "c@d.test", queued: t1})
	if err := os.Remove(filepath.Join(dir, "mess", strconv.FormatUint(gone%qmailSplit, 10), strconv.FormatUint(gone, 10))); err != nil {
		t.Fatal(err)
	}
	// A mess file whose name is not a number is not qmail's; ignored.
	writeFile(t, filepath.Join(dir, "mess", "0", "junk"), "x")

	msgs, st, err := (&Reader{Dir: dir}).Read(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 1 || msgs[0].ID != id || msgs[0].Left != 1 || msgs[0].Done != 1 {
		t.Errorf("got %+v", msgs)
	}
	if st.Listed != 1 || st.Failed != 0 {
		t.Errorf("stats %+v", st)
	}

	if os.Geteuid() != 0 {
		// As root nothing is unreadable; elsewhere, an unreadable file is
		// a failure, not a vanished message.
		p := filepath.Join(dir, "info", split, strconv.FormatUint(id, 10))
		if err := os.Chmod(p, 0); err != nil {
			t.Fatal(err)
		}
		_, st, err := (&Reader{Dir: dir}).Read(context.Background(), nil)
		if err != nil || st.Failed != 1 || !errors.Is(st.Err, os.ErrPermission) {
			t.Errorf("unreadable info: stats %+v, err %v", st, err)
		}
	}
}
