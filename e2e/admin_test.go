package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"relay/admin"
	"relay/internal/testcert"
)

// The admin API's paths (docs/design.md §6) through the real daemon.

// senderPolicy is a [policy] block capping only sender: identities at
// rcpts = [rate], so the ip: and domain: identities every test shares never
// decide.
func senderPolicy(overLimit, rate string) string {
	return fmt.Sprintf(`[policy]
mode = "enforce"
over_limit = %q
suspend_after = 0

[policy.limits.sender]
rcpts = [%q]
`, overLimit, rate)
}

// pathID percent-encodes an identity as one path segment, ':' included, as
// docs/design.md §6 writes it (uid%3Aweb1%3A1001).
func pathID(id string) string {
	return strings.ReplaceAll(url.PathEscape(id), ":", "%3A")
}

// adminDo calls the admin API with the given Authorization header value
// ("" for none) and extra headers, and returns status, headers and body.
func adminDo(t *testing.T, d *daemon, method, path, auth string, hdr map[string]string) (int, http.Header, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+d.admin+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, resp.Header, b.String()
}

func decodeJSON[T any](t *testing.T, body string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatalf("decoding %q: %v", body, err)
	}
	return v
}

// getSender reads one sender through the API.
func getSender(t *testing.T, d *daemon, id string) admin.Sender {
	t.Helper()
	code, body := d.api("GET", "/api/senders/"+pathID(id))
	if code != http.StatusOK {
		t.Fatalf("GET sender %s: %d %s", id, code, body)
	}
	return decodeJSON[admin.Sender](t, body)
}

// rcptsUsed is the sender's recipient count in its (only) rcpts window.
func rcptsUsed(t *testing.T, d *daemon, id string) int64 {
	t.Helper()
	s := getSender(t, d, id)
	for _, u := range s.Usage {
		if u.Metric == "rcpts" {
			return u.Used
		}
	}
	t.Fatalf("%s has no rcpts usage: %+v", id, s)
	return 0
}

// sendOne runs one transaction on a fresh connection and returns the final
// reply.
func sendOne(t *testing.T, d *daemon, from string, to ...string) string {
	t.Helper()
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	r := s.send(from, to, "Subject: admin e2e\r\n\r\nbody\r\n")
	s.cmd("QUIT")
	s.c.Close()
	return r
}

var heldReply = regexp.MustCompile(`^250 ok held (\S+)$`)

// sendHeld sends a message that must go to the hold spool and returns its id.
func sendHeld(t *testing.T, d *daemon, from string, to ...string) string {
	t.Helper()
	r := sendOne(t, d, from, to...)
	m := heldReply.FindStringSubmatch(r)
	if m == nil {
		t.Fatalf("reply %q, want 250 ok held <id>", r)
	}
	return m[1]
}

func mustPrefix(t *testing.T, what, got, prefix string) {
	t.Helper()
	if !strings.HasPrefix(got, prefix) {
		t.Fatalf("%s: got %q, want %q...", what, got, prefix)
	}
}

const alice = "sender:alice@example.com"

