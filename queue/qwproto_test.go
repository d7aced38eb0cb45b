package queue

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

// FuzzReadQWFrame: any byte stream decodes into frames that encode back
// to the same bytes, or stops with an error; nothing panics or allocates
// beyond the frame limit.
func FuzzReadQWFrame(f *testing.F) {
	f.Add(appendQWFrame(nil, qwHello, 0, qwHelloPayload(1002, 5)))
	f.Add(appendQWFrame(appendQWFrame(nil, qwBegin, 7, []byte("Subject: x\n\nhi\n")), qwEnd, 7, []byte("Fa@b\x00Tc@d\x00\x00")))
	f.Add(appendQWFrame(nil, qwOK, 3, qwOKPayload(1<<40, 12345)))
	f.Add([]byte{0, 0, 0, 8, 'B'})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 'D', 0, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bufio.NewReader(bytes.NewReader(data))
		var buf []byte
		var out []byte
		for {
			fr, err := readQWFrame(r, &buf)
			if err != nil {
				if err == io.EOF && !bytes.Equal(out, data) {
					t.Fatalf("clean EOF after %d of %d bytes", len(out), len(data))
				}
				if err != io.EOF && !errors.Is(err, errQWProtocol) && err != io.ErrUnexpectedEOF {
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			if len(fr.payload) > qwMaxPayload {
				t.Fatalf("payload of %d bytes", len(fr.payload))
			}
			out = appendQWFrame(out, fr.typ, fr.id, fr.payload)
			if !bytes.HasPrefix(data, out) {
				t.Fatalf("re-encoded frames differ from the input")
			}
		}
	})
}

// qqEnvelopeModel is qmail-queue.c's reading of the envelope, byte by
// byte, as literally as Go allows: the reference parseQQEnvelope is held
// to.
func qqEnvelopeModel(env []byte) ([]byte, int) {
	var out []byte
	i := 0
	get := func() (byte, bool) {
		if i >= len(env) {
			return 0, false
		}
		i++
		return env[i-1], true
	}
	ch, ok := get()
	if !ok {
		return nil, 54
	}
	if ch != 'F' {
		return nil, 91
	}
	out = append(out, ch)
	l := 0
	for l = 0; l < 1003; l++ {
		ch, ok = get()
		if !ok {
			return nil, 54
		}
		out = append(out, ch)
		if ch == 0 {
			break
		}
	}
	if l >= 1003 {
		return nil, 11
	}
	for {
		ch, ok = get()
		if !ok {
			return nil, 54
		}
		if ch == 0 {
			break
		}
		if ch != 'T' {
			return nil, 91
		}
		out = append(out, ch)
		for l = 0; l < 1003; l++ {
			ch, ok = get()
			if !ok {
				return nil, 54
			}
			out = append(out, ch)
			if ch == 0 {
				break
			}
		}
		if l >= 1003 {
			return nil, 11
		}
	}
	return out, 0
}

func FuzzParseQQEnvelope(f *testing.F) {
	for _, s := range []string{
		"Fa@b\x00Tc@d\x00\x00", "F\x00\x00", "Fa\x00Tb\x00Tc\x00\x00trailing", "Xa\x00\x00", "Fa\x00Xb\x00\x00",
		"Fa\x00Tb\x00", "", "F", "F" + strings.Repeat("a", 1002) + "\x00\x00", "F" + strings.Repeat("a", 1003) + "\x00\x00",
		"Fa\x00T" + strings.Repeat("b", 1003) + "\x00\x00",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, env []byte) {
		got, code := parseQQEnvelope(env)
		want, wantCode := qqEnvelopeModel(env)
		if code != wantCode || !bytes.Equal(got, want) {
			t.Fatalf("%q: got %q exit %d, qmail-queue's reading %q exit %d", env, got, code, want, wantCode)
		}
	})
}

func TestQQEnvelopeRoundTrip(t *testing.T) {
	env := Envelope{From: "", To: []string{"a@b", "c@d"}}
	got, code := parseQQEnvelope(AppendEnvelope(nil, env))
	if code != 0 || string(got) != "F\x00Ta@b\x00Tc@d\x00" {
		t.Fatalf("%q %d", got, code)
	}
}
