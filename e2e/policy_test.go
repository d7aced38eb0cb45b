package e2e

// Issue 3 end to end: caps per identity kind, the allowlist, racing
// sessions, the over_limit actions, suspension, observe mode, counters
// across restart, kill -9 and reload, forged uid headers, notifications.

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// The admin API's JSON, as much of it as these tests read (docs/design.md §6).
type apiUsage struct {
	Metric string `json:"metric"`
	Window string `json:"window"`
	Limit  int64  `json:"limit"`
	Used   int64  `json:"used"`
}

type apiSender struct {
	ID      string     `json:"id"`
	State   string     `json:"state"`
	Scripts []string   `json:"scripts"`
	Usage   []apiUsage `json:"usage"`
}

type apiEvent struct {
	Kind     string `json:"kind"`
	Identity string `json:"identity"`
	Detail   string `json:"detail"`
}

type apiHeld struct {
	ID         string   `json:"id"`
	From       string   `json:"from"`
	Rcpts      int      `json:"rcpts"`
	Identities []string `json:"identities"`
	Reason     string   `json:"reason"`
}

// getJSON GETs an admin API path and decodes its 200 answer into v.
func (d *daemon) getJSON(path string, v any) {
	d.t.Helper()
	code, body := d.api("GET", path)
	if code != http.StatusOK {
		d.t.Fatalf("GET %s: %d %s", path, code, body)
	}
	if err := json.Unmarshal([]byte(body), v); err != nil {
		d.t.Fatalf("GET %s: %v in %s", path, err, body)
	}
}

// senders returns GET /api/senders?state=<state> by id.
func (d *daemon) senders(state string) map[string]apiSender {
	d.t.Helper()
	var list []apiSender
	d.getJSON("/api/senders?state="+state, &list)
	out := make(map[string]apiSender, len(list))
	for _, s := range list {
		out[s.ID] = s
	}
	return out
}

// events returns GET /api/events?kind=<kind>, newest first.
func (d *daemon) events(kind string) []apiEvent {
	d.t.Helper()
	var evs []apiEvent
	d.getJSON("/api/events?kind="+kind, &evs)
	return evs
}

// dialSMTPFrom is dialSMTP from a chosen loopback source address, so the
// client is another ip: identity or a [[webserver]].
func dialSMTPFrom(t *testing.T, addr, localIP string) *smtpConn {
	t.Helper()
	dl := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(localIP)}}
	c, err := dl.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return greeted(t, c)
}

// dialLocal opens an SMTP session on the daemon's local unix socket.
func dialLocal(t *testing.T, path string) *smtpConn {
	t.Helper()
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return greeted(t, c)
}

// greeted wraps c as an smtpConn and reads the 220 greeting.
func greeted(t *testing.T, c net.Conn) *smtpConn {
	t.Helper()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	s := &smtpConn{t: t, c: c, r: bufio.NewReader(c)}
	t.Cleanup(func() { c.Close() })
	if got := s.reply(); !strings.HasPrefix(got, "220 ") {
		t.Fatalf("greeting %q", got)
	}
	return s
}

// rcpts returns n distinct remote recipients, tagged so messages differ.
func rcpts(tag string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%d@remote.example", tag, i)
	}
	return out
}

// capacity tells how many more recipients from can get now: it offers up
// to max recipients in one transaction, then RSETs (nothing is charged).
// It returns the count accepted and the first refusal ("" if none).
func (s *smtpConn) capacity(from string, max int) (int, string) {
	s.t.Helper()
	s.expect("MAIL FROM:<"+from+">", "250")
	n, refusal := 0, ""
	for _, rc := range rcpts("probe", max) {
		r := s.cmd("RCPT TO:<" + rc + ">")
		if !strings.HasPrefix(r, "250") {
			refusal = r
			break
		}
		n++
	}
	s.expect("RSET", "250")
	return n, refusal
}

// mustSend sends one message and fails unless it is accepted.
func (s *smtpConn) mustSend(from string, to []string, body string) {
	s.t.Helper()
	if got := s.send(from, to, body); !strings.HasPrefix(got, "250 ok") {
		s.t.Fatalf("send from %s to %d: %q, want 250 ok", from, len(to), got)
	}
}

