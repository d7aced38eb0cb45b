package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"relay/internal/testcert"
	"relay/queue"
)

const testToken = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

type fixture struct {
	srv     *Server
	ts      *httptest.Server
	policy  *fakePolicy
	held    *fakeHeld
	handoff *recordingHandoff
	clock   *clock
	reload  func() error
}

const (
	webID    = "uid:web1:1001"
	bobID    = "user:bob"
	newsID   = "sender:news@example.com"
	ip6ID    = "ip:2001:db8::/64"
	heldID   = "1767261600.1234.mail"
	heldBody = "Received: (qmail 4242 invoked by uid 1001); 1 Jan 2026 10:00:00 -0000\nSubject: Buy now\nX-PHP-Originating-Script: 1001:contact.php\n\nSpam body line\n"
)

func newFixture(t *testing.T) *fixture {
	t.Helper()
	clk := &clock{t: time.Date(2026, 1, 1, 10, 0, 0, 0, time.UTC)}
	now := clk.Now()
	p := newFakePolicy(clk.Now,
		Sender{ID: webID, Kind: "uid", State: StateThrottled, Account: "alice", Scripts: []string{"contact.php", "<b>x</b>.php"},
			Rule: "default uid", LastSeen: now.Add(-2 * time.Minute),
			Usage: []Usage{
				{Metric: "rcpts", Window: "1h", Limit: 500, Used: 512},
				{Metric: "msgs", Window: "1h", Limit: 200, Used: 40},
			},
			LastDecision: "uid:web1:1001 is over 500 recipients/1h; try again in 12m"},
		Sender{ID: bobID, Kind: "user", State: StateOK, Rule: "default user", LastSeen: now.Add(-time.Hour),
			Usage: []Usage{{Metric: "rcpts", Window: "1m", Limit: 100, Used: 30}}},
		Sender{ID: newsID, Kind: "sender", State: StateSuspended, Rule: "allow sender:news@example.com",
			Suspension: &Suspension{Reason: "5 over-limit events in 24h", At: now.Add(-3 * time.Hour)}},
		Sender{ID: ip6ID, Kind: "ip", State: StateOK, Rule: "none"},
	)
	p.RecordEvent(Event{Time: now.Add(-10 * time.Minute), Kind: "throttle_start", Identity: webID, Account: "alice", Script: "contact.php", Detail: "over 500 recipients/1h"})
	p.RecordEvent(Event{Time: now.Add(-5 * time.Minute), Kind: "over_limit", Identity: webID, Account: "alice", Detail: "over 500 recipients/1h"})
	p.RecordEvent(Event{Time: now.Add(-4 * time.Minute), Kind: "over_limit", Identity: bobID, Detail: "over 100 recipients/1m"})

	ho := &recordingHandoff{}
	h := newFakeHeld(ho)
	h.put(queue.HeldMeta{ID: heldID, Time: now.Add(-time.Minute), From: "alice@example.com",
		To: []string{"x@example.net", "y@example.org"}, Identities: []string{webID, "sender:alice@example.com"},
		Reason: "over 500 recipients/1h", Subject: "Buy now"}, heldBody)

	f := &fixture{policy: p, held: h, handoff: ho, clock: clk}
	reg := prometheus.NewRegistry()
	if err := RegisterHeldGauge(reg, h); err != nil {
		t.Fatal(err)
	}
	srv, err := New(Options{Token: testToken, Policy: p, Held: h, Now: clk.Now, Gatherer: reg,
		Reload: func() error { return f.reload() }})
	if err != nil {
		t.Fatal(err)
	}
	f.reload = func() error { return nil }
	f.srv = srv
	f.ts = newTestHTTP(t, srv)
	return f
}

func newTestHTTP(t *testing.T, srv *Server) *httptest.Server {
	ts := httptest.NewServer(srv.Handler())
	t.Cleanup(ts.Close)
	return ts
}

// req is one test request.
type req struct {
	method, path string
	form         url.Values
	bearer       string
	cookie       *http.Cookie
	header       map[string]string
}

