package admin

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLoginRedirectStaysLocal: browsers drop every tab, CR and LF from a
// URL before parsing it (WHATWG URL "remove all ASCII tab or newline"), so
// a next of "/\t/evil.example" would send the admin, just logged in, to
// //evil.example. Such a target must fall back to "/".
func TestLoginRedirectStaysLocal(t *testing.T) {
	f := newFixture(t)
	for _, next := range []string{"/\t/evil.example/", "/\n/evil.example/", "/\x00/evil.example/", "/\x7f/evil.example/"} {
		r := httptest.NewRequest("POST", "/login", strings.NewReader(url.Values{"token": {testToken}, "next": {next}}.Encode()))
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		w := httptest.NewRecorder()
		f.srv.Handler().ServeHTTP(w, r)
		if w.Code != http.StatusSeeOther {
			t.Fatalf("next %q: status %d", next, w.Code)
		}
		loc := w.Header().Get("Location")
		browser := strings.NewReplacer("\t", "", "\n", "", "\r", "").Replace(loc)
		if u, err := url.Parse(browser); err != nil || u.Host != "" || strings.HasPrefix(browser, "//") || loc != "/" {
			t.Errorf("next %q: Location %q leaves the server or is not /", next, loc)
		}
	}
}

// TestTokenFileReadableByOthersRefused: the admin API listens on loopback,
// which every local user can reach; the token file is all that keeps a
// customer with a shell from unsuspending himself. A token_file that
// every user may read (say made with the default umask) is refused.
func TestTokenFileReadableByOthersRefused(t *testing.T) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "admin.token")
	if err := os.WriteFile(tokenFile, []byte(testToken+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tokenFile, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := LoadOrCreateToken(tokenFile, dir); err == nil {
		t.Fatal("a world-readable token_file was accepted")
	}
	if _, err := ReadToken(tokenFile, dir); err == nil {
		t.Fatal("ReadToken accepted a world-readable token file")
	}
	if err := os.Chmod(tokenFile, 0o640); err != nil {
		t.Fatal(err)
	}
	if tok, _, _, err := LoadOrCreateToken(tokenFile, dir); err != nil || tok != testToken {
		t.Fatalf("mode 0640: %q, %v", tok, err)
	}
}