// overReply matches the reply to a recipient or message over a rate cap
// (docs/design.md §5): "451 4.7.1 <id> is over N recipients/W; try again in …".
func overReply(code, id string, n int, window string) *regexp.Regexp {
	enh := "4.7.1"
	if code == "550" {
		enh = "5.7.1"
	}
	unit := "recipients"
	if n == 1 {
		unit = "recipient"
	}
	return regexp.MustCompile(fmt.Sprintf(`^%s %s %s is over %d %s/%s; try again in (\d+s|\d+m(\d+s)?|\d+h(\d+m)?)$`,
		code, regexp.QuoteMeta(enh), regexp.QuoteMeta(id), n, unit, regexp.QuoteMeta(window)))
}

func wantReply(t *testing.T, what, got string, want *regexp.Regexp) {
	t.Helper()
	if !want.MatchString(got) {
		t.Fatalf("%s: got %q, want %s", what, got, want)
	}
}

// policyWith is a [policy] block enforcing one kind's caps.
func policyWith(overLimit string, suspendAfter int, limits string) string {
	return fmt.Sprintf("[policy]\nmode = \"enforce\"\nover_limit = %q\nsuspend_after = %d\n\n%s\n", overLimit, suspendAfter, limits)
}

const web1 = `
[[webserver]]
name = "web1"
addr = "127.0.0.2"
`

