package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// relay doctor's command line: usage errors exit 64; a config that does
// not load FAILs (exit 1), in text and in JSON, and the checks that need
// no config are still made.
func TestDoctorCommand(t *testing.T) {
	if code, _, errs := runRelay(t, "doctor", "--bogus"); code != 64 || !strings.Contains(errs, "usage: relay doctor") {
		t.Errorf("exit %d, %q", code, errs)
	}
	dir := t.TempDir()
	bad := filepath.Join(dir, "relay.toml")
	os.WriteFile(bad, []byte("[relay]\nmax_recipients = -1\n"), 0o644)
	args := []string{"doctor", "--config", bad, "--qmail", filepath.Join(dir, "qmail"), "--sendmail", filepath.Join(dir, "sendmail")}
	code, out, _ := runRelay(t, args...)
	if code != 1 || !strings.HasPrefix(out, "FAIL  config ") || !strings.Contains(out, "relay.max_recipients") || !strings.Contains(out, "fix: run relay check-config --config "+bad) {
		t.Errorf("exit %d:\n%s", code, out)
	}
	code, out, _ = runRelay(t, append(args, "--json")...)
	var rs []map[string]string
	if err := json.Unmarshal([]byte(out), &rs); err != nil || code != 1 {
		t.Fatalf("exit %d, %v:\n%s", code, err, out)
	}
	checks := map[string]string{}
	for _, r := range rs {
		if len(r) != 4 {
			t.Errorf("keys: %v", r)
		}
		checks[r["check"]] = r["status"]
	}
	if checks["config"] != "FAIL" || checks["sendmail"] != "FAIL" || checks["qmail-queue"] != "FAIL" {
		t.Errorf("%v", checks)
	}
}
