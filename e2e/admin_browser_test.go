package e2e

import (
	"strings"
	"testing"

	"github.com/chromedp/chromedp"

	"relay/internal/browsertest"

	"relay/admin"
)

// TestBrowserSuspendThrottledSender: real SMTP traffic throttles a sender;
// Debian's chromium logs in with the token, sees it throttled, clicks
// Suspend, sees it suspended; the next SMTP client gets 550.
func TestBrowserSuspendThrottledSender(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("defer", "1/1h")})
	mustPrefix(t, "first", sendOne(t, d, "alice@example.com", "bob@remote.example"), "250 ok ")
	mustPrefix(t, "over the cap", sendOne(t, d, "alice@example.com", "bob@remote.example"), "451 4.7.1 ")

	browser := browsertest.New(t)

	step := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(browser, steps...); err != nil {
			t.Fatalf("%s: %v\nrelay log:\n%s", what, err, d.logs())
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(browser, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("text of %s: %v", sel, err)
		}
		return strings.TrimSpace(s)
	}
	throttledRow := `#throttled tr[data-id="` + alice + `"]`
	suspendedRow := `#suspended tr[data-id="` + alice + `"]`
	step("log in with the token",
		chromedp.Navigate("http://"+d.admin+"/"),
		chromedp.WaitVisible(chromedp.CSS(`#token`)),
		chromedp.SendKeys(chromedp.CSS(`#token`), d.token()),
		chromedp.Click(chromedp.CSS(`#login`)),
		chromedp.WaitVisible(chromedp.CSS(throttledRow)))
	if st := text(throttledRow + ` td.state`); st != "throttled" {
		t.Errorf("before: state %q, want throttled", st)
	}
	step("click Suspend",
		chromedp.Click(chromedp.CSS(throttledRow+` button.suspend`)),
		chromedp.WaitVisible(chromedp.CSS(`#msg`)),
		chromedp.WaitVisible(chromedp.CSS(suspendedRow)))
	if st := text(suspendedRow + ` td.state`); st != "suspended" {
		t.Errorf("after clicking Suspend: state %q, want suspended", st)
	}
	if msg := text(`#msg`); !strings.Contains(msg, "suspend") {
		t.Errorf("notice after clicking Suspend: %q", msg)
	}

	if s := getSender(t, d, alice); s.State != admin.StateSuspended {
		t.Errorf("API after the click: %+v", s)
	}
	got := sendOne(t, d, "alice@example.com", "bob@remote.example")
	if !strings.HasPrefix(got, "550 5.7.1 ") || !strings.Contains(got, alice+" is suspended") {
		t.Errorf("SMTP after the click: %q, want 550 5.7.1 %s is suspended", got, alice)
	}
}
