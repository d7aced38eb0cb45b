package admin

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"relay/policy"
	"relay/queue"
)

// Bounds of the API.
const (
	maxIDLen          = 1024
	defaultEventLimit = 100
	maxEventLimit     = 1000
	senderEventLimit  = 50
	maxHeaderBlock    = 256 << 10
)

// validIdentity reports whether id looks like "<kind>:<something>" (one
// of policy's kinds, docs/design.md §3) with no control characters. Ids may hold ':' '/' '@'
// and spaces (uid:web1:33, ip:2001:db8::/64, script:local:33:/var/www/a b.php).
func validIdentity(id string) bool {
	if len(id) > maxIDLen || !policy.ValidID(id) || !utf8.ValidString(id) {
		return false
	}
	for _, c := range id {
		if c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
}

// validHeldID accepts spool ids: letters, digits, '.', '_', '-', not
// starting with '.', so no id can name a path outside the spool.
func validHeldID(id string) bool {
	if id == "" || len(id) > 128 || id[0] == '.' {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// validEventKind accepts lower-case words with '_' (throttle_start).
func validEventKind(k string) bool {
	if k == "" || len(k) > 32 {
		return false
	}
	for i := 0; i < len(k); i++ {
		if c := k[i]; !(c >= 'a' && c <= 'z' || c == '_') {
			return false
		}
	}
	return true
}

func validState(st string) bool {
	switch st {
	case StateOK, StateThrottled, StateSuspended, StateAll, StateActive:
		return true
	}
	return false
}

type apiError struct {
	Error string `json:"error"`
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, apiError{msg})
}

// statusOf maps an error of Policy or Held to an HTTP status.
func statusOf(err error) int {
	var qe *queue.Error
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, queue.ErrHeldNotFound):
		return http.StatusNotFound
	case errors.Is(err, queue.ErrHeldBadID):
		return http.StatusBadRequest
	case errors.Is(err, queue.ErrHeldBusy):
		return http.StatusConflict
	case errors.As(err, &qe):
		return http.StatusBadGateway
	}
	return http.StatusInternalServerError
}

// senders lists senders in a state; the result is never nil.
func (s *Server) senders(state string) []Sender {
	list := s.opts.Policy.Senders(state)
	if list == nil {
		list = []Sender{}
	}
	return list
}

func (s *Server) listSenders(w http.ResponseWriter, r *http.Request) {
	state := r.URL.Query().Get("state")
	if state == "" {
		state = StateAll
	}
	if !validState(state) {
		writeError(w, http.StatusBadRequest, "state must be ok, throttled, suspended or all")
		return
	}
	writeJSON(w, http.StatusOK, s.senders(state))
}

// sender looks one sender up with its recent events.
func (s *Server) sender(id string) (Sender, bool) {
	snd, ok := s.opts.Policy.Sender(id)
	if !ok {
		return Sender{}, false
	}
	if snd.Events == nil {
		snd.Events = s.opts.Policy.Events(EventFilter{Identity: id, Limit: senderEventLimit})
	}
	if snd.Events == nil {
		snd.Events = []Event{}
	}
	return snd, true
}

func (s *Server) getSender(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !validIdentity(id) {
		writeError(w, http.StatusBadRequest, "bad identity id")
		return
	}
	snd, ok := s.sender(id)
	if !ok {
		writeError(w, http.StatusNotFound, "no such sender")
		return
	}
	writeJSON(w, http.StatusOK, snd)
}

// ActionResult is the reply to a POST that acted.
type ActionResult struct {
	ID     string `json:"id,omitempty"`
	Action string `json:"action"`
	Reply  string `json:"reply,omitempty"` // release: what the hand-off said
}

// reason reads the optional suspension reason from a form or JSON body.
func reason(r *http.Request) string {
	if strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") {
		var body struct {
			Reason string `json:"reason"`
		}
		json.NewDecoder(io.LimitReader(r.Body, maxFormBytes)).Decode(&body)
		return body.Reason
	}
	r.Body = http.MaxBytesReader(nil, r.Body, maxFormBytes)
	return r.FormValue("reason")
}

