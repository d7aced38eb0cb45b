package admin

import (
	"crypto/sha256"
	"encoding/base64"
	"net/url"
	"strings"
	"testing"

	"relay/queue"
)

func TestDashboardRenders(t *testing.T) {
	f := newFixture(t)
	resp, page := f.do(t, req{method: "GET", path: "/", bearer: testToken})
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("GET /: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	throttled, _, _ := strings.Cut(page, `<section id="suspended">`)
	for _, want := range []string{
		webID, "alice", "contact.php", // who, which account, which script
		`<meter min="0" max="500"`, `value="512"`, "512/500 recipients per 1h", "40/200 messages per 1h", // how much
		"default uid", "2m ago", "2026-01-01 09:50:00", // rule, last seen, since (throttle_start)
		"try again in 12m",                                      // last decision
		`action="/ui/senders/uid:web1:1001/suspend"`, "Suspend", // buttons
	} {
		if !strings.Contains(throttled, want) {
			t.Errorf("throttled section lacks %q", want)
		}
	}
	for _, want := range []string{
		newsID, "5 over-limit events in 24h", "Unsuspend", // suspended
		bobID, "30/100 recipients per 1m", // busiest under limits
		"Buy now", heldID, `action="/ui/held/` + heldID + `/release"`, `action="/ui/held/` + heldID + `/delete"`, // held
		"throttle_start", "over 100 recipients/1m", // events
	} {
		if !strings.Contains(page, want) {
			t.Errorf("dashboard lacks %q", want)
		}
	}
	// Sender-controlled text is escaped, never markup.
	if strings.Contains(page, "<b>x</b>") || !strings.Contains(page, "&lt;b&gt;x&lt;/b&gt;.php") {
		t.Error("a script name reached the page unescaped")
	}
	// Without JavaScript: no script anywhere; the CSP allows exactly our style sheet.
	if strings.Contains(page, "<script") {
		t.Error("the page has a script")
	}
	_, rest, _ := strings.Cut(page, "<style>")
	css, _, _ := strings.Cut(rest, "</style>")
	sum := sha256.Sum256([]byte(css))
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "'sha256-"+base64.StdEncoding.EncodeToString(sum[:])+"'") ||
		!strings.Contains(csp, "default-src 'none'") {
		t.Errorf("CSP %q does not allow the inline style by hash", csp)
	}
	if resp.Header.Get("X-Frame-Options") != "DENY" || resp.Header.Get("Cache-Control") != "no-store" {
		t.Error("missing frame/cache headers")
	}
}

func TestSenderPageRenders(t *testing.T) {
	f := newFixture(t)
	resp, page := f.do(t, req{method: "GET", path: "/ui/senders/" + esc(webID), bearer: testToken})
	if resp.StatusCode != 200 {
		t.Fatalf("%d", resp.StatusCode)
	}
	for _, want := range []string{webID, `id="state">throttled`, "alice", "contact.php", "default uid",
		"uid:web1:1001 is over 500 recipients/1h; try again in 12m", "over_limit", "throttle_start", "Suspend", "Reset"} {
		if !strings.Contains(page, want) {
			t.Errorf("sender page lacks %q", want)
		}
	}
	// An id with '/' posts to one path segment, and the action works.
	_, page = f.do(t, req{method: "GET", path: "/ui/senders/" + esc(ip6ID), bearer: testToken})
	if !strings.Contains(strings.ToLower(page), `action="/ui/senders/ip:2001:db8::%2f64/suspend"`) {
		t.Error("the ip:…/64 form does not post to one escaped segment")
	}
	if resp, _ := f.do(t, req{method: "POST", path: "/ui/senders/ip:2001:db8::%2f64/suspend", bearer: testToken, form: url.Values{}}); resp.StatusCode != 303 {
		t.Errorf("suspend ip:…/64 from its page: %d", resp.StatusCode)
	}
	if s, _ := f.policy.Sender(ip6ID); s.State != StateSuspended {
		t.Errorf("ip:…/64 not suspended: %+v", s)
	}
	if resp, _ := f.do(t, req{method: "GET", path: "/ui/senders/" + esc("user:nobody"), bearer: testToken}); resp.StatusCode != 404 {
		t.Errorf("unknown sender page: %d", resp.StatusCode)
	}
	if resp, _ := f.do(t, req{method: "GET", path: "/ui/senders/bad", bearer: testToken}); resp.StatusCode != 400 {
		t.Errorf("bad sender id page: %d", resp.StatusCode)
	}
}

func TestHeldPageRenders(t *testing.T) {
	f := newFixture(t)
	_, page := f.do(t, req{method: "GET", path: "/ui/held/" + heldID, bearer: testToken})
	for _, want := range []string{"Received: (qmail 4242 invoked by uid 1001)", "X-PHP-Originating-Script: 1001:contact.php",
		"x@example.net, y@example.org", "alice@example.com", "Release", "Delete", "?raw=1"} {
		if !strings.Contains(page, want) {
			t.Errorf("held page lacks %q", want)
		}
	}
	resp, raw := f.do(t, req{method: "GET", path: "/ui/held/" + heldID + "?raw=1", bearer: testToken})
	if raw != heldBody || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Errorf("raw view: %s %q", resp.Header.Get("Content-Type"), raw)
	}
}

