package admin

import (
	"strings"
	"testing"
	"time"
)

// FuzzSessionCookie: a cookie made with one token is no session under
// another, and the server accepts only its own exact form.
func FuzzSessionCookie(f *testing.F) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	mine, err := New(Options{Token: testToken, Policy: newFakePolicy(clock), Now: clock})
	if err != nil {
		f.Fatal(err)
	}
	other, err := New(Options{Token: strings.ToUpper(testToken), Policy: newFakePolicy(clock), Now: clock})
	if err != nil {
		f.Fatal(err)
	}
	good := mine.newSession()
	f.Add(good)
	f.Add(good[:len(good)-1] + "0")
	f.Add("1767225600.00.00")
	f.Add("..")
	f.Add("")
	f.Add(testToken)
	f.Fuzz(func(t *testing.T, v string) {
		if _, ok := other.checkSession(v); ok {
			t.Fatalf("cookie %q accepted under another token", v)
		}
		if _, ok := mine.checkSession(v); ok {
			parts := strings.Split(v, ".")
			if len(parts) != 3 || len(parts[2]) != 64 || parts[2] != mine.mac("session", parts[0], parts[1]) {
				t.Fatalf("cookie %q accepted", v)
			}
		}
	})
}

// FuzzHeaderBlock: the header block has no empty line and only lines of the input.
func FuzzHeaderBlock(f *testing.F) {
	f.Add(heldBody)
	f.Add("Subject: x\r\n\r\nbody\r\n")
	f.Add("no end of header")
	f.Add("\nbody only")
	f.Add("")
	f.Fuzz(func(t *testing.T, msg string) {
		hdr, err := headerBlock(strings.NewReader(msg))
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(hdr, "\n\n") || strings.HasPrefix(hdr, "\n") {
			t.Fatalf("empty line in the header of %q: %q", msg, hdr)
		}
		norm := strings.ReplaceAll(msg, "\r", "")
		if !strings.HasPrefix(norm, strings.ReplaceAll(strings.TrimSuffix(hdr, "\n"), "\r", "")) {
			t.Fatalf("header %q is not the start of %q", hdr, msg)
		}
	})
}

// FuzzValidIdentity: an accepted id has a known kind, an address part and
// no control characters.
func FuzzValidIdentity(f *testing.F) {
	for _, s := range []string{webID, ip6ID, newsID, "sender:<>", "user:", "x:y", "user:a\nb", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if !validIdentity(id) {
			return
		}
		kind, rest, _ := strings.Cut(id, ":")
		if rest == "" || strings.ContainsFunc(id, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			t.Fatalf("accepted %q", id)
		}
		switch kind {
		case "user", "uid", "sender", "domain", "ip":
		default:
			t.Fatalf("accepted kind %q", kind)
		}
	})
}
