package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"relay/internal/qmailtest"
)

// directDaemon is relay serve started as root with method qmail-direct,
// writing into the real qmail's queue.
type directDaemon struct {
	t      *testing.T
	q      *qmailtest.Qmail
	dir    string
	config string
	smtp   string
	cmd    *exec.Cmd
	logMu  sync.Mutex
	log    bytes.Buffer
	exited chan struct{}
}

func startDirect(t *testing.T, q *qmailtest.Qmail) *directDaemon {
	t.Helper()
	// The daemon runs as qmaild: its config must be reachable by it.
	dir, err := os.MkdirTemp("", "relay-e2e-direct-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &directDaemon{t: t, q: q, dir: dir, config: filepath.Join(dir, "relay.toml")}
	d.start()
	return d
}

func (d *directDaemon) start() {
	d.t.Helper()
	d.smtp = freePort(d.t)
	cfg := fmt.Sprintf(`hostname = "relay.example.test"
data_dir = %q

[[listen]]
addr = %q
mode = "smtp"

[relay]
local_domains = [%q]
relay_networks = ["127.0.0.0/8"]
timeout = "30s"
# The load comes from one address, a connection per message: no rate.
conn_rate_per_ip = ""

[delivery]
method = "qmail-direct"
queue_dir = %q
timeout = "10s"

[admin]
listen = %q

[policy.limits]
`, filepath.Join(d.dir, "data"), d.smtp, d.q.Me, d.q.Queue, freePort(d.t))
	if err := os.WriteFile(d.config, []byte(cfg), 0o644); err != nil {
		d.t.Fatal(err)
	}
	d.logMu.Lock()
	d.log.Reset()
	d.logMu.Unlock()
	d.exited = make(chan struct{})
	d.cmd = exec.Command(bins.relay, "serve", "--config", d.config, "--grace", "10s")
	w := lockedWriter{&d.logMu, &d.log}
	d.cmd.Stdout, d.cmd.Stderr = w, w
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	go func(c *exec.Cmd, done chan struct{}) { c.Wait(); close(done) }(d.cmd, d.exited)
	d.t.Cleanup(d.stop)
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(d.logs(), "relay started") || !strings.Contains(d.logs(), "queue writer started") {
		select {
		case <-d.exited:
			d.t.Fatalf("relay exited at start:\n%s", d.logs())
		default:
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("relay did not come up:\n%s", d.logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (d *directDaemon) logs() string {
	d.logMu.Lock()
	defer d.logMu.Unlock()
	return d.log.String()
}

func (d *directDaemon) stop() {
	select {
	case <-d.exited:
	default:
		d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.exited:
		case <-time.After(30 * time.Second):
			d.cmd.Process.Kill()
			<-d.exited
		}
	}
	if d.t.Failed() {
		d.t.Logf("relay log:\n%s", d.logs())
	}
}

// proc is a process as /proc shows it.
type proc struct {
	pid, ppid int
	uid, gid  int
	groups    []int
	cmdline   string
}

func readProc(pid int) (proc, bool) {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return proc{}, false
	}
	cl, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	p := proc{pid: pid, cmdline: strings.ReplaceAll(strings.TrimRight(string(cl), "\x00"), "\x00", " ")}
	for line := range strings.Lines(string(st)) {
		k, v, _ := strings.Cut(strings.TrimSpace(line), ":")
		f := strings.Fields(v)
		switch k {
		case "PPid":
			p.ppid, _ = strconv.Atoi(f[0])
		case "Uid":
			p.uid, _ = strconv.Atoi(f[0])
		case "Gid":
			p.gid, _ = strconv.Atoi(f[0])
		case "Groups":
			for _, g := range f {
				n, _ := strconv.Atoi(g)
				p.groups = append(p.groups, n)
			}
		}
	}
	return p, true
}

// children lists the live children of pid whose command line has sub.
func children(pid int, sub string) []proc {
	ents, _ := os.ReadDir("/proc")
	var out []proc
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if p, ok := readProc(n); ok && p.ppid == pid && strings.Contains(p.cmdline, sub) {
			out = append(out, p)
		}
	}
	return out
}

// waitChildren waits up to 15 s for cond to hold of pid's children with sub.
func waitChildren(t *testing.T, pid int, sub string, cond func([]proc) bool) []proc {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		c := children(pid, sub)
		if cond(c) {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("children of %d with %q: %+v", pid, sub, c)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func lookupID(t *testing.T, name string) (uid, gid int) {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid
}

// smtpClient is a plain SMTP client that reports instead of failing the
// test, for load from many goroutines.
type smtpClient struct {
	c net.Conn
	r *bufio.Reader
}

func dialClient(addr string) (*smtpClient, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(60 * time.Second))
	s := &smtpClient{c: c, r: bufio.NewReader(c)}
	if r, err := s.reply(); err != nil || !strings.HasPrefix(r, "220") {
		c.Close()
		return nil, fmt.Errorf("greeting %q: %v", r, err)
	}
	if r, err := s.cmd("EHLO loadtest"); err != nil || !strings.HasPrefix(r, "250") {
		c.Close()
		return nil, fmt.Errorf("EHLO %q: %v", r, err)
	}
	return s, nil
}

func (s *smtpClient) reply() (string, error) {
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			return line, err
		}
		line = strings.TrimRight(line, "\r\n")
		if len(line) < 4 || line[3] != '-' {
			return line, nil
		}
	}
}

func (s *smtpClient) cmd(line string) (string, error) {
	if _, err := fmt.Fprintf(s.c, "%s\r\n", line); err != nil {
		return "", err
	}
	return s.reply()
}

// send runs one transaction; wire is the DATA content, CRLF and
// dot-stuffed, without the final dot.
func (s *smtpClient) send(from, to, wire string) (string, error) {
	for _, c := range []string{"MAIL FROM:<" + from + ">", "RCPT TO:<" + to + ">", "DATA"} {
		r, err := s.cmd(c)
		if err != nil {
			return r, err
		}
		if !strings.HasPrefix(r, "250") && !strings.HasPrefix(r, "354") {
			return r, nil
		}
	}
	if _, err := fmt.Fprintf(s.c, "%s.\r\n", wire); err != nil {
		return "", err
	}
	return s.reply()
}

func (s *smtpClient) close() {
	s.cmd("QUIT")
	s.c.Close()
}

// testMessage is message k to mailbox to, as stored (LF, dot-unstuffed)
// and as sent.
func testMessage(k int, to string) (stored, wire string) {
	var b strings.Builder
	fmt.Fprintf(&b, "Subject: direct %d\nTo: <%s>\nX-Marker: m%d\n\n", k, to, k)
	b.WriteString(".a line that starts with a dot\n..two dots\ncaf\xc3\xa9 8-bit\n")
	b.WriteString(strings.Repeat(strconv.Itoa(k%10), 1200) + "\n")
	for i := range k % 7 {
		fmt.Fprintf(&b, "line %d of %d\n", i, k)
	}
	stored = b.String()
	var w strings.Builder
	for line := range strings.Lines(stored) {
		line = strings.TrimSuffix(line, "\n")
		if strings.HasPrefix(line, ".") {
			w.WriteString(".")
		}
		w.WriteString(line + "\r\n")
	}
	return stored, w.String()
}

var (
	qpReplyRE = regexp.MustCompile(`^250 ok \d+ qp (\d+)$`)
	markerRE  = regexp.MustCompile(`(?m)^X-Marker: m(\d+)$`)
	qqLineRE  = regexp.MustCompile(`^Received: \(qmail (\d+) invoked from network\); \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000\n`)
	smtpdRE   = regexp.MustCompile(`^Received: from unknown \(HELO loadtest\) \(127\.0\.0\.1\)\n  by relay\.example\.test with SMTP; \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000\n`)
)

// waitMarkers waits up to two minutes until every message of want (by its
// marker) is in box, and returns all that box holds then; checkDelivered
// says what is missing if some never come.
func waitMarkers(t *testing.T, q *qmailtest.Qmail, box *qmailtest.Mailbox, want map[int]int) [][]byte {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		msgs, err := box.Messages()
		if err != nil {
			t.Fatal(err)
		}
		got := map[int]bool{}
		for _, m := range msgs {
			if mk := markerRE.FindSubmatch(m); mk != nil {
				k, _ := strconv.Atoi(string(mk[1]))
				got[k] = true
			}
		}
		all := true
		for k := range want {
			all = all && got[k]
		}
		if all || time.Now().After(deadline) {
			return msgs
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkDelivered checks that every message of want (marker -> qp) is in
// msgs exactly once, byte for byte as sent behind qmail-queue's line with
// that qp and relay's own; other markers may appear once each.
func checkDelivered(t *testing.T, msgs [][]byte, want map[int]int, to string) {
	t.Helper()
	seen := map[int]int{}
	for _, raw := range msgs {
		m, err := qmailtest.StripDelivery(raw)
		if err != nil {
			t.Fatalf("%v: %q", err, raw)
		}
		mk := markerRE.FindSubmatch(m)
		if mk == nil {
			t.Fatalf("delivered message without marker: %q", m)
		}
		k, _ := strconv.Atoi(string(mk[1]))
		seen[k]++
		qq := qqLineRE.FindSubmatch(m)
		if qq == nil {
			t.Fatalf("m%d: no qmail-queue Received line first: %q", k, m)
		}
		rest := m[len(qq[0]):]
		loc := smtpdRE.FindIndex(rest)
		stored, _ := testMessage(k, to)
		if loc == nil || loc[0] != 0 || string(rest[loc[1]:]) != stored {
			t.Fatalf("m%d delivered as %q, want the Received lines and %q", k, m, stored)
		}
		if qp, ok := want[k]; ok && string(qq[1]) != strconv.Itoa(qp) {
			t.Errorf("m%d: qp %s in the queue, %d in the 250", k, qq[1], qp)
		}
	}
	for k, n := range seen {
		if n != 1 {
			t.Errorf("m%d delivered %d times", k, n)
		}
	}
	for k := range want {
		if seen[k] == 0 {
			t.Errorf("m%d was answered 250 and never delivered", k)
		}
	}
}

// TestQmailDirectDeliversThroughRealQmail: 200 messages over SMTP, in
// sessions of one and of many messages, reach a Maildir through the real
// qmail-send byte for byte and exactly once; qmail-send's log names each
// by the qp relay answered with; the processes run as the contract says.
func TestQmailDirectDeliversThroughRealQmail(t *testing.T) {
	q := qmailtest.Require(t)
	q.StartSend()
	box := q.Mailbox()
	d := startDirect(t, q)

	root := d.cmd.Process.Pid
	qmaildU, _ := lookupID(t, "qmaild")
	qmailqU, qmailG := lookupID(t, "qmailq")
	serve := waitChildren(t, root, " serve ", func(p []proc) bool { return len(p) == 1 })[0]
	writer := waitChildren(t, root, "queue-writer", func(p []proc) bool { return len(p) == 1 })[0]
	if serve.uid != qmaildU {
		t.Errorf("the SMTP daemon runs as uid %d, want qmaild's %d", serve.uid, qmaildU)
	}
	if writer.uid != qmailqU || writer.gid != qmailG || slices.Contains(writer.groups, 0) || len(writer.groups) > 1 {
		t.Errorf("writer %+v: want uid %d gid %d, no group 0", writer, qmailqU, qmailG)
	}

	const n, workers = 200, 8
	var next atomic.Int64
	var mu sync.Mutex
	qps := map[int]int{}
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			var c *smtpClient
			defer func() {
				if c != nil {
					c.close()
				}
			}()
			for {
				k := int(next.Add(1))
				if k > n {
					return
				}
				if c == nil {
					var err error
					if c, err = dialClient(d.smtp); err != nil {
						errs <- err
						return
					}
				}
				_, wire := testMessage(k, box.Addr)
				r, err := c.send("sender@example.test", box.Addr, wire)
				m := qpReplyRE.FindStringSubmatch(r)
				if err != nil || m == nil {
					errs <- fmt.Errorf("m%d: %q %v", k, r, err)
					return
				}
				qp, _ := strconv.Atoi(m[1])
				mu.Lock()
				qps[k] = qp
				mu.Unlock()
				if w%2 == 0 { // half the workers use a connection per message
					c.close()
					c = nil
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	checkDelivered(t, waitMarkers(t, q, box, qps), qps, box.Addr)
	seenQP := map[int]bool{}
	for _, qp := range qps {
		if seenQP[qp] {
			t.Errorf("qp %d answered twice", qp)
		}
		seenQP[qp] = true
	}
	// qmail-send's log joins on qp: "info msg N: bytes B from <s> qp P uid U".
	log := q.WaitLog(30*time.Second, func(log string) bool {
		for _, qp := range qps {
			if !strings.Contains(log, fmt.Sprintf(" qp %d uid %d\n", qp, qmaildU)) {
				return false
			}
		}
		return true
	})
	if c := strings.Count(log, "from <sender@example.test> qp "); c != n {
		t.Errorf("qmail-send logged %d of our messages, want %d", c, n)
	}
}

// queueFile is one file of a queued message.
type queueFile struct {
	data  []byte
	mode  os.FileMode
	uid   uint32
	gid   uint32
	ino   uint64
	nlink uint64
}

func readQueueFile(t *testing.T, path string) queueFile {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return queueFile{data: b, mode: os.FileMode(st.Mode & 0o7777), uid: st.Uid, gid: st.Gid, ino: st.Ino, nlink: uint64(st.Nlink)}
}

func todoIDs(t *testing.T, queue string) map[string]bool {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(queue, "todo"))
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	for _, e := range ents {
		ids[e.Name()] = true
	}
	return ids
}

// newTodo returns the one id in todo/ that was not in before.
func newTodo(t *testing.T, queue string, before map[string]bool) string {
	t.Helper()
	var ids []string
	for id := range todoIDs(t, queue) {
		if !before[id] {
			ids = append(ids, id)
		}
	}
	if len(ids) != 1 {
		t.Fatalf("new in todo/: %v, want one", ids)
	}
	before[ids[0]] = true
	return ids[0]
}

// messageFiles reads mess, intd and todo of message id.
func messageFiles(t *testing.T, queue, id string) (mess, intd, todo queueFile, messPath string) {
	t.Helper()
	n, _ := strconv.Atoi(id)
	matches, _ := filepath.Glob(filepath.Join(queue, "mess", "*", id))
	if len(matches) != 1 {
		t.Fatalf("mess files of %s: %v", id, matches)
	}
	ents, _ := os.ReadDir(filepath.Join(queue, "mess"))
	if want := filepath.Join(queue, "mess", strconv.Itoa(n%len(ents)), id); matches[0] != want {
		t.Errorf("mess file at %s, want %s (split %d)", matches[0], want, len(ents))
	}
	return readQueueFile(t, matches[0]), readQueueFile(t, filepath.Join(queue, "intd", id)), readQueueFile(t, filepath.Join(queue, "todo", id)), matches[0]
}

var (
	qqFirstLineRE = regexp.MustCompile(`^Received: \(qmail (\d+) invoked from network\); (\d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000)\n`)
	intdQPRE      = regexp.MustCompile(`\x00p(\d+)\x00`)
)

// TestQmailDirectMatchesRealQmailQueue queues one message through relay's
// writer and the same message (what relay handed on, and its envelope)
// through the real qmail-queue run as qmaild, as qmail-smtpd runs it, and
// compares the files: the same bytes but for the qp and the date, the
// same names, modes and owner. Then qmail-send delivers both.
func TestQmailDirectMatchesRealQmailQueue(t *testing.T) {
	q := qmailtest.Require(t)
	if q.SendRunning() {
		t.Skip("a qmail-send not started by qmailtest is running; this test needs the queue still")
	}
	box := q.Mailbox()
	d := startDirect(t, q)
	before := todoIDs(t, q.Queue)

	c, err := dialClient(d.smtp)
	if err != nil {
		t.Fatal(err)
	}
	_, wire := testMessage(42, box.Addr)
	r, err := c.send("sender@example.test", box.Addr, wire)
	c.close()
	m := qpReplyRE.FindStringSubmatch(r)
	if err != nil || m == nil {
		t.Fatalf("%q %v", r, err)
	}
	ours := newTodo(t, q.Queue, before)
	oMess, oIntd, oTodo, _ := messageFiles(t, q.Queue, ours)

	// The real qmail-queue, given what relay handed on.
	first := qqFirstLineRE.FindSubmatch(oMess.data)
	if first == nil {
		t.Fatalf("relay's mess file: %q", oMess.data)
	}
	if string(first[1]) != m[1] {
		t.Errorf("qp %s in the queue, %s in the reply", first[1], m[1])
	}
	handed := oMess.data[len(first[0]):]
	qmaildU, nofilesG := lookupID(t, "qmaild")
	qmailqU, qmailG := lookupID(t, "qmailq")
	envR, envW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	qq := exec.Command(filepath.Join(q.Home, "bin", "qmail-queue"))
	qq.Dir = q.Home
	qq.Stdin = bytes.NewReader(handed)
	qq.Stdout = envR
	qq.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(qmaildU), Gid: uint32(nofilesG)}}
	if err := qq.Start(); err != nil {
		t.Fatal(err)
	}
	envR.Close()
	envW.Write([]byte("Fsender@example.test\x00T" + box.Addr + "\x00\x00"))
	envW.Close()
	if err := qq.Wait(); err != nil {
		t.Fatalf("qmail-queue: %v", err)
	}
	real := newTodo(t, q.Queue, before)
	rMess, rIntd, rTodo, _ := messageFiles(t, q.Queue, real)

	rFirst := qqFirstLineRE.FindSubmatch(rMess.data)
	if rFirst == nil || !bytes.Equal(rMess.data[len(rFirst[0]):], handed) {
		t.Errorf("qmail-queue's mess file %q, relay's %q", rMess.data, oMess.data)
	}
	if rp := string(rFirst[1]); rp == "" || len(rp) >= len(first[1]) {
		t.Errorf("qp %s (qmail-queue) and %s (relay): relay's should be beyond any pid", rp, first[1])
	}
	norm := func(b []byte) string { return intdQPRE.ReplaceAllString(string(b), "\x00p<qp>\x00") }
	if norm(oIntd.data) != norm(rIntd.data) || norm(oTodo.data) != norm(rTodo.data) || !bytes.Equal(oIntd.data, oTodo.data) {
		t.Errorf("intd/todo: relay %q %q, qmail-queue %q %q", oIntd.data, oTodo.data, rIntd.data, rTodo.data)
	}
	if qp := intdQPRE.FindSubmatch(oTodo.data); qp == nil || string(qp[1]) != m[1] {
		t.Errorf("todo's p field %q, want the reply's qp %s", oTodo.data, m[1])
	}
	for _, f := range []struct {
		name       string
		ours, real queueFile
	}{{"mess", oMess, rMess}, {"intd", oIntd, rIntd}, {"todo", oTodo, rTodo}} {
		if f.ours.mode != f.real.mode || f.ours.mode != 0o644 || f.ours.uid != f.real.uid || f.ours.uid != uint32(qmailqU) || f.ours.nlink != f.real.nlink {
			t.Errorf("%s: relay's mode %v uid %d links %d; qmail-queue's mode %v uid %d links %d", f.name,
				f.ours.mode, f.ours.uid, f.ours.nlink, f.real.mode, f.real.uid, f.real.nlink)
		}
		// The group is the writer's (qmail), qmail-queue's the caller's (nofiles).
		if f.ours.gid != uint32(qmailG) {
			t.Errorf("%s: group %d, want qmail's %d", f.name, f.ours.gid, qmailG)
		}
	}
	if oTodo.ino != oIntd.ino || strconv.FormatUint(oMess.ino, 10) != ours {
		t.Errorf("relay's todo is not intd's link, or the id is not mess's inode")
	}
	if ents, _ := os.ReadDir(filepath.Join(q.Queue, "pid")); len(ents) != 0 {
		t.Errorf("pid/ holds %d files", len(ents))
	}
	// qmail-send takes both.
	q.StartSend()
	q.Wait(box, 2, 60*time.Second)
}

// waitExit waits up to 15 s for pid to be gone.
func waitExit(t *testing.T, pid int, what string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, ok := readProc(pid); !ok || strings.HasPrefix(procState(pid), "Z") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s (pid %d) did not exit by itself", what, pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func procState(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) {
		return string(b[i+2:])
	}
	return ""
}

// TestQmailDirectKillsLoseNo250 keeps SMTP load on relay while it kills,
// with SIGKILL, the queue writer (another takes its place within
// seconds), then the SMTP daemon, then the supervisor (the other
// processes exit by themselves), starting relay again after each. Every
// message answered 250 is delivered by the real qmail-send, exactly once.
func TestQmailDirectKillsLoseNo250(t *testing.T) {
	q := qmailtest.Require(t)
	q.StartSend()
	box := q.Mailbox()
	d := startDirect(t, q)
	var addr atomic.Value
	addr.Store(d.smtp)

	var mu sync.Mutex
	accepted := map[int]int{}
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(accepted) }
	var next atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 6 {
		wg.Go(func() {
			var c *smtpClient
			for {
				select {
				case <-stop:
					if c != nil {
						c.close()
					}
					return
				default:
				}
				if c == nil {
					var err error
					if c, err = dialClient(addr.Load().(string)); err != nil {
						time.Sleep(20 * time.Millisecond)
						continue
					}
				}
				k := int(next.Add(1))
				_, wire := testMessage(k, box.Addr)
				r, err := c.send("sender@example.test", box.Addr, wire)
				if m := qpReplyRE.FindStringSubmatch(r); m != nil {
					qp, _ := strconv.Atoi(m[1])
					mu.Lock()
					accepted[k] = qp
					mu.Unlock()
				}
				if err != nil || w%2 == 0 || !strings.HasPrefix(r, "250") {
					c.c.Close()
					c = nil
				}
			}
		})
	}
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}()
	waitCount := func(n int) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for count() < n {
			if time.Now().After(deadline) {
				t.Fatalf("only %d messages accepted, waited for %d:\n%s", count(), n, d.logs())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	restart := func() {
		t.Helper()
		d.start()
		addr.Store(d.smtp)
	}

	// 1. The writer, under load: another one takes over within seconds.
	waitCount(40)
	root := d.cmd.Process.Pid
	w1 := waitChildren(t, root, "queue-writer", func(p []proc) bool { return len(p) == 1 })[0]
	syscall.Kill(w1.pid, syscall.SIGKILL)
	waitChildren(t, root, "queue-writer", func(p []proc) bool { return len(p) == 1 && p[0].pid != w1.pid })
	waitCount(count() + 40)

	// 2. The SMTP daemon: the supervisor and the writer exit by themselves.
	serve := waitChildren(t, root, " serve ", func(p []proc) bool { return len(p) == 1 })[0]
	w2 := waitChildren(t, root, "queue-writer", func(p []proc) bool { return len(p) == 1 })[0]
	syscall.Kill(serve.pid, syscall.SIGKILL)
	waitExit(t, w2.pid, "the writer of a killed daemon")
	select {
	case <-d.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("the supervisor of a killed daemon did not exit")
	}
	restart()
	waitCount(count() + 40)

	// 3. The supervisor: the daemon and the writer exit by themselves.
	root = d.cmd.Process.Pid
	serve = waitChildren(t, root, " serve ", func(p []proc) bool { return len(p) == 1 })[0]
	w3 := waitChildren(t, root, "queue-writer", func(p []proc) bool { return len(p) == 1 })[0]
	d.cmd.Process.Kill()
	<-d.exited
	waitExit(t, w3.pid, "the writer of a killed supervisor")
	waitExit(t, serve.pid, "the daemon of a killed supervisor")
	restart()
	waitCount(count() + 40)
	close(stop)
	wg.Wait()

	mu.Lock()
	want := maps.Clone(accepted)
	mu.Unlock()
	msgs := waitMarkers(t, q, box, want)
	checkDelivered(t, msgs, want, box.Addr)
	left := removeCrashLeftovers(t, q, box.Addr, []int{w1.pid, w2.pid, w3.pid})
	t.Logf("%d messages answered 250, %d delivered, %d sent; the kills left %d files that qmail-send never delivers", len(want), len(msgs), next.Load(), left)
}

// removeCrashLeftovers waits until qmail-send has taken every queued
// message to addr, stops it, and then checks that what is left of the
// test's messages is only what a killed qmail-queue leaves (mess/, intd/
// and pid/ files without todo/ or info/, which qmail-send never delivers
// and removes after 36 hours) and removes it, so the shared queue is left
// as the test found it.
func removeCrashLeftovers(t *testing.T, q *qmailtest.Qmail, addr string, writerPIDs []int) int {
	t.Helper()
	marker := []byte("\nTo: <" + addr + ">\n")
	split := 0
	ents, _ := os.ReadDir(filepath.Join(q.Queue, "mess"))
	split = len(ents)
	scan := func() (queued int, left []string) {
		files, _ := filepath.Glob(filepath.Join(q.Queue, "mess", "*", "*"))
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil || !bytes.Contains(b, marker) {
				continue
			}
			id := filepath.Base(f)
			n, _ := strconv.Atoi(id)
			_, errTodo := os.Stat(filepath.Join(q.Queue, "todo", id))
			_, errInfo := os.Stat(filepath.Join(q.Queue, "info", strconv.Itoa(n%split), id))
			if errTodo == nil || errInfo == nil {
				queued++
			} else {
				left = append(left, id)
			}
		}
		return queued, left
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		queued, _ := scan()
		if queued == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d messages of the test still queued after 60 s", queued)
		}
		time.Sleep(100 * time.Millisecond)
	}
	q.StopSend()
	_, left := scan()
	removed := 0
	for _, id := range left {
		n, _ := strconv.Atoi(id)
		for _, f := range []string{filepath.Join(q.Queue, "mess", strconv.Itoa(n%split), id), filepath.Join(q.Queue, "intd", id)} {
			if os.Remove(f) == nil {
				removed++
			}
		}
	}
	for _, pid := range writerPIDs {
		files, _ := filepath.Glob(filepath.Join(q.Queue, "pid", strconv.Itoa(pid)+".*"))
		for _, f := range files {
			if os.Remove(f) == nil {
				removed++
			}
		}
	}
	return removed
}

