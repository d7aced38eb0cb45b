package admin

import (
	"strings"
	"testing"

	"github.com/chromedp/chromedp"

	"relay/internal/browsertest"
)

// TestBrowserSuspend drives Debian's chromium: log in with the token, see a
// throttled sender, click Suspend, see it suspended.
func TestBrowserSuspend(t *testing.T) {
	f := newFixture(t)
	browser := browsertest.New(t)

	row := `#throttled tr[data-id="` + webID + `"]`
	step := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(browser, steps...); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(browser, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("text of %s: %v", sel, err)
		}
		return s
	}
	step("log in",
		chromedp.Navigate(f.ts.URL+"/"),
		chromedp.WaitVisible(chromedp.CSS(`#token`)),
		chromedp.SendKeys(chromedp.CSS(`#token`), testToken),
		chromedp.Click(chromedp.CSS(`#login`)),
		chromedp.WaitVisible(chromedp.CSS(row)))
	throttled := text(row + ` td.state`)
	step("suspend",
		chromedp.Click(chromedp.CSS(row+` button.suspend`)),
		chromedp.WaitVisible(chromedp.CSS(`#msg`)))
	notice := text(`#msg`)
	state := text(`#suspended tr[data-id="` + webID + `"] td.state`)
	if strings.TrimSpace(throttled) != "throttled" {
		t.Errorf("before: state %q", throttled)
	}
	if strings.TrimSpace(state) != "suspended" || !strings.Contains(notice, "suspend done") {
		t.Errorf("after clicking Suspend: state %q, notice %q", state, notice)
	}
	if s, _ := f.policy.Sender(webID); s.State != StateSuspended {
		t.Errorf("policy: %+v", s)
	}
}
