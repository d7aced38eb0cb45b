// Package fakeqq builds and reads the fake qmail-queue used by tests.
package fakeqq

import (
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// Build compiles the fake qmail-queue into a temporary directory and returns
// its path. The binary is world-executable so tests may run it as another user.
func Build(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "fakeqq")
	cmd := exec.Command("go", "build", "-o", bin, "relay/internal/fakeqq/cmd/fakeqq")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building fakeqq: %v\n%s", err, out)
	}
	return bin
}

// Call is one recorded invocation of the fake.
type Call struct {
	Message  []byte // exactly what arrived on fd 0
	Envelope []byte // exactly what arrived on fd 1
	Info     string // "uid=N pid=N"
}

// From returns the envelope sender.
func (c Call) From() string {
	s := string(c.Envelope)
	if i := strings.IndexByte(s, 0); i > 0 {
		return s[1:i]
	}
	return ""
}

// To returns the envelope recipients.
func (c Call) To() []string {
	parts := strings.Split(string(c.Envelope), "\x00")
	var to []string
	for _, p := range parts[1:] {
		if strings.HasPrefix(p, "T") {
			to = append(to, p[1:])
		}
	}
	return to
}

// Calls reads every call recorded in dir (FAKEQQ_DIR), oldest first.
func Calls(t testing.TB, dir string) []Call {
	t.Helper()
	infos, _ := filepath.Glob(filepath.Join(dir, "*.info"))
	sort.Slice(infos, func(i, j int) bool { return num(infos[i]) < num(infos[j]) })
	var calls []Call
	for _, info := range infos {
		base := strings.TrimSuffix(info, ".info")
		i, _ := os.ReadFile(info)
		m, err1 := os.ReadFile(base + ".msg")
		e, err2 := os.ReadFile(base + ".env")
		if err1 != nil || err2 != nil {
			continue // still being written
		}
		calls = append(calls, Call{Message: m, Envelope: e, Info: strings.TrimSpace(string(i))})
	}
	return calls
}

func num(p string) int {
	n, _ := strconv.Atoi(strings.TrimSuffix(filepath.Base(p), ".info"))
	return n
}
