package local

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// fakeQQ is the fake qmail-queue (internal/fakeqq), built once for the
// package in a directory every user may enter.
var fakeQQ string

// helperEnv makes the test binary act as relay qq or relay sendmail with
// the config named by RELAY_CONFIG: the same wiring as cmd/relay, so tests
// can give it real fds 0 and 1 and another uid without building cmd/relay.
const helperEnv = "RELAY_LOCAL_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "qq":
		os.Exit(helperQQ())
	case "":
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
		os.Exit(70)
	}
	dir, err := os.MkdirTemp("", "relay-local-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Chmod(dir, 0o755)
	fakeQQ = filepath.Join(dir, "fakeqq")
	out, err := exec.Command("go", "build", "-o", fakeQQ, "relay/internal/fakeqq/cmd/fakeqq").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building fakeqq: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func helperQQ() int {
	return QQCommand(nil, os.Stderr) // the config comes from $RELAY_CONFIG
}