// TestPolicyIdentityKinds: every identity kind is capped on its own, with
// the identity and the limit named in the 451.
func TestPolicyIdentityKinds(t *testing.T) {
	t.Run("user", func(t *testing.T) {
		hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		users := filepath.Join(t.TempDir(), "users")
		if err := os.WriteFile(users, []byte("alice:"+string(hash)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		d := newDaemon(t, daemonOpts{
			policy:    policyWith("defer", 0, "[policy.limits.user]\nrcpts = [\"2/1h\"]\n"),
			extraTOML: fmt.Sprintf("[auth]\nusers_file = %q\nrequire_tls = false\n", users),
		})
		s := dialSMTP(t, d.sub)
		s.expect("EHLO client.example.test", "250")
		s.expect("MAIL FROM:<a@example.com>", "530 5.7.0")
		s.expect("AUTH PLAIN "+base64.StdEncoding.EncodeToString([]byte("\x00alice\x00s3cret")), "235")
		s.mustSend("a@example.com", rcpts("u", 2), "Subject: 1\r\n\r\nx\r\n")
		// Another envelope sender does not escape the login's cap.
		s.expect("MAIL FROM:<b@other.example>", "250")
		wantReply(t, "RCPT over the user cap", s.cmd("RCPT TO:<z@remote.example>"), overReply("451", "user:alice", 2, "1h"))
	})

	t.Run("uid-local", func(t *testing.T) {
		d := newDaemon(t, daemonOpts{policy: policyWith("defer", 0, "[policy.limits.uid]\nrcpts = [\"2/1h\"]\n")})
		id := "uid:local:" + strconv.Itoa(os.Getuid())
		s := dialLocal(t, d.sock)
		s.expect("EHLO script.example.test", "250")
		s.mustSend("a@example.com", rcpts("l", 2), "Subject: 1\r\n\r\nx\r\n")
		s.expect("MAIL FROM:<b@other.example>", "250")
		wantReply(t, "RCPT over the uid cap", s.cmd("RCPT TO:<z@remote.example>"), overReply("451", id, 2, "1h"))
		if _, ok := d.senders("all")[id]; !ok {
			t.Errorf("%s not in /api/senders", id)
		}
	})

	webCase := func(t *testing.T, header, web string) *daemon {
		d := newDaemon(t, daemonOpts{
			policy:    policyWith("defer", 0, "[policy.limits.uid]\nrcpts = [\"2/1h\"]\n"),
			extraTOML: web,
		})
		s := dialSMTPFrom(t, d.smtp, "127.0.0.2")
		s.expect("EHLO web1.example.test", "250")
		s.mustSend("www-data@example.com", rcpts("w", 2), header+"Subject: 1\r\n\r\nx\r\n")
		// The uid is known only at DATA: the whole message is refused there.
		wantReply(t, "DATA over the web uid cap", s.send("other@example.com", rcpts("v", 1), header+"Subject: 2\r\n\r\nx\r\n"),
			overReply("451", "uid:web1:1001", 2, "1h"))
		// Another uid on the same web server has its own cap.
		s.mustSend("www-data@example.com", rcpts("o", 2), strings.ReplaceAll(header, "1001", "1002")+"Subject: 3\r\n\r\nx\r\n")
		return d
	}
	t.Run("uid-webserver-received", func(t *testing.T) {
		webCase(t, "Received: (qmail 123 invoked by uid 1001); 1 Jan 2026 00:00:00 -0000\r\n", web1)
	})
	// With require_uid = false (a web server whose PHP talks SMTP itself),
	// the PHP header alone names the uid.
	t.Run("uid-webserver-php", func(t *testing.T) {
		d := webCase(t, "X-PHP-Originating-Script: 1001:form.php\r\n", web1+"require_uid = false\n")
		var snd apiSender
		d.getJSON("/api/senders/"+url.PathEscape("uid:web1:1001"), &snd)
		if len(snd.Scripts) != 1 || snd.Scripts[0] != "form.php" {
			t.Errorf("uid:web1:1001 scripts %q, want [form.php]", snd.Scripts)
		}
	})

	t.Run("sender", func(t *testing.T) {
		d := newDaemon(t, daemonOpts{policy: policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"2/1h\"]\n")})
		s := dialSMTP(t, d.smtp)
		s.expect("EHLO client.example.test", "250")
		s.mustSend("A@Example.com", rcpts("s", 2), "Subject: 1\r\n\r\nx\r\n")
		s.mustSend("b@example.com", rcpts("t", 2), "Subject: 2\r\n\r\nx\r\n")
		s.expect("MAIL FROM:<a@example.com>", "250")
		wantReply(t, "RCPT over the sender cap", s.cmd("RCPT TO:<z@remote.example>"), overReply("451", "sender:a@example.com", 2, "1h"))
	})

	t.Run("domain", func(t *testing.T) {
		d := newDaemon(t, daemonOpts{policy: policyWith("defer", 0, "[policy.limits.domain]\nrcpts = [\"2/1h\"]\n")})
		s := dialSMTP(t, d.smtp)
		s.expect("EHLO client.example.test", "250")
		s.mustSend("a@dom.example", rcpts("d", 2), "Subject: 1\r\n\r\nx\r\n")
		s.mustSend("a@other.example", rcpts("e", 2), "Subject: 2\r\n\r\nx\r\n")
		s.expect("MAIL FROM:<b@DOM.example>", "250")
		wantReply(t, "RCPT over the domain cap", s.cmd("RCPT TO:<z@remote.example>"), overReply("451", "domain:dom.example", 2, "1h"))
	})

	t.Run("ip", func(t *testing.T) {
		d := newDaemon(t, daemonOpts{policy: policyWith("defer", 0, "[policy.limits.ip]\nrcpts = [\"2/1h\"]\n")})
		s := dialSMTPFrom(t, d.smtp, "127.0.0.3")
		s.expect("EHLO client.example.test", "250")
		s.mustSend("a@example.com", rcpts("i", 2), "Subject: 1\r\n\r\nx\r\n")
		s.expect("MAIL FROM:<b@other.example>", "250")
		wantReply(t, "RCPT over the ip cap", s.cmd("RCPT TO:<z@remote.example>"), overReply("451", "ip:127.0.0.3", 2, "1h"))
		// Another client address is another identity.
		o := dialSMTP(t, d.smtp)
		o.expect("EHLO client.example.test", "250")
		o.mustSend("a@example.com", rcpts("j", 2), "Subject: 2\r\n\r\nx\r\n")
	})
}

// TestPolicyAllowlist: a mailing list's own big cap lets it through while
// another sender from the same client stops at the default cap.
func TestPolicyAllowlist(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: policyWith("defer", 0, `[policy.limits.sender]
max_rcpts_per_msg = 5
rcpts = ["3/1h"]

[[policy.allow]]
match = "sender:news@example.com"
max_rcpts_per_msg = 5000
rcpts = ["1000/1h"]
`)})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO lists.example.test", "250")
	for i := range 3 {
		to := rcpts(fmt.Sprintf("n%d-", i), 30)
		if got := s.send("news@example.com", to, "Subject: newsletter\r\n\r\nx\r\n"); !strings.HasPrefix(got, "250 ok") {
			t.Fatalf("newsletter %d: %q", i, got)
		}
	}
	n, refusal := s.capacity("other@example.com", 10)
	if n != 3 {
		t.Fatalf("other@example.com got %d recipients, want the default cap 3 (refusal %q)", n, refusal)
	}
	wantReply(t, "other sender", refusal, overReply("451", "sender:other@example.com", 3, "1h"))
	calls := d.queued()
	if len(calls) != 3 {
		t.Fatalf("qmail-queue called %d times, want 3", len(calls))
	}
	for _, c := range calls {
		if got := strings.Count(string(c.Envelope), "\x00T"); got != 30 {
			t.Errorf("newsletter handed off with %d recipients, want 30", got)
		}
	}
}

