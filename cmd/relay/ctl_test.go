package main

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"relay/admin"
	"relay/config"
	"relay/policy"
)

const ctlTestToken = "ctl-test-token-0123456789abcdef"

// ctlDaemon serves the admin API over a real policy engine on loopback.
func ctlDaemon(t *testing.T) (*httptest.Server, *policy.Engine) {
	t.Helper()
	db, err := policy.OpenDB(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	cfg := &config.Config{Policy: config.Policy{Mode: config.PolicyEnforce, OverLimit: config.OverLimitDefer}}
	engine, err := policy.New(db, cfg, policy.Options{FlushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { engine.Close() })
	srv, err := admin.New(admin.Options{Token: ctlTestToken, Policy: engine,
		Reload: func() error { return os.ErrInvalid }})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(srv.Handler())
	t.Cleanup(ts.Close)
	return ts, engine
}

func runCtlAgainst(t *testing.T, ts *httptest.Server, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := ctl(args, &out, &errb, func() (*admin.Client, error) {
		return admin.NewClient(strings.TrimPrefix(ts.URL, "http://"), ctlTestToken, "")
	})
	return code, out.String(), errb.String()
}

func TestCtlAgainstDaemon(t *testing.T) {
	ts, engine := ctlDaemon(t)
	if code, out, errs := runCtlAgainst(t, ts, "suspend", "uid:web1:1001", "--reason", "spam from contact.php"); code != 0 || !strings.Contains(out, "suspend uid:web1:1001: done") {
		t.Fatalf("suspend: %d %q %q", code, out, errs)
	}
	if s, _ := engine.Sender("uid:web1:1001"); s.State != policy.StateSuspended || s.Suspension.Reason != "spam from contact.php" {
		t.Fatalf("engine after ctl suspend: %+v", s)
	}
	code, out, _ := runCtlAgainst(t, ts, "senders", "--state", "suspended")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) != 2 || !strings.HasPrefix(lines[0], "ID") || !strings.Contains(lines[1], "uid:web1:1001") ||
		strings.Index(lines[0], "STATE") != strings.Index(lines[1], "suspended") {
		t.Fatalf("senders table: %d\n%s", code, out)
	}
	code, out, _ = runCtlAgainst(t, ts, "--json", "senders", "--state", "suspended")
	var ss []admin.Sender
	if err := json.Unmarshal([]byte(out), &ss); code != 0 || err != nil || len(ss) != 1 || ss[0].ID != "uid:web1:1001" {
		t.Fatalf("senders --json: %d %v %s", code, err, out)
	}
	if code, out, _ := runCtlAgainst(t, ts, "sender", "uid:web1:1001"); code != 0 || !strings.Contains(out, "spam from contact.php") {
		t.Errorf("sender: %d %s", code, out)
	}
	if code, out, _ := runCtlAgainst(t, ts, "events", "--kind", "suspended"); code != 0 || !strings.Contains(out, "uid:web1:1001") {
		t.Errorf("events: %d %s", code, out)
	}
	if code, _, _ := runCtlAgainst(t, ts, "unsuspend", "uid:web1:1001"); code != 0 {
		t.Errorf("unsuspend: %d", code)
	}
	if code, _, errs := runCtlAgainst(t, ts, "unsuspend", "uid:web1:1001"); code != 1 || !strings.Contains(errs, "not suspended") {
		t.Errorf("second unsuspend: %d %q", code, errs)
	}
	if code, out, _ := runCtlAgainst(t, ts, "held"); code != 0 || !strings.HasPrefix(out, "ID") {
		t.Errorf("held: %d %q", code, out)
	}
	if code, _, errs := runCtlAgainst(t, ts, "reload"); code != 1 || !strings.Contains(errs, "422") {
		t.Errorf("reload with a bad file: %d %q", code, errs)
	}
	if code, out, _ := runCtlAgainst(t, ts, "health"); code != 0 || out != "ok\n" {
		t.Errorf("health: %d %q", code, out)
	}
	for _, args := range [][]string{{}, {"bogus"}, {"suspend"}, {"senders", "extra"}, {"events", "--nope"}} {
		if code, _, _ := runCtlAgainst(t, ts, args...); code != 64 {
			t.Errorf("ctl %q: exit %d, want 64", args, code)
		}
	}
	ts.Close()
	if code, _, _ := runCtlAgainst(t, ts, "health"); code != 69 {
		t.Errorf("daemon down: exit %d, want 69", code)
	}
}

// TestRunCtlReadsConfig: relay ctl finds the address and the token through
// the config file (needs config.Load).
func TestRunCtlReadsConfig(t *testing.T) {
	ts, _ := ctlDaemon(t)
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "admin.token")
	os.WriteFile(tokenFile, []byte(ctlTestToken+"\n"), 0o600)
	cfgFile := filepath.Join(dir, "relay.toml")
	os.WriteFile(cfgFile, []byte("data_dir = \""+dir+"\"\n[admin]\nlisten = \""+strings.TrimPrefix(ts.URL, "http://")+"\"\ntoken_file = \""+tokenFile+"\"\n"), 0o600)
	loads := func() (ok bool) {
		defer func() {
			if recover() != nil {
				ok = false
			}
		}()
		_, err := config.Load(cfgFile)
		return err == nil
	}
	if !loads() {
		t.Skip("config.Load cannot load a minimal config yet")
	}
	var out, errb bytes.Buffer
	if code := runCtl([]string{"--config", cfgFile, "health"}, &out, &errb); code != 0 || out.String() != "ok\n" {
		t.Fatalf("relay ctl --config health: %d %q %q", code, out.String(), errb.String())
	}
}
