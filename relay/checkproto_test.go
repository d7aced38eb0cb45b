package relay

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strconv"
	"strings"
	"testing"
)

// encodeCheckRequest is a request as relay qq sends it.
func encodeCheckRequest(req *checkRequest) []byte {
	b := []byte(checkMagic)
	b = appendFrame(b, frameFrom, req.from)
	for _, to := range req.rcpts {
		b = appendFrame(b, frameTo, to)
	}
	b = appendFrame(b, frameSize, strconv.FormatInt(req.size, 10))
	b = appendFrame(b, frameHeader, string(req.head))
	return appendFrame(b, frameEnd, "")
}

func TestReadCheckRequest(t *testing.T) {
	want := &checkRequest{from: "", rcpts: []string{"a@x.test", "b@y.test"}, size: 1234, head: []byte("Subject: s\n\n")}
	in := append(encodeCheckRequest(want), "C\x00\x00\x00\x00"...)
	r := bufio.NewReader(bytes.NewReader(in))
	got, err := readCheckRequest(r)
	if err != nil {
		t.Fatal(err)
	}
	if got.from != want.from || strings.Join(got.rcpts, ",") != "a@x.test,b@y.test" || got.size != 1234 || string(got.head) != "Subject: s\n\n" {
		t.Fatalf("got %+v", got)
	}
	// It stops at the E: what follows is the next step's.
	if err := expectFrame(r, frameCommit); err != nil {
		t.Fatalf("the commit after the request: %v", err)
	}
}

func TestCheckMessageReader(t *testing.T) {
	frames := func(fs ...string) *bufio.Reader {
		var b []byte
		for _, f := range fs {
			b = appendFrame(b, f[0], f[1:])
		}
		return bufio.NewReader(bytes.NewReader(b))
	}
	for _, tc := range []struct {
		name string
		r    *bufio.Reader
		size int64
		want string // "" with an error
		head string
	}{
		{"two pieces", frames("Mhello ", "Mworld", "E"), 11, "hello world", ""},
		{"starts with the header", frames("Mhel", "Mlo world", "E"), 11, "hello world", "hello w"},
		{"another header", frames("Mhel", "Mlo world", "E"), 11, "", "hello W"},
		{"another header at once", frames("Mjello world", "E"), 11, "", "h"},
		{"empty message", frames("E"), 0, "", ""},
		{"short", frames("Mhello", "E"), 11, "", ""},
		{"long", frames("Mhello", "M world", "E"), 5, "", ""},
		{"empty piece", frames("M", "Mhello", "E"), 5, "", ""},
		{"other frame", frames("Mhello", "C", "E"), 5, "", ""},
		{"no end", frames("Mhello"), 5, "", ""},
		{"end with payload", frames("Mhello", "Ex"), 5, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := io.ReadAll(&checkMessageReader{r: tc.r, size: tc.size, head: []byte(tc.head)})
			switch {
			case tc.want != "" && (err != nil || string(got) != tc.want):
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			case tc.want == "" && tc.size > 0 && err == nil:
				t.Fatalf("got %q and no error", got)
			}
		})
	}
}

func TestHeadComplete(t *testing.T) {
	for head, want := range map[string]bool{
		"Subject: s\n\n":        true,
		"Subject: s\r\n\r\n":    true,
		"Subject: s\n\r\n":      true,
		"\n":                    true,
		"\r\n":                  true,
		"Subject: s\n":          false, // a message that is all header
		"Subject: s\n folded\n": false,
		"Subject: s":            false, // cut at 64 KiB
		"":                      false,
		"Subject: s\r\n\rx\n":   false,
	} {
		if got := headComplete([]byte(head)); got != want {
			t.Errorf("headComplete(%q) = %v", head, got)
		}
	}
}

// FuzzReadCheckRequest: no input makes the daemon's readers of what relay
// qq sends (the request; for G or Q the message; the commit) panic or break
// their limits. What the request reader accepts is exactly what it read; a
// message read whole is exactly the size announced and starts with the
// header it was judged by.
func FuzzReadCheckRequest(f *testing.F) {
	signed := func(msg string) []byte {
		head := msg[:strings.Index(msg, "\n\n")+2]
		b := encodeCheckRequest(&checkRequest{from: "a@b", rcpts: []string{"c@d"}, size: int64(len(msg)), head: []byte(head)})
		b = appendFrame(b, frameMessage, msg[:len(msg)/2])
		b = appendFrame(b, frameMessage, msg[len(msg)/2:])
		b = appendFrame(b, frameEnd, "")
		return appendFrame(b, frameCommit, "31337")
	}
	f.Add(encodeCheckRequest(&checkRequest{from: "a@b", rcpts: []string{"c@d"}, size: 3, head: []byte("x\n\n")}))
	f.Add(encodeCheckRequest(&checkRequest{rcpts: []string{"c@d", "e@f", "g@h"}, size: 0}))
	f.Add(signed("From: a@shop.example\nSubject: s\n\nbody\n"))
	f.Add(signed("From: a@shop.example\r\n\r\n"))
	f.Add(append(encodeCheckRequest(&checkRequest{from: "a@b", rcpts: []string{"c@d"}, size: 4, head: []byte("x\n\n")}), "M\x00\x00\x00\x04y\n\nzE\x00\x00\x00\x00"...))
	f.Add([]byte(checkMagic + "F\x00\x00\x00\x00T\x00\x00\x00\x00"))
	f.Add([]byte(checkMagic + "F\xff\xff\xff\xff"))
	f.Add([]byte(checkMagic + "F\x00\x00\x00\x01aT\x00\x00\x00\x01bS\x00\x00\x00\x02-1"))
	f.Add([]byte("\x00RQ2"))
	f.Add([]byte("EHLO x\r\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		src := bytes.NewReader(in)
		r := bufio.NewReader(src)
		req, err := readCheckRequest(r)
		if err != nil {
			if !errors.Is(err, errCheckProtocol) && !errors.Is(err, io.ErrUnexpectedEOF) && err != io.EOF {
				t.Fatalf("error %v is neither a protocol error nor a short read", err)
			}
			return
		}
		if len(req.rcpts) == 0 || req.size < 0 || len(req.head) > maxCheckHeader || int64(len(req.head)) > req.size || len(req.from) > maxCheckAddress {
			t.Fatalf("accepted %+v", req)
		}
		for _, to := range req.rcpts {
			if to == "" || len(to) > maxCheckAddress {
				t.Fatalf("accepted recipient %q", to)
			}
		}
		enc := encodeCheckRequest(req)
		if read := len(in) - src.Len() - r.Buffered(); !bytes.HasPrefix(in, enc) || read != len(enc) {
			t.Fatalf("accepted %+v from %q, which is not what it read", req, in)
		}

		// What follows, as the message of a G or a Q, then the commit.
		msg, err := io.ReadAll(&checkMessageReader{r: r, size: req.size, head: req.head})
		if err != nil {
			if !errors.Is(err, errCheckProtocol) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("message: error %v is neither a protocol error nor a short read", err)
			}
			return
		}
		if int64(len(msg)) != req.size || !bytes.HasPrefix(msg, req.head) {
			t.Fatalf("accepted a message of %d bytes (%d announced) starting %q, header %q", len(msg), req.size, msg[:min(len(msg), 64)], req.head)
		}
		pid, err := readCommit(r)
		if err != nil {
			if !errors.Is(err, errCheckProtocol) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("commit: error %v is neither a protocol error nor a short read", err)
			}
			return
		}
		if pid < 0 || pid > 1<<31-1 {
			t.Fatalf("commit with pid %d", pid)
		}
	})
}
