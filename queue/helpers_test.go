package queue

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// errBadData stands for a client that sent bad data or too much of it.
var errBadData = errors.New("client sent bad data")

// failingReader yields data, then fails with errBadData.
type failingReader struct{ data []byte }

func (f *failingReader) Read(p []byte) (int, error) {
	if len(f.data) == 0 {
		return 0, errBadData
	}
	n := copy(p, f.data)
	f.data = f.data[n:]
	return n, nil
}

// patternReader yields n bytes of repeated lines without holding them.
type patternReader struct{ left int64 }

func (r *patternReader) Read(p []byte) (int, error) {
	if r.left <= 0 {
		return 0, io.EOF
	}
	const line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n"
	limit := len(p)
	if int64(limit) > r.left {
		limit = int(r.left)
	}
	n := 0
	for n < limit {
		n += copy(p[n:limit], line)
	}
	r.left -= int64(n)
	return n, nil
}

// logBuffer is a slog logger writing to a buffer the test can read.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func (l *logBuffer) logger() *slog.Logger { return slog.New(slog.NewTextHandler(l, nil)) }

// writeScript writes an executable shell script.
func writeScript(t testing.TB, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func wantError(t testing.TB, err error, code int, enhanced [3]int, text string) {
	t.Helper()
	var qe *Error
	if !errors.As(err, &qe) {
		t.Fatalf("error = %v (%T), want *queue.Error %d %s", err, err, code, text)
	}
	if qe.Code != code || qe.Enhanced != enhanced || qe.Text != text {
		t.Fatalf("error = %d %v %q, want %d %v %q", qe.Code, qe.Enhanced, qe.Text, code, enhanced, text)
	}
}
