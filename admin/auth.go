package admin

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Session cookie: "<issued unix>.<nonce>.<mac>", mac = HMAC-SHA256 keyed by
// the token, so the cookie never holds the token and a new token ends every
// session. The server keeps the nonces of the sessions it opened
// (sessionStore): logging out removes one, so its cookie opens nothing
// afterwards, and a restart ends them all.
const (
	sessionCookie = "relay_admin"
	sessionTTL    = 12 * time.Hour
	csrfField     = "csrf"
	csrfHeader    = "X-CSRF-Token"
	// maxSessions bounds the sessions kept; a login beyond it ends the
	// oldest.
	maxSessions = 1000
)

// sessionStore is the set of open page sessions: nonce -> issue time.
type sessionStore struct {
	mu     sync.Mutex
	issued map[string]time.Time
}

// add opens a session, dropping expired ones and, at maxSessions, the
// oldest.
func (ss *sessionStore) add(nonce string, now time.Time) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.issued == nil {
		ss.issued = map[string]time.Time{}
	}
	if len(ss.issued) >= maxSessions {
		oldest, first := "", time.Time{}
		for n, t := range ss.issued {
			if now.Sub(t) > sessionTTL {
				delete(ss.issued, n)
				continue
			}
			if oldest == "" || t.Before(first) {
				oldest, first = n, t
			}
		}
		if len(ss.issued) >= maxSessions {
			delete(ss.issued, oldest)
		}
	}
	ss.issued[nonce] = now
}

// open reports whether the session nonce is open.
func (ss *sessionStore) open(nonce string) bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	_, ok := ss.issued[nonce]
	return ok
}

// end closes the session nonce.
func (ss *sessionStore) end(nonce string) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	delete(ss.issued, nonce)
}

type authKind int

const (
	authNone authKind = iota
	authBearer
	authCookie
)

type ctxKey struct{}

// session is how a request was authenticated.
type session struct {
	kind  authKind
	nonce string // cookie sessions only
}

func (s *Server) mac(parts ...string) string {
	m := hmac.New(sha256.New, s.token)
	for _, p := range parts {
		m.Write([]byte(p))
		m.Write([]byte{0})
	}
	return hex.EncodeToString(m.Sum(nil))
}

// newSession opens a session and returns its cookie value.
func (s *Server) newSession() string {
	var raw [16]byte
	rand.Read(raw[:])
	now := s.now()
	issued := strconv.FormatInt(now.Unix(), 10)
	nonce := hex.EncodeToString(raw[:])
	s.sessions.add(nonce, now)
	return issued + "." + nonce + "." + s.mac("session", issued, nonce)
}

// checkSession verifies a cookie value of an open session and returns its
// nonce.
func (s *Server) checkSession(v string) (string, bool) {
	issued, rest, ok1 := strings.Cut(v, ".")
	nonce, mac, ok2 := strings.Cut(rest, ".")
	if !ok1 || !ok2 {
		return "", false
	}
	if !hmac.Equal([]byte(mac), []byte(s.mac("session", issued, nonce))) {
		return "", false
	}
	t, err := strconv.ParseInt(issued, 10, 64)
	if err != nil {
		return "", false
	}
	age := s.now().Sub(time.Unix(t, 0))
	if age < -time.Minute || age > sessionTTL || !s.sessions.open(nonce) {
		return "", false
	}
	return nonce, true
}

// csrfToken is the per-session token the page's forms carry.
func (s *Server) csrfToken(nonce string) string { return s.mac("csrf", nonce)[:32] }

func (s *Server) tokenOK(t string) bool {
	return subtle.ConstantTimeCompare([]byte(t), s.token) == 1
}

// authenticate reads the bearer token or the session cookie. A wrong
// Authorization header fails even when a good cookie comes with it.
func (s *Server) authenticate(r *http.Request) session {
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, tok, ok := strings.Cut(h, " ")
		if ok && strings.EqualFold(scheme, "Bearer") && s.tokenOK(strings.TrimSpace(tok)) {
			return session{kind: authBearer}
		}
		return session{}
	}
	if c, err := r.Cookie(sessionCookie); err == nil {
		if nonce, ok := s.checkSession(c.Value); ok {
			return session{kind: authCookie, nonce: nonce}
		}
	}
	return session{}
}