// TestQmailDirectNotRootRunsItsOwnWriter: relay serve started by a user
// who is not root runs the queue writer itself, as that user, into a
// queue that user may write, and starts another when it dies.
func TestQmailDirectNotRootRunsItsOwnWriter(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run relay as another user")
	}
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Skip("no user nobody")
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	dir, err := os.MkdirTemp("", "relay-e2e-direct-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	queue := filepath.Join(dir, "queue")
	for _, sub := range []string{"pid", "intd", "todo", "bounce", "lock", "mess/0", "mess/1", "mess/2", "info/0", "info/1", "info/2"} {
		os.MkdirAll(filepath.Join(queue, sub), 0o750)
	}
	filepath.WalkDir(dir, func(p string, _ os.DirEntry, _ error) error { return os.Chown(p, uid, gid) })
	smtp := freePort(t)
	cfg := fmt.Sprintf("hostname = \"relay.example.test\"\ndata_dir = %q\n[[listen]]\naddr = %q\nmode = \"smtp\"\n"+
		"[relay]\nlocal_domains = [\"example.test\"]\nrelay_networks = [\"127.0.0.0/8\"]\nconn_rate_per_ip = \"\"\n"+
		"[delivery]\nmethod = \"qmail-direct\"\nqueue_dir = %q\ntimeout = \"10s\"\n[admin]\nlisten = %q\n[policy.limits]\n",
		filepath.Join(dir, "data"), smtp, queue, freePort(t))
	config := filepath.Join(dir, "relay.toml")
	os.WriteFile(config, []byte(cfg), 0o644)

	var logMu sync.Mutex
	var log bytes.Buffer
	cmd := exec.Command(bins.relay, "serve", "--config", config)
	cmd.Stdout, cmd.Stderr = lockedWriter{&logMu, &log}, lockedWriter{&logMu, &log}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		<-exited
		if t.Failed() {
			logMu.Lock()
			t.Logf("relay log:\n%s", log.String())
			logMu.Unlock()
		}
	})
	writer := waitChildren(t, cmd.Process.Pid, "queue-writer", func(p []proc) bool { return len(p) == 1 })[0]
	if writer.uid != uid {
		t.Errorf("writer runs as uid %d, want %d", writer.uid, uid)
	}
	send := func(k int) string {
		t.Helper()
		var c *smtpClient
		deadline := time.Now().Add(15 * time.Second)
		for c == nil {
			c, err = dialClient(smtp)
			if err != nil && time.Now().After(deadline) {
				t.Fatal(err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		defer c.close()
		_, wire := testMessage(k, "box@example.test")
		r, err := c.send("sender@example.test", "box@example.test", wire)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	if r := send(1); !qpReplyRE.MatchString(r) {
		t.Fatalf("reply %q", r)
	}
	syscall.Kill(writer.pid, syscall.SIGKILL)
	waitChildren(t, cmd.Process.Pid, "queue-writer", func(p []proc) bool { return len(p) == 1 && p[0].pid != writer.pid })
	if r := send(2); !qpReplyRE.MatchString(r) {
		t.Fatalf("after the writer was replaced: %q", r)
	}
	todo, _ := os.ReadDir(filepath.Join(queue, "todo"))
	if len(todo) != 2 {
		t.Fatalf("todo/ holds %d entries, want 2", len(todo))
	}
	b, _ := os.ReadFile(filepath.Join(queue, "todo", todo[0].Name()))
	if !strings.HasPrefix(string(b), "u"+u.Uid+"\x00p") {
		t.Errorf("todo %q: want the daemon's uid %s", b, u.Uid)
	}
}
