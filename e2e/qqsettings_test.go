package e2e

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"relay/config"
)

// relay serve writes <data_dir>/qq.settings for relay-qq at start, and
// again on every reload: world-readable key=value lines, the socket as
// bound (a reload does not rebind), exempt users as the uids /etc/passwd
// gives them. A reload the daemon refuses leaves the file as it was.
func TestQQSettingsFollowTheDaemon(t *testing.T) {
	d := newDaemon(t, daemonOpts{})
	path := filepath.Join(d.dir, "data", "qq.settings")
	accounts, err := config.ReadPasswdFile("/etc/passwd")
	if err != nil {
		t.Fatal(err)
	}
	uidsOf := func(names ...string) string {
		var uids []int
		for uid, name := range accounts {
			if slices.Contains(names, name) {
				uids = append(uids, int(uid))
			}
		}
		slices.Sort(uids)
		s := make([]string, len(uids))
		for i, u := range uids {
			s[i] = strconv.Itoa(u)
		}
		return strings.Join(s, ",")
	}
	read := func() map[string]string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		kv := map[string]string{}
		for _, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				t.Fatalf("line %q is not key=value", line)
			}
			kv[k] = v
		}
		return kv
	}

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("no qq.settings after start: %v", err)
	}
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("mode %v, want 0644", fi.Mode().Perm())
	}
	// relay-qq runs as the caller: the data_dir relay made is searchable
	// by others (and no more).
	if di, err := os.Stat(filepath.Dir(path)); err != nil || di.Mode().Perm() != 0o711 {
		t.Errorf("data_dir mode %v (%v), want 0711", di.Mode().Perm(), err)
	}
	want := map[string]string{
		"socket":         d.sock,
		"qmail_queue":    bins.fakeqq,
		"on_daemon_down": "accept",
		"exempt_uids":    uidsOf("alias", "qmaild", "qmaill", "qmailp", "qmailq", "qmailr", "qmails"),
	}
	if got := read(); !maps.Equal(got, want) {
		t.Fatalf("qq.settings at start:\n%v\nwant\n%v", got, want)
	}

	cfg, err := os.ReadFile(d.config)
	if err != nil {
		t.Fatal(err)
	}
	edited := strings.Replace(string(cfg), "[local]\n", "[local]\non_daemon_down = \"defer\"\nexempt_users = [\"root\"]\n", 1)
	edited = strings.Replace(edited, strconv.Quote(d.sock), strconv.Quote(d.sock+".new"), 1)
	if err := os.WriteFile(d.config, []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	d.signal(syscall.SIGHUP)
	want["on_daemon_down"], want["exempt_uids"] = "defer", uidsOf("root")
	deadline := time.Now().Add(10 * time.Second)
	for got := read(); !maps.Equal(got, want); got = read() {
		if time.Now().After(deadline) {
			t.Fatalf("qq.settings after the reload:\n%v\nwant\n%v\nlog:\n%s", got, want, d.logs())
		}
		time.Sleep(20 * time.Millisecond)
	}

	if err := os.WriteFile(d.config, []byte(edited+"\n[local]\nbogus = 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d.signal(syscall.SIGHUP)
	d.waitLog("reload failed")
	if got := read(); !maps.Equal(got, want) {
		t.Fatalf("qq.settings after a refused reload:\n%v\nwant\n%v", got, want)
	}
}