func (f *fixture) do(t *testing.T, r req) (*http.Response, string) {
	t.Helper()
	var body io.Reader
	if r.form != nil {
		body = strings.NewReader(r.form.Encode())
	}
	hr, err := http.NewRequest(r.method, f.ts.URL+r.path, body)
	if err != nil {
		t.Fatal(err)
	}
	if r.form != nil {
		hr.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	if r.bearer != "" {
		hr.Header.Set("Authorization", "Bearer "+r.bearer)
	}
	if r.cookie != nil {
		hr.AddCookie(r.cookie)
	}
	for k, v := range r.header {
		hr.Header.Set(k, v)
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func (f *fixture) api(t *testing.T, method, path string, form url.Values) (int, string) {
	t.Helper()
	resp, body := f.do(t, req{method: method, path: path, form: form, bearer: testToken})
	return resp.StatusCode, body
}

func decode[T any](t *testing.T, body string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatalf("decoding %q: %v", body, err)
	}
	return v
}

var esc = url.PathEscape

// TestEveryEndpointNeedsTheToken: 401 without the token (and with a wrong
// one), an answer with it; /healthz needs nothing.
func TestEveryEndpointNeedsTheToken(t *testing.T) {
	f := newFixture(t)
	endpoints := []struct {
		method, path string
		want         int // with the token
	}{
		{"GET", "/", 200},
		{"GET", "/ui/senders/" + esc(webID), 200},
		{"GET", "/ui/held/" + heldID, 200},
		{"GET", "/api/senders?state=throttled", 200},
		{"GET", "/api/senders/" + esc(webID), 200},
		{"POST", "/api/senders/" + esc(bobID) + "/suspend", 200},
		{"POST", "/api/senders/" + esc(bobID) + "/unsuspend", 200},
		{"POST", "/api/senders/" + esc(bobID) + "/reset", 200},
		{"GET", "/api/held", 200},
		{"GET", "/api/held/" + heldID, 200},
		{"GET", "/api/events", 200},
		{"GET", "/api/dkim", 200},
		{"POST", "/api/reload", 200},
		{"GET", "/metrics", 200},
		{"GET", "/api/nothing-here", 404},
		{"POST", "/api/held/" + heldID + "/release", 200},
		{"POST", "/api/held/" + heldID + "/delete", 404}, // released just before
	}
	for _, e := range endpoints {
		released := len(f.handoff.envs)
		for _, tok := range []string{"", "wrong-token-wrong-token", testToken[:len(testToken)-1] + "0"} {
			resp, body := f.do(t, req{method: e.method, path: e.path, bearer: tok, form: url.Values{}})
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("%s %s with token %q: %d, want 401", e.method, e.path, tok, resp.StatusCode)
			}
			if strings.HasPrefix(e.path, "/api/") && !strings.Contains(body, `"error"`) {
				t.Errorf("%s %s: 401 body %q is not a JSON error", e.method, e.path, body)
			}
		}
		if len(f.handoff.envs) != released {
			t.Fatalf("a request without the token released mail")
		}
		resp, body := f.do(t, req{method: e.method, path: e.path, bearer: testToken, form: url.Values{}})
		if resp.StatusCode != e.want {
			t.Errorf("%s %s with the token: %d %s, want %d", e.method, e.path, resp.StatusCode, body, e.want)
		}
	}
	resp, body := f.do(t, req{method: "GET", path: "/healthz"})
	if resp.StatusCode != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %q", resp.StatusCode, body)
	}
	// A page without a session answers with the login form.
	resp, body = f.do(t, req{method: "GET", path: "/"})
	if resp.StatusCode != 401 || !strings.Contains(body, `action="/login"`) {
		t.Errorf("GET / without a session: %d, login form missing", resp.StatusCode)
	}
}

func login(t *testing.T, f *fixture) *http.Cookie {
	t.Helper()
	resp, _ := f.do(t, req{method: "POST", path: "/login", form: url.Values{"token": {testToken}, "next": {"/ui/senders/" + esc(webID)}}})
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("login: %d", resp.StatusCode)
	}
	if loc := resp.Header.Get("Location"); loc != "/ui/senders/"+esc(webID) {
		t.Errorf("login redirects to %q", loc)
	}
	for _, c := range resp.Cookies() {
		if c.Name == sessionCookie {
			return c
		}
	}
	t.Fatal("login set no session cookie")
	return nil
}