// guard authenticates and applies the cross-site checks; it answers the
// request itself (and returns false) when they fail.
func (s *Server) guard(w http.ResponseWriter, r *http.Request, deny func(http.ResponseWriter, *http.Request, int, string)) (session, bool) {
	sess := s.authenticate(r)
	if sess.kind == authNone {
		deny(w, r, http.StatusUnauthorized, "missing or wrong admin token")
		return sess, false
	}
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return sess, true
	}
	// Browsers name the requesting site (Sec-Fetch-Site, Origin); a page
	// on another site must not act with the admin's cookie.
	if err := s.origin.Check(r); err != nil {
		s.log.Warn("admin: cross-site request refused", "path", r.URL.Path, "origin", r.Header.Get("Origin"), "remote", r.RemoteAddr)
		deny(w, r, http.StatusForbidden, "cross-site request refused")
		return sess, false
	}
	if sess.kind == authCookie {
		r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
		got := r.Header.Get(csrfHeader)
		if got == "" {
			got = r.PostFormValue(csrfField)
		}
		if !hmac.Equal([]byte(got), []byte(s.csrfToken(sess.nonce))) {
			deny(w, r, http.StatusForbidden, "missing or wrong CSRF token")
			return sess, false
		}
	}
	return sess, true
}

// api wraps a JSON endpoint: 401/403 answers are JSON errors.
func (s *Server) api(h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sess, ok := s.guard(w, r, func(w http.ResponseWriter, r *http.Request, code int, msg string) {
			if code == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Bearer realm="relay"`)
			}
			writeError(w, code, msg)
		})
		if ok {
			h(w, r.WithContext(context.WithValue(r.Context(), ctxKey{}, sess)))
		}
	})
}

// page wraps a dashboard page: without a session it answers 401 with the
// login form, which comes back to the page after logging in.
func (s *Server) page(h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sess, ok := s.guard(w, r, func(w http.ResponseWriter, r *http.Request, code int, msg string) {
			if code == http.StatusUnauthorized {
				next := "/"
				if r.Method == http.MethodGet {
					next = r.URL.RequestURI()
				}
				s.renderLogin(w, code, next, "")
				return
			}
			s.renderError(w, code, msg)
		})
		if ok {
			h(w, r.WithContext(context.WithValue(r.Context(), ctxKey{}, sess)))
		}
	})
}

func sessionOf(r *http.Request) session {
	sess, _ := r.Context().Value(ctxKey{}).(session)
	return sess
}

// via names how a request was authenticated, for the log.
func via(r *http.Request) string {
	if sessionOf(r).kind == authCookie {
		return "page"
	}
	return "api"
}

func (s *Server) loginForm(w http.ResponseWriter, r *http.Request) {
	s.renderLogin(w, http.StatusOK, localPath(r.URL.Query().Get("next")), "")
}

// login checks the token typed into the form and sets the session cookie.
func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	if err := s.origin.Check(r); err != nil {
		s.renderError(w, http.StatusForbidden, "cross-site request refused")
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	next := localPath(r.PostFormValue("next"))
	if !s.tokenOK(strings.TrimSpace(r.PostFormValue("token"))) {
		s.log.Warn("admin: login with a wrong token", "remote", r.RemoteAddr)
		s.renderLogin(w, http.StatusUnauthorized, next, "Wrong token.")
		return
	}
	http.SetCookie(w, &http.Cookie{
		Name:     sessionCookie,
		Value:    s.newSession(),
		Path:     "/",
		MaxAge:   int(sessionTTL / time.Second),
		HttpOnly: true,
		Secure:   r.TLS != nil,
		SameSite: http.SameSiteStrictMode,
	})
	s.log.Info("admin: logged in", "remote", r.RemoteAddr)
	http.Redirect(w, r, next, http.StatusSeeOther)
}

// logout ends the session on the server (its cookie opens nothing
// afterwards, wherever a copy of it is) and clears the cookie.
func (s *Server) logout(w http.ResponseWriter, r *http.Request) {
	if sess := sessionOf(r); sess.kind == authCookie {
		s.sessions.end(sess.nonce)
		s.log.Info("admin: logged out", "remote", r.RemoteAddr)
	}
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: "", Path: "/", MaxAge: -1,
		HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode})
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

// localPath keeps a redirect target on this server: an absolute path that
// is not protocol-relative ("//host") and has no backslash tricks and no
// control characters (browsers drop tabs and newlines from a URL before
// parsing it, so "/\t/host" would be "//host").
func localPath(p string) string {
	if p == "" || p[0] != '/' || strings.HasPrefix(p, "//") || strings.ContainsRune(p, '\\') {
		return "/"
	}
	for i := 0; i < len(p); i++ {
		if p[i] < 0x20 || p[i] == 0x7f {
			return "/"
		}
	}
	return p
}
