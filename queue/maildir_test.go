package queue

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMaildirDelivers(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "Maildir")
	m, err := NewMaildir(dir, "mail.example.test")
	if err != nil {
		t.Fatal(err)
	}
	for _, sub := range []string{"tmp", "new", "cur"} {
		fi, err := os.Stat(filepath.Join(dir, sub))
		if err != nil || fi.Mode().Perm() != 0o700 {
			t.Fatalf("%s: %v %v", sub, fi, err)
		}
	}
	msg := "Received: from x\nSubject: hi\n\n.dot\nbody\n"
	r1, err := m.Deliver(context.Background(), Envelope{From: "s@example.test", To: []string{"a@x", "b@y"}}, strings.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	r2, err := m.Deliver(context.Background(), Envelope{From: "", To: []string{"a@x"}}, strings.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	if r1.Reply == r2.Reply {
		t.Errorf("two deliveries, one name: %q", r1.Reply)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "new", "*"))
	if len(files) != 2 {
		t.Fatalf("new/ holds %d files", len(files))
	}
	got, _ := os.ReadFile(filepath.Join(dir, "new", strings.TrimPrefix(r1.Reply, "ok ")))
	if want := "Return-Path: <s@example.test>\nDelivered-To: a@x\nDelivered-To: b@y\n" + msg; string(got) != want {
		t.Errorf("file = %q, want %q", got, want)
	}
	got, _ = os.ReadFile(filepath.Join(dir, "new", strings.TrimPrefix(r2.Reply, "ok ")))
	if !strings.HasPrefix(string(got), "Return-Path: <>\nDelivered-To: a@x\n") {
		t.Errorf("null sender file = %q", got)
	}
	if tmp, _ := os.ReadDir(filepath.Join(dir, "tmp")); len(tmp) != 0 {
		t.Errorf("tmp/ left with %d files", len(tmp))
	}
}

func TestMaildirHostnameEscaped(t *testing.T) {
	m, err := NewMaildir(t.TempDir(), "odd/host:name")
	if err != nil {
		t.Fatal(err)
	}
	r, err := m.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(r.Reply, `.odd\057host\072name`) {
		t.Errorf("name %q", r.Reply)
	}
}

func TestMaildirReaderFailureLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	m, err := NewMaildir(dir, "h")
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, &failingReader{data: []byte("Subject: x\n\npart")})
	if !errors.Is(err, errBadData) {
		t.Fatalf("error = %v", err)
	}
	for _, sub := range []string{"tmp", "new"} {
		if e, _ := os.ReadDir(filepath.Join(dir, sub)); len(e) != 0 {
			t.Errorf("%s/ holds %d files after a failed read", sub, len(e))
		}
	}
}

func TestMaildirUnwritable(t *testing.T) {
	dir := t.TempDir()
	m, err := NewMaildir(dir, "h")
	if err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(filepath.Join(dir, "tmp"))
	_, err = m.Deliver(context.Background(), Envelope{From: "a@b", To: []string{"c@d"}}, strings.NewReader("x\n"))
	wantError(t, err, 451, [3]int{4, 3, 0}, "maildir delivery failed (#4.3.0)")
}