// csrfOf finds the CSRF token in a page.
func csrfOf(t *testing.T, page string) string {
	t.Helper()
	_, rest, ok := strings.Cut(page, `name="csrf" value="`)
	if !ok {
		t.Fatal("no CSRF field in the page")
	}
	tok, _, _ := strings.Cut(rest, `"`)
	return tok
}

func TestLoginCookieFlow(t *testing.T) {
	f := newFixture(t)
	resp, body := f.do(t, req{method: "POST", path: "/login", form: url.Values{"token": {"not-the-token-at-all"}}})
	if resp.StatusCode != 401 || !strings.Contains(body, "Wrong token") || len(resp.Cookies()) != 0 {
		t.Fatalf("wrong token: %d, cookies %v", resp.StatusCode, resp.Cookies())
	}
	resp, _ = f.do(t, req{method: "POST", path: "/login", form: url.Values{"token": {testToken}, "next": {"//evil.example/"}}})
	if loc := resp.Header.Get("Location"); loc != "/" {
		t.Errorf("login with next=//evil.example/ redirects to %q, want /", loc)
	}

	c := login(t, f)
	// The header as sent: HttpOnly, SameSite=Strict, Path=/, no token.
	resp, _ = f.do(t, req{method: "POST", path: "/login", form: url.Values{"token": {testToken}}})
	sc := resp.Header.Get("Set-Cookie")
	for _, want := range []string{"HttpOnly", "SameSite=Strict", "Path=/"} {
		if !strings.Contains(sc, want) {
			t.Errorf("Set-Cookie %q lacks %s", sc, want)
		}
	}
	if strings.Contains(sc, testToken) || strings.Contains(sc, testToken[:16]) {
		t.Errorf("the cookie carries the token: %q", sc)
	}

	resp, page := f.do(t, req{method: "GET", path: "/", cookie: c})
	if resp.StatusCode != 200 || !strings.Contains(page, webID) {
		t.Fatalf("dashboard with the cookie: %d", resp.StatusCode)
	}
	csrf := csrfOf(t, page)

	// The cookie alone does not make a POST: it needs the form's CSRF token.
	path := "/ui/senders/" + esc(bobID) + "/suspend"
	resp, _ = f.do(t, req{method: "POST", path: path, cookie: c, form: url.Values{"reason": {"x"}}})
	if resp.StatusCode != 403 {
		t.Errorf("cookie POST without CSRF token: %d, want 403", resp.StatusCode)
	}
	resp, _ = f.do(t, req{method: "POST", path: path, cookie: c, form: url.Values{"csrf": {strings.Repeat("0", 32)}}})
	if resp.StatusCode != 403 {
		t.Errorf("cookie POST with a wrong CSRF token: %d, want 403", resp.StatusCode)
	}
	if s, _ := f.policy.Sender(bobID); s.State == StateSuspended {
		t.Fatal("suspended without a CSRF token")
	}
	resp, _ = f.do(t, req{method: "POST", path: path, cookie: c,
		form:   url.Values{"csrf": {csrf}, "reason": {"complaint #42"}, "back": {"/"}},
		header: map[string]string{"Sec-Fetch-Site": "same-origin", "Origin": f.ts.URL}})
	if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(resp.Header.Get("Location"), "/?msg=") {
		t.Fatalf("suspend from the page: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if s, _ := f.policy.Sender(bobID); s.State != StateSuspended || s.Suspension.Reason != "complaint #42" {
		t.Fatalf("after suspend from the page: %+v", s)
	}

	// Another session's CSRF token does not fit this session.
	c2 := login(t, f)
	resp, _ = f.do(t, req{method: "POST", path: "/ui/senders/" + esc(bobID) + "/unsuspend", cookie: c2, form: url.Values{"csrf": {csrf}}})
	if resp.StatusCode != 403 {
		t.Errorf("CSRF token of another session: %d, want 403", resp.StatusCode)
	}

	// A forged cookie and an expired one are no session.
	forged := *c
	forged.Value = c.Value[:len(c.Value)-1] + "x"
	if resp, _ := f.do(t, req{method: "GET", path: "/api/events", cookie: &forged}); resp.StatusCode != 401 {
		t.Errorf("forged cookie: %d, want 401", resp.StatusCode)
	}
	f.clock.Add(sessionTTL + time.Minute)
	if resp, _ := f.do(t, req{method: "GET", path: "/api/events", cookie: c}); resp.StatusCode != 401 {
		t.Errorf("expired cookie: %d, want 401", resp.StatusCode)
	}
}

// TestLogout: POST /logout ends the session on the server: a copy of the
// old cookie then opens nothing (401 with the login form for the page, 401
// for a POST, which changes nothing), while other sessions go on.
func TestLogout(t *testing.T) {
	f := newFixture(t)
	c := login(t, f)
	other := login(t, f)
	_, page := f.do(t, req{method: "GET", path: "/", cookie: c})
	csrf := csrfOf(t, page)
	resp, _ := f.do(t, req{method: "POST", path: "/logout", cookie: c, form: url.Values{"csrf": {csrf}}})
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login" {
		t.Fatalf("logout: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	for _, nc := range resp.Cookies() {
		if nc.Name == sessionCookie && nc.MaxAge >= 0 {
			t.Errorf("logout left the cookie: %+v", nc)
		}
	}

	resp, body := f.do(t, req{method: "GET", path: "/", cookie: c})
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(body, `action="/login"`) {
		t.Errorf("GET / with the logged-out cookie: %d, want 401 and the login form", resp.StatusCode)
	}
	resp, _ = f.do(t, req{method: "POST", path: "/ui/senders/" + esc(bobID) + "/suspend", cookie: c,
		form: url.Values{"csrf": {csrf}, "reason": {"after logout"}}})
	if resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusForbidden {
		t.Errorf("POST /ui/... with the logged-out cookie: %d, want 401 or 403", resp.StatusCode)
	}
	if s, _ := f.policy.Sender(bobID); s.State == StateSuspended {
		t.Error("a logged-out cookie suspended a sender")
	}
	if resp, _ := f.do(t, req{method: "GET", path: "/api/events", cookie: c}); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("API with the logged-out cookie: %d, want 401", resp.StatusCode)
	}
	if resp, _ := f.do(t, req{method: "GET", path: "/", cookie: other}); resp.StatusCode != http.StatusOK {
		t.Errorf("another session after the logout: %d, want 200", resp.StatusCode)
	}
}

