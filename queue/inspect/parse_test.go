package inspect

import (
	"bytes"
	"io"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

func TestParseOrigin(t *testing.T) {
	tests := []struct {
		name     string
		received []string
		want     Origin
	}{
		{"uid", []string{"(qmail 4242 invoked by uid 1001); " + date}, Origin{Kind: KindUID, QP: 4242, UID: intp(1001)}},
		{"uid root", []string{"(qmail 1 invoked by uid 0); " + date}, Origin{Kind: KindUID, QP: 1, UID: intp(0)}},
		{"alias", []string{"(qmail 7 invoked by alias); " + date}, Origin{Kind: KindAlias, QP: 7}},
		{"bounce", []string{"(qmail 8 invoked for bounce); " + date}, Origin{Kind: KindBounce, QP: 8}},
		{"network no smtpd line", []string{"(qmail 9 invoked from network); " + date}, Origin{Kind: KindNetwork, QP: 9}},
		{
			"qmail-smtpd, HELO equals host",
			[]string{"(qmail 9 invoked from network); " + date, "from unknown (127.0.0.1) by mail.example.test with SMTP; " + date},
			Origin{Kind: KindNetwork, QP: 9, Host: "unknown", IP: "127.0.0.1", Protocol: "SMTP"},
		},
		{
			"qmail-smtpd with HELO and rDNS",
			[]string{"(qmail 9 invoked from network); " + date, "from mx.example.net (HELO mx) (203.0.113.5) by 0 with SMTP; " + date},
			Origin{Kind: KindNetwork, QP: 9, Host: "mx.example.net", HELO: "mx", IP: "203.0.113.5", Protocol: "SMTP"},
		},
		{
			"AUTH patch ESMTPA",
			[]string{"(qmail 9 invoked from network); " + date, "from unknown (HELO pc) (bob@example.com@192.0.2.1) by mail with ESMTPA; " + date},
			Origin{Kind: KindNetwork, QP: 9, Host: "unknown", HELO: "pc", IP: "192.0.2.1", AuthUser: "bob@example.com", Protocol: "ESMTPA"},
		},
		{
			"ESMTPSA with cipher comment, IPv6",
			[]string{"(qmail 9 invoked from network); " + date, "from unknown (HELO pc) (bob@2001:db8::1) by mail with ESMTPSA (TLS_AES_128_GCM_SHA256); " + date},
			Origin{Kind: KindNetwork, QP: 9, Host: "unknown", HELO: "pc", IP: "2001:db8::1", AuthUser: "bob", Protocol: "ESMTPSA"},
		},
		{
			"ident without auth",
			[]string{"(qmail 9 invoked from network); " + date, "from unknown (HELO pc) (root@192.0.2.1) by mail with SMTP; " + date},
			Origin{Kind: KindNetwork, QP: 9, Host: "unknown", HELO: "pc", IP: "192.0.2.1", Ident: "root", Protocol: "SMTP"},
		},
		{
			"filter line above qmail-queue's",
			[]string{"by scanner (filter 1.0); " + date, "(qmail 5 invoked by uid 33); " + date},
			Origin{Kind: KindUID, QP: 5, UID: intp(33)},
		},
		{
			"relay's local socket under qmaild",
			[]string{"(qmail 9 invoked from network); " + date, "(relay invoked by uid 1001); " + date},
			Origin{Kind: KindUID, QP: 9, UID: intp(1001)},
		},
		{
			"relay's line forged by a local script is not trusted",
			[]string{"(qmail 9 invoked by uid 1002); " + date, "(relay invoked by uid 0); " + date},
			Origin{Kind: KindUID, QP: 9, UID: intp(1002)},
		},
		{"someone else's line", []string{"from a.example by b.example with ESMTP id 1; " + date}, Origin{Kind: KindUnknown}},
		{"none", nil, Origin{Kind: KindUnknown}},
		{"bad uid", []string{"(qmail 1 invoked by uid x)"}, Origin{Kind: KindUnknown, QP: 1}},
	}
	for _, tc := range tests {
		if got := parseOrigin(tc.received); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s:\n got %+v\nwant %+v", tc.name, got, tc.want)
		}
	}
}

func TestParseHeader(t *testing.T) {
	hdr := "Received: (qmail 1 invoked from network); " + date + "\n" +
		"Received: from unknown (HELO\n\tpc) (ann@192.0.2.9)\n  by mail with ESMTPA; " + date + "\n" +
		"x-php-originating-script: 1001:first.php\n" +
		"X-PHP-Originating-Script: 1002:second.php\n" +
		"X-Sender-Id:\n  user:ann\n" +
		"not a field line\n" +
		"Subject: x\n\n" +
		"Received: (qmail 2 invoked by uid 5); in the body\n"
	h := parseHeader([]byte(hdr))
	want := headerInfo{
		origin:    Origin{Kind: KindNetwork, QP: 1, Host: "unknown", HELO: "pc", IP: "192.0.2.9", AuthUser: "ann", Protocol: "ESMTPA"},
		phpScript: "1001:first.php",
		senderID:  "user:ann",
	}
	if !reflect.DeepEqual(h, want) {
		t.Errorf("got %+v\nwant %+v", h, want)
	}
}

