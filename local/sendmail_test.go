package local

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

func TestParseSendmailArgs(t *testing.T) {
	tests := []struct {
		args  string // split on spaces; "_" stands for an empty word
		want  SendmailArgs
		usage string // substring of the usage error, "" = ok
	}{
		{args: "a@b", want: SendmailArgs{Recipients: []string{"a@b"}}},
		{args: "-t -i", want: SendmailArgs{HeaderRecipients: true}},
		{args: "-ti", want: SendmailArgs{HeaderRecipients: true}},
		{args: "-t -oi -- -weird@b", want: SendmailArgs{HeaderRecipients: true, Recipients: []string{"-weird@b"}}},
		{args: "-f me@x.test a@b", want: SendmailArgs{Sender: "me@x.test", SenderSet: true, Recipients: []string{"a@b"}}},
		{args: "-fme@x.test a@b", want: SendmailArgs{Sender: "me@x.test", SenderSet: true, Recipients: []string{"a@b"}}},
		{args: "-f <me@x.test> a@b", want: SendmailArgs{Sender: "me@x.test", SenderSet: true, Recipients: []string{"a@b"}}},
		{args: "-f <> a@b", want: SendmailArgs{Sender: "", SenderSet: true, Recipients: []string{"a@b"}}},
		{args: "-f _ a@b", want: SendmailArgs{Sender: "", SenderSet: true, Recipients: []string{"a@b"}}},
		{args: "-F Web_Shop -t", want: SendmailArgs{FullName: "Web Shop", HeaderRecipients: true}},
		{args: "-FShop -t", want: SendmailArgs{FullName: "Shop", HeaderRecipients: true}},
		{args: "-tif me@x a@b", want: SendmailArgs{HeaderRecipients: true, Sender: "me@x", SenderSet: true, Recipients: []string{"a@b"}}},
		{args: "-odb -oem -o i -v -m -x -E -J -eq -p smtp -B 8BITMIME -bm a@b", want: SendmailArgs{Recipients: []string{"a@b"}}},
		// Options stop at the first argument, as in qmail's getopt.
		{args: "a@b -f me@x", want: SendmailArgs{Recipients: []string{"a@b", "-f", "me@x"}}},
		{args: "-", want: SendmailArgs{Recipients: []string{"-"}}},
		{args: "", want: SendmailArgs{Recipients: []string{}}},
		{args: "-bp", usage: "-bp is not supported"},
		{args: "-bs", usage: "-bs is not supported"},
		{args: "-b", usage: "-b needs a value"},
		{args: "-t -f", usage: "-f needs a value"},
		{args: "-N never a@b", usage: "unknown option -N"},
		{args: "-q", usage: "unknown option -q"},
	}
	for _, tc := range tests {
		t.Run(tc.args, func(t *testing.T) {
			args := strings.Fields(tc.args)
			for i, a := range args {
				if a == "_" {
					args[i] = ""
				} else {
					args[i] = strings.ReplaceAll(a, "_", " ")
				}
			}
			got, err := ParseSendmailArgs(args)
			if tc.usage != "" {
				var ue *UsageError
				if !errors.As(err, &ue) || !strings.Contains(err.Error(), tc.usage) {
					t.Fatalf("error %v, want a usage error with %q", err, tc.usage)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Recipients == nil {
				got.Recipients = []string{}
			}
			if tc.want.Recipients == nil {
				tc.want.Recipients = []string{}
			}
			if !reflect.DeepEqual(*got, tc.want) {
				t.Errorf("got %+v, want %+v", *got, tc.want)
			}
		})
	}
}

var fixedNow = time.Date(2026, 3, 5, 7, 4, 9, 0, time.FixedZone("CET", 3600))

func TestCompleteMessage(t *testing.T) {
	d := headerDefaults{From: "web1@mail.example.test", Hostname: "mail.example.test", Now: fixedNow, Pid: 42, WantRcpts: true}
	added := "Date: Thu, 05 Mar 2026 07:04:09 +0100\nMessage-ID: <" + "1772690649000000000.42@mail.example.test>\n"
	tests := []struct {
		name      string
		in        string
		fullName  string
		want      string
		wantRcpts []string
	}{
		{
			name:      "adds what is missing, drops Bcc",
			in:        "To: A <a@example.com>, b@example.org\nBcc: hidden@example.net\nSubject: hi\n\nbody\n",
			want:      "To: A <a@example.com>, b@example.org\nSubject: hi\n" + added + "From: web1@mail.example.test\n\nbody\n",
			wantRcpts: []string{"a@example.com", "b@example.org", "hidden@example.net"},
		},
		{
			name: "keeps what is there",
			in:   "From: shop@example.com\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-Id: <x@y>\nCc: c@example.com,\n  d@example.com\n\nbody",
			want: "From: shop@example.com\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-Id: <x@y>\nCc: c@example.com,\n  d@example.com\n\nbody",
			// a folded Cc
			wantRcpts: []string{"c@example.com", "d@example.com"},
		},
		{
			name:      "full name",
			in:        "To: a@example.com\n\nx\n",
			fullName:  "Web Shop",
			want:      "To: a@example.com\n" + added + "From: \"Web Shop\" <web1@mail.example.test>\n\nx\n",
			wantRcpts: []string{"a@example.com"},
		},
		{
			name: "no header at all",
			in:   "just a body line\nand another\n",
			want: added + "From: web1@mail.example.test\n\njust a body line\nand another\n",
		},
		{
			name:      "CRLF input keeps its separator",
			in:        "To: a@example.com\r\nSubject: x\r\n\r\nbody\r\n",
			want:      "To: a@example.com\r\nSubject: x\r\n" + added + "From: web1@mail.example.test\n\r\nbody\r\n",
			wantRcpts: []string{"a@example.com"},
		},
		{
			name:      "unparsable list falls back to commas, bare names kept",
			in:        "To: root, <b@example.com>, broken <<x\nTo: undisclosed-recipients:;\n\n",
			want:      "To: root, <b@example.com>, broken <<x\nTo: undisclosed-recipients:;\n" + added + "From: web1@mail.example.test\n\n",
			wantRcpts: []string{"root", "b@example.com", "x"},
		},
		{
			name: "empty message",
			in:   "",
			want: added + "From: web1@mail.example.test\n\n",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := d
			d.FullName = tc.fullName
			got, rcpts := completeMessage([]byte(tc.in), d)
			if string(got) != tc.want {
				t.Errorf("message\n got %q\nwant %q", got, tc.want)
			}
			if !reflect.DeepEqual(rcpts, tc.wantRcpts) {
				t.Errorf("recipients %q, want %q", rcpts, tc.wantRcpts)
			}
		})
	}
}

func FuzzCompleteMessage(f *testing.F) {
	f.Add([]byte("To: a@b\nBcc: c@d\n\nbody\n"))
	f.Add([]byte("Subject: x\r\n folded\r\n\r\n.\r\n"))
	f.Add([]byte("no header\n"))
	f.Add([]byte(""))
	f.Add([]byte("To: \"q,uoted\" <a@b>, (comment) c@d, g: e@f;\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		d := headerDefaults{From: "u@h", Hostname: "h", Now: fixedNow, Pid: 1, WantRcpts: true}
		out, _ := completeMessage(in, d)
		// A completed message has nothing left to complete or delete: a
		// second pass must give it back byte for byte, body included.
		again, _ := completeMessage(out, d)
		if !bytes.Equal(again, out) {
			t.Fatalf("not idempotent:\n in %q\nout %q\nagain %q", in, out, again)
		}
	})
}

func FuzzParseSendmailArgs(f *testing.F) {
	f.Add("-t -i -f a@b -F Name -- x@y")
	f.Add("-tif\x00a -bm")
	f.Add("-o")
	f.Fuzz(func(t *testing.T, line string) {
		a, err := ParseSendmailArgs(strings.Split(line, " "))
		if err != nil {
			var ue *UsageError
			if !errors.As(err, &ue) {
				t.Fatalf("non-usage error %v", err)
			}
			return
		}
		if strings.ContainsAny(a.Sender, "\r\n") {
			t.Fatal("a sender with a line break got through")
		}
	})
}

func newTestSendmail(t *testing.T, socket string) (*Sendmail, *bytes.Buffer) {
	stderr := &bytes.Buffer{}
	return &Sendmail{
		Socket:   socket,
		Hostname: "mail.example.test",
		UID:      0,
		Timeout:  5 * time.Second,
		Stderr:   stderr,
		Now:      func() time.Time { return fixedNow },
	}, stderr
}

func TestSendmailSubmits(t *testing.T) {
	d := startDaemon(t, daemonScript{})
	s, stderr := newTestSendmail(t, d.socket)
	args, _ := ParseSendmailArgs([]string{"-t", "-i", "-f", "shop@example.com", "extra@example.net"})
	in := "To: a@example.com, A@example.com\nBcc: b@example.org\nSubject: order\n\n.one dot\nbody\n"
	if code := s.Run(args, strings.NewReader(in)); code != 0 {
		t.Fatalf("exit %d; stderr %s", code, stderr)
	}
	got := d.session(t)
	if got.helo != "localhost" {
		t.Errorf("EHLO %q: relay sendmail must not open a check session", got.helo)
	}
	if got.from != "shop@example.com" || strings.Join(got.rcpts, " ") != "a@example.com b@example.org extra@example.net" {
		t.Errorf("envelope %q -> %q", got.from, got.rcpts)
	}
	want := "To: a@example.com, A@example.com\r\nSubject: order\r\nDate: Thu, 05 Mar 2026 07:04:09 +0100\r\n" +
		"Message-ID: <1772690649000000000." // pid follows
	if !strings.HasPrefix(string(got.data), want) ||
		!strings.HasSuffix(string(got.data), "@mail.example.test>\r\nFrom: shop@example.com\r\n\r\n.one dot\r\nbody\r\n") {
		t.Errorf("message on the wire: %q", got.data)
	}
	if stderr.Len() != 0 {
		t.Errorf("stderr on success: %q", stderr)
	}
}

func TestSendmailDefaultSender(t *testing.T) {
	d := startDaemon(t, daemonScript{})
	s, stderr := newTestSendmail(t, d.socket)
	s.UID = 0 // root
	args, _ := ParseSendmailArgs([]string{"-F", "Admin", "a@example.com"})
	if code := s.Run(args, strings.NewReader("Subject: x\n\nhi\n")); code != 0 {
		t.Fatalf("exit %d; stderr %s", code, stderr)
	}
	got := d.session(t)
	if got.from != "root@mail.example.test" || !strings.Contains(string(got.data), "\r\nFrom: \"Admin\" <root@mail.example.test>\r\n") {
		t.Errorf("sender %q, message %q", got.from, got.data)
	}
}

func TestSendmailExitCodes(t *testing.T) {
	tests := []struct {
		name   string
		script daemonScript
		socket string // "" = the fake daemon's
		args   []string
		want   int
		stderr string
	}{
		{name: "accepted", args: []string{"a@b.example"}, want: 0},
		{name: "over a rate", script: daemonScript{rcpt: func(int, string) error { return replyOverLimit }}, args: []string{"a@b.example"}, want: 75, stderr: "recipient <a@b.example> refused: 451 4.7.1"},
		{name: "suspended", script: daemonScript{mail: replyRejected}, args: []string{"a@b.example"}, want: 77, stderr: "550 5.7.1"},
		{name: "permanent, not policy", script: daemonScript{data: reply(554, smtp.EnhancedCode{5, 3, 4}, "message too big")}, args: []string{"a@b.example"}, want: 69, stderr: "message refused: 554 5.3.4"},
		{name: "temporary at DATA", script: daemonScript{data: reply(451, smtp.EnhancedCode{4, 3, 0}, "qq temporary problem")}, args: []string{"a@b.example"}, want: 75},
		{name: "daemon down", socket: "missing", args: []string{"a@b.example"}, want: 75, stderr: "cannot reach relay daemon at "},
		{name: "no recipients", args: nil, want: 64, stderr: "no recipients"},
		{name: "no recipients with -t", args: []string{"-t"}, want: 64, stderr: "no recipients"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, tc.script)
			socket := d.socket
			if tc.socket != "" {
				socket = filepath.Join(t.TempDir(), tc.socket)
			}
			s, stderr := newTestSendmail(t, socket)
			args, err := ParseSendmailArgs(tc.args)
			if err != nil {
				t.Fatal(err)
			}
			code := s.Run(args, strings.NewReader("Subject: x\n\nhi\n"))
			if code != tc.want {
				t.Errorf("exit %d, want %d; stderr %q", code, tc.want, stderr)
			}
			if !strings.Contains(stderr.String(), tc.stderr) || strings.Count(stderr.String(), "\n") != min(1, code) {
				t.Errorf("stderr %q: want one line containing %q", stderr, tc.stderr)
			}
		})
	}
}

