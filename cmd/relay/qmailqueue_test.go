package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"relay/queue/inspect"
)

// A small qmail queue, laid out as qmail's install and qmail-queue make it
// (copied in short from queue/inspect's fixture).

const qmailSplit = 23 // conf-split of a stock qmail build

func newQmailQueue(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, sub := range []string{"pid", "intd", "todo", "bounce", "lock"} {
		mkdirAll(t, filepath.Join(dir, sub))
	}
	for _, sub := range []string{"mess", "info", "local", "remote"} {
		for s := range qmailSplit {
			mkdirAll(t, filepath.Join(dir, sub, strconv.Itoa(s)))
		}
	}
	return dir
}

func mkdirAll(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
}

func writeTestFile(t *testing.T, name, data string) {
	t.Helper()
	if err := os.WriteFile(name, []byte(data), 0o640); err != nil {
		t.Fatal(err)
	}
}

// addQueued writes a preprocessed message: mess named by its inode, info
// with the sender (mtime = queued), remote recipients ("T..." to do, "D..."
// done). It returns the message id.
func addQueued(t *testing.T, dir, mess, sender string, remote []string, queued time.Time) uint64 {
	t.Helper()
	tmp := filepath.Join(dir, "pid", strconv.Itoa(os.Getpid()))
	writeTestFile(t, tmp, mess)
	fi, err := os.Stat(tmp)
	if err != nil {
		t.Fatal(err)
	}
	id := fi.Sys().(*syscall.Stat_t).Ino
	name, split := strconv.FormatUint(id, 10), strconv.FormatUint(id%qmailSplit, 10)
	if err := os.Rename(tmp, filepath.Join(dir, "mess", split, name)); err != nil {
		t.Fatal(err)
	}
	info := filepath.Join(dir, "info", split, name)
	writeTestFile(t, info, "F"+sender+"\x00")
	writeTestFile(t, filepath.Join(dir, "remote", split, name), strings.Join(remote, "\x00")+"\x00")
	if err := os.Chtimes(info, queued, queued); err != nil {
		t.Fatal(err)
	}
	return id
}

const queueDate = "28 Nov 2026 02:41:53 -0000"

type queueFixture struct {
	dir, passwd string
	php, auth   uint64
}

func buildQueueFixture(t *testing.T) queueFixture {
	t.Helper()
	f := queueFixture{dir: newQmailQueue(t), passwd: filepath.Join(t.TempDir(), "passwd")}
	writeTestFile(t, f.passwd, "root:x:0:0:root:/root:/bin/sh\nalice:x:1001:1001::/home/alice:/bin/sh\n")
	t1 := time.Date(2026, 11, 28, 2, 41, 53, 0, time.UTC)
	// A PHP script of uid 1001: qmail-inject's line, one delivery done.
	f.php = addQueued(t, f.dir,
		"Received: (qmail 4242 invoked by uid 1001); "+queueDate+"\nX-PHP-Originating-Script: 1001:contact.php\nSubject: win\n\nbody\n",
		"www@shop.example", []string{"Tr1@example.net", "Dr2@example.net", "Tr3@example.org"}, t1.Add(time.Minute))
	// bob authenticated over SMTP: relay's Received line and X-Sender-Id.
	f.auth = addQueued(t, f.dir,
		"Received: (qmail 5151 invoked from network); "+queueDate+"\nReceived: from unknown (HELO laptop) (bob@192.0.2.7)\n  by mail.example.test with ESMTPSA; "+queueDate+"\nX-Sender-Id: user:bob\nSubject: hi\n\nbody\n",
		"bob@example.com", []string{"Tx@example.net", "Ty@example.net"}, t1)
	return f
}

