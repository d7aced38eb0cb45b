package relay

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"relay/config"
)

// pipeConn is the server's end of a net.Pipe, with a client address the
// gate can read.
type pipeConn struct{ net.Conn }

func (pipeConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5555} }

// lockedBuffer is a bytes.Buffer for a logger written from several
// goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

var (
	confirmed = regexp.MustCompile(`(?m)^250 ok 1795833709 qp 4242\r$`)
	mailCmd   = regexp.MustCompile(`(?i)mail from:`)
	dataEnd   = regexp.MustCompile(`(?i)\r\n\.\r\n|\bLAST\b`)
)

// FuzzSession sends random client bytes to a server on net.Pipe with a
// fake hand-off: no panic (go-smtp recovers one in a command and answers
// 421 4.0.0, so that reply is what shows it). Nothing may be handed off without a full
// transaction: each hand-off needs a MAIL and an end of data (".", or BDAT
// LAST) in the input, gets exactly one "250 ok", and every 250 ok is a
// hand-off; every policy transaction begun ends (commit, abort or held).
func FuzzSession(f *testing.F) {
	b64 := "AGJvYgBwdw==" // \0bob\0pw
	for _, seed := range []string{
		"EHLO x\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nSubject: s\r\n\r\nbody\r\n.\r\n",
		"HELO x\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\nRCPT TO:<Postmaster>\r\nDATA\r\n..dot\r\n.\rX\r\n.\r\nRSET\r\n",
		"EHLO x\r\nAUTH PLAIN " + b64 + "\r\nMAIL FROM:<bob@example.test> SIZE=100\r\nRCPT TO:<far@elsewhere.test>\r\nBDAT 5 LAST\r\nhello",
		"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@example.test>\r\nBDAT 3\r\nabcBDAT 2 LAST\r\nde",
		"EHLO x\r\nAUTH PLAIN\r\n!!!\r\nAUTH LOGIN\r\nYm9i\r\ncHc=\r\nMAIL FROM:<>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nbare\nLF\r\n.\r\n",
		"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n" + strings.Repeat("Received: x\r\n", 101) + "\r\n.\r\n",
		"EHLO x\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<c@d>\r\nRCPT TO:<u@example.test>\r\nEHLO y\r\nDATA\r\nQUIT\r\n",
		"\x00\xff\r\nEHLO \r\nSTARTTLS\r\nVRFY x\r\nNOOP\r\n",
	} {
		f.Add(false, []byte(seed))
		f.Add(true, []byte(seed))
	}
	f.Fuzz(func(t *testing.T, submission bool, input []byte) {
		var logs lockedBuffer
		mode := config.ModeSMTP
		if submission {
			mode = config.ModeSubmission
		}
		cfg := testConfig(config.Listener{Addr: "127.0.0.1:0", Mode: mode})
		cfg.Auth.RequireTLS = false
		cfg.Relay.MaxMessageBytes = 4096
		cfg.Relay.MaxRecipients = 5
		// A session stuck waiting (a BDAT chunk never sent) ends soon.
		cfg.Relay.Timeout = config.Duration{Duration: 200 * time.Millisecond}
		h := &fakeHandoff{}
		checker := &fakeChecker{}
		st, err := newSettings(cfg, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		s, err := newServer(st, Deps{
			Handoff: h,
			Policy:  checker,
			Auth:    fakeAuth{"bob", "pw"},
			Logger:  slog.New(slog.NewTextHandler(&logs, nil)),
			Now:     func() time.Time { return fixedNow },
		})
		if err != nil {
			t.Fatal(err)
		}
		client, server := net.Pipe()
		tc := s.admit(pipeConn{server}, false, false)
		if tc == nil {
			t.Fatal("gate refused the connection")
		}
		srv := s.smtpServer(mode, tc.info)
		go srv.Serve(&oneConnListener{conn: tc})

		// The input, then whatever ends the session; replies are read
		// until the server closes.
		go func() {
			client.Write(input)
			client.Write([]byte("\r\n.\r\nQUIT\r\n"))
		}()
		client.SetReadDeadline(time.Now().Add(time.Minute))
		out, _ := io.ReadAll(client)
		client.Close()
		srv.Close() // returns once the session logged out

		// go-smtp answers a panic in a command with this 421 (and logs it,
		// after closing the connection).
		if bytes.Contains(out, []byte("421 4.0.0 Internal server error")) || strings.Contains(logs.String(), "panic") {
			t.Fatalf("panic in the session:\n%s\n%s", out, logs.String())
		}
		sent := append(append([]byte(nil), input...), "\r\n.\r\nQUIT\r\n"...)
		d := h.deliveries()
		if n := len(confirmed.FindAll(out, -1)); n != len(d) {
			t.Fatalf("%d hand-offs but %d '250 ok' replies:\n%s", len(d), n, out)
		}
		if len(d) > len(mailCmd.FindAll(sent, -1)) || len(d) > len(dataEnd.FindAll(sent, -1)) {
			t.Fatalf("%d hand-offs from an input with fewer MAIL commands or ends of data: %q", len(d), sent)
		}
		for _, m := range d {
			if len(m.env.To) == 0 || !bytes.Contains(bytes.ToLower(sent), []byte(strings.ToLower(m.env.From))) {
				t.Fatalf("hand-off %+v not from the input", m.env)
			}
		}
		calls := checker.log()
		begun := strings.Count(calls, "begin ")
		ended := strings.Count(calls, "commit") + strings.Count(calls, "abort") + strings.Count(calls, "held ")
		if begun != ended {
			t.Fatalf("%d policy transactions begun, %d ended: %s", begun, ended, calls)
		}
	})
}