func TestSendmailRefusesOversizedMessage(t *testing.T) {
	d := startDaemon(t, daemonScript{})
	s, stderr := newTestSendmail(t, d.socket)
	s.MaxMessageBytes = 100
	args, _ := ParseSendmailArgs([]string{"a@b.example"})
	if code := s.Run(args, strings.NewReader(strings.Repeat("x", 101))); code != 69 {
		t.Errorf("exit %d, want 69; stderr %q", code, stderr)
	}
	if d.connections() != 0 {
		t.Error("oversized message was sent")
	}
}

// TestSendmailQualifiesWithControlMe: with hostname = "" the default sender
// and bare recipients take control/me's host, as the config documents.
func TestSendmailQualifiesWithControlMe(t *testing.T) {
	d := startDaemon(t, daemonScript{})
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "control"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "control", "me"), []byte("me.example.test\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "relay.toml")
	cfg := fmt.Sprintf("hostname = \"\"\n[[listen]]\naddr = %q\nmode = \"local\"\n[relay]\nqmail_control_dir = \"control\"\n", d.socket)
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	if code := SendmailCommand([]string{"--config", path, "bob"}, strings.NewReader("Subject: x\n\nhi\n"), &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	got := d.session(t)
	if !strings.HasSuffix(got.from, "@me.example.test") || strings.Join(got.rcpts, ",") != "bob@me.example.test" {
		t.Errorf("envelope %q -> %q, want control/me's host", got.from, got.rcpts)
	}
}
