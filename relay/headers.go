package relay

import (
	"bytes"
	"strconv"
	"strings"
	"time"

	"relay/queue"
)

// maxHeadBytes bounds how much of a message is read into memory to find the
// header fields relay looks at (attribution, Subject for the hold spool).
const maxHeadBytes = 64 << 10

// headerFields returns the header fields of head in order, each as its name
// and unfolded value (continuation lines joined with their leading
// whitespace, RFC 5322 §2.2.3). head is in stored form (LF line ends) and may
// be cut short; scanning stops at the first empty line. A line that is
// neither a field nor a continuation ends the header too, as it would for a
// reader of the message.
func headerFields(head []byte, visit func(name, value string) bool) {
	var name string
	var value strings.Builder
	have := false
	flush := func() bool {
		if !have {
			return true
		}
		have = false
		return visit(name, value.String())
	}
	for len(head) > 0 {
		line := head
		if i := bytes.IndexByte(head, '\n'); i >= 0 {
			line, head = head[:i], head[i+1:]
		} else {
			head = nil
		}
		if len(line) == 0 {
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			if have {
				value.Write(line)
			}
			continue
		}
		if !flush() {
			return
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			return
		}
		name = string(bytes.TrimRight(line[:colon], " \t"))
		value.Reset()
		value.Write(line[colon+1:])
		have = true
	}
	flush()
}

// firstReceivedUID looks at the first Received header field of a message
// and, when qmail-queue wrote it, returns the uid from
// "(qmail N invoked by uid U)" (docs/qmail.md §2.2). Received fields further down
// are never looked at: anyone can write them.
func firstReceivedUID(head []byte) (uid uint32, ok bool) {
	headerFields(head, func(name, value string) bool {
		if !strings.EqualFold(name, "Received") {
			return true
		}
		uid, ok = parseInvokedByUID(value)
		return false
	})
	return uid, ok
}

// firstReceivedBounce reports whether the first Received header field is
// the one qmail-queue writes for qmail-send's own bounces:
// "(qmail N invoked for bounce); <date>".
func firstReceivedBounce(head []byte) (bounce bool) {
	headerFields(head, func(name, value string) bool {
		if !strings.EqualFold(name, "Received") {
			return true
		}
		rest, ok := strings.CutPrefix(strings.TrimLeft(value, " \t"), "(qmail ")
		if !ok {
			return false
		}
		pid, rest, ok := strings.Cut(rest, " ")
		bounce = ok && allDigits(pid) && strings.HasPrefix(rest, "invoked for bounce);")
		return false
	})
	return bounce
}

// parseInvokedByUID parses qmail-queue's Received value
// " (qmail 1234 invoked by uid 1001); 28 Nov 2026 02:41:53 -0000".
func parseInvokedByUID(value string) (uint32, bool) {
	rest, ok := strings.CutPrefix(strings.TrimLeft(value, " \t"), "(qmail ")
	if !ok {
		return 0, false
	}
	pid, rest, ok := strings.Cut(rest, " ")
	if !ok || !allDigits(pid) {
		return 0, false
	}
	rest, ok = strings.CutPrefix(rest, "invoked by uid ")
	if !ok {
		return 0, false
	}
	uid, rest, ok := strings.Cut(rest, ")")
	if !ok || !strings.HasPrefix(rest, ";") {
		return 0, false
	}
	return parseUID(uid)
}

// phpOriginatingScript returns the first X-PHP-Originating-Script field,
// "U:script" (PHP's mail() with mail.add_x_header puts it before the
// script's own headers, so a script cannot get one in ahead of it).
func phpOriginatingScript(head []byte) (uid uint32, script string, ok bool) {
	headerFields(head, func(name, value string) bool {
		if !strings.EqualFold(name, "X-PHP-Originating-Script") {
			return true
		}
		u, s, found := strings.Cut(strings.TrimSpace(value), ":")
		if found {
			uid, ok = parseUID(u)
			script = strings.TrimSpace(s)
		}
		return false
	})
	if !ok {
		return 0, "", false
	}
	return uid, script, true
}

