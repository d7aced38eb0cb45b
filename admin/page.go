package admin

import (
	"bytes"
	"cmp"
	"embed"
	"html/template"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"relay/policy"
)

//go:embed web/page.html
var pageFS embed.FS

//go:embed web/style.css
var styleSheet string

// Dashboard bounds.
const (
	dashboardEvents  = 50
	dashboardBusiest = 20
)

func parsePages() (*template.Template, error) {
	return template.New("").Funcs(template.FuncMap{
		"pathid": url.PathEscape,
		"stamp":  stamp,
		"high":   func(limit int64) int64 { return limit * 8 / 10 },
		"join":   strings.Join,
		// scriptid links a script a uid identity recorded to that
		// script's own identity; "" when id is not a uid.
		"scriptid": func(id, path string) string { sid, _ := policy.ScriptOfUID(id, path); return sid },
		// uidof is the account (uid identity) a script identity is under.
		"uidof": func(id string) string { uid, _ := policy.UIDOfScript(id); return uid },
	}).ParseFS(pageFS, "web/page.html")
}

// stamp writes a time the way the page and relay ctl show it.
func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05")
}

// ago writes how long before now t was ("3m ago").
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := now.Sub(t)
	switch {
	case d < time.Minute:
		return strconv.Itoa(max(int(d/time.Second), 0)) + "s ago"
	case d < time.Hour:
		return strconv.Itoa(int(d/time.Minute)) + "m ago"
	case d < 48*time.Hour:
		return strconv.Itoa(int(d/time.Hour)) + "h ago"
	}
	return strconv.Itoa(int(d/(24*time.Hour))) + "d ago"
}

// senderRow is a sender with what its row on the page needs.
type senderRow struct {
	Sender
	Since   time.Time // throttled since (newest throttle_start event) or suspended since
	SeenAgo string
	CSRF    string
	Back    string
	Fill    float64 // highest used/limit of its windows
}

// heldRow is a held message with what its row needs.
type heldRow struct {
	HeldSummary
	CSRF string
	Back string
}

// pageData feeds every page; each page uses its part.
type pageData struct {
	Title string
	Style template.CSS
	CSRF  string
	Now   time.Time
	Msg   string
	Err   string
	Next  string // login

	Throttled, Suspended, Busiest []senderRow
	Events                        []Event
	Held                          []heldRow
	HeldErr                       string
	Queues                        []queueRow // queue.go
	QueuedTotal                   int
	Queued                        []heldRow
	Counts                        []countRow
	CanReload                     bool
	DKIM                          []dkimRow
	DKIMReport                    DKIMReport

	Sender  *senderRow
	Message *HeldMessage
	HeldRow *heldRow
}

func (s *Server) newPage(r *http.Request, title string) *pageData {
	p := &pageData{Title: title, Style: template.CSS(styleSheet), Now: s.now(), CanReload: s.opts.Reload != nil}
	if r != nil {
		if sess := sessionOf(r); sess.kind == authCookie {
			p.CSRF = s.csrfToken(sess.nonce)
		}
		p.Msg = r.URL.Query().Get("msg")
		p.Err = r.URL.Query().Get("err")
	}
	return p
}