// TestAdminEveryPathNeedsToken: every §6 path answers 401 without the token
// or with a wrong one and does nothing; with the token each one works.
func TestAdminEveryPathNeedsToken(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("hold", "2/1h")})
	mustPrefix(t, "first message", sendOne(t, d, "alice@example.com", "bob@remote.example", "carol@remote.example"), "250 ok ")
	held1 := sendHeld(t, d, "alice@example.com", "dave@remote.example")
	held2 := sendHeld(t, d, "alice@example.com", "erin@remote.example")

	id := "/api/senders/" + pathID(alice)
	// In this order with the token each succeeds.
	paths := []struct{ method, path string }{
		{"GET", "/"},
		{"GET", "/api/senders"},
		{"GET", "/api/senders?state=throttled"},
		{"GET", "/api/senders?state=suspended"},
		{"GET", "/api/senders?state=all"},
		{"GET", id},
		{"POST", id + "/suspend"},
		{"POST", id + "/unsuspend"},
		{"POST", id + "/reset"},
		{"GET", "/api/held"},
		{"GET", "/api/held/" + held1},
		{"GET", "/api/held/" + held1 + "?raw=1"},
		{"POST", "/api/held/" + held1 + "/release"},
		{"POST", "/api/held/" + held2 + "/delete"},
		{"GET", "/api/events"},
		{"POST", "/api/reload"},
		{"GET", "/metrics"},
	}
	wrong := "Bearer " + strings.Repeat("0", len(d.token()))
	for _, auth := range []string{"", wrong, "Basic " + d.token(), d.token()} {
		for _, p := range paths {
			code, hdr, body := adminDo(t, d, p.method, p.path, auth, nil)
			if code != http.StatusUnauthorized {
				t.Errorf("%s %s with Authorization %q: %d, want 401\n%s", p.method, p.path, auth, code, body)
			}
			if p.path != "/" && !strings.HasPrefix(hdr.Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("%s %s: 401 without WWW-Authenticate: Bearer", p.method, p.path)
			}
			if p.path == "/" && !strings.Contains(body, `id="token"`) {
				t.Errorf("GET / without a session does not offer the login form:\n%s", body)
			}
		}
	}
	// Nothing above acted.
	if s := getSender(t, d, alice); s.State == admin.StateSuspended {
		t.Errorf("suspended by a request without the token: %+v", s)
	}
	if n := len(d.queued()); n != 1 {
		t.Errorf("qmail-queue called %d times after unauthenticated requests, want 1", n)
	}
	code, body := d.api("GET", "/api/held")
	if list := decodeJSON[[]admin.HeldSummary](t, body); code != 200 || len(list) != 2 {
		t.Fatalf("held after unauthenticated requests: %d %s", code, body)
	}

	for _, p := range paths {
		if code, body := d.api(p.method, p.path); code != http.StatusOK {
			t.Errorf("%s %s with the token: %d %s", p.method, p.path, code, body)
		}
	}
	if code, _, body := adminDo(t, d, "GET", "/healthz", "", nil); code != 200 || strings.TrimSpace(body) != "ok" {
		t.Errorf("/healthz without the token: %d %q", code, body)
	}
	if n := len(d.queued()); n != 2 {
		t.Errorf("qmail-queue called %d times after the release, want 2", n)
	}
	if code, body := d.api("GET", "/api/held"); code != 200 || strings.TrimSpace(body) != "[]" {
		t.Errorf("held after release and delete: %d %s", code, body)
	}
}

// serveRefuses runs relay serve on config and checks that it exits non-zero
// within seconds, its output containing every one of want.
func serveRefuses(t *testing.T, d *daemon, want ...string) {
	t.Helper()
	cmd := exec.Command(bins.relay, "serve", "--config", d.config)
	cmd.Env = d.env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("relay serve kept running:\n%s", out.String())
	}
	if cmd.ProcessState.ExitCode() == 0 {
		t.Errorf("serve: exit 0, output:\n%s", out.String())
	}
	for _, w := range want {
		if !strings.Contains(out.String(), w) {
			t.Errorf("serve's output does not say %q:\n%s", w, out.String())
		}
	}
}

// checkConfig runs relay check-config on d's config.
func checkConfig(d *daemon) (string, error) {
	out, err := exec.Command(bins.relay, "check-config", "--config", d.config).CombinedOutput()
	return string(out), err
}