// firstHeader returns the value of the first field called name, trimmed
// (Subject and Message-ID, for the hold spool and policy's samples).
func firstHeader(head []byte, name string) string {
	var found string
	headerFields(head, func(n, value string) bool {
		if strings.EqualFold(n, name) {
			found = strings.TrimSpace(value)
			return false
		}
		return true
	})
	return found
}

func parseUID(s string) (uint32, bool) {
	if !allDigits(s) {
		return 0, false
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, false
	}
	return uint32(n), true
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// receivedInfo is what the Received header says about one transaction.
type receivedInfo struct {
	Helo     string // HELO/EHLO argument; "" if none was given
	HasHelo  bool
	Remote   string // client IP; "" for the local socket
	UID      uint32 // peer uid, local socket only
	Local    bool
	User     string // AUTH login, "" when not authenticated
	TLS      bool
	By       string // this host (control/me)
	Received time.Time
}

// formatReceived writes the Received header in qmail-smtpd's format
// (received.c, docs/qmail.md §1.4), with LF line ends:
//
//	Received: from unknown (HELO <helo>) ([<user>@]<ip>)
//	  by <me> with SMTP; 5 Mar 2024 07:04:09 -0000
//
// relay does no reverse DNS, so the remote host is always "unknown" (as with
// tcpserver -H). The protocol is SMTP, or ESMTPA / ESMTPS / ESMTPSA after
// AUTH and/or TLS (RFC 3848), as the qmail AUTH and TLS patches write it.
// Mail from the local socket gets a line that keeps admins' "invoked by uid
// U" grep working:
//
//	Received: (relay invoked by uid 1001); 5 Mar 2024 07:04:09 -0000
func formatReceived(ri receivedInfo) string {
	date := formatDate(ri.Received)
	if ri.Local {
		return "Received: (relay invoked by uid " + strconv.FormatUint(uint64(ri.UID), 10) + "); " + date + "\n"
	}
	var b strings.Builder
	b.WriteString("Received: from unknown")
	if ri.HasHelo && !strings.EqualFold(ri.Helo, "unknown") {
		b.WriteString(" (HELO ")
		b.WriteString(safeReceived(ri.Helo))
		b.WriteString(")")
	}
	b.WriteString(" (")
	if ri.User != "" {
		b.WriteString(safeReceived(ri.User))
		b.WriteString("@")
	}
	b.WriteString(safeReceived(ri.Remote))
	b.WriteString(")\n  by ")
	b.WriteString(safeReceived(ri.By))
	b.WriteString(" with ")
	switch {
	case ri.TLS && ri.User != "":
		b.WriteString("ESMTPSA")
	case ri.TLS:
		b.WriteString("ESMTPS")
	case ri.User != "":
		b.WriteString("ESMTPA")
	default:
		b.WriteString("SMTP")
	}
	b.WriteString("; ")
	b.WriteString(date)
	b.WriteString("\n")
	return b.String()
}

// safeReceived replaces every byte outside [A-Za-z0-9.@%+/=:\-\[\]] with '?',
// as qmail's received.c safeput does.
func safeReceived(s string) string {
	b := []byte(s)
	for i, c := range b {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte(".@%+/=:-[]", c) >= 0:
		default:
			b[i] = '?'
		}
	}
	return string(b)
}

// formatDate writes qmail's date822fmt: "5 Mar 2024 07:04:09 -0000", UTC
// (the queue writer's Received line uses the same).
func formatDate(t time.Time) string { return queue.Date822(t) }

// safeHeaderValue makes s safe to put in a header field we write: control
// bytes (CR, LF, NUL, ...) become '?'.
func safeHeaderValue(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c < 0x20 || c == 0x7f {
			b[i] = '?'
		}
	}
	return string(b)
}
