package e2e

// Issue 15 end to end: the release queue of over_limit = "queue", pace,
// and the connection-level limits (conn_rate_per_ip, fail_limit), with
// the real binary and the fake qmail-queue, whose recorded files carry the
// hand-off times.

import (
	"bufio"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// handoff is one message the fake qmail-queue took, with when.
type handoff struct {
	subject string
	at      time.Time // the fake's .info file: written before it exits 0
}

var subjectLine = regexp.MustCompile(`(?m)^Subject: (.*)$`)

// handoffs reads every hand-off recorded so far, in the order they came.
func (d *daemon) handoffs() []handoff {
	d.t.Helper()
	var out []handoff
	for _, c := range d.queued() {
		m := subjectLine.FindSubmatch(c.Message)
		if m == nil {
			d.t.Fatalf("hand-off without a subject: %q", c.Message)
		}
		out = append(out, handoff{subject: string(m[1])})
	}
	infos, _ := filepath.Glob(filepath.Join(d.qqDir, "*.info"))
	sort.Slice(infos, func(i, j int) bool { return infoNum(infos[i]) < infoNum(infos[j]) })
	for i := range out {
		fi, err := os.Stat(infos[i])
		if err != nil {
			d.t.Fatal(err)
		}
		out[i].at = fi.ModTime()
	}
	return out
}

func infoNum(p string) int {
	n, _ := strconv.Atoi(strings.TrimSuffix(filepath.Base(p), ".info"))
	return n
}

// waitHandoffs waits until n hand-offs are recorded (each test bounds how
// long that may take by its own window arithmetic, plus room for a loaded
// machine).
func (d *daemon) waitHandoffs(n int, within time.Duration) []handoff {
	d.t.Helper()
	deadline := time.Now().Add(within)
	for {
		got := d.handoffs()
		if len(got) >= n || time.Now().After(deadline) {
			if len(got) != n {
				d.t.Fatalf("%d hand-offs, want %d:\n%s", len(got), n, d.logs())
			}
			return got
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// exactlyOnceInOrder checks that the hand-offs are the subjects want, each
// once, in that order.
func exactlyOnceInOrder(t *testing.T, got []handoff, want []string) {
	t.Helper()
	var subjects []string
	for _, h := range got {
		subjects = append(subjects, h.subject)
	}
	if strings.Join(subjects, ",") != strings.Join(want, ",") {
		t.Fatalf("hand-offs %v, want %v", subjects, want)
	}
}

func subjects(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%d", prefix, i+1)
	}
	return out
}

// queuePolicy caps sender: identities at msgs = [rate] with over_limit
// "queue" (plus extra lines in the limits section).
func queuePolicy(rate, extra string) string {
	return fmt.Sprintf(`[policy]
mode = "enforce"
over_limit = "queue"
suspend_after = 0

[policy.limits.sender]
msgs = [%q]
%s`, rate, extra)
}

// sendAll sends the messages with subjects on one connection and returns
// the final replies.
func sendAll(t *testing.T, d *daemon, from string, subjects []string) []string {
	t.Helper()
	c := dialSMTP(t, d.smtp)
	c.expect("EHLO client.example", "250")
	var replies []string
	for _, s := range subjects {
		replies = append(replies, c.send(from, []string{"friend@far.example"}, "Subject: "+s+"\n\nhello\n"))
	}
	c.cmd("QUIT")
	return replies
}

type apiQueue struct {
	Identity string    `json:"identity"`
	Messages int       `json:"messages"`
	State    string    `json:"state"`
	DrainsBy time.Time `json:"drains_by"`
}

func (d *daemon) releaseQueues() map[string]apiQueue {
	d.t.Helper()
	var list []apiQueue
	d.getJSON("/api/queue", &list)
	out := map[string]apiQueue{}
	for _, q := range list {
		out[q.Identity] = q
	}
	return out
}

// TestQueueOverCapReleasesInOrder: 8 messages over a 3/10s cap all get
// 250, and all reach qmail-queue exactly once, in order, never more than
// 3 within any 10s, each batch as soon as the window frees up (a W/60
// bucket late at most, plus room for a loaded machine).
func TestQueueOverCapReleasesInOrder(t *testing.T) {
	t.Parallel()
	const window = 10 * time.Second
	d := newDaemon(t, daemonOpts{policy: queuePolicy("3/10s", "")})
	want := subjects("q", 8)
	replies := sendAll(t, d, "news@example.com", want)
	for i, r := range replies {
		if !strings.HasPrefix(r, "250 ") {
			t.Fatalf("message %d: %q", i+1, r)
		}
		if queued := strings.HasPrefix(r, "250 ok queued "); queued != (i >= 3) {
			t.Fatalf("message %d: %q (the first 3 go straight through, the rest wait)", i+1, r)
		}
	}
	q := d.releaseQueues()["sender:news@example.com"]
	if q.Messages == 0 || q.DrainsBy.IsZero() {
		t.Errorf("the release queue as the API shows it: %+v", q)
	}
	if code, out, errOut := ctlRun(t, d, "queue"); code != 0 || !strings.Contains(out, "sender:news@example.com") || !strings.Contains(out, "WAITING") {
		t.Errorf("relay ctl queue: %d %q %q", code, out, errOut)
	}
	got := d.waitHandoffs(8, 2*window+time.Minute)
	exactlyOnceInOrder(t, got, want)
	slack := window / 60
	for i := 3; i < len(got); i++ {
		gap := got[i].at.Sub(got[i-3].at)
		if gap < window-slack {
			t.Errorf("hand-offs %d and %d are %v apart: 4 within %v", i-2, i+1, gap, window)
		}
		if gap > window+slack+5*time.Second {
			t.Errorf("hand-off %d came %v after the one 3 before it: the window was free long before", i+1, gap)
		}
	}
	// Nothing is left waiting, and the metrics say what happened.
	time.Sleep(200 * time.Millisecond)
	if len(d.handoffs()) != 8 || len(d.releaseQueues()) != 0 {
		t.Fatalf("after the queue drained: %d hand-offs, queues %v", len(d.handoffs()), d.releaseQueues())
	}
	m := scrape(t, d)
	if v, _ := sum(m, "relay_queued_total", nil); v != 5 {
		t.Errorf("relay_queued_total %v, want 5", v)
	}
	if v, _ := sum(m, "relay_queue_released_total", nil); v != 5 {
		t.Errorf("relay_queue_released_total %v, want 5", v)
	}
	if v, _ := sum(m, "relay_queued_messages", nil); v != 0 {
		t.Errorf("relay_queued_messages %v, want 0", v)
	}
}

// TestQueueSuspendStopsRelease: suspending the queue's identity stops its
// releases (the page and API say so); unsuspending resumes them.
func TestQueueSuspendStopsRelease(t *testing.T) {
	t.Parallel()
	const window = 4 * time.Second
	d := newDaemon(t, daemonOpts{policy: queuePolicy("1/4s", "")})
	const id = "sender:news@example.com"
	want := subjects("s", 3)
	replies := sendAll(t, d, "news@example.com", want)
	for i, r := range replies {
		if !strings.HasPrefix(r, "250 ") {
			t.Fatalf("message %d: %q", i+1, r)
		}
	}
	if code, body := d.api("POST", "/api/senders/"+pathID(id)+"/suspend"); code != 200 {
		t.Fatalf("suspend: %d %s", code, body)
	}
	suspendedAt := time.Now()
	deadline := suspendedAt.Add(2*window + 10*time.Second)
	for d.releaseQueues()[id].State != "suspended" {
		if time.Now().After(deadline) {
			t.Fatalf("the queue never says suspended: %+v", d.releaseQueues())
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Two windows and more pass: nothing goes out while suspended.
	time.Sleep(2*window + window/60)
	if got := d.handoffs(); len(got) != 1 {
		t.Fatalf("%d hand-offs while suspended, want only the first message", len(got))
	}
	code, page := d.api("GET", "/")
	if code != 200 || !strings.Contains(page, `<tr data-id="`+id+`">`) || !strings.Contains(page, "suspended") {
		t.Fatalf("the page does not show the suspended queue: %d", code)
	}
	if code, body := d.api("POST", "/api/senders/"+pathID(id)+"/unsuspend"); code != 200 {
		t.Fatalf("unsuspend: %d %s", code, body)
	}
	got := d.waitHandoffs(3, window+time.Minute)
	exactlyOnceInOrder(t, got, want)
	if gap := got[2].at.Sub(got[1].at); gap < window-window/60 {
		t.Errorf("after unsuspend two releases %v apart under a 1/4s cap", gap)
	}
}

// TestQueueSurvivesKill9: relay is killed (SIGKILL) with mail waiting,
// after part of it was released; after the restart what waited goes out,
// what went out does not go again, and the window holds across the
// restart (releases are charged durably).
func TestQueueSurvivesKill9(t *testing.T) {
	t.Parallel()
	const window = 5 * time.Second
	d := newDaemon(t, daemonOpts{policy: queuePolicy("3/5s", "")})
	want := subjects("k", 9)
	for i, r := range sendAll(t, d, "news@example.com", want) {
		if !strings.HasPrefix(r, "250 ") {
			t.Fatalf("message %d: %q", i+1, r)
		}
	}
	before := d.waitHandoffs(6, window+time.Minute) // 3 at once, 3 released
	// Between releases: the window is full until about 5s after the 4th.
	time.Sleep(time.Second)
	d.kill9()
	if n := len(d.handoffs()); n != 6 {
		t.Fatalf("%d hand-offs when killed", n)
	}
	d.start()
	got := d.waitHandoffs(9, window+time.Minute)
	exactlyOnceInOrder(t, got, want)
	if gap := got[6].at.Sub(before[3].at); gap < window-window/60 {
		t.Errorf("the first release after the restart came %v after the 4th: the window forgot the releases", gap)
	}
	time.Sleep(500 * time.Millisecond)
	if n := len(d.handoffs()); n != 9 {
		t.Fatalf("%d hand-offs in the end, want 9", n)
	}
}

// TestPaceFromHandoffTimes: at pace = "4/1s" 20 messages sent at once all
// get 250 (none refused, over_limit says reject); 4 go at once and the
// rest at 4 a second: never more than 4 + 4 in any second, and the last
// goes out (20-4)/4 s after the first was sent at the earliest. (Measured
// from the sending, not from the first hand-off: on a loaded machine the
// first hand-off may come late while the bucket already runs.)
func TestPaceFromHandoffTimes(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, daemonOpts{policy: `[policy]
mode = "enforce"
over_limit = "reject"
suspend_after = 0

[policy.limits.sender]
pace = "4/1s"
`})
	want := subjects("p", 20)
	sent := time.Now()
	replies := sendAll(t, d, "list@example.com", want)
	for i, r := range replies {
		if !strings.HasPrefix(r, "250 ") {
			t.Fatalf("message %d: %q", i+1, r)
		}
	}
	got := d.waitHandoffs(20, time.Minute)
	exactlyOnceInOrder(t, got, want)
	for i := range got {
		n := 0
		for j := i; j < len(got) && got[j].at.Sub(got[i].at) < time.Second; j++ {
			n++
		}
		if n > 8 {
			t.Fatalf("%d hand-offs within a second from hand-off %d", n, i+1)
		}
	}
	if span := got[len(got)-1].at.Sub(sent); span < 4*time.Second-50*time.Millisecond {
		t.Fatalf("20 messages at 4/1s with a burst of 4 went out within %v of the first being sent", span)
	}
	if v, _ := sum(scrape(t, d), "relay_queued_total", map[string]string{"reason": "pace"}); v == 0 {
		t.Errorf("relay_queued_total{reason=pace} is 0")
	}
}

// TestConnRateAndFailLimit: conn_rate_per_ip refuses a client address's
// connections beyond its bucket with 421 4.7.0 in the greeting, other
// addresses and the local socket unaffected; fail_limit refuses AUTH with
// 454 4.7.0, even with the right password, from an address over it and
// for a login over it from any address, other addresses and logins
// unaffected. Clients come from several 127.0.0.0/8 addresses.
func TestConnRateAndFailLimit(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	var users strings.Builder
	for _, u := range []string{"alice", "bob", "carol"} {
		h, err := bcrypt.GenerateFromPassword([]byte(u+" pw"), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&users, "%s:%s\n", u, h)
	}
	usersFile := filepath.Join(dir, "users")
	if err := os.WriteFile(usersFile, []byte(users.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	d := newDaemon(t, daemonOpts{
		relay:     "[relay]\nlocal_domains = [\"example.com\"]\nrelay_networks = []\nconn_rate_per_ip = \"3/1m\"\n",
		extraTOML: fmt.Sprintf("[auth]\nusers_file = %q\nrequire_tls = false\nfail_limit = \"2/10m\"\n", usersFile),
	})

	// conn_rate_per_ip: 3 from 127.0.0.2, the 4th refused at the greeting.
	for range 3 {
		dialSMTPFrom(t, d.smtp, "127.0.0.2").expect("QUIT", "221")
	}
	if got := rawGreeting(t, d.smtp, "127.0.0.2"); !strings.HasPrefix(got, "421 4.7.0 ") {
		t.Fatalf("4th connection from 127.0.0.2: %q, want 421 4.7.0", got)
	}
	dialSMTPFrom(t, d.smtp, "127.0.0.3").expect("QUIT", "221")
	for range 5 {
		dialLocal(t, d.sock).expect("QUIT", "221")
	}

	auth := func(from, login, pass string) string {
		t.Helper()
		c := dialSMTPFrom(t, d.sub, from)
		c.expect("EHLO client.example", "250")
		return c.cmd("AUTH PLAIN " + plain(login, pass))
	}
	// fail_limit per address: two failures from 127.0.0.4 (alice, bob).
	mustPrefix(t, "1st failure", auth("127.0.0.4", "alice", "wrong"), "535 ")
	mustPrefix(t, "2nd failure", auth("127.0.0.4", "bob", "wrong"), "535 ")
	mustPrefix(t, "right password from the address over the limit", auth("127.0.0.4", "carol", "carol pw"), "454 4.7.0 ")
	// Per login: carol fails from two other addresses, once each.
	mustPrefix(t, "carol from 127.0.0.5", auth("127.0.0.5", "carol", "wrong"), "535 ")
	mustPrefix(t, "carol from 127.0.0.6", auth("127.0.0.6", "carol", "wrong"), "535 ")
	mustPrefix(t, "carol, right password, from a fresh address", auth("127.0.0.7", "carol", "carol pw"), "454 4.7.0 ")
	// Other addresses and logins are unaffected.
	mustPrefix(t, "alice from a fresh address", auth("127.0.0.7", "alice", "alice pw"), "235 ")
	mustPrefix(t, "bob from 127.0.0.5", auth("127.0.0.5", "bob", "bob pw"), "235 ")

	m := scrape(t, d)
	for _, c := range []struct {
		name, reason string
		want         float64
	}{
		{"relay_connections_refused_total", "conn_rate", 1},
		{"relay_auth_refused_total", "fail_limit_address", 1},
		{"relay_auth_refused_total", "fail_limit_login", 1},
	} {
		if v, _ := sum(m, c.name, map[string]string{"reason": c.reason}); v != c.want {
			t.Errorf("%s{reason=%q} = %v, want %v", c.name, c.reason, v, c.want)
		}
	}
}

// rawGreeting connects from localIP and returns the first line relay
// writes.
func rawGreeting(t *testing.T, addr, localIP string) string {
	t.Helper()
	dl := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(localIP)}}
	c, err := dl.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 512)
	n, _ := c.Read(buf)
	return strings.TrimRight(string(buf[:n]), "\r\n")
}

// plain is the initial response of AUTH PLAIN for login and password.
func plain(login, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte("\x00" + login + "\x00" + pass))
}

// TestRSSOf20000Addresses: 20,000 distinct client addresses (each
// connecting once, greeted, QUIT) grow relay's RSS by less than 50 MB,
// conn_rate_per_ip on, after a warm-up of 2,000 others.
func TestRSSOf20000Addresses(t *testing.T) {
	t.Parallel()
	d := newDaemon(t, daemonOpts{relay: "[relay]\nlocal_domains = [\"example.com\"]\nrelay_networks = [\"127.0.0.0/8\"]\nconn_rate_per_ip = \"60/1m\"\nmax_connections_per_ip = 20\n"})
	connect := func(base, n int) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for w := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < n; i += 16 {
					k := base + i
					ip := net.IPv4(127, byte(k>>16), byte(k>>8), byte(k))
					if err := greetAndQuit(d.smtp, ip); err != nil {
						errs <- fmt.Errorf("%v: %w", ip, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
	connect(1<<16, 2000) // 127.1.x.y
	before := rssOf(t, d.cmd.Process.Pid)
	connect(2<<16, 20000) // 127.2.x.y
	after := rssOf(t, d.cmd.Process.Pid)
	t.Logf("RSS %d MB before, %d MB after 20,000 addresses", before>>20, after>>20)
	if after-before > 50<<20 {
		t.Fatalf("RSS grew %d MB for 20,000 client addresses", (after-before)>>20)
	}
}

// greetAndQuit connects from ip, wants the 220 greeting, says QUIT.
func greetAndQuit(addr string, ip net.IP) error {
	dl := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: ip}}
	c, err := dl.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "220 ") {
		return fmt.Errorf("greeting %q: %v", line, err)
	}
	if _, err := io.WriteString(c, "QUIT\r\n"); err != nil {
		return err
	}
	_, err = r.ReadString('\n')
	return err
}

// rssOf reads a process's resident set size from /proc.
func rssOf(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmRSS:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}
