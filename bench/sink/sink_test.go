package sink

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

func TestCopyLF(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"a\r\nb\r\n", "a\nb\n"},
		{"bare\rcr\r\n", "bare\rcr\n"},
		{"lf only\n", "lf only\n"},
		{"\r\r\n\r", "\r\n\r"},
		{strings.Repeat("x", 40000) + "\r\n" + strings.Repeat("y", 30000) + "\r\n", strings.Repeat("x", 40000) + "\n" + strings.Repeat("y", 30000) + "\n"},
	} {
		var whole bytes.Buffer
		if err := copyLF(&whole, strings.NewReader(tc.in)); err != nil {
			t.Fatal(err)
		}
		if whole.String() != tc.want {
			t.Errorf("%.40q: got %.40q, want %.40q", tc.in, whole.String(), tc.want)
		}
		// One byte at a time: every CRLF is split across two reads.
		var out bytes.Buffer
		if err := copyLF(&out, iotest.OneByteReader(strings.NewReader(tc.in))); err != nil {
			t.Fatal(err)
		}
		if out.String() != tc.want {
			t.Errorf("bytewise %.40q: got %.40q, want %.40q", tc.in, out.String(), tc.want)
		}
	}
}

func TestEnvelope(t *testing.T) {
	got := Envelope("a@b", []string{"c@d", "e@f"})
	if want := "Fa@b\x00Tc@d\x00Te@f\x00\x00"; string(got) != want {
		t.Fatalf("%q, want %q", got, want)
	}
	if got := Envelope("", nil); string(got) != "F\x00\x00" {
		t.Fatalf("null sender, no recipients: %q", got)
	}
}

// FuzzCopyLF checks the streaming conversion against the obvious one, with
// the input cut into reads of every size.
func FuzzCopyLF(f *testing.F) {
	f.Add([]byte("a\r\nb\r\n"), uint8(1))
	f.Add([]byte("\r\r\n\r\r"), uint8(2))
	f.Add([]byte("x\ry\r\n\n"), uint8(3))
	f.Fuzz(func(t *testing.T, in []byte, chunk uint8) {
		want := bytes.ReplaceAll(in, []byte("\r\n"), []byte("\n"))
		var out bytes.Buffer
		r := iotest.HalfReader(&chunked{b: in, n: int(chunk%16) + 1})
		if err := copyLF(&out, r); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), want) {
			t.Fatalf("copyLF(%q) = %q, want %q", in, out.Bytes(), want)
		}
	})
}

// chunked reads at most n bytes at a time.
type chunked struct {
	b []byte
	n int
}

func (c *chunked) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	k := copy(p[:min(len(p), c.n)], c.b)
	c.b = c.b[k:]
	return k, nil
}
