package smtp

import (
	"bufio"
	"io"
	"strings"
	"testing"
)

// relay patch: a leading ".\r" not followed by "\n" keeps its CR, as
// net/textproto's DotReader does.
func TestDataReaderKeepsCRAfterLeadingDot(t *testing.T) {
	r := &dataReader{r: bufio.NewReader(strings.NewReader("a\r\n.\rX\r\n..b\r\n.\r\n"))}
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if want := "a\r\n\rX\r\n.b\r\n"; string(got) != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// relay patch: RFC 5321 §4.5.1, <Postmaster> without a domain.
func TestParsePathPostmaster(t *testing.T) {
	for _, in := range []string{"<postmaster>", "<Postmaster>", "<POSTMASTER> NOTIFY=NEVER"} {
		p := parser{s: in}
		got, err := p.parsePath()
		if err != nil || got != "postmaster" {
			t.Errorf("%q: %q, %v", in, got, err)
		}
	}
}