func TestReadHeader(t *testing.T) {
	body := strings.Repeat("b", 3*maxHeader)
	tests := []struct {
		name, in, want string
	}{
		{"ends at blank line", "A: 1\nB: 2\n\nbody\n", "A: 1\nB: 2\n\n"},
		{"no body", "A: 1\n", "A: 1\n"},
		{"empty header", "\nbody", "\n"},
		{"header cut at limit", strings.Repeat("X: y\n", maxHeader) + "\n" + body, strings.Repeat("X: y\n", maxHeader)[:maxHeader]},
		{"body not read", "A: 1\n\n" + body, "A: 1\n\n"},
	}
	for _, tc := range tests {
		for _, r := range []io.Reader{strings.NewReader(tc.in), iotest.OneByteReader(strings.NewReader(tc.in))} {
			got, err := readHeader(r, nil)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Errorf("%s: got %d bytes %.40q…, want %d bytes", tc.name, len(got), got, len(tc.want))
			}
		}
	}
	// How much of a big message is read: the first chunk only.
	counter := &countingReader{r: strings.NewReader("A: 1\n\n" + body)}
	if _, err := readHeader(counter, nil); err != nil {
		t.Fatal(err)
	}
	if counter.n > readChunk {
		t.Errorf("read %d bytes of a message whose header is 6 bytes", counter.n)
	}
	if _, err := readHeader(iotest.ErrReader(io.ErrUnexpectedEOF), nil); err == nil {
		t.Error("read error not returned")
	}
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func TestRecords(t *testing.T) {
	env := parseTodo([]byte("u33\x00p100\x00Fa@b.test\x00Tc@d.test\x00Te@f.test"), true)
	if env.sender != "a@b.test" || env.left != 1 || len(env.recipients) != 1 {
		t.Errorf("todo with half-written last record: %+v", env)
	}
	if s, ok := parseInfo([]byte("Fx@y.test\x00")); s != "x@y.test" || !ok {
		t.Errorf("info sender = %q, %v", s, ok)
	}
	if s, ok := parseInfo([]byte("F\x00")); s != "" || !ok {
		t.Errorf("null sender = %q, %v", s, ok)
	}
	if _, ok := parseInfo([]byte("Fx@y.te")); ok {
		t.Error("half-written info taken as complete")
	}
	var e envelope
	addRecipients(&e, []byte("Ta@x\x00Db@x\x00Xjunk\x00\x00Tc@x\x00"), true, true)
	want := envelope{left: 2, done: 1, recipients: []Recipient{{"a@x", true, false}, {"b@x", true, true}, {"c@x", true, false}}}
	if !reflect.DeepEqual(e, want) {
		t.Errorf("got %+v, want %+v", e, want)
	}
}

// FuzzParseHeader feeds arbitrary mess file starts to the header reader and
// parser: no panic, and what it reports must come from the input.
func FuzzParseHeader(f *testing.F) {
	f.Add([]byte(localQQLine + "\nX-PHP-Originating-Script: 1:a.php\n\nbody"))
	f.Add([]byte(strings.Join(networkLines(1, "unknown (HELO x) (u@1.2.3.4)", "ESMTPA"), "\n") + "\n\n"))
	f.Add([]byte("Received: (qmail 1 invoked from network)\nReceived: from (((\n\n"))
	f.Add([]byte("Received: (qmail  invoked by uid -1)\n"))
	f.Add([]byte("\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		hdr, err := readHeader(bytes.NewReader(data), nil)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(data, hdr) {
			t.Fatal("header is not a prefix of the file")
		}
		h := parseHeader(hdr)
		o := h.origin
		for _, s := range []string{o.Host, o.HELO, o.IP, o.AuthUser, o.Ident, o.Protocol, h.phpScript, h.senderID} {
			if s != "" && !strings.Contains(strings.ReplaceAll(string(hdr), "\t", " "), s) && !strings.Contains(unfold(hdr), s) {
				t.Errorf("reported %q, not in the header", s)
			}
		}
		if o.UID != nil && *o.UID < 0 {
			t.Errorf("negative uid %d", *o.UID)
		}
		for _, l := range receivedLines(hdr) {
			if !bytes.Contains(hdr, []byte(l)) {
				t.Errorf("Received line %q not in header", l)
			}
		}
	})
}

// FuzzRecords feeds arbitrary bytes to the queue-file parsers: counts must
// match the complete T/D records in the input.
func FuzzRecords(f *testing.F) {
	f.Add([]byte("u1001\x00p7\x00Fa@b\x00Tc@d\x00"))
	f.Add([]byte("Ta@x\x00Db@x\x00Tc"))
	f.Add([]byte("\x00\x00\x00"))
	f.Add([]byte("F\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var wantT, wantD int
		complete := data[:bytes.LastIndexByte(data, 0)+1]
		for _, rec := range bytes.Split(complete, []byte{0}) {
			if len(rec) > 0 && rec[0] == 'T' {
				wantT++
			}
			if len(rec) > 0 && rec[0] == 'D' {
				wantD++
			}
		}
		var e envelope
		addRecipients(&e, data, false, true)
		if e.left != wantT || e.done != wantD || len(e.recipients) != wantT+wantD {
			t.Errorf("local/remote: got %d left %d done %d kept, want %d/%d", e.left, e.done, len(e.recipients), wantT, wantD)
		}
		todo := parseTodo(data, false)
		if todo.left != wantT || todo.recipients != nil {
			t.Errorf("todo: %d left, want %d", todo.left, wantT)
		}
		_, _ = parseInfo(data)
	})
}
