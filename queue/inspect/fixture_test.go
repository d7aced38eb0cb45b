package inspect

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// qmailSplit is conf-split of a stock qmail build.
const qmailSplit = 23

// newQueue makes an empty queue directory laid out as qmail's install does.
func newQueue(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	for _, sub := range []string{"pid", "intd", "todo", "bounce", "lock"} {
		mustMkdir(t, filepath.Join(dir, sub))
	}
	for _, sub := range []string{"mess", "info", "local", "remote"} {
		for s := range qmailSplit {
			mustMkdir(t, filepath.Join(dir, sub, strconv.Itoa(s)))
		}
	}
	return dir
}

func mustMkdir(t testing.TB, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
}

// fixtureMsg is one message to put in a fixture queue.
type fixtureMsg struct {
	mess   string   // the whole mess file
	todo   string   // todo contents; "" for none
	info   string   // sender for info/; used only when preprocessed
	local  []string // "T<addr>" or "D<addr>"
	remote []string
	queued time.Time // info mtime; zero: not preprocessed (todo only)
	bounce bool
}

// addMessage writes m the way qmail-queue and qmail-send do: the message goes
// to pid/ first, is hard-linked as mess/<ino%23>/<ino> and the pid file is
// removed; every other file is named after that inode. It returns the id.
func addMessage(t testing.TB, dir string, m fixtureMsg) uint64 {
	t.Helper()
	tmp := filepath.Join(dir, "pid", strconv.Itoa(os.Getpid())+"."+strconv.FormatInt(time.Now().UnixNano(), 10))
	writeFile(t, tmp, m.mess)
	fi, err := os.Stat(tmp)
	if err != nil {
		t.Fatal(err)
	}
	id := fi.Sys().(*syscall.Stat_t).Ino
	name := strconv.FormatUint(id, 10)
	split := strconv.FormatUint(id%qmailSplit, 10)
	if err := os.Link(tmp, filepath.Join(dir, "mess", split, name)); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(tmp); err != nil {
		t.Fatal(err)
	}
	if m.todo != "" {
		writeFile(t, filepath.Join(dir, "todo", name), m.todo)
	}
	if !m.queued.IsZero() {
		info := filepath.Join(dir, "info", split, name)
		writeFile(t, info, "F"+m.info+"\x00")
		if len(m.local) > 0 {
			writeFile(t, filepath.Join(dir, "local", split, name), nulRecords(m.local))
		}
		if len(m.remote) > 0 {
			writeFile(t, filepath.Join(dir, "remote", split, name), nulRecords(m.remote))
		}
		if err := os.Chtimes(info, m.queued, m.queued); err != nil {
			t.Fatal(err)
		}
	}
	if m.bounce {
		writeFile(t, filepath.Join(dir, "bounce", name), "<x@example.net>:\nno mailbox\n\n")
	}
	return id
}

func nulRecords(recs []string) string {
	return strings.Join(recs, "\x00") + "\x00"
}

func writeFile(t testing.TB, name, data string) {
	t.Helper()
	if err := os.WriteFile(name, []byte(data), 0o640); err != nil {
		t.Fatal(err)
	}
}

// messFile builds a mess file: the given Received lines on top, then a small
// header and body.
func messFile(received []string, extra ...string) string {
	var b strings.Builder
	for _, r := range received {
		b.WriteString(r + "\n")
	}
	for _, e := range extra {
		b.WriteString(e + "\n")
	}
	b.WriteString("From: a@example.com\nSubject: hi\n\nbody line\n")
	return b.String()
}

const (
	date        = "28 Nov 2026 02:41:53 -0000"
	smtpdLocal  = "mail.example.test"
	localQQLine = "Received: (qmail 4242 invoked by uid 1001); " + date
)

func networkLines(qp int, from string, proto string) []string {
	return []string{
		"Received: (qmail " + strconv.Itoa(qp) + " invoked from network); " + date,
		"Received: from " + from + "\n  by " + smtpdLocal + " with " + proto + "; " + date,
	}
}
