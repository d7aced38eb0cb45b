package e2e

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"

	"relay/admin"
)

// ctlRun runs the real binary's `relay ctl --config <daemon's config> args...`.
func ctlRun(t *testing.T, d *daemon, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(bins.relay, append([]string{"ctl", "--config", d.config}, args...)...)
	cmd.Env = d.env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatalf("relay ctl %v: %v", args, err)
	}
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}

// TestCtlAgainstRunningDaemon drives the daemon with `relay ctl` the way an
// admin does from a shell: tables, --json, actions, and exit codes.
func TestCtlAgainstRunningDaemon(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: senderPolicy("hold", "1/1h")})
	mustPrefix(t, "first", sendOne(t, d, "alice@example.com", "zed@remote.example"), "250 ok ")
	heldID := sendHeld(t, d, "alice@example.com", "bob@remote.example", "carol@remote.example")

	code, out, errs := ctlRun(t, d, "senders", "--state", "all")
	if code != 0 || !strings.HasPrefix(out, "ID") || !strings.Contains(out, alice) || !strings.Contains(out, "ip:127.0.0.1") {
		t.Errorf("senders --state all: %d\n%s%s", code, out, errs)
	}
	code, out, errs = ctlRun(t, d, "--json", "senders", "--state", "all")
	senders := decodeJSON[[]admin.Sender](t, out)
	found := false
	for _, s := range senders {
		found = found || s.ID == alice && len(s.Usage) == 1 && s.Usage[0].Used == 1 && s.Usage[0].Limit == 1
	}
	if code != 0 || !found {
		t.Errorf("--json senders: %d %s %s", code, out, errs)
	}

	code, out, errs = ctlRun(t, d, "held")
	if code != 0 || !strings.Contains(out, heldID) || !strings.Contains(out, "alice@example.com") {
		t.Errorf("held: %d\n%s%s", code, out, errs)
	}
	code, out, _ = ctlRun(t, d, "--json", "held")
	if held := decodeJSON[[]admin.HeldSummary](t, out); code != 0 || len(held) != 1 || held[0].ID != heldID || held[0].Rcpts != 2 {
		t.Errorf("--json held: %d %s", code, out)
	}

	code, out, errs = ctlRun(t, d, "release", heldID)
	if code != 0 || !strings.HasPrefix(out, "release "+heldID+": done (ok") {
		t.Errorf("release: %d %q %q", code, out, errs)
	}
	calls := d.queued()
	if len(calls) != 2 || calls[1].From() != "alice@example.com" || strings.Join(calls[1].To(), ",") != "bob@remote.example,carol@remote.example" {
		t.Fatalf("after ctl release qmail-queue got %d calls: %+v", len(calls), calls)
	}
	// The daemon answered with an error: exit 1 and its text.
	if code, _, errs := ctlRun(t, d, "release", heldID); code != 1 || !strings.Contains(errs, "404") && !strings.Contains(errs, "not") {
		t.Errorf("second release: %d %q, want exit 1 with the daemon's error", code, errs)
	}

	code, out, errs = ctlRun(t, d, "suspend", alice, "--reason", "ticket 42")
	if code != 0 || strings.TrimSpace(out) != "suspend "+alice+": done" {
		t.Errorf("suspend: %d %q %q", code, out, errs)
	}
	got := sendOne(t, d, "alice@example.com", "bob@remote.example")
	mustPrefix(t, "after ctl suspend", got, "550 5.7.1 ")
	code, out, _ = ctlRun(t, d, "--json", "senders", "--state", "suspended")
	if ss := decodeJSON[[]admin.Sender](t, out); code != 0 || len(ss) != 1 || ss[0].ID != alice || ss[0].Suspension == nil || ss[0].Suspension.Reason != "ticket 42" {
		t.Errorf("--json senders --state suspended: %d %s", code, out)
	}
	code, out, _ = ctlRun(t, d, "--json", "unsuspend", alice)
	if r := decodeJSON[admin.ActionResult](t, out); code != 0 || r.Action != "unsuspend" || r.ID != alice {
		t.Errorf("--json unsuspend: %d %s", code, out)
	}

	code, out, errs = ctlRun(t, d, "reload")
	if code != 0 || strings.TrimSpace(out) != "reload: done" {
		t.Errorf("reload: %d %q %q", code, out, errs)
	}
	code, out, _ = ctlRun(t, d, "--json", "reload")
	if r := decodeJSON[admin.ActionResult](t, out); code != 0 || r.Action != "reload" {
		t.Errorf("--json reload: %d %s", code, out)
	}
	if code, _, errs := ctlRun(t, d, "bogus"); code != 64 || !strings.Contains(errs, "usage:") {
		t.Errorf("unknown command: %d %q, want 64 and the usage", code, errs)
	}

	d.stop()
	if code, _, errs := ctlRun(t, d, "health"); code != 69 {
		t.Errorf("health with the daemon stopped: %d %q, want 69 (EX_UNAVAILABLE)", code, errs)
	}
}
