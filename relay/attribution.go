package relay

import (
	"time"

	"github.com/emersion/go-smtp"

	"relay/policy"
)

// Attribution from the header (docs/design.md §3, §10). On a connection from a
// [[webserver]] the uid is the one in the first Received field when qmail
// wrote it there ("(qmail N invoked by uid U)"): with the web server's
// firewall letting only qmail-remote reach port 25 here (`relay scan
// --firewall`), that line is the web server's qmail-queue's own, whose uid
// the kernel gave it. A script talking SMTP to us itself has no such line
// first, so with require_uid it is refused. X-PHP-Originating-Script
// counts only under that uid: the script's own header could name anyone.

// eventSpacing is how often a web server's refusals are written to the
// event log (every one is logged).
const eventSpacing = time.Minute

// maxScriptPath bounds the path of a script: identity. A longer one, or one
// with control characters, names no script (the uid still counts).
const maxScriptPath = 512

// headerIdentities are the identities the header adds, or the refusal of
// a web server's mail that cannot be attributed:
//   - on a connection from a [[webserver]]: uid:<name>:<uid> from the first
//     Received field when it is qmail's "invoked by uid" line, and with it
//     script:<name>:<uid>:<path> from an X-PHP-Originating-Script of that
//     same uid. Without that line, require_uid refuses the message (550
//     5.7.1) unless the session logged in (then the login is who sent
//     it), or the message is the web server's own qmail-send's bounce
//     (first line "invoked for bounce" and MAIL FROM:<>; counted on the
//     web server's ip: alone);
//     require_uid = false takes the uid from
//     X-PHP-Originating-Script alone, as relay did before it existed.
//   - on the local socket: script:local:<uid>:<path> from an
//     X-PHP-Originating-Script whose uid is the peer's own (and the script
//     is recorded on uid:local:<uid>).
//
// Headers anywhere else change nothing.
func (s *session) headerIdentities(from string, head []byte) ([]policy.Identity, *smtp.SMTPError) {
	switch {
	case s.webserver != nil:
		ws := s.webserver
		phpUID, path, phpOK := phpOriginatingScript(head)
		uid, ok := firstReceivedUID(head)
		if !ok {
			switch {
			case ws.requireUID && s.user == "" && from == "" && firstReceivedBounce(head):
				return nil, nil
			case ws.requireUID && s.user == "":
				s.refuseUnattributed()
				return nil, replyNoUID
			case ws.requireUID || !phpOK:
				return nil, nil
			}
			uid = phpUID
		}
		if !phpOK || phpUID != uid || !scriptPathOK(path) {
			path = ""
		}
		acct := ws.accounts[uid]
		ids := []policy.Identity{policy.WebUID(ws.name, uid, acct, path)}
		if path != "" {
			ids = append(ids, policy.ScriptID(ws.name, uid, acct, path))
		}
		return ids, nil
	case s.local:
		phpUID, path, ok := phpOriginatingScript(head)
		if !ok || phpUID != s.uid || !scriptPathOK(path) {
			return nil, nil
		}
		id := policy.LocalUID(s.uid, s.account)
		id.Script = path
		return []policy.Identity{id, policy.ScriptID("local", s.uid, s.account, path)}, nil
	}
	return nil, nil
}

// scriptPathOK reports whether a script path may name an identity: not
// empty, bounded, no control characters.
func scriptPathOK(p string) bool {
	if p == "" || len(p) > maxScriptPath {
		return false
	}
	for i := 0; i < len(p); i++ {
		if c := p[i]; c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
}

// refuseUnattributed logs a web server's message without qmail's uid line
// and records the event, at most once per eventSpacing per web server.
func (s *session) refuseUnattributed() {
	ws := s.webserver
	s.log.Warn("web server mail without qmail's uid line refused", "webserver", ws.name, "remote", s.remote.String())
	now := s.srv.now()
	last := ws.lastEvent.Load()
	if now.UnixNano()-last < int64(eventSpacing) || !ws.lastEvent.CompareAndSwap(last, now.UnixNano()) {
		return
	}
	if s.srv.deps.Policy == nil {
		return
	}
	s.srv.deps.Policy.NoteEvent(policy.Event{
		Time:     now,
		Kind:     policy.EventRefused,
		Identity: policy.IPID(s.remote).ID,
		Detail:   "web server " + ws.name + " (" + s.remote.String() + `): first Received field is not qmail's "invoked by uid" line; refused 550 5.7.1 (require_uid)`,
	})
}

// policyRefusal ends a message's stream when the check at the end of DATA
// refuses it (storeReader.atEOF), so the hand-off queues nothing.
type policyRefusal struct{ reply *smtp.SMTPError }

func (p *policyRefusal) Error() string { return "refused at the end of DATA: " + p.reply.Message }

// recheck is the policy check at the end of DATA: a transaction whose
// reservations lapsed (reserve_timeout) while the message came in is
// checked again before the hand-off may confirm it. It may no longer be
// held or queued instead (the hand-off already has most of it): a hold or
// queue decision then defers.
func (s *session) recheck(tx *transaction) error {
	if tx.ptx == nil {
		return nil
	}
	d := tx.ptx.Recheck()
	s.observed("end of data", d)
	if r := decisionReply(d); r != nil {
		return &policyRefusal{reply: r}
	}
	if (d.Action == policy.Hold || d.Action == policy.Queue) && !tx.hold {
		return &policyRefusal{reply: reply(451, smtp.EnhancedCode{4, 7, 1}, safeHeaderValue(d.Text()))}
	}
	return nil
}