// doSenderAction runs suspend, unsuspend or reset; the status is 0 on success.
func (s *Server) doSenderAction(r *http.Request, id, action string) (int, error) {
	if !validIdentity(id) {
		return http.StatusBadRequest, errors.New("bad identity id")
	}
	var err error
	if action == "unsuspend" || action == "reset" {
		// Name the usual refusals exactly; policy's own errors stay 500.
		snd, ok := s.opts.Policy.Sender(id)
		switch {
		case !ok:
			return http.StatusNotFound, errors.New("no such sender")
		case action == "unsuspend" && snd.State != StateSuspended:
			return http.StatusConflict, errors.New(id + " is not suspended")
		}
	}
	switch action {
	case "suspend":
		why := strings.TrimSpace(reason(r))
		if why == "" {
			why = "suspended by the admin"
		}
		err = s.opts.Policy.Suspend(id, why)
	case "unsuspend":
		err = s.opts.Policy.Unsuspend(id)
	case "reset":
		err = s.opts.Policy.Reset(id)
	default:
		return http.StatusNotFound, errors.New("no such action")
	}
	if err != nil {
		s.log.Error("admin: sender action failed", "action", action, "id", id, "err", err)
		return statusOf(err), err
	}
	s.log.Info("admin: sender action", "action", action, "id", id, "via", via(r), "remote", r.RemoteAddr)
	return 0, nil
}