// TestPolicyRaceForLastSlot: sessions of one identity racing for its last
// slot: exactly one gets it.
func TestPolicyRaceForLastSlot(t *testing.T) {
	const racers = 8
	d := newDaemon(t, daemonOpts{policy: policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"5/1h\"]\n")})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("a@example.com", rcpts("r", 4), "Subject: 1\r\n\r\nx\r\n")

	conns := make([]*smtpConn, racers)
	for i := range conns {
		conns[i] = dialSMTP(t, d.smtp)
		conns[i].expect("EHLO client.example.test", "250")
		conns[i].expect("MAIL FROM:<a@example.com>", "250")
	}
	replies := make([]string, racers)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if _, err := fmt.Fprintf(c.c, "RCPT TO:<race%d@remote.example>\r\n", i); err != nil {
				replies[i] = err.Error()
				return
			}
			line, err := c.r.ReadString('\n')
			if err != nil {
				replies[i] = err.Error()
				return
			}
			replies[i] = strings.TrimRight(line, "\r\n")
		}()
	}
	close(start)
	wg.Wait()
	winner := -1
	for i, r := range replies {
		switch {
		case strings.HasPrefix(r, "250"):
			if winner >= 0 {
				t.Errorf("sessions %d and %d both got the last slot", winner, i)
			}
			winner = i
		case !strings.HasPrefix(r, "451 4.7.1 sender:a@example.com is over 5 recipients/1h"):
			t.Errorf("session %d: %q, want 250 or 451 4.7.1", i, r)
		}
	}
	if winner < 0 {
		t.Fatalf("no session got the last slot: %q", replies)
	}
	// The winner's reservation turns into a charge; then nothing is left.
	w := conns[winner]
	w.expect("DATA", "354")
	fmt.Fprint(w.c, "Subject: won\r\n\r\nx\r\n.\r\n")
	if got := w.reply(); !strings.HasPrefix(got, "250 ok") {
		t.Fatalf("winner's DATA: %q", got)
	}
	for _, c := range conns {
		c.expect("QUIT", "221")
	}
	if n, refusal := s.capacity("a@example.com", 3); n != 0 {
		t.Fatalf("after the race %d more recipients passed, want 0 (%q)", n, refusal)
	}
}