func runQQList(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := runQmailQueue(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestQmailQueueCommandList(t *testing.T) {
	f := buildQueueFixture(t)
	// --config is taken first, as by every subcommand, and not needed.
	code, out, errs := runQQList(t, "--config", "/nonexistent/relay.toml", "--queue", f.dir, "--passwd", f.passwd)
	if code != 0 || errs != "" {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "ID ") {
		t.Fatalf("table:\n%s", out)
	}
	// Oldest first: bob's message was queued a minute before the script's.
	for i, want := range []struct {
		id    uint64
		parts []string
	}{
		{f.auth, []string{"2026-11-28 02:41:53", "<bob@example.com>", "network 192.0.2.7 helo=laptop user=bob", "user:bob"}},
		{f.php, []string{"2026-11-28 02:42:53", "<www@shop.example>", "uid 1001 (alice)", "1001:contact.php"}},
	} {
		line := lines[i+1]
		if !strings.HasPrefix(line, strconv.FormatUint(want.id, 10)+" ") {
			t.Errorf("line %d %q, want message %d", i+1, line, want.id)
		}
		for _, p := range want.parts {
			if !strings.Contains(line, p) {
				t.Errorf("line %q lacks %q", line, p)
			}
		}
	}

	code, out, _ = runQQList(t, "--queue", f.dir, "--passwd", f.passwd, "--json")
	var msgs []inspect.Message
	if err := json.Unmarshal([]byte(out), &msgs); code != 0 || err != nil || len(msgs) != 2 {
		t.Fatalf("--json: %d %v\n%s", code, err, out)
	}
	if m := msgs[1]; m.ID != f.php || m.Left != 2 || m.Done != 1 || len(m.Recipients) != 3 || m.Origin.Account != "alice" {
		t.Errorf("--json message: %+v", m)
	}
}

func TestQmailQueueCommandFilters(t *testing.T) {
	f := buildQueueFixture(t)
	only := func(args ...string) []uint64 {
		t.Helper()
		code, out, errs := runQQList(t, append([]string{"--queue", f.dir, "--passwd", f.passwd, "--json"}, args...)...)
		var msgs []inspect.Message
		if err := json.Unmarshal([]byte(out), &msgs); code != 0 || err != nil {
			t.Fatalf("%v: %d %v %s", args, code, err, errs)
		}
		var ids []uint64
		for _, m := range msgs {
			ids = append(ids, m.ID)
		}
		return ids
	}
	for _, c := range []struct {
		args []string
		want []uint64
	}{
		{[]string{"--uid", "1001"}, []uint64{f.php}},
		{[]string{"--uid", "1002"}, nil},
		{[]string{"--from", "@example.com"}, []uint64{f.auth}},
		{[]string{"--from", "www@shop.example"}, []uint64{f.php}},
		{[]string{"--ip", "192.0.2.0/24"}, []uint64{f.auth}},
		{[]string{"--ip", "198.51.100.1"}, nil},
	} {
		if got := only(c.args...); !slices.Equal(got, c.want) {
			t.Errorf("%v: %v, want %v", c.args, got, c.want)
		}
	}

	code, out, _ := runQQList(t, "--queue", f.dir, "--passwd", f.passwd, "--top", "5")
	if code != 0 || !strings.HasPrefix(out, "ORIGIN") || !strings.Contains(out, "uid:1001") || !strings.Contains(out, "alice") ||
		!strings.Contains(out, "SENDER") || !strings.Contains(out, "bob@example.com") {
		t.Errorf("--top:\n%s", out)
	}
	code, out, _ = runQQList(t, "--queue", f.dir, "--passwd", f.passwd, "--top", "1", "--json")
	var top inspect.Top
	if err := json.Unmarshal([]byte(out), &top); code != 0 || err != nil || len(top.ByOrigin) != 1 || len(top.BySender) != 1 {
		t.Errorf("--top 1 --json: %d %v %s", code, err, out)
	}

	code, out, _ = runQQList(t, "--queue", f.dir, "--received", strconv.FormatUint(f.auth, 10))
	want := "Received: (qmail 5151 invoked from network); " + queueDate + "\nReceived: from unknown (HELO laptop) (bob@192.0.2.7)\n  by mail.example.test with ESMTPSA; " + queueDate + "\n"
	if code != 0 || out != want {
		t.Errorf("--received: %d\n%q\nwant\n%q", code, out, want)
	}
}

func TestQmailQueueCommandErrors(t *testing.T) {
	f := buildQueueFixture(t)
	for _, c := range []struct {
		args []string
		code int
		err  string
	}{
		{[]string{"--queue", f.dir, "--uid", "alice"}, 64, "not a uid"},
		{[]string{"--queue", f.dir, "--ip", "mail.example.com"}, 64, ""},
		{[]string{"--queue", f.dir, "extra"}, 64, `unexpected argument "extra"`},
		{[]string{"--bogus"}, 64, "usage: relay qmail-queue"},
		{[]string{"--queue", t.TempDir()}, 1, "relay qmail-queue: "},
		{[]string{"--queue", f.dir, "--received", "12345678901"}, 1, "not in the queue"},
	} {
		code, out, errs := runQQList(t, c.args...)
		if code != c.code || !strings.Contains(errs, c.err) {
			t.Errorf("%v: exit %d stderr %q, want %d and %q", c.args, code, errs, c.code, c.err)
		}
		if code != 0 && out != "" {
			t.Errorf("%v: failed but printed %q", c.args, out)
		}
	}
	// No passwd file: still lists, names missing, and says why.
	code, out, errs := runQQList(t, "--queue", f.dir, "--passwd", filepath.Join(t.TempDir(), "none"))
	if code != 0 || !strings.Contains(errs, "account names not shown") || !strings.Contains(out, "uid 1001") || strings.Contains(out, "alice") {
		t.Errorf("without passwd: %d %q\n%s", code, errs, out)
	}
}
