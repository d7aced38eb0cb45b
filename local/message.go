package local

import (
	"bytes"
	"fmt"
	"net/mail"
	"strings"
	"time"
)

// headerDefaults is what completeMessage adds to a header that lacks it.
type headerDefaults struct {
	From      string // address for an added From
	FullName  string // -F: display name for an added From
	Hostname  string // right-hand side of an added Message-ID
	Now       time.Time
	Pid       int
	WantRcpts bool // collect To, Cc and Bcc addresses (-t)
}

// completeMessage does qmail-inject's header work on a message as a script
// wrote it (qmail-inject(8), docs/qmail.md §3.1): it deletes
// Bcc and Resent-Bcc, and adds Date, Message-ID and From when missing. With
// WantRcpts it also returns the addresses of To, Cc and Bcc. Line ends are
// kept as written; added lines end in LF (the SMTP client sends CRLF).
//
// The header is the leading run of "Name: value" lines and their
// continuation lines; it ends at an empty line, or at the first line that
// is neither, in which case an empty line is inserted before it, so that
// line stays in the body.
func completeMessage(raw []byte, d headerDefaults) (msg []byte, rcpts []string) {
	var out bytes.Buffer
	out.Grow(len(raw) + 256)
	have := map[string]bool{}
	rest := raw
	var field []byte // the current field, all its lines
	var name string
	flush := func() {
		if field == nil {
			return
		}
		if !bytes.HasSuffix(field, []byte("\n")) {
			field = append(field, '\n') // the input ended inside the header
		}
		switch name {
		case "to", "cc", "bcc":
			if d.WantRcpts {
				rcpts = append(rcpts, headerAddrs(field)...)
			}
		}
		if name != "bcc" && name != "resent-bcc" {
			out.Write(field)
		}
		have[name] = true
		field = nil
	}
	separator := "\n"
	for len(rest) > 0 {
		line := rest
		if i := bytes.IndexByte(rest, '\n'); i >= 0 {
			line = rest[:i+1]
		}
		if field != nil && (line[0] == ' ' || line[0] == '\t') {
			field = append(field, line...)
			rest = rest[len(line):]
			continue
		}
		n, ok := fieldName(line)
		if !ok {
			if len(bytes.TrimRight(line, "\r\n")) == 0 {
				separator = string(line)
				rest = rest[len(line):]
			}
			break
		}
		flush()
		field = append([]byte(nil), line...)
		name = strings.ToLower(n)
		rest = rest[len(line):]
	}
	flush()

	if !have["date"] {
		fmt.Fprintf(&out, "Date: %s\n", d.Now.Format(time.RFC1123Z))
	}
	if !have["message-id"] {
		fmt.Fprintf(&out, "Message-ID: <%d.%d@%s>\n", d.Now.UnixNano(), d.Pid, d.Hostname)
	}
	if !have["from"] {
		if d.FullName != "" {
			fmt.Fprintf(&out, "From: %s\n", (&mail.Address{Name: d.FullName, Address: d.From}).String())
		} else {
			fmt.Fprintf(&out, "From: %s\n", d.From)
		}
	}
	out.WriteString(separator)
	out.Write(rest)
	return out.Bytes(), rcpts
}

// fieldName returns the name of a header field line "Name: value"
// (RFC 5322 §2.2: printable ASCII but colon, then a colon).
func fieldName(line []byte) (string, bool) {
	i := bytes.IndexByte(line, ':')
	if i <= 0 {
		return "", false
	}
	for _, c := range line[:i] {
		if c < 33 || c > 126 {
			return "", false
		}
	}
	return string(line[:i]), true
}

// headerAddrs returns the addresses in an address field (all its lines):
// through net/mail when it parses, else the comma-separated words, each
// stripped of angle brackets.
func headerAddrs(field []byte) []string {
	_, value, _ := strings.Cut(string(field), ":")
	value = strings.NewReplacer("\r\n", " ", "\n", " ").Replace(value)
	if strings.TrimSpace(value) == "" {
		return nil
	}
	var out []string
	if list, err := mail.ParseAddressList(value); err == nil {
		for _, a := range list {
			out = append(out, a.Address)
		}
		return out
	}
	for _, w := range strings.Split(value, ",") {
		w = strings.TrimSpace(w)
		if i := strings.LastIndexByte(w, '<'); i >= 0 {
			w = strings.TrimSuffix(w[i+1:], ">")
		}
		if w != "" && !strings.HasSuffix(w, ";") && !strings.HasSuffix(w, ":") {
			out = append(out, w)
		}
	}
	return out
}