// TestPolicyOverLimitActions: defer, reject and hold over a cap.
func TestPolicyOverLimitActions(t *testing.T) {
	limits := "[policy.limits.sender]\nrcpts = [\"1/1h\"]\n"
	for _, action := range []string{"defer", "reject"} {
		t.Run(action, func(t *testing.T) {
			d := newDaemon(t, daemonOpts{policy: policyWith(action, 0, limits)})
			s := dialSMTP(t, d.smtp)
			s.expect("EHLO client.example.test", "250")
			s.mustSend("a@example.com", rcpts("a", 1), "Subject: 1\r\n\r\nx\r\n")
			code := map[string]string{"defer": "451", "reject": "550"}[action]
			wantReply(t, "RCPT over the cap", s.send("a@example.com", rcpts("b", 1), "Subject: 2\r\n\r\nx\r\n"),
				overReply(code, "sender:a@example.com", 1, "1h"))
			if n := len(d.queued()); n != 1 {
				t.Fatalf("qmail-queue called %d times, want 1", n)
			}
		})
	}
	t.Run("hold", func(t *testing.T) {
		d := newDaemon(t, daemonOpts{policy: policyWith("hold", 0, limits)})
		s := dialSMTP(t, d.smtp)
		s.expect("EHLO client.example.test", "250")
		s.mustSend("a@example.com", rcpts("a", 1), "Subject: 1\r\n\r\nx\r\n")
		got := s.send("a@example.com", rcpts("b", 2), "Subject: held one\r\n\r\nx\r\n")
		m := regexp.MustCompile(`^250 ok held (\S+)$`).FindStringSubmatch(got)
		if m == nil {
			t.Fatalf("DATA over the cap with hold: %q, want 250 ok held <id>", got)
		}
		if n := len(d.queued()); n != 1 {
			t.Fatalf("qmail-queue called %d times, want 1 (the held message must not reach it)", n)
		}
		var held []apiHeld
		d.getJSON("/api/held", &held)
		if len(held) != 1 || held[0].ID != m[1] {
			t.Fatalf("GET /api/held = %+v, want one message %s", held, m[1])
		}
		h := held[0]
		if h.From != "a@example.com" || h.Rcpts != 2 || !strings.Contains(h.Reason, "sender:a@example.com is over 1 recipient/1h") {
			t.Errorf("held message %+v", h)
		}
		if !strings.Contains(strings.Join(h.Identities, " "), "sender:a@example.com") {
			t.Errorf("held identities %q lack sender:a@example.com", h.Identities)
		}
	})
}

// TestPolicySuspension: suspend_after over-limit events suspend the
// identity, durably at once, and the webhook is told. (Senders are
// suspended only when suspend_kinds names them, as here; by default the
// attempts count for the client's address: e2e/trust_test.go.)
func TestPolicySuspension(t *testing.T) {
	const id = "sender:a@example.com"
	h := newHook(t, nil)
	d := newDaemon(t, daemonOpts{
		policy:    strings.Replace(policyWith("defer", 2, "[policy.limits.sender]\nrcpts = [\"1/1h\"]\n"), "suspend_after = 2\n", "suspend_after = 2\nsuspend_kinds = [\"sender\"]\n", 1),
		extraTOML: fmt.Sprintf("[notify]\nwebhook = %q\n", h.url()),
	})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("a@example.com", rcpts("a", 1), "Subject: 1\r\n\r\nx\r\n")
	// A transaction opened before the suspension.
	early := dialSMTP(t, d.smtp)
	early.expect("EHLO client.example.test", "250")
	early.expect("MAIL FROM:<a@example.com>", "250")
	for i := 1; i <= 2; i++ { // over-limit events 1 and 2, in two transactions
		s.expect("MAIL FROM:<a@example.com>", "250")
		wantReply(t, fmt.Sprintf("over-limit RCPT %d", i), s.cmd("RCPT TO:<z@remote.example>"), overReply("451", id, 1, "1h"))
		s.expect("RSET", "250")
	}
	if got, want := early.cmd("RCPT TO:<z@remote.example>"), "550 5.7.1 "+id+" is suspended"; got != want {
		t.Fatalf("RCPT after the suspension: %q, want %q", got, want)
	}
	suspended := func(when string) {
		t.Helper()
		s := dialSMTP(t, d.smtp)
		s.expect("EHLO client.example.test", "250")
		if got, want := s.cmd("MAIL FROM:<a@example.com>"), "550 5.7.1 "+id+" is suspended"; got != want {
			t.Fatalf("MAIL %s: %q, want %q", when, got, want)
		}
		if _, ok := d.senders("suspended")[id]; !ok {
			t.Fatalf("%s: %s not listed as suspended", when, id)
		}
	}
	suspended("after 2 over-limit events")
	// Another sender from the same client is not suspended.
	s.mustSend("b@example.com", rcpts("b", 1), "Subject: 2\r\n\r\nx\r\n")

	for _, event := range []string{"throttle_start", "suspended"} {
		select {
		case m := <-h.got:
			if m["event"] != event || m["identity"] != id {
				t.Errorf("webhook got %v, want event %s for %s", m, event, id)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("webhook never told of %s", event)
		}
	}

	d.kill9() // the suspension must be on disk already, not at the next flush
	d.start()
	suspended("after kill -9")
	d.stop()
	d.start()
	suspended("after a restart")
}

// TestPolicyObserveMode: over the cap nothing is refused, mail reaches
// qmail-queue, and the event log says what enforce would have done.
func TestPolicyObserveMode(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: "[policy]\nmode = \"observe\"\nover_limit = \"reject\"\nsuspend_after = 1\n\n" +
		"[policy.limits.sender]\nmax_rcpts_per_msg = 3\nrcpts = [\"2/1h\"]\n"})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("a@example.com", rcpts("a", 5), "Subject: 1\r\n\r\nx\r\n")
	s.mustSend("a@example.com", rcpts("b", 5), "Subject: 2\r\n\r\nx\r\n")
	s.mustSend("a@example.com", rcpts("c", 1), "Subject: 3\r\n\r\nx\r\n")
	calls := d.queued()
	if len(calls) != 3 {
		t.Fatalf("qmail-queue called %d times, want 3", len(calls))
	}
	if got := strings.Count(string(calls[1].Envelope), "\x00T"); got != 5 {
		t.Errorf("second message handed off with %d recipients, want 5", got)
	}
	evs := d.events("observe")
	found := false
	for _, ev := range evs {
		if ev.Kind != "observe" {
			t.Errorf("GET /api/events?kind=observe returned a %q event", ev.Kind)
		}
		if ev.Identity == "sender:a@example.com" && strings.Contains(ev.Detail, "would reject") {
			found = true
		}
	}
	if !found {
		t.Fatalf("no observe event for sender:a@example.com saying it would reject: %+v", evs)
	}
	if got := d.senders("suspended"); len(got) != 0 {
		t.Errorf("observe mode suspended %v", got)
	}
	if got := d.events("over_limit"); len(got) != 0 {
		t.Errorf("observe mode recorded over_limit events %+v", got)
	}
}