// render executes one page into a buffer first, so a template error never
// sends half a page.
func (s *Server) render(w http.ResponseWriter, code int, name string, p *pageData) {
	var buf bytes.Buffer
	if err := s.pages.ExecuteTemplate(&buf, name, p); err != nil {
		s.log.Error("admin: rendering page", "page", name, "err", err)
		http.Error(w, "page error", http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src "+s.cspHash+
		"; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	w.WriteHeader(code)
	w.Write(buf.Bytes())
}

func (s *Server) renderLogin(w http.ResponseWriter, code int, next, msg string) {
	p := s.newPage(nil, "Log in")
	p.Next, p.Err = next, msg
	s.render(w, code, "login", p)
}

func (s *Server) renderError(w http.ResponseWriter, code int, msg string) {
	p := s.newPage(nil, http.StatusText(code))
	p.Err = msg
	s.render(w, code, "error", p)
}

func (s *Server) row(snd Sender, csrf, back string, since map[string]time.Time) senderRow {
	r := senderRow{Sender: snd, SeenAgo: ago(s.now(), snd.LastSeen), CSRF: csrf, Back: back, Since: since[snd.ID]}
	if snd.Suspension != nil {
		r.Since = snd.Suspension.At
	}
	for _, u := range snd.Usage {
		if u.Limit > 0 {
			r.Fill = max(r.Fill, float64(u.Used)/float64(u.Limit))
		}
	}
	return r
}

// throttledSince maps identities to their newest throttle_start event.
func throttledSince(evs []Event) map[string]time.Time {
	m := map[string]time.Time{}
	for _, e := range evs {
		if e.Kind == "throttle_start" && e.Time.After(m[e.Identity]) {
			m[e.Identity] = e.Time
		}
	}
	return m
}

func (s *Server) dashboard(w http.ResponseWriter, r *http.Request) {
	p := s.newPage(r, "relay")
	p.Events = s.events(EventFilter{Limit: dashboardEvents})
	since := throttledSince(p.Events)
	rows := func(list []Sender) []senderRow {
		out := make([]senderRow, 0, len(list))
		for _, snd := range list {
			out = append(out, s.row(snd, p.CSRF, "/", since))
		}
		return out
	}
	p.Throttled = rows(s.senders(StateThrottled))
	p.Suspended = rows(s.senders(StateSuspended))
	slices.SortStableFunc(p.Throttled, func(a, b senderRow) int { return cmp.Compare(b.Fill, a.Fill) })
	slices.SortStableFunc(p.Suspended, func(a, b senderRow) int { return b.Since.Compare(a.Since) })

	// Who is sending most, against its own caps, throttled or not.
	for _, r := range rows(s.senders(StateActive)) {
		if r.Fill > 0 && r.State == StateOK {
			p.Busiest = append(p.Busiest, r)
		}
	}
	slices.SortStableFunc(p.Busiest, func(a, b senderRow) int { return cmp.Compare(b.Fill, a.Fill) })
	p.Busiest = p.Busiest[:min(len(p.Busiest), dashboardBusiest)]

	held, err := s.heldList()
	if err != nil {
		p.HeldErr = err.Error()
	}
	for _, h := range held {
		if h.Queue == "" {
			p.Held = append(p.Held, heldRow{HeldSummary: h, CSRF: p.CSRF, Back: "/"})
		}
	}
	s.queueSection(p, held)
	p.DKIMReport = s.dkimReport()
	p.DKIM = dkimRows(p.DKIMReport)
	s.render(w, http.StatusOK, "dashboard", p)
}

func (s *Server) senderPage(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !validIdentity(id) {
		s.renderError(w, http.StatusBadRequest, "bad identity id")
		return
	}
	snd, ok := s.sender(id)
	if !ok {
		s.renderError(w, http.StatusNotFound, "no such sender: "+id)
		return
	}
	p := s.newPage(r, id)
	row := s.row(snd, p.CSRF, "/ui/senders/"+url.PathEscape(id), throttledSince(snd.Events))
	p.Sender = &row
	p.Events = snd.Events
	s.render(w, http.StatusOK, "sender", p)
}

func (s *Server) heldPage(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !validHeldID(id) {
		s.renderError(w, http.StatusBadRequest, "bad held message id")
		return
	}
	if raw, _ := strconv.ParseBool(r.URL.Query().Get("raw")); raw {
		s.copyRaw(w, id, "text/plain; charset=utf-8")
		return
	}
	msg, err := s.heldMessage(id)
	if err != nil {
		s.renderError(w, statusOf(err), err.Error())
		return
	}
	p := s.newPage(r, "held "+id)
	p.Message = &msg
	p.HeldRow = &heldRow{HeldSummary: summarize(msg.HeldMeta), CSRF: p.CSRF, Back: "/"}
	s.render(w, http.StatusOK, "held", p)
}

// redirectBack sends the browser back to the page the form was on, with
// the outcome to show.
func redirectBack(w http.ResponseWriter, r *http.Request, key, msg string) {
	back, _, _ := strings.Cut(localPath(r.PostFormValue("back")), "?")
	http.Redirect(w, r, back+"?"+url.Values{key: {msg}}.Encode(), http.StatusSeeOther)
}

func (s *Server) senderActionUI(w http.ResponseWriter, r *http.Request) {
	id, action := r.PathValue("id"), r.PathValue("action")
	if _, err := s.doSenderAction(r, id, action); err != nil {
		redirectBack(w, r, "err", action+" "+id+": "+err.Error())
		return
	}
	redirectBack(w, r, "msg", id+": "+action+" done")
}

func (s *Server) heldActionUI(w http.ResponseWriter, r *http.Request) {
	id, action := r.PathValue("id"), r.PathValue("action")
	reply, _, err := s.doHeldAction(r, id, action)
	if err != nil {
		redirectBack(w, r, "err", action+" "+id+": "+err.Error())
		return
	}
	msg := "held message " + id + ": " + action + " done"
	if reply != "" {
		msg += " (" + reply + ")"
	}
	redirectBack(w, r, "msg", msg)
}

func (s *Server) reloadUI(w http.ResponseWriter, r *http.Request) {
	if _, err := s.doReload(r); err != nil {
		redirectBack(w, r, "err", "reload refused, the running policy stays: "+err.Error())
		return
	}
	redirectBack(w, r, "msg", "config reloaded")
}
