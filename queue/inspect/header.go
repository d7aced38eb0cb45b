package inspect

import (
	"bytes"
	"io"
	"strconv"
	"strings"
)

// maxHeader is how much of a mess file is read: the Received lines and the
// few fields this package wants sit at the top of the header, and a header
// bigger than this is cut there rather than read whole.
const maxHeader = 64 << 10

// readChunk is how much readHeader asks for at a time: most headers fit in
// the first read, and a big message is not read much beyond its header.
const readChunk = 8 << 10

// readHeader reads the header part of a message into buf (reusing its
// storage): up to and including the empty line that ends it, or maxHeader
// bytes, or EOF, whichever comes first.
func readHeader(r io.Reader, buf []byte) ([]byte, error) {
	if cap(buf) < maxHeader {
		buf = make([]byte, 0, maxHeader)
	}
	buf = buf[:0]
	for len(buf) < maxHeader {
		start := len(buf)
		n, err := r.Read(buf[start:min(start+readChunk, maxHeader)])
		buf = buf[:start+n]
		if end := headerEnd(buf, start); end >= 0 {
			return buf[:end], nil
		}
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
	return buf, nil
}

// headerEnd returns the length of the header in b including the empty line
// that ends it (RFC 5322 §2.1), or -1 when b holds no end yet. from is where
// the bytes new since the last call start.
func headerEnd(b []byte, from int) int {
	if len(b) > 0 && b[0] == '\n' {
		return 1
	}
	from = max(from-1, 0)
	if i := bytes.Index(b[from:], []byte("\n\n")); i >= 0 {
		return from + i + 2
	}
	return -1
}

// fields calls fn with each header field of hdr: its name and its raw text
// (after the colon, continuation lines and their line ends included).
// Lines that are not fields (no colon in a name-like prefix) are skipped.
func fields(hdr []byte, fn func(name, raw []byte)) {
	for len(hdr) > 0 {
		end := len(hdr)
		for i := 0; i < len(hdr); i++ {
			if hdr[i] == '\n' && (i+1 == len(hdr) || (hdr[i+1] != ' ' && hdr[i+1] != '\t')) {
				end = i + 1
				break
			}
		}
		field := hdr[:end]
		hdr = hdr[end:]
		colon := bytes.IndexByte(field, ':')
		if colon <= 0 || bytes.ContainsAny(field[:colon], " \t\n") {
			continue
		}
		fn(field[:colon], bytes.TrimRight(field[colon+1:], "\n"))
	}
}

// unfold turns a folded field body into one line (RFC 5322 §2.2.3) and trims
// the whitespace around it.
func unfold(raw []byte) string {
	s := string(raw)
	if strings.IndexByte(s, '\n') >= 0 {
		s = strings.ReplaceAll(s, "\n", "")
	}
	return strings.TrimSpace(strings.ReplaceAll(s, "\t", " "))
}

// headerInfo is what the listing takes from a message's header.
type headerInfo struct {
	origin    Origin
	phpScript string
	senderID  string
}

// parseHeader extracts the origin, X-PHP-Originating-Script and X-Sender-Id.
// Only the first of each header field counts: the top of the header is what
// this server wrote; lower lines come from whoever submitted the message.
func parseHeader(hdr []byte) headerInfo {
	var info headerInfo
	var received []string
	fields(hdr, func(name, raw []byte) {
		switch {
		case asciiEqualFold(name, "Received"):
			if len(received) < maxOriginLines {
				received = append(received, unfold(raw))
			}
		case info.phpScript == "" && asciiEqualFold(name, "X-PHP-Originating-Script"):
			info.phpScript = unfold(raw)
		case info.senderID == "" && asciiEqualFold(name, "X-Sender-Id"):
			info.senderID = unfold(raw)
		}
	})
	info.origin = parseOrigin(received)
	return info
}

// maxOriginLines bounds how many Received lines parseOrigin looks at: a
// QMAILQUEUE filter may prepend a line of its own above qmail-queue's.
const maxOriginLines = 4

func asciiEqualFold(b []byte, s string) bool {
	return len(b) == len(s) && strings.EqualFold(string(b), s)
}

// parseOrigin reads where a message came from out of its first Received
// lines (values, unfolded). qmail-queue always writes the top one
// (docs/qmail.md §2.2):
//
//	(qmail <pid> invoked by uid <n>); <date>
//	(qmail <pid> invoked from network); <date>
//	(qmail <pid> invoked by alias); <date>
//	(qmail <pid> invoked for bounce); <date>
//
// and for "from network" qmail-smtpd's (or relay's) line follows
// (docs/qmail.md §1.4):
//
//	from <host> (HELO <helo>) (<info>@<ip>) by <local> with <proto>; <date>
//
// or relay's line for its local socket, "(relay invoked by uid <n>)".
func parseOrigin(received []string) Origin {
	o := Origin{Kind: KindUnknown}
	for i, v := range received {
		rest, ok := strings.CutPrefix(v, "(qmail ")
		if !ok {
			continue
		}
		qp, how, ok := strings.Cut(rest, " invoked ")
		if !ok {
			continue
		}
		how, _, _ = strings.Cut(how, ")")
		if n, err := strconv.Atoi(qp); err == nil {
			o.QP = n
		}
		switch {
		case strings.HasPrefix(how, "by uid "):
			n, err := strconv.Atoi(strings.TrimPrefix(how, "by uid "))
			if err != nil || n < 0 {
				return o
			}
			o.Kind, o.UID = KindUID, &n
		case how == "from network":
			o.Kind = KindNetwork
			if i+1 < len(received) {
				if uid, ok := relayLocalUID(received[i+1]); ok {
					// relay's local socket (relay sendmail): the uid
					// comes from SO_PEERCRED. Trusted only right under
					// a "from network" line, which qmaild wrote.
					o.Kind, o.UID = KindUID, &uid
				} else {
					parseSMTPReceived(received[i+1], &o)
				}
			}
		case how == "by alias":
			o.Kind = KindAlias
		case how == "for bounce":
			o.Kind = KindBounce
		}
		return o
	}
	return o
}

// relayLocalUID reads the line relay writes for mail from its local socket:
// "(relay invoked by uid <n>); <date>".
func relayLocalUID(v string) (int, bool) {
	rest, ok := strings.CutPrefix(v, "(relay invoked by uid ")
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(strings.TrimSuffix(strings.SplitN(rest, ")", 2)[0], " "))
	return n, err == nil && n >= 0
}

// parseSMTPReceived fills o from qmail-smtpd's Received value. The HELO part
// is absent when the HELO equals the remote host; the info@ part is there
// only with ident or an AUTH patch. qmail replaces every character outside
// [A-Za-z0-9.@%+/=:-[]] with '?' (received.c), so parentheses do not nest.
func parseSMTPReceived(v string, o *Origin) {
	rest, ok := strings.CutPrefix(v, "from ")
	if !ok {
		return
	}
	host, rest, _ := strings.Cut(rest, " ")
	o.Host = host
	var remote string
	for {
		rest = strings.TrimLeft(rest, " ")
		if !strings.HasPrefix(rest, "(") {
			break
		}
		group, after, ok := strings.Cut(rest[1:], ")")
		if !ok {
			break
		}
		rest = after
		if helo, ok := strings.CutPrefix(group, "HELO "); ok {
			o.HELO = helo
		} else if remote == "" {
			remote = group
		}
	}
	if _, with, ok := strings.Cut(rest, " with "); ok {
		o.Protocol, _, _ = strings.Cut(with, ";")
		o.Protocol, _, _ = strings.Cut(strings.TrimSpace(o.Protocol), " ")
	}
	info, ip := "", remote
	if at := strings.LastIndexByte(remote, '@'); at >= 0 {
		info, ip = remote[:at], remote[at+1:]
	}
	o.IP = ip
	// RFC 3848: a protocol ending in "A" (ESMTPA, ESMTPSA) means the
	// client authenticated; AUTH patches put the login in the info slot.
	// Without it the info slot is an ident (RFC 1413) answer.
	if info != "" {
		if strings.HasSuffix(o.Protocol, "A") {
			o.AuthUser = info
		} else {
			o.Ident = info
		}
	}
}

// receivedLines returns every Received field of hdr as it is stored, with
// its continuation lines.
func receivedLines(hdr []byte) []string {
	var out []string
	fields(hdr, func(name, raw []byte) {
		if asciiEqualFold(name, "Received") {
			out = append(out, string(name)+":"+string(raw))
		}
	})
	return out
}