// TestPolicyCountersSurviveRestart: what was sent before SIGTERM still
// counts after the start.
func TestPolicyCountersSurviveRestart(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"5/1h\"]\n")})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("a@example.com", rcpts("a", 3), "Subject: 1\r\n\r\nx\r\n")
	s.expect("QUIT", "221")
	d.stop()
	d.start()
	s = dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	if n, refusal := s.capacity("a@example.com", 5); n != 2 {
		t.Fatalf("after a restart %d recipients passed, want 5-3 = 2 (refusal %q)", n, refusal)
	}
}

// TestPolicyCountersSurviveKill9: counters flushed (every second) survive
// a crash.
func TestPolicyCountersSurviveKill9(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"5/1h\"]\n")})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("a@example.com", rcpts("a", 3), "Subject: 1\r\n\r\nx\r\n")
	time.Sleep(1600 * time.Millisecond) // more than the 1 s flush interval
	d.kill9()
	d.start()
	s = dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	if n, refusal := s.capacity("a@example.com", 5); n != 2 {
		t.Fatalf("after kill -9 %d recipients passed, want 5-3 = 2 (refusal %q)", n, refusal)
	}
}

// TestPolicyReloadKeepsCounters: a changed cap applies to the counts
// already made.
func TestPolicyReloadKeepsCounters(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"5/1h\"]\n")})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("a@example.com", rcpts("a", 3), "Subject: 1\r\n\r\nx\r\n")

	cfg, err := os.ReadFile(d.config)
	if err != nil {
		t.Fatal(err)
	}
	changed := strings.Replace(string(cfg), `rcpts = ["5/1h"]`, `rcpts = ["4/1h"]`, 1)
	if changed == string(cfg) {
		t.Fatal("cap not found in the config")
	}
	if err := os.WriteFile(d.config, []byte(changed), 0o644); err != nil {
		t.Fatal(err)
	}
	d.signal(syscall.SIGHUP)
	d.waitLog("config reloaded")
	n, refusal := s.capacity("a@example.com", 5)
	if n != 1 {
		t.Fatalf("after lowering the cap to 4 with 3 sent, %d recipients passed, want 1 (refusal %q)", n, refusal)
	}
	wantReply(t, "refusal after reload", refusal, overReply("451", "sender:a@example.com", 4, "1h"))
}