func TestPageActions(t *testing.T) {
	f := newFixture(t)
	c := login(t, f)
	_, page := f.do(t, req{method: "GET", path: "/", cookie: c})
	csrf := csrfOf(t, page)
	post := func(path string, form url.Values) string {
		form.Set("csrf", csrf)
		resp, _ := f.do(t, req{method: "POST", path: path, cookie: c, form: form})
		if resp.StatusCode != 303 {
			t.Fatalf("POST %s: %d", path, resp.StatusCode)
		}
		return resp.Header.Get("Location")
	}
	back := "/ui/senders/" + esc(newsID)
	if loc := post("/ui/senders/"+esc(newsID)+"/unsuspend", url.Values{"back": {back}}); !strings.HasPrefix(loc, back+"?msg=") {
		t.Errorf("unsuspend redirects to %q", loc)
	}
	if s, _ := f.policy.Sender(newsID); s.State != StateOK {
		t.Errorf("unsuspend from the page: %+v", s)
	}
	if loc := post("/ui/senders/"+esc(newsID)+"/unsuspend", url.Values{"back": {"https://evil.example/"}}); !strings.HasPrefix(loc, "/?err=") {
		t.Errorf("failed unsuspend redirects to %q", loc)
	}
	post("/ui/held/"+heldID+"/release", url.Values{})
	if len(f.handoff.envs) != 1 {
		t.Error("release from the page did not hand off")
	}
	f.held.put(queue.HeldMeta{ID: "2.y", To: []string{"a@b"}}, "x\n")
	post("/ui/held/2.y/delete", url.Values{})
	if _, err := f.held.Get("2.y"); err == nil {
		t.Error("delete from the page left the message")
	}
	_, page = f.do(t, req{method: "GET", path: "/?msg=" + url.QueryEscape("<i>done</i>"), cookie: c})
	if strings.Contains(page, "<i>done</i>") || !strings.Contains(page, "&lt;i&gt;done&lt;/i&gt;") {
		t.Error("the notice is not escaped")
	}
}

func TestLocalPath(t *testing.T) {
	for in, want := range map[string]string{
		"": "/", "/": "/", "/ui/senders/x": "/ui/senders/x", "//evil.example": "/", "/\\evil.example": "/",
		"https://evil.example/": "/", "evil": "/", "/a\r\nSet-Cookie: x": "/",
	} {
		if got := localPath(in); got != want {
			t.Errorf("localPath(%q) = %q, want %q", in, got, want)
		}
	}
}

// Issue 12: a script identity shows under its account, and the account
// links to each of its scripts.
func TestScriptsUnderTheirAccount(t *testing.T) {
	f := newFixture(t)
	const scriptID = "script:web1:1001:contact.php"
	f.policy.mu.Lock()
	f.policy.senders[scriptID] = &Sender{ID: scriptID, Kind: "script", State: StateThrottled, Account: "alice",
		Scripts: []string{"contact.php"}, Rule: "default script", LastSeen: f.clock.Now()}
	f.policy.mu.Unlock()

	_, page := f.do(t, req{method: "GET", path: "/ui/senders/" + esc(webID), bearer: testToken})
	if !strings.Contains(page, `<a href="/ui/senders/script:web1:1001:contact.php" class="script"><code>contact.php</code></a>`) {
		t.Error("the account's page does not link its script to the script's identity")
	}
	if !strings.Contains(page, `<a href="/ui/senders/script:web1:1001:%3Cb%3Ex%3C%2Fb%3E.php" class="script"><code>&lt;b&gt;x&lt;/b&gt;.php</code></a>`) {
		t.Error("an odd script name is not linked safely")
	}
	resp, page := f.do(t, req{method: "GET", path: "/ui/senders/" + esc(scriptID), bearer: testToken})
	if resp.StatusCode != 200 {
		t.Fatalf("script page: %d", resp.StatusCode)
	}
	for _, want := range []string{`<dt>Under</dt><dd><a href="/ui/senders/uid:web1:1001" class="owner">uid:web1:1001</a>`,
		"<dt>Account</dt><dd>alice</dd>", "default script", `action="/ui/senders/script:web1:1001:contact.php/suspend"`} {
		if !strings.Contains(page, want) {
			t.Errorf("script page lacks %q", want)
		}
	}
	_, page = f.do(t, req{method: "GET", path: "/", bearer: testToken})
	throttled, _, _ := strings.Cut(page, `<section id="suspended">`)
	if !strings.Contains(throttled, `<span class="muted">under</span> <a href="/ui/senders/uid:web1:1001" class="owner">`) {
		t.Error("the dashboard does not show the script under its account")
	}
	// The API lists and suspends it.
	if code, body := f.api(t, "GET", "/api/senders?state=all", nil); code != 200 || !strings.Contains(body, `"id":"script:web1:1001:contact.php"`) {
		t.Errorf("state=all: %d %s", code, body)
	}
	if code, body := f.api(t, "POST", "/api/senders/"+esc(scriptID)+"/suspend", nil); code != 200 {
		t.Errorf("suspend: %d %s", code, body)
	}
	if s, _ := f.policy.Sender(scriptID); s.State != StateSuspended {
		t.Errorf("not suspended: %+v", s)
	}
}
