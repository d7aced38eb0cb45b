package loadgen

import (
	"bufio"
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestReply(t *testing.T) {
	s := &session{r: bufio.NewReader(strings.NewReader("250-mail.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n451 4.7.1 later\r\n"))}
	code, lines, err := s.reply()
	if err != nil || code != 250 || strings.Join(lines, "|") != "mail.example|PIPELINING|8BITMIME" {
		t.Fatalf("%d %q %v", code, lines, err)
	}
	if code, _, err := s.reply(); err != nil || code != 451 {
		t.Fatalf("%d %v", code, err)
	}
	for _, bad := range []string{"250 ok\n", "25 ok\r\n", "abc ok\r\n", "250+ok\r\n", "250-more\r\n"} {
		s := &session{r: bufio.NewReader(strings.NewReader(bad))}
		if _, _, err := s.reply(); err == nil {
			t.Errorf("reply(%q) succeeded", bad)
		}
	}
}

func FuzzReply(f *testing.F) {
	f.Add([]byte("250-a\r\n250 b\r\n"))
	f.Add([]byte("354 go ahead\r\n"))
	f.Add([]byte("2\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s := &session{r: bufio.NewReader(bytes.NewReader(b))}
		code, lines, err := s.reply()
		if err == nil && (code < 0 || code > 999 || len(lines) == 0) {
			t.Fatalf("reply(%q) = %d %q", b, code, lines)
		}
	})
}

// TestMessage checks that the content is the size asked for, dot-safe and
// properly ended.
func TestMessage(t *testing.T) {
	cfg := Config{UIDs: 3}.withDefaults()
	for _, size := range []int{1, 1024, 102400, 10 << 20} {
		m := newMessage(size)
		var b bytes.Buffer
		w := bufio.NewWriter(&b)
		if err := m.write(w, 7, SenderAddr(7, 2), &cfg); err != nil {
			t.Fatal(err)
		}
		got := b.Bytes()
		if size >= 1024 && (len(got) < size*95/100 || len(got) > size*105/100) {
			t.Errorf("size %d: wrote %d bytes", size, len(got))
		}
		if !bytes.HasSuffix(got, []byte("\r\n.\r\n")) || bytes.Contains(got[:len(got)-3], []byte("\n.")) {
			t.Errorf("size %d: not a transparent DATA stream", size)
		}
		if !bytes.HasPrefix(got, []byte("Received: (qmail ")) || !bytes.Contains(got, []byte(" invoked by uid 10001);")) {
			t.Errorf("size %d: no uid line for message 7 of 3 uids: %.90q", size, got)
		}
	}
}

func TestSenderAddr(t *testing.T) {
	if got := SenderAddr(1234, 100); got != "s1234@d34.bench.example" {
		t.Fatal(got)
	}
}

func TestPercentile(t *testing.T) {
	var lat []time.Duration
	for i := 1; i <= 100; i++ {
		lat = append(lat, time.Duration(i)*time.Microsecond)
	}
	if p50, p99 := percentile(lat, 50), percentile(lat, 99); p50 != 50 || p99 != 99 {
		t.Fatalf("p50 %v p99 %v", p50, p99)
	}
	if percentile(nil, 50) != 0 || percentile(lat[:1], 99) != 1 {
		t.Fatal("edge cases")
	}
}