// TestSessionsBounded: the server keeps at most maxSessions sessions; a
// login beyond that ends the oldest.
func TestSessionsBounded(t *testing.T) {
	var ss sessionStore
	now := time.Now()
	for i := range maxSessions + 1 {
		ss.add(fmt.Sprint(i), now.Add(time.Duration(i)*time.Second))
	}
	if len(ss.issued) != maxSessions || ss.open("0") || !ss.open("1") || !ss.open(fmt.Sprint(maxSessions)) {
		t.Errorf("%d sessions; oldest open %v", len(ss.issued), ss.open("0"))
	}
}

// TestCrossSitePostRefused: a page on another site cannot act with the
// admin's cookie, and a cross-site request is refused even with the token.
func TestCrossSitePostRefused(t *testing.T) {
	f := newFixture(t)
	c := login(t, f)
	_, page := f.do(t, req{method: "GET", path: "/", cookie: c})
	csrf := csrfOf(t, page)
	path := "/ui/senders/" + esc(bobID) + "/suspend"
	for _, h := range []map[string]string{
		{"Origin": "http://evil.example"},
		{"Sec-Fetch-Site": "cross-site"},
		{"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
		{"Sec-Fetch-Site": "same-site", "Origin": "http://other.127.0.0.1.example"},
	} {
		resp, _ := f.do(t, req{method: "POST", path: path, cookie: c, form: url.Values{"csrf": {csrf}}, header: h})
		if resp.StatusCode != 403 {
			t.Errorf("cookie POST with %v: %d, want 403", h, resp.StatusCode)
		}
		resp, _ = f.do(t, req{method: "POST", path: "/api/senders/" + esc(bobID) + "/suspend", bearer: testToken, form: url.Values{}, header: h})
		if resp.StatusCode != 403 {
			t.Errorf("bearer POST with %v: %d, want 403", h, resp.StatusCode)
		}
		resp, _ = f.do(t, req{method: "POST", path: "/login", form: url.Values{"token": {testToken}}, header: h})
		if resp.StatusCode != 403 || len(resp.Cookies()) != 0 {
			t.Errorf("login POST with %v: %d, want 403", h, resp.StatusCode)
		}
	}
	if s, _ := f.policy.Sender(bobID); s.State != StateOK {
		t.Fatalf("a cross-site POST changed the sender: %+v", s)
	}
}

func TestSendersAPI(t *testing.T) {
	f := newFixture(t)
	code, body := f.api(t, "GET", "/api/senders?state=throttled", nil)
	if code != 200 {
		t.Fatalf("%d %s", code, body)
	}
	// The JSON shape other tools rely on.
	list := decode[[]map[string]any](t, body)
	if len(list) != 1 || list[0]["id"] != webID || list[0]["state"] != "throttled" || list[0]["account"] != "alice" ||
		list[0]["rule"] != "default uid" || list[0]["last_seen"] == nil {
		t.Fatalf("throttled list: %s", body)
	}
	usage := list[0]["usage"].([]any)[0].(map[string]any)
	if usage["metric"] != "rcpts" || usage["window"] != "1h" || usage["limit"] != 500.0 || usage["used"] != 512.0 {
		t.Errorf("usage: %v", usage)
	}
	if scripts := list[0]["scripts"].([]any); len(scripts) != 2 || scripts[0] != "contact.php" {
		t.Errorf("scripts: %v", scripts)
	}
	for state, n := range map[string]int{"": 4, "all": 4, "suspended": 1, "ok": 2} {
		code, body := f.api(t, "GET", "/api/senders?state="+state, nil)
		if got := len(decode[[]Sender](t, body)); code != 200 || got != n {
			t.Errorf("state=%q: %d, %d senders, want %d", state, code, got, n)
		}
	}
	if code, body := f.api(t, "GET", "/api/senders?state=bogus", nil); code != 400 || !strings.Contains(body, `"error"`) {
		t.Errorf("bad state: %d %s", code, body)
	}
	// Nobody in a state is [], not null.
	f.policy.Unsuspend(newsID)
	if _, body := f.api(t, "GET", "/api/senders?state=suspended", nil); strings.TrimSpace(body) != "[]" {
		t.Errorf("empty list: %q", body)
	}
}

func TestSenderByID(t *testing.T) {
	f := newFixture(t)
	code, body := f.api(t, "GET", "/api/senders/"+esc(webID), nil)
	if code != 200 {
		t.Fatalf("%d %s", code, body)
	}
	s := decode[Sender](t, body)
	if s.ID != webID || s.LastDecision == "" || len(s.Events) != 2 || s.Events[0].Kind != "over_limit" {
		t.Errorf("sender: %+v", s)
	}
	// Ids with ':' '/' '@', percent-encoded as one segment.
	for _, id := range []string{ip6ID, newsID} {
		if code, body := f.api(t, "GET", "/api/senders/"+esc(id), nil); code != 200 || decode[Sender](t, body).ID != id {
			t.Errorf("GET %s: %d %s", id, code, body)
		}
	}
	if code, _ := f.api(t, "GET", "/api/senders/"+esc("user:nobody"), nil); code != 404 {
		t.Errorf("unknown sender: %d, want 404", code)
	}
	for _, bad := range []string{"nokind", "bogus:x", "user:", esc("user:a\x01b"), esc(strings.Repeat("user:", 300))} {
		if code, _ := f.api(t, "GET", "/api/senders/"+bad, nil); code != 400 {
			t.Errorf("GET /api/senders/%s: %d, want 400", bad, code)
		}
	}
}

func TestSenderActions(t *testing.T) {
	f := newFixture(t)
	path := "/api/senders/" + esc(ip6ID)
	code, body := f.api(t, "POST", path+"/suspend", url.Values{"reason": {"abuse report"}})
	if code != 200 || decode[ActionResult](t, body) != (ActionResult{ID: ip6ID, Action: "suspend"}) {
		t.Fatalf("suspend: %d %s", code, body)
	}
	if s, _ := f.policy.Sender(ip6ID); s.State != StateSuspended || s.Suspension.Reason != "abuse report" {
		t.Fatalf("after suspend: %+v", s)
	}
	if code, _ := f.api(t, "POST", path+"/unsuspend", url.Values{}); code != 200 {
		t.Fatalf("unsuspend: %d", code)
	}
	if s, _ := f.policy.Sender(ip6ID); s.State != StateOK {
		t.Fatalf("after unsuspend: %+v", s)
	}
	if code, body := f.api(t, "POST", path+"/unsuspend", url.Values{}); code != 409 {
		t.Errorf("unsuspend of a sender not suspended: %d %s", code, body)
	}
	// The default reason names the admin.
	f.api(t, "POST", "/api/senders/"+esc(bobID)+"/suspend", nil)
	if s, _ := f.policy.Sender(bobID); s.Suspension == nil || s.Suspension.Reason != "suspended by the admin" {
		t.Errorf("default reason: %+v", s.Suspension)
	}
	if code, _ := f.api(t, "POST", "/api/senders/"+esc(webID)+"/reset", nil); code != 200 {
		t.Fatalf("reset: %d", code)
	}
	if s, _ := f.policy.Sender(webID); s.Usage[0].Used != 0 || s.State != StateOK {
		t.Errorf("after reset: %+v", s)
	}
	if code, _ := f.api(t, "POST", "/api/senders/"+esc("user:nobody")+"/reset", nil); code != 404 {
		t.Errorf("reset of an unknown sender: %d, want 404", code)
	}
	if code, _ := f.api(t, "POST", "/api/senders/"+esc(webID)+"/explode", nil); code != 404 {
		t.Errorf("unknown action: %d, want 404", code)
	}
	if code, _ := f.api(t, "POST", "/api/senders/nokind/suspend", nil); code != 400 {
		t.Errorf("suspend of a bad id: %d, want 400", code)
	}
	if code, _ := f.api(t, "GET", "/api/senders/"+esc(webID)+"/suspend", nil); code != 404 {
		t.Errorf("GET on a POST action: %d, want 404", code)
	}
	if s, _ := f.policy.Sender(webID); s.State == StateSuspended {
		t.Error("a GET suspended")
	}
}

func TestHeldAPI(t *testing.T) {
	f := newFixture(t)
	code, body := f.api(t, "GET", "/api/held", nil)
	list := decode[[]map[string]any](t, body)
	if code != 200 || len(list) != 1 || list[0]["id"] != heldID || list[0]["rcpts"] != 2.0 || list[0]["subject"] != "Buy now" ||
		list[0]["from"] != "alice@example.com" || list[0]["size"] != float64(len(heldBody)) || list[0]["time"] == nil {
		t.Fatalf("held list: %d %s", code, body)
	}
	if ids := list[0]["identities"].([]any); len(ids) != 2 || ids[0] != webID {
		t.Errorf("identities: %v", ids)
	}

	code, body = f.api(t, "GET", "/api/held/"+heldID, nil)
	m := decode[HeldMessage](t, body)
	if code != 200 || !strings.Contains(m.Headers, "Subject: Buy now\n") || strings.Contains(m.Headers, "Spam body") ||
		len(m.To) != 2 || m.Reason == "" {
		t.Fatalf("held message: %d %s", code, body)
	}
	resp, raw := f.do(t, req{method: "GET", path: "/api/held/" + heldID + "?raw=1", bearer: testToken})
	if raw != heldBody || resp.Header.Get("Content-Type") != "message/rfc822" {
		t.Errorf("raw: %q %q", resp.Header.Get("Content-Type"), raw)
	}

	// A failing hand-off keeps the message.
	f.handoff.err = &queue.Error{Code: 451, Text: "qq temporary problem (#4.3.0)"}
	code, body = f.api(t, "POST", "/api/held/"+heldID+"/release", nil)
	if code != 502 || !strings.Contains(body, "qq temporary problem") {
		t.Errorf("release with a failing hand-off: %d %s", code, body)
	}
	if _, err := f.held.Get(heldID); err != nil {
		t.Fatal("a failed release lost the message")
	}
	f.handoff.err = nil

	code, body = f.api(t, "POST", "/api/held/"+heldID+"/release", nil)
	if code != 200 || decode[ActionResult](t, body).Reply != "ok 1 qp 2" {
		t.Fatalf("release: %d %s", code, body)
	}
	if len(f.handoff.envs) != 1 || f.handoff.envs[0].From != "alice@example.com" ||
		strings.Join(f.handoff.envs[0].To, ",") != "x@example.net,y@example.org" || f.handoff.msgs[0] != heldBody {
		t.Errorf("handed off %+v %q", f.handoff.envs, f.handoff.msgs)
	}
	evs := f.policy.Events(EventFilter{Kind: "released"})
	if len(evs) != 1 || evs[0].Identity != webID || !strings.Contains(evs[0].Detail, heldID) {
		t.Errorf("released event: %+v", evs)
	}
	if code, _ := f.api(t, "POST", "/api/held/"+heldID+"/release", nil); code != 404 {
		t.Errorf("second release: %d, want 404", code)
	}

	f.held.put(queue.HeldMeta{ID: "2.x", From: "", To: []string{"z@example.net"}}, "Subject: y\n\nz\n")
	if code, _ := f.api(t, "POST", "/api/held/2.x/delete", nil); code != 200 {
		t.Errorf("delete: %d", code)
	}
	if _, err := f.held.Get("2.x"); !errors.Is(err, queue.ErrHeldNotFound) {
		t.Error("delete left the message")
	}
	for _, bad := range []string{"..%2Fetc%2Fpasswd", ".hidden", "a%20b", esc(strings.Repeat("a", 200))} {
		if code, _ := f.api(t, "GET", "/api/held/"+bad, nil); code != 400 {
			t.Errorf("GET /api/held/%s: %d, want 400", bad, code)
		}
		if code, _ := f.api(t, "POST", "/api/held/"+bad+"/delete", nil); code != 400 {
			t.Errorf("delete %s: %d, want 400", bad, code)
		}
	}
	if code, _ := f.api(t, "GET", "/api/held/nope", nil); code != 404 {
		t.Errorf("unknown held id: %d, want 404", code)
	}
}

func TestEventsAPI(t *testing.T) {
	f := newFixture(t)
	code, body := f.api(t, "GET", "/api/events", nil)
	evs := decode[[]Event](t, body)
	if code != 200 || len(evs) != 3 || evs[0].Identity != bobID || evs[2].Kind != "throttle_start" {
		t.Fatalf("events: %d %s", code, body)
	}
	for i := 1; i < len(evs); i++ {
		if evs[i].Seq > evs[i-1].Seq {
			t.Errorf("not newest first: %+v", evs)
		}
	}
	_, body = f.api(t, "GET", "/api/events?identity="+url.QueryEscape(webID)+"&kind=over_limit", nil)
	if evs := decode[[]Event](t, body); len(evs) != 1 || evs[0].Identity != webID || evs[0].Kind != "over_limit" {
		t.Errorf("filtered: %s", body)
	}
	_, body = f.api(t, "GET", "/api/events?limit=1", nil)
	if evs := decode[[]Event](t, body); len(evs) != 1 {
		t.Errorf("limit=1: %s", body)
	}
	for _, q := range []string{"kind=DROP%20TABLE", "identity=nokind", "limit=-1", "limit=x"} {
		if code, _ := f.api(t, "GET", "/api/events?"+q, nil); code != 400 {
			t.Errorf("events?%s: %d, want 400", q, code)
		}
	}
}

func TestReload(t *testing.T) {
	f := newFixture(t)
	f.reload = func() error {
		return errors.New("/etc/relay/relay.toml:12:3: unknown key policy.limits.user.rcpt")
	}
	code, body := f.api(t, "POST", "/api/reload", nil)
	if code != 422 || decode[apiError](t, body).Error != "/etc/relay/relay.toml:12:3: unknown key policy.limits.user.rcpt" {
		t.Errorf("bad file: %d %s", code, body)
	}
	if evs := f.policy.Events(EventFilter{Kind: "reload"}); len(evs) != 1 || !strings.Contains(evs[0].Detail, "failed: /etc/relay/relay.toml:12:3") {
		t.Errorf("a refused reload must be recorded as failed, with where: %+v", evs)
	}
	f.reload = func() error { return nil }
	if code, _ := f.api(t, "POST", "/api/reload", nil); code != 200 {
		t.Errorf("good file: %d", code)
	}
	if evs := f.policy.Events(EventFilter{Kind: "reload"}); len(evs) != 2 || evs[0].Detail != "admin: config reloaded" {
		t.Errorf("reload events: %+v", evs)
	}
	// From the page, the error is shown back.
	c := login(t, f)
	_, page := f.do(t, req{method: "GET", path: "/", cookie: c})
	f.reload = func() error { return errors.New("relay.toml:3:1: bad") }
	resp, _ := f.do(t, req{method: "POST", path: "/ui/reload", cookie: c, form: url.Values{"csrf": {csrfOf(t, page)}, "back": {"/"}}})
	loc := resp.Header.Get("Location")
	_, page = f.do(t, req{method: "GET", path: loc, cookie: c})
	if !strings.Contains(page, "relay.toml:3:1: bad") || !strings.Contains(page, "running policy stays") {
		t.Errorf("page after a bad reload (%s) does not say why", loc)
	}

	srv, _ := New(Options{Token: testToken, Policy: f.policy})
	rec := httptest.NewRecorder()
	r := httptest.NewRequest("POST", "/api/reload", nil)
	r.Header.Set("Authorization", "Bearer "+testToken)
	srv.Handler().ServeHTTP(rec, r)
	if rec.Code != 501 {
		t.Errorf("reload without a Reload func: %d", rec.Code)
	}
}

func TestNewRefuses(t *testing.T) {
	p := newFakePolicy(time.Now)
	for name, o := range map[string]Options{
		"no token":    {Policy: p},
		"short token": {Token: "abc", Policy: p},
		"no policy":   {Token: testToken},
		"bad listen":  {Token: testToken, Policy: p, Listen: "8025"},
	} {
		if _, err := New(o); err == nil {
			t.Errorf("%s: New accepted %+v", name, o)
		}
	}
}

// TestStartServesHTTPS: with tls_cert and tls_key the listener speaks
// HTTPS only; relay ctl's client trusts exactly that certificate.
func TestStartServesHTTPS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := testcert.Write(t, dir, "admin.example.test")
	p := newFakePolicy(time.Now)
	srv, err := New(Options{Listen: "127.0.0.1:0", Token: testToken, Policy: p, TLSCert: certFile, TLSKey: keyFile})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	addr := srv.Addr().String()
	c, err := NewClient(addr, testToken, certFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(c.BaseURL, "https://") {
		t.Fatalf("client URL %s", c.BaseURL)
	}
	ctx := t.Context()
	if _, err := c.Senders(ctx, StateAll); err != nil {
		t.Fatalf("over HTTPS with the pinned certificate: %v", err)
	}

	// Plain HTTP is not served there.
	resp, err := http.Get("http://" + addr + "/healthz")
	if err == nil {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Errorf("plain HTTP answered 200: %s", body)
		}
	}
	// The cookie of an HTTPS login is Secure.
	hc := &http.Client{Transport: c.HTTP.Transport, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err = hc.PostForm("https://"+addr+"/login", url.Values{"token": {testToken}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if sc := resp.Header.Get("Set-Cookie"); !strings.Contains(sc, "Secure") {
		t.Errorf("HTTPS login cookie %q is not Secure", sc)
	}

	// Another certificate (the one the daemon would serve after an
	// attacker took the address) is refused.
	otherDir := t.TempDir()
	otherCert, _ := testcert.Write(t, otherDir, "admin.example.test")
	c2, err := NewClient(addr, testToken, otherCert)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Senders(ctx, StateAll); err == nil || !strings.Contains(err.Error(), "admin.tls_cert") {
		t.Errorf("a client pinned to another certificate: %v", err)
	}
	if _, err := NewClient(addr, testToken, filepath.Join(dir, "missing.pem")); err == nil {
		t.Error("NewClient with a missing tls_cert file")
	}
}

func TestStartServesOnLoopback(t *testing.T) {
	p := newFakePolicy(time.Now)
	srv, err := New(Options{Listen: "127.0.0.1:0", Token: testToken, Policy: p})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	c, err := NewClient(srv.Addr().String(), testToken, "")
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if err := c.Health(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Senders(ctx, StateAll); err != nil {
		t.Fatal(err)
	}
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Health(ctx); err == nil {
		t.Fatal("still serving after Shutdown")
	}
}