// TestAdminNonLoopbackNeedsTokenAndTLS: relay serve refuses to put a token
// it made itself on a non-loopback address, or to serve the token there in
// clear unless insecure_plain_http says so on purpose; check-config says so
// too, at the line.
func TestAdminNonLoopbackNeedsTokenAndTLS(t *testing.T) {
	d := newDaemon(t, daemonOpts{})
	d.stop()
	cfg, err := os.ReadFile(d.config)
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := strings.Cut(d.admin, ":")
	open := strings.Replace(string(cfg), fmt.Sprintf("listen = %q", d.admin), fmt.Sprintf("listen = %q", "0.0.0.0:"+port), 1)
	if open == string(cfg) {
		t.Fatal("admin listen line not found in the config")
	}
	write := func(text string) {
		if err := os.WriteFile(d.config, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(open)
	serveRefuses(t, d, "admin.listen", "token_file")
	if got, err := checkConfig(d); err == nil || !strings.Contains(got, "admin.listen") || !strings.Contains(got, "token_file") || !strings.Contains(got, "relay.toml:") {
		t.Errorf("check-config: err %v, output:\n%s", err, got)
	}

	// A token file chosen by the admin, but plain HTTP: refused too.
	tokenFile := filepath.Join(d.dir, "token")
	os.WriteFile(tokenFile, []byte("an-admin-chosen-token-0123456789\n"), 0o600)
	withToken := strings.Replace(open, "[admin]\n", fmt.Sprintf("[admin]\ntoken_file = %q\n", tokenFile), 1)
	write(withToken)
	serveRefuses(t, d, "admin.listen", "tls_cert", "insecure_plain_http")
	if got, err := checkConfig(d); err == nil || !strings.Contains(got, "tls_cert") || !strings.Contains(got, "relay.toml:") {
		t.Errorf("check-config without TLS: err %v, output:\n%s", err, got)
	}

	// Plain HTTP on purpose, or HTTPS: fine.
	write(strings.Replace(withToken, "[admin]\n", "[admin]\ninsecure_plain_http = true\n", 1))
	if got, err := checkConfig(d); err != nil {
		t.Errorf("check-config with insecure_plain_http: %v\n%s", err, got)
	}
	certFile, keyFile := testcert.Write(t, d.dir, "admin.example.test")
	write(strings.Replace(withToken, "[admin]\n", fmt.Sprintf("[admin]\ntls_cert = %q\ntls_key = %q\n", certFile, keyFile), 1))
	if got, err := checkConfig(d); err != nil {
		t.Errorf("check-config with tls_cert: %v\n%s", err, got)
	}
}

// TestAdminOverHTTPS: with tls_cert and tls_key the admin listener speaks
// HTTPS only, and relay ctl works against it, trusting the certificate the
// config names.
func TestAdminOverHTTPS(t *testing.T) {
	d := newDaemon(t, daemonOpts{})
	d.stop()
	certFile, keyFile := testcert.Write(t, d.dir, "admin.example.test")
	cfg, _ := os.ReadFile(d.config)
	tlsCfg := strings.Replace(string(cfg), "[admin]\n", fmt.Sprintf("[admin]\ntls_cert = %q\ntls_key = %q\n", certFile, keyFile), 1)
	if err := os.WriteFile(d.config, []byte(tlsCfg), 0o644); err != nil {
		t.Fatal(err)
	}
	d.start()

	if code, out, errs := ctlRun(t, d, "health"); code != 0 {
		t.Fatalf("relay ctl health over HTTPS: %d %s %s", code, out, errs)
	}
	mustPrefix(t, "a message", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	if code, out, errs := ctlRun(t, d, "senders", "--state", "all"); code != 0 || !strings.Contains(out, "sender:alice@example.com") {
		t.Errorf("relay ctl senders over HTTPS: %d\n%s%s", code, out, errs)
	}
	if resp, err := http.Get("http://" + d.admin + "/healthz"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Error("plain HTTP is served on the HTTPS admin listener")
		}
	}
	c, err := admin.NewClient(d.admin, d.token(), certFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Health(t.Context()); err != nil {
		t.Errorf("HTTPS /healthz: %v", err)
	}
}

// TestAdminCrossSitePOSTRefused: a browser POST from another site is refused
// even with the token, and does not act.
func TestAdminCrossSitePOSTRefused(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("defer", "100/1h")})
	mustPrefix(t, "first message", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	bearer := "Bearer " + d.token()
	for _, hdr := range []map[string]string{
		{"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
		{"Sec-Fetch-Site": "cross-site"},
		{"Origin": "http://evil.example"},
	} {
		for _, path := range []string{"/api/senders/" + pathID(alice) + "/suspend", "/api/reload"} {
			code, _, body := adminDo(t, d, "POST", path, bearer, hdr)
			if code != http.StatusForbidden || !strings.Contains(body, "cross-site") {
				t.Errorf("POST %s with %v: %d %s, want 403 cross-site", path, hdr, code, body)
			}
		}
	}
	if s := getSender(t, d, alice); s.State == admin.StateSuspended {
		t.Fatalf("a cross-site POST suspended %s", alice)
	}
	mustPrefix(t, "after the cross-site POSTs", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	// The same POST from the admin's own page (same origin) goes through.
	code, _, body := adminDo(t, d, "POST", "/api/senders/"+pathID(alice)+"/suspend", bearer,
		map[string]string{"Origin": "http://" + d.admin, "Sec-Fetch-Site": "same-origin"})
	if code != http.StatusOK {
		t.Errorf("same-origin POST: %d %s", code, body)
	}
}

// TestAdminSuspendUnsuspendReset: what the API does is what SMTP clients get
// next.
func TestAdminSuspendUnsuspendReset(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("defer", "3/1h")})
	mustPrefix(t, "before", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")

	if code, body := d.api("POST", "/api/senders/"+pathID(alice)+"/suspend"); code != 200 {
		t.Fatalf("suspend: %d %s", code, body)
	}
	got := sendOne(t, d, "alice@example.com", "bob@remote.example")
	if !strings.HasPrefix(got, "550 5.7.1 ") || !strings.Contains(got, alice) {
		t.Errorf("suspended sender got %q, want 550 5.7.1 naming %s", got, alice)
	}
	// Other senders on the same connection address are not affected.
	mustPrefix(t, "another sender", sendOne(t, d, "bob@example.com", "x@remote.example"), "250 ok ")
	if s := getSender(t, d, alice); s.State != admin.StateSuspended || s.Suspension == nil {
		t.Errorf("after suspend: %+v", s)
	}

	if code, body := d.api("POST", "/api/senders/"+pathID(alice)+"/unsuspend"); code != 200 {
		t.Fatalf("unsuspend: %d %s", code, body)
	}
	mustPrefix(t, "after unsuspend", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	if code, body := d.api("POST", "/api/senders/"+pathID(alice)+"/unsuspend"); code != http.StatusConflict {
		t.Errorf("unsuspending a sender that is not suspended: %d %s, want 409", code, body)
	}

	// Two used; one more fits, then the cap defers.
	mustPrefix(t, "third", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	mustPrefix(t, "over the cap", sendOne(t, d, "alice@example.com", "bob@remote.example"), "451 4.7.1 ")
	if s := getSender(t, d, alice); s.State != admin.StateThrottled {
		t.Errorf("over the cap: state %q, want throttled", s.State)
	}
	if n := rcptsUsed(t, d, alice); n != 3 {
		t.Errorf("used %d, want 3", n)
	}
	if code, body := d.api("POST", "/api/senders/"+pathID(alice)+"/reset"); code != 200 {
		t.Fatalf("reset: %d %s", code, body)
	}
	if n := rcptsUsed(t, d, alice); n != 0 {
		t.Errorf("used %d after reset, want 0", n)
	}
	for i := range 3 {
		mustPrefix(t, "after reset #"+strconv.Itoa(i+1), sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	}
	mustPrefix(t, "over the cap again", sendOne(t, d, "alice@example.com", "bob@remote.example"), "451 4.7.1 ")

	code, body := d.api("GET", "/api/events?identity="+url.QueryEscape(alice))
	evs := decodeJSON[[]admin.Event](t, body)
	kinds := map[string]bool{}
	for _, e := range evs {
		kinds[e.Kind] = true
	}
	if code != 200 || !kinds["suspended"] || !kinds["unsuspended"] {
		t.Errorf("events for %s: %d %s", alice, code, body)
	}
	// Unknown ids and actions are named, not guessed.
	if code, _ := d.api("POST", "/api/senders/"+pathID("sender:nobody@example.com")+"/reset"); code != http.StatusNotFound {
		t.Errorf("reset of an unknown sender: %d, want 404", code)
	}
	if code, _ := d.api("POST", "/api/senders/"+pathID(alice)+"/explode"); code != http.StatusNotFound {
		t.Errorf("unknown action: %d, want 404", code)
	}
}

// TestAdminReleaseHeld: held mail is released to qmail-queue with its
// original envelope and is not counted again.
func TestAdminReleaseHeld(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("hold", "1/1h")})
	mustPrefix(t, "first", sendOne(t, d, "alice@example.com", "zed@remote.example"), "250 ok ")
	s := dialSMTP(t, d.smtp)
	s.expect("EHLO client.example.test", "250")
	r := s.send("alice@example.com", []string{"bob@remote.example", "carol@remote.example"},
		"Subject: held for review\r\nMessage-ID: <held-1@example.com>\r\n\r\nplease hold\r\n")
	m := heldReply.FindStringSubmatch(r)
	if m == nil {
		t.Fatalf("over the cap with over_limit = hold: %q", r)
	}
	id := m[1]
	if n := len(d.queued()); n != 1 {
		t.Fatalf("held message reached qmail-queue: %d calls", n)
	}
	used := rcptsUsed(t, d, alice)
	if used != 1 {
		t.Errorf("used %d after hold, want 1 (held mail is not charged)", used)
	}

	code, body := d.api("GET", "/api/held")
	list := decodeJSON[[]admin.HeldSummary](t, body)
	if code != 200 || len(list) != 1 || list[0].ID != id || list[0].From != "alice@example.com" || list[0].Rcpts != 2 ||
		list[0].Subject != "held for review" || list[0].Reason == "" {
		t.Fatalf("GET /api/held: %d %s", code, body)
	}
	code, body = d.api("GET", "/api/held/"+id)
	msg := decodeJSON[admin.HeldMessage](t, body)
	if code != 200 || strings.Join(msg.To, ",") != "bob@remote.example,carol@remote.example" || !strings.Contains(msg.Headers, "Message-ID: <held-1@example.com>") {
		t.Fatalf("GET /api/held/%s: %d %s", id, code, body)
	}

	code, body = d.api("POST", "/api/held/"+id+"/release")
	res := decodeJSON[admin.ActionResult](t, body)
	if code != 200 || res.Action != "release" || !strings.HasPrefix(res.Reply, "ok") {
		t.Fatalf("release: %d %s", code, body)
	}
	calls := d.queued()
	if len(calls) != 2 {
		t.Fatalf("qmail-queue called %d times, want 2", len(calls))
	}
	rel := calls[1]
	if want := "Falice@example.com\x00Tbob@remote.example\x00Tcarol@remote.example\x00\x00"; string(rel.Envelope) != want {
		t.Errorf("released envelope %q, want %q", rel.Envelope, want)
	}
	if !strings.HasPrefix(string(rel.Message), "Received: from ") || !strings.HasSuffix(string(rel.Message), "Subject: held for review\nMessage-ID: <held-1@example.com>\n\nplease hold\n") {
		t.Errorf("released message:\n%q", rel.Message)
	}
	if n := rcptsUsed(t, d, alice); n != used {
		t.Errorf("used %d after release, want %d: released mail was counted again", n, used)
	}
	if code, _ := d.api("GET", "/api/held/"+id); code != http.StatusNotFound {
		t.Errorf("released message still held: %d", code)
	}
	if code, _ := d.api("POST", "/api/held/"+id+"/release"); code != http.StatusNotFound {
		t.Errorf("second release: %d, want 404", code)
	}
	if n := len(d.queued()); n != 2 {
		t.Errorf("qmail-queue called %d times after a second release, want 2", n)
	}
	_, body = d.api("GET", "/api/events?kind=released")
	if evs := decodeJSON[[]admin.Event](t, body); len(evs) != 1 || evs[0].Identity == "" || !strings.Contains(evs[0].Detail, id) {
		t.Errorf("released events: %s", body)
	}
	if code, _ := d.api("GET", "/api/held/..%2Fpolicy.db"); code != http.StatusBadRequest {
		t.Errorf("held id naming a path outside the spool: %d, want 400", code)
	}
}

// TestAdminReloadBadFile: POST /api/reload with a broken file answers with
// file:line:col and the running policy stays; a good file takes effect.
func TestAdminReloadBadFile(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("defer", "1/1h")})
	mustPrefix(t, "first", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	mustPrefix(t, "over the cap", sendOne(t, d, "alice@example.com", "bob@remote.example"), "451 4.7.1 ")

	orig, err := os.ReadFile(d.config)
	if err != nil {
		t.Fatal(err)
	}
	raised := strings.Replace(string(orig), `rcpts = ["1/1h"]`, `rcpts = ["100/1h"]`, 1)
	if raised == string(orig) {
		t.Fatal("rate line not found in the config")
	}
	// The raise comes with a broken rate on the last line: none of it may
	// take effect.
	bad := raised + "\n[policy.limits.domain]\nrcpts = [\"lots/1h\"]\n"
	badLine := strings.Count(bad, "\n") // the last line
	if err := os.WriteFile(d.config, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	code, body := d.api("POST", "/api/reload")
	e := decodeJSON[struct{ Error string }](t, body)
	t.Logf("reload of a bad file: %d %s", code, e.Error)
	wantPos := regexp.MustCompile(regexp.QuoteMeta(d.config) + ":" + strconv.Itoa(badLine) + `:\d+`)
	if code != http.StatusUnprocessableEntity || !wantPos.MatchString(e.Error) {
		t.Errorf("reload of a bad file: %d %q, want 422 naming %s:%d:col", code, e.Error, d.config, badLine)
	}
	mustPrefix(t, "after the bad reload", sendOne(t, d, "alice@example.com", "bob@remote.example"), "451 4.7.1 ")

	// Not TOML at all.
	os.WriteFile(d.config, []byte(raised+"\n[policy\n"), 0o644)
	if code, body := d.api("POST", "/api/reload"); code != http.StatusUnprocessableEntity || !strings.Contains(body, d.config+":") {
		t.Errorf("reload of a file that is not TOML: %d %s", code, body)
	}
	mustPrefix(t, "after the second bad reload", sendOne(t, d, "alice@example.com", "bob@remote.example"), "451 4.7.1 ")

	os.WriteFile(d.config, []byte(raised), 0o644)
	if code, body := d.api("POST", "/api/reload"); code != 200 {
		t.Fatalf("reload of a good file: %d %s", code, body)
	}
	mustPrefix(t, "after the good reload", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	_, body = d.api("GET", "/api/events?kind=reload")
	reloaded := false
	for _, e := range decodeJSON[[]admin.Event](t, body) {
		reloaded = reloaded || strings.Contains(e.Detail, "reloaded")
	}
	if !reloaded {
		t.Errorf("no event for the good reload: %s", body)
	}
}

// metricSeries is one sample of the Prometheus text format.
type metricSeries struct {
	name   string
	labels map[string]string
	value  float64
}

var seriesLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$`)
var labelPair = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

// scrape reads /metrics with the token and returns its relay_ samples.
func scrape(t *testing.T, d *daemon) []metricSeries {
	t.Helper()
	code, body := d.api("GET", "/metrics")
	if code != 200 {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	var out []metricSeries
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "relay_") {
			continue
		}
		m := seriesLine.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("unparsable metrics line %q", line)
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		s := metricSeries{name: m[1], labels: map[string]string{}, value: v}
		for _, p := range labelPair.FindAllStringSubmatch(m[2], -1) {
			s.labels[p[1]] = p[2]
		}
		out = append(out, s)
	}
	return out
}

// sum adds the samples of name whose labels include want.
func sum(series []metricSeries, name string, want map[string]string) (float64, bool) {
	var total float64
	found := false
next:
	for _, s := range series {
		if s.name != name {
			continue
		}
		for k, v := range want {
			if s.labels[k] != v {
				continue next
			}
		}
		total += s.value
		found = true
	}
	return total, found
}

// TestAdminMetricsAfterTraffic: /metrics counts real SMTP traffic, and no
// label carries an address or identity.
func TestAdminMetricsAfterTraffic(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("hold", "6/1h")})
	const n = 3
	for i := range n {
		mustPrefix(t, "message "+strconv.Itoa(i), sendOne(t, d, "alice@example.com", "bob@remote.example", "carol@remote.example"), "250 ok ")
	}
	sendHeld(t, d, "alice@example.com", "dave@remote.example")
	s := dialSMTP(t, d.smtp)
	s.expect("HELO x", "250")
	s.expect("MAIL FROM:<x@internet.example>", "250")
	s.expect("RCPT TO:<y@elsewhere.example>", "250") // a relay client may relay
	if code, body := d.api("POST", "/api/senders/"+pathID("sender:bob@example.com")+"/suspend"); code != 200 {
		t.Fatalf("suspend: %d %s", code, body)
	}

	series := scrape(t, d) // s is still open
	checks := []struct {
		name   string
		labels map[string]string
		min    float64
		max    float64 // -1: no upper bound
	}{
		{"relay_transactions_total", map[string]string{"result": "accepted"}, n, -1},
		{"relay_transactions_total", map[string]string{"result": "held"}, 1, -1},
		{"relay_recipients_total", map[string]string{"result": "accepted"}, 2*n + 1, -1},
		{"relay_policy_decisions_total", map[string]string{"action": "hold", "kind": "sender"}, 1, -1},
		{"relay_policy_decisions_total", map[string]string{"action": "accept"}, 1, -1},
		{"relay_handoff_seconds_count", map[string]string{"method": "qmail-queue", "result": "ok"}, n, n},
		{"relay_connections_open", nil, 1, -1},
		{"relay_held_messages", nil, 1, 1},
		{"relay_suspended_identities", nil, 1, 1},
	}
	for _, c := range checks {
		v, ok := sum(series, c.name, c.labels)
		if !ok || v < c.min || (c.max >= 0 && v > c.max) {
			t.Errorf("%s%v = %v (present %v), want in [%v, %v] (-1: unbounded)", c.name, c.labels, v, ok, c.min, c.max)
		}
	}
	for _, sr := range series {
		for k, v := range sr.labels {
			if strings.ContainsAny(v, "@:") || strings.Contains(v, "example") || strings.Contains(v, "127.0.0") {
				t.Errorf("%s label %s=%q carries an address or identity", sr.name, k, v)
			}
		}
	}
}

// TestAdminActionsDurable: suspend and reset are on disk when the API
// answers: a kill -9 right after loses neither.
func TestAdminActionsDurable(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("defer", "2/1h")})
	bob := "sender:bob@example.com"
	for range 2 {
		mustPrefix(t, "alice", sendOne(t, d, "alice@example.com", "x@remote.example"), "250 ok ")
		mustPrefix(t, "bob", sendOne(t, d, "bob@example.com", "x@remote.example"), "250 ok ")
	}
	// A clean restart keeps the counters, so what a reset forgets is on
	// disk before it.
	d.stop()
	d.start()
	mustPrefix(t, "alice over the cap after a restart", sendOne(t, d, "alice@example.com", "x@remote.example"), "451 4.7.1 ")
	if code, body := d.api("POST", "/api/senders/"+pathID(alice)+"/reset"); code != 200 {
		t.Fatalf("reset: %d %s", code, body)
	}
	if code, body := d.api("POST", "/api/senders/"+pathID(bob)+"/suspend"); code != 200 {
		t.Fatalf("suspend: %d %s", code, body)
	}
	d.kill9()
	d.start()

	got := sendOne(t, d, "bob@example.com", "x@remote.example")
	if !strings.HasPrefix(got, "550 5.7.1 ") {
		t.Errorf("suspended sender after kill -9 and restart: %q, want 550 5.7.1", got)
	}
	if v, _ := sum(scrape(t, d), "relay_suspended_identities", nil); v != 1 {
		t.Errorf("relay_suspended_identities after restart = %v, want 1", v)
	}
	for i := range 2 {
		mustPrefix(t, "alice after reset and restart #"+strconv.Itoa(i+1), sendOne(t, d, "alice@example.com", "x@remote.example"), "250 ok ")
	}
	if code, body := d.api("POST", "/api/senders/"+pathID(bob)+"/unsuspend"); code != 200 {
		t.Fatalf("unsuspend: %d %s", code, body)
	}
	if v, _ := sum(scrape(t, d), "relay_suspended_identities", nil); v != 0 {
		t.Errorf("relay_suspended_identities after unsuspend = %v, want 0", v)
	}
}

// TestAdminReleaseFailureKeepsMessage: a release that qmail-queue defers
// answers an error with qmail's text and leaves the message held.
func TestAdminReleaseFailureKeepsMessage(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("hold", "1/1h")})
	mustPrefix(t, "first", sendOne(t, d, "alice@example.com", "zed@remote.example"), "250 ok ")
	id := sendHeld(t, d, "alice@example.com", "bob@remote.example")
	d.stop()
	env := d.env
	d.env = append(append([]string(nil), env...), "FAKEQQ_EXIT=71")
	d.start()
	code, body := d.api("POST", "/api/held/"+id+"/release")
	if code < 500 || !strings.Contains(body, "temporarily rejected") {
		t.Errorf("release with qmail-queue exiting 71: %d %s, want a 5xx status with qmail's text", code, body)
	}
	if code, _ := d.api("GET", "/api/held/"+id); code != 200 {
		t.Fatalf("message gone from the spool after a failed release: %d", code)
	}
	d.stop()
	d.env = env
	d.start()
	if code, body := d.api("POST", "/api/held/"+id+"/release"); code != 200 {
		t.Fatalf("release after qmail-queue recovered: %d %s", code, body)
	}
	calls := d.queued()
	if last := calls[len(calls)-1]; last.From() != "alice@example.com" || strings.Join(last.To(), ",") != "bob@remote.example" {
		t.Errorf("released envelope: %q", last.Envelope)
	}
}

// TestAdminLogoutEndsSession: the real daemon's page: log in with the
// token, log out, and a copy of the old cookie opens nothing any more.
func TestAdminLogoutEndsSession(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("defer", "100/1h")})
	mustPrefix(t, "a message", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	base := "http://" + d.admin
	resp, err := noRedirect.PostForm(base+"/login", url.Values{"token": {d.token()}, "next": {"/"}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == "relay_admin" {
			cookie = c
		}
	}
	if cookie == nil {
		t.Fatalf("login: %d, no cookie", resp.StatusCode)
	}
	do := func(method, path string, form url.Values) (int, string) {
		var body *strings.Reader
		if form != nil {
			body = strings.NewReader(form.Encode())
		} else {
			body = strings.NewReader("")
		}
		req, _ := http.NewRequest(method, base+path, body)
		if form != nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		req.AddCookie(cookie)
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		return resp.StatusCode, b.String()
	}
	code, page := do("GET", "/", nil)
	_, rest, ok := strings.Cut(page, `name="csrf" value="`)
	if code != 200 || !ok {
		t.Fatalf("page with the cookie: %d", code)
	}
	csrf, _, _ := strings.Cut(rest, `"`)
	if code, _ := do("POST", "/logout", url.Values{"csrf": {csrf}}); code != http.StatusSeeOther {
		t.Fatalf("logout: %d", code)
	}
	if code, _ := do("GET", "/", nil); code != http.StatusUnauthorized {
		t.Errorf("GET / after logout: %d, want 401", code)
	}
	id := "sender:alice@example.com"
	if code, _ := do("POST", "/ui/senders/"+pathID(id)+"/suspend", url.Values{"csrf": {csrf}, "reason": {"x"}}); code != http.StatusUnauthorized && code != http.StatusForbidden {
		t.Errorf("POST /ui/... after logout: %d, want 401 or 403", code)
	}
	if s := getSender(t, d, id); s.State == admin.StateSuspended {
		t.Error("the logged-out cookie suspended a sender")
	}
}