func (s *Server) senderAction(w http.ResponseWriter, r *http.Request) {
	id, action := r.PathValue("id"), r.PathValue("action")
	if code, err := s.doSenderAction(r, id, action); err != nil {
		writeError(w, code, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, ActionResult{ID: id, Action: action})
}

// heldList is the spool newest first; no spool is an empty one.
func (s *Server) heldList() ([]HeldSummary, error) {
	out := []HeldSummary{}
	if s.opts.Held == nil {
		return out, nil
	}
	metas, err := s.opts.Held.List()
	if err != nil {
		return out, err
	}
	for _, m := range metas {
		out = append(out, summarize(m))
	}
	slices.SortStableFunc(out, func(a, b HeldSummary) int { return b.Time.Compare(a.Time) })
	return out, nil
}

func (s *Server) listHeld(w http.ResponseWriter, r *http.Request) {
	list, err := s.heldList()
	if err != nil {
		s.log.Error("admin: listing the hold spool", "err", err)
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, list)
}

var errNoSpool = errors.New("no hold spool: " + fs.ErrNotExist.Error())

// heldMessage reads one held message's metadata and header block.
func (s *Server) heldMessage(id string) (HeldMessage, error) {
	if s.opts.Held == nil {
		return HeldMessage{}, errNoSpool
	}
	meta, err := s.opts.Held.Get(id)
	if err != nil {
		return HeldMessage{}, err
	}
	rc, err := s.opts.Held.Open(id)
	if err != nil {
		return HeldMessage{}, err
	}
	defer rc.Close()
	hdr, err := headerBlock(rc)
	return HeldMessage{HeldMeta: meta, Headers: hdr}, err
}

// headerBlock reads a message's header up to the empty line (RFC 5322 §2.1),
// at most maxHeaderBlock bytes, with LF line ends.
func headerBlock(r io.Reader) (string, error) {
	br := bufio.NewReader(io.LimitReader(r, maxHeaderBlock))
	var b strings.Builder
	for {
		line, err := br.ReadString('\n')
		if t := strings.TrimRight(line, "\r\n"); t != "" {
			b.WriteString(t)
			b.WriteByte('\n')
		} else if err == nil {
			return b.String(), nil // the empty line ending the header
		}
		if err == io.EOF {
			return b.String(), nil
		}
		if err != nil {
			return b.String(), err
		}
	}
}

// copyRaw writes a held message as it sits in the spool.
func (s *Server) copyRaw(w http.ResponseWriter, id, contentType string) {
	if s.opts.Held == nil {
		writeError(w, http.StatusNotFound, errNoSpool.Error())
		return
	}
	rc, err := s.opts.Held.Open(id)
	if err != nil {
		writeError(w, statusOf(err), err.Error())
		return
	}
	defer rc.Close()
	w.Header().Set("Content-Type", contentType)
	if _, err := io.Copy(w, rc); err != nil {
		s.log.Warn("admin: sending a held message", "id", id, "err", err)
	}
}

func (s *Server) getHeld(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !validHeldID(id) {
		writeError(w, http.StatusBadRequest, "bad held message id")
		return
	}
	if raw, _ := strconv.ParseBool(r.URL.Query().Get("raw")); raw {
		s.copyRaw(w, id, "message/rfc822")
		return
	}
	msg, err := s.heldMessage(id)
	if err != nil {
		writeError(w, statusOf(err), err.Error())
		return
	}
	writeJSON(w, http.StatusOK, msg)
}

// doHeldAction releases or deletes a held message.
func (s *Server) doHeldAction(r *http.Request, id, action string) (string, int, error) {
	if !validHeldID(id) {
		return "", http.StatusBadRequest, errors.New("bad held message id")
	}
	if s.opts.Held == nil {
		return "", http.StatusNotFound, errNoSpool
	}
	if action != "release" && action != "delete" {
		return "", http.StatusNotFound, errors.New("no such action")
	}
	meta, err := s.opts.Held.Get(id)
	if err != nil {
		return "", statusOf(err), err
	}
	ev := Event{Time: s.now(), Detail: "held message " + id}
	if len(meta.Identities) > 0 {
		ev.Identity = meta.Identities[0]
	}
	var reply string
	switch action {
	case "release":
		var rcpt queue.Receipt
		// Not the request's context: a client that hangs up must not kill
		// a hand-off that may already have queued the message (a later
		// release would send it twice). The hand-off has its own timeout.
		rcpt, err = s.opts.Held.Release(context.WithoutCancel(r.Context()), id)
		reply = rcpt.Reply
		ev.Kind, ev.Detail = "released", ev.Detail+" released by the admin: "+reply
	case "delete":
		err = s.opts.Held.Delete(id)
		ev.Kind, ev.Detail = "deleted", ev.Detail+" deleted by the admin"
	}
	if err != nil {
		s.log.Error("admin: held action failed", "action", action, "id", id, "err", err)
		return "", statusOf(err), err
	}
	s.recordEvent(ev)
	s.log.Info("admin: held action", "action", action, "id", id, "via", via(r), "remote", r.RemoteAddr, "reply", reply)
	return reply, 0, nil
}

func (s *Server) heldAction(w http.ResponseWriter, r *http.Request) {
	id, action := r.PathValue("id"), r.PathValue("action")
	reply, code, err := s.doHeldAction(r, id, action)
	if err != nil {
		writeError(w, code, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, ActionResult{ID: id, Action: action, Reply: reply})
}

// recordEvent adds an admin action to the event log; the action is done
// either way, so a failure is only logged.
func (s *Server) recordEvent(ev Event) {
	if err := s.opts.Policy.RecordEvent(ev); err != nil {
		s.log.Error("admin: recording an event", "kind", ev.Kind, "err", err)
	}
}

// events reads the event log newest first.
func (s *Server) events(f EventFilter) []Event {
	evs := s.opts.Policy.Events(f)
	if evs == nil {
		evs = []Event{}
	}
	slices.SortStableFunc(evs, func(a, b Event) int {
		return cmp.Or(cmp.Compare(b.Seq, a.Seq), b.Time.Compare(a.Time))
	})
	return evs
}

func (s *Server) listEvents(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := EventFilter{Identity: q.Get("identity"), Kind: q.Get("kind"), Limit: defaultEventLimit}
	if f.Identity != "" && !validIdentity(f.Identity) {
		writeError(w, http.StatusBadRequest, "bad identity id")
		return
	}
	if f.Kind != "" && !validEventKind(f.Kind) {
		writeError(w, http.StatusBadRequest, "bad event kind")
		return
	}
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n <= 0 {
			writeError(w, http.StatusBadRequest, "limit must be a positive number")
			return
		}
		f.Limit = min(n, maxEventLimit)
	}
	writeJSON(w, http.StatusOK, s.events(f))
}

// doReload reloads the config; a bad file keeps the running policy.
func (s *Server) doReload(r *http.Request) (int, error) {
	if s.opts.Reload == nil {
		return http.StatusNotImplemented, errors.New("reload is not available")
	}
	if err := s.opts.Reload(); err != nil {
		s.log.Error("admin: reload refused, the running policy stays", "err", err)
		s.recordEvent(Event{Time: s.now(), Kind: "reload", Detail: "admin: failed: " + err.Error()})
		return http.StatusUnprocessableEntity, err
	}
	s.recordEvent(Event{Time: s.now(), Kind: "reload", Detail: "admin: config reloaded"})
	s.log.Info("admin: config reloaded", "via", via(r), "remote", r.RemoteAddr)
	return 0, nil
}

func (s *Server) reload(w http.ResponseWriter, r *http.Request) {
	if code, err := s.doReload(r); err != nil {
		writeError(w, code, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, ActionResult{Action: "reload"})
}