// TestPolicyForgedUIDHeaders: uid lines count only from a configured web
// server, and only in the first Received field (with require_uid, mail
// without one there is refused: e2e/trust_test.go).
func TestPolicyForgedUIDHeaders(t *testing.T) {
	d := newDaemon(t, daemonOpts{
		policy:    policyWith("defer", 0, "[policy.limits.uid]\nrcpts = [\"100/1h\"]\n"),
		extraTOML: web1,
	})
	const invoked = "Received: (qmail %d invoked by uid %d); 1 Jan 2026 00:00:00 -0000\r\n"
	uidIDs := func() []string {
		var ids []string
		for id := range d.senders("all") {
			if strings.HasPrefix(id, "uid:") {
				ids = append(ids, id)
			}
		}
		return ids
	}

	// From a relay client that is not a web server: headers change nothing.
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("a@example.com", rcpts("a", 1),
		fmt.Sprintf(invoked, 1, 1001)+"X-PHP-Originating-Script: 1001:form.php\r\nSubject: forged\r\n\r\nx\r\n")
	if got := uidIDs(); len(got) != 0 {
		t.Fatalf("uid headers from 127.0.0.1 created %q", got)
	}

	w := dialSMTPFrom(t, d.smtp, "127.0.0.2")
	w.expect("EHLO web1.example.test", "250")
	// A script's own Received line below qmail's is not the uid.
	w.mustSend("www@example.com", rcpts("b", 1),
		fmt.Sprintf(invoked, 123, 1001)+fmt.Sprintf(invoked, 9, 666)+"Subject: two\r\n\r\nx\r\n")
	// Nor is one below a Received line that is not qmail's: refused.
	if got := w.send("www@example.com", rcpts("c", 1),
		"Received: from x by y; 1 Jan 2026 00:00:00 -0000\r\n"+fmt.Sprintf(invoked, 9, 777)+"Subject: three\r\n\r\nx\r\n"); !strings.HasPrefix(got, "550 5.7.1 ") {
		t.Fatalf("qmail line below another Received: %q, want 550 5.7.1", got)
	}
	if got := uidIDs(); len(got) != 1 || got[0] != "uid:web1:1001" {
		t.Fatalf("uid identities %q, want only uid:web1:1001", got)
	}
	if u := d.senders("all")["uid:web1:1001"].Usage; len(u) != 1 || u[0].Used != 1 {
		t.Errorf("uid:web1:1001 usage %+v, want 1 recipient", u)
	}
}

// hook is a webhook receiver: it hands each POST's decoded JSON to got.
type hook struct {
	srv  *httptest.Server
	got  chan map[string]any
	hold func() // runs in the handler before it answers
}

func newHook(t *testing.T, hold func()) *hook {
	h := &hook{got: make(chan map[string]any, 16), hold: hold}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		m := map[string]any{}
		if err := json.Unmarshal(body, &m); err != nil || r.Method != http.MethodPost ||
			!strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") || r.URL.Path != "/hook" {
			m = map[string]any{"bad request": fmt.Sprintf("%s %s %s %q %v", r.Method, r.URL.Path, r.Header.Get("Content-Type"), body, err)}
		}
		h.got <- m
		if h.hold != nil {
			h.hold()
		}
	}))
	t.Cleanup(h.srv.Close)
	return h
}

func (h *hook) url() string { return h.srv.URL + "/hook" }

// TestPolicyWebhook: throttle start is POSTed as JSON.
func TestPolicyWebhook(t *testing.T) {
	h := newHook(t, nil)
	d := newDaemon(t, daemonOpts{
		policy:    policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"1/1h\"]\n"),
		extraTOML: fmt.Sprintf("[notify]\nwebhook = %q\n", h.url()),
	})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("a@example.com", rcpts("a", 1), "Subject: 1\r\n\r\nx\r\n")
	s.expect("MAIL FROM:<a@example.com>", "250")
	s.expect("RCPT TO:<z@remote.example>", "451 4.7.1")
	select {
	case m := <-h.got:
		want := map[string]any{"event": "throttle_start", "identity": "sender:a@example.com", "kind": "sender",
			"limit": "1 recipient/1h", "action": "defer"}
		for k, v := range want {
			if m[k] != v {
				t.Errorf("webhook %s = %v, want %v (body %v)", k, m[k], v, m)
			}
		}
	case <-time.After(10 * time.Second):
		t.Fatal("webhook never called")
	}
}

