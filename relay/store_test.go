package relay

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

func storeAll(t testing.TB, in string, limit int64) (string, error) {
	t.Helper()
	r := newStoreReader(strings.NewReader(in), limit, nil)
	out, err := io.ReadAll(r)
	if err == nil && r.Err() != nil {
		t.Fatalf("ReadAll clean but Err() = %v", r.Err())
	}
	return string(out), err
}

func TestStoreReaderConverts(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"a\r\n", "a\n"},
		{"Subject: x\r\n\r\nbody\r\n.dot\r\n", "Subject: x\n\nbody\n.dot\n"},
		{"\r\n\r\n", "\n\n"},
		{"no newline at end", "no newline at end"},
		{"8bit \xff\xfe\x00 bytes\r\n", "8bit \xff\xfe\x00 bytes\n"},
	} {
		got, err := storeAll(t, tc.in, 0)
		if err != nil || got != tc.want {
			t.Errorf("store(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func TestStoreReaderBareNewlines(t *testing.T) {
	for _, in := range []string{
		"a\nb\r\n",           // bare LF
		"a\r\n.\nMAIL FROM:", // smuggling: LF.LF
		"a\r.\rb\r\n",        // smuggling: CR.CR
		"a\rb\r\n",           // bare CR
		"a\r",                // CR at the very end
		"\n",
	} {
		got, err := storeAll(t, in, 0)
		if !errors.Is(err, errBareNewline) {
			t.Errorf("store(%q) = %q, %v; want errBareNewline", in, got, err)
		}
	}
}

func TestStoreReaderDatabytes(t *testing.T) {
	// 10 stored bytes: "123456789\n" (11 on the wire).
	if got, err := storeAll(t, "123456789\r\n", 10); err != nil || got != "123456789\n" {
		t.Errorf("exactly databytes: %q, %v", got, err)
	}
	if _, err := storeAll(t, "1234567890\r\n", 10); !errors.Is(err, errTooBig) {
		t.Errorf("databytes+1: err = %v, want errTooBig", err)
	}
}

func TestStoreReaderHops(t *testing.T) {
	hops := func(n int, line string) string {
		return strings.Repeat(line, n) + "\r\nbody\r\n"
	}
	if _, err := storeAll(t, hops(99, "Received: x\r\n"), 0); err != nil {
		t.Errorf("99 hops: %v", err)
	}
	if _, err := storeAll(t, hops(100, "Received: x\r\n"), 0); !errors.Is(err, errTooManyHops) {
		t.Errorf("100 Received: %v, want errTooManyHops", err)
	}
	// qmail counts "delivered" and "received" prefixes in either case,
	// Received-SPF and Delivered-To included.
	mixed := strings.Repeat("rEcEiVeD-SPF: x\r\n", 50) + strings.Repeat("DELIVERED-To: y\r\n", 50) + "\r\n"
	if _, err := storeAll(t, mixed, 0); !errors.Is(err, errTooManyHops) {
		t.Errorf("mixed hops: %v, want errTooManyHops", err)
	}
	// Continuation lines and the body do not count.
	body := "Subject: x\r\n" + strings.Repeat(" Received: folded\r\n", 150) + "\r\n" + strings.Repeat("Received: in body\r\n", 150)
	if _, err := storeAll(t, body, 0); err != nil {
		t.Errorf("body hops counted: %v", err)
	}
	// "Receive:" is not "received".
	if _, err := storeAll(t, hops(150, "Receive: x\r\n"), 0); err != nil {
		t.Errorf("short prefix counted: %v", err)
	}
}

// The converter must give the same bytes whatever the read sizes.
func TestStoreReaderChunking(t *testing.T) {
	in := "Received: a\r\nX: b\r\n\r\nline\r\n\r\n..x\r\nend"
	want, _ := storeAll(t, in, 0)
	r := newStoreReader(iotest.OneByteReader(strings.NewReader(in)), 0, nil)
	got, err := io.ReadAll(iotest.OneByteReader(r))
	if err != nil || string(got) != want {
		t.Fatalf("one byte at a time: %q, %v; want %q", got, err, want)
	}
}

func FuzzStoreReader(f *testing.F) {
	for _, s := range []string{"a\r\nb\r\n", "a\nb", "\r.\r", "\r\n.\r\n", "Received: x\r\n\r\n", "x\r", strings.Repeat("delivered\r\n", 101)} {
		f.Add([]byte(s), int64(0))
		f.Add([]byte(s), int64(5))
	}
	f.Fuzz(func(t *testing.T, in []byte, limit int64) {
		if limit < 0 {
			limit = -limit
		}
		r := newStoreReader(bytes.NewReader(in), limit, nil)
		out, err := io.ReadAll(r)
		if len(out) > len(in) {
			t.Fatalf("output longer than input")
		}
		if err != nil {
			return
		}
		// A clean stored message is exactly the input with CRLF -> LF.
		want := bytes.ReplaceAll(in, []byte("\r\n"), []byte("\n"))
		if !bytes.Equal(out, want) {
			t.Fatalf("got %q, want %q", out, want)
		}
		if bytes.ContainsAny(out, "\r") || bytes.Count(in, []byte("\n")) != bytes.Count(in, []byte("\r\n")) {
			t.Fatalf("accepted a bare CR or LF: %q", in)
		}
		if limit > 0 && int64(len(out)) > limit {
			t.Fatalf("accepted %d bytes over limit %d", len(out), limit)
		}
	})
}

func BenchmarkStoreReader(b *testing.B) {
	msg := []byte(strings.Repeat("Received: from x\r\n", 5) + "\r\n" + strings.Repeat("a fairly ordinary line of body text, seventy-odd bytes long....\r\n", 16000))
	b.SetBytes(int64(len(msg)))
	for b.Loop() {
		r := newStoreReader(bytes.NewReader(msg), 0, nil)
		if _, err := io.Copy(io.Discard, r); err != nil {
			b.Fatal(err)
		}
	}
}

// storeModel is storeReader's conversion one byte at a time, as qmail-smtpd's
// blast() does it: the specification the fast path in fill is held to.
func storeModel(in []byte, limit int64) (out []byte, size int64, err error) {
	const recv, deliv = "received", "delivered"
	cr, inHeader, linePos, hops := false, true, 0, 0
	maybeRecv, maybeDeliv := true, true
	emit := func(b byte) bool {
		size++
		if limit > 0 && size > limit {
			err = errTooBig
			return false
		}
		out = append(out, b)
		if !inHeader {
			return true
		}
		if b == '\n' {
			if linePos == 0 {
				inHeader = false
			}
			linePos, maybeRecv, maybeDeliv = 0, true, true
			return true
		}
		lb := b
		if 'A' <= lb && lb <= 'Z' {
			lb += 'a' - 'A'
		}
		if linePos < len(deliv) && maybeDeliv && lb != deliv[linePos] {
			maybeDeliv = false
		} else if linePos == len(deliv)-1 && maybeDeliv {
			hops++
		}
		if linePos < len(recv) && maybeRecv && lb != recv[linePos] {
			maybeRecv = false
		} else if linePos == len(recv)-1 && maybeRecv {
			hops++
		}
		linePos++
		if hops >= maxHops {
			err = errTooManyHops
			return false
		}
		return true
	}
	for _, b := range in {
		if cr {
			cr = false
			if b == '\n' {
				if !emit('\n') {
					return
				}
				continue
			}
			return out, size, errBareNewline
		}
		if b == '\r' {
			cr = true
			continue
		}
		if b == '\n' {
			return out, size, errBareNewline
		}
		if !emit(b) {
			return
		}
	}
	if cr {
		return out, size, errBareNewline
	}
	return
}

// FuzzStoreReaderMatchesModel holds storeReader, with its runs copied
// whole, to the byte-at-a-time model: the same bytes, the same error and
// the same size, however the input arrives in pieces.
func FuzzStoreReaderMatchesModel(f *testing.F) {
	for _, s := range []string{"a\r\nb\r\n", "Subject: x\r\n\r\nbody line\r\nmore\r\n", "x\r\n\r\nab\rc", "h\r\n\r\nbody\nlf", "Received: a\r\nDelivered-To: b\r\n\r\n" + strings.Repeat("z", 100), "\r\n\r\n\r"} {
		f.Add([]byte(s), int64(0), uint8(7))
		f.Add([]byte(s), int64(20), uint8(3))
		f.Add([]byte(s), int64(5), uint8(0))
	}
	f.Fuzz(func(t *testing.T, in []byte, limit int64, chunk uint8) {
		if limit < 0 {
			limit = -limit
		}
		wantOut, wantSize, wantErr := storeModel(in, limit)
		var src io.Reader = bytes.NewReader(in)
		if chunk > 0 {
			src = &chunkReader{b: in, n: int(chunk)}
		}
		r := newStoreReader(src, limit, nil)
		out, err := io.ReadAll(r)
		if !bytes.Equal(out, wantOut) || !errors.Is(err, wantErr) {
			t.Fatalf("store(%q, limit %d) = %q, %v; model %q, %v", in, limit, out, err, wantOut, wantErr)
		}
		if r.Size() != wantSize {
			t.Fatalf("size %d, model %d", r.Size(), wantSize)
		}
	})
}

// chunkReader yields b n bytes at a time.
type chunkReader struct {
	b []byte
	n int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	k := copy(p[:min(len(p), c.n)], c.b)
	c.b = c.b[k:]
	return k, nil
}