// TestPolicySlowWebhook: a slow webhook does not hold up the SMTP reply.
func TestPolicySlowWebhook(t *testing.T) {
	release := make(chan struct{})
	returned := make(chan struct{})
	var once sync.Once
	h := newHook(t, func() {
		select {
		case <-release:
		case <-time.After(3 * time.Second):
		}
		once.Do(func() { close(returned) })
	})
	defer close(release) // lets the handler, and so the server's Close, finish at once
	d := newDaemon(t, daemonOpts{
		policy:    policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"1/1h\"]\n"),
		extraTOML: fmt.Sprintf("[notify]\nwebhook = %q\n", h.url()),
	})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("a@example.com", rcpts("a", 1), "Subject: 1\r\n\r\nx\r\n")
	s.expect("MAIL FROM:<a@example.com>", "250")
	s.expect("RCPT TO:<z@remote.example>", "451 4.7.1")
	select {
	case <-returned:
		t.Fatal("the 451 came only after the webhook handler returned")
	default:
	}
	// The session goes on while the webhook is still in flight.
	s.expect("RSET", "250")
	s.mustSend("b@example.com", rcpts("b", 1), "Subject: 2\r\n\r\nx\r\n")
	select {
	case m := <-h.got:
		if m["event"] != "throttle_start" {
			t.Errorf("webhook got %v, want a throttle_start", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("webhook never called")
	}
}

// TestPolicyNotifyEmail: the admin's notification goes through the
// delivery path to the configured address and is not counted.
func TestPolicyNotifyEmail(t *testing.T) {
	d := newDaemon(t, daemonOpts{
		policy: policyWith("defer", 0, "[policy.limits.sender]\nrcpts = [\"1/1h\"]\n\n[policy.limits.domain]\nrcpts = [\"100/1h\"]\n\n"+
			"[policy.limits.ip]\nrcpts = [\"100/1h\"]\n"),
		extraTOML: "[notify]\nemail = \"admin@example.com\"\n",
	})
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	s.mustSend("a@dom.example", rcpts("a", 1), "Subject: 1\r\n\r\nx\r\n")
	s.expect("MAIL FROM:<a@dom.example>", "250")
	wantReply(t, "RCPT over the cap", s.cmd("RCPT TO:<z@remote.example>"), overReply("451", "sender:a@dom.example", 1, "1h"))
	s.expect("RSET", "250")

	var note []byte
	deadline := time.Now().Add(10 * time.Second)
	for note == nil && time.Now().Before(deadline) {
		for _, c := range d.queued() {
			if string(c.Envelope) == "F\x00Tadmin@example.com\x00\x00" {
				note = c.Message
			}
		}
		if note == nil {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if note == nil {
		t.Fatalf("no notification from <> to admin@example.com reached qmail-queue; calls: %d", len(d.queued()))
	}
	if !strings.Contains(string(note), "Subject: relay: sender:a@dom.example is throttled\n") {
		t.Errorf("notification message:\n%s", note)
	}
	if n := len(d.queued()); n != 2 {
		t.Errorf("qmail-queue called %d times, want 2 (the message and one notification)", n)
	}
	// Only the customer's message is counted: no identity of the
	// notification (sender:<>, admin's domain) appears, and usage is the
	// one recipient sent.
	senders := d.senders("all")
	want := []string{"domain:dom.example", "ip:127.0.0.1", "sender:a@dom.example"}
	if len(senders) != len(want) {
		t.Errorf("senders %v, want exactly %q", senders, want)
	}
	for _, id := range want {
		if u := senders[id].Usage; len(u) != 1 || u[0].Used != 1 {
			t.Errorf("%s usage %+v, want the 1 recipient sent", id, u)
		}
	}
}
