package signals

import (
	"bytes"
	"time"
)

// The lines of qmail-send's log that the join reads (qmail-send.c):
//
//	new msg N
//	info msg N: bytes B from <S> qp Q uid U
//	starting delivery D: msg N to local R      (or "to remote R")
//	delivery D: success: TEXT                  (failure:, deferral:, or "report mangled, will defer")
//	end msg N
//
// N is the message's inode number (reused once the message is gone), D a
// delivery number counted from 1 at qmail-send's start, Q the pid of the
// qmail-queue that queued the message. S went through qmail's logsafe:
// bytes outside 33..126 and '%' became '_', newlines '/', so it holds no
// space. Every line may carry a stamp in front: multilog's "@" and 24 hex
// digits (tai64n), or, in a syslog file, splogger's "SECONDS.MICROS "
// after the syslog header's ": " (a line longer than splogger's 800
// bytes continues on the next syslog line as "SECONDS.MICROS+REST").

// lineKind is what a log line says.
type lineKind uint8

const (
	lineOther    lineKind = iota // anything else: skipped
	lineNew                      // new msg N
	lineInfo                     // info msg N: ... qp Q
	lineStarting                 // starting delivery D: msg N
	lineDelivery                 // delivery D: outcome
	lineEnd                      // end msg N
	lineCont                     // a splogger continuation of the previous line
	lineCut                      // an info line cut short (splogger continues it)
	lineBad                      // begins as one of the above but does not parse: skipped
)

// Delivery outcomes as the sink gets them (policy's DeliverySuccess, ...).
const (
	outcomeSuccess  = "success"
	outcomeFailure  = "failure"
	outcomeDeferral = "deferral"
)

// line is one parsed log line. Byte slices point into the line read.
type line struct {
	kind     lineKind
	stamp    int64 // unix nanoseconds; 0 when the line has none (or a bad one)
	msg      uint64
	delivery uint64
	qp       uint64
	sender   []byte
	outcome  string
	rest     []byte // lineCont: the continued text; lineCut: the whole message
}

// maxDigits bounds the numbers read: 19 decimal digits always fit a uint64.
const maxDigits = 19

// taiOffset is 2^62 + 10: a TAI64 label minus this is unix time (as
// daemontools' tai_unix writes it).
const taiOffset = 1<<62 + 10

// parseLine reads one log line (without its newline).
func parseLine(b []byte) line {
	var l line
	rest := b
	switch {
	case len(b) > 0 && b[0] == '@':
		sp := bytes.IndexByte(b, ' ')
		if sp < 0 {
			return l
		}
		l.stamp = parseTAI64N(b[1:sp])
		rest = b[sp+1:]
	case !hasKeyword(b):
		// A syslog line: the message follows the first ": " after the
		// header and tag that is followed by splogger's stamp or by a
		// line qmail-send writes.
		found := false
		for tries := 0; tries < 4 && !found; tries++ {
			i := bytes.Index(rest, []byte(": "))
			if i < 0 {
				return l
			}
			rest = rest[i+2:]
			if ns, n, cont := parseSplogger(rest); n > 0 {
				l.stamp = ns
				rest = rest[n:]
				if cont {
					l.kind, l.rest = lineCont, rest
					return l
				}
				found = true
			} else {
				found = hasKeyword(rest)
			}
		}
		if !found {
			return l
		}
		if l.stamp == 0 {
			l.stamp = parseSyslogStamp(b)
		}
	}
	parseMessage(&l, rest)
	return l
}

var keywords = [][]byte{[]byte("info msg "), []byte("starting delivery "), []byte("delivery "), []byte("new msg "), []byte("end msg ")}

func hasKeyword(b []byte) bool {
	for _, k := range keywords {
		if bytes.HasPrefix(b, k) {
			return true
		}
	}
	return false
}

// parseMessage reads what qmail-send wrote into l.
func parseMessage(l *line, b []byte) {
	var ok bool
	switch {
	case bytes.HasPrefix(b, []byte("info msg ")):
		l.kind, ok = lineInfo, parseInfo(l, b[len("info msg "):])
		if !ok && !bytes.Contains(b, []byte("> qp ")) {
			l.kind, l.rest, ok = lineCut, b, true
		}
	case bytes.HasPrefix(b, []byte("starting delivery ")):
		l.kind = lineStarting
		var r []byte
		if l.delivery, r, ok = number(b[len("starting delivery "):]); ok {
			if r, ok = cutPrefix(r, ": msg "); ok {
				l.msg, r, ok = number(r)
				ok = ok && (bytes.HasPrefix(r, []byte(" to local ")) || bytes.HasPrefix(r, []byte(" to remote ")))
			}
		}
	case bytes.HasPrefix(b, []byte("delivery ")):
		l.kind = lineDelivery
		var r []byte
		if l.delivery, r, ok = number(b[len("delivery "):]); ok {
			switch {
			case bytes.HasPrefix(r, []byte(": success:")):
				l.outcome = outcomeSuccess
			case bytes.HasPrefix(r, []byte(": failure:")):
				l.outcome = outcomeFailure
			case bytes.HasPrefix(r, []byte(": deferral:")), bytes.HasPrefix(r, []byte(": report mangled, will defer")):
				l.outcome = outcomeDeferral
			default:
				ok = false
			}
		}
	case bytes.HasPrefix(b, []byte("new msg ")):
		l.kind = lineNew
		l.msg, ok = wholeNumber(b[len("new msg "):])
	case bytes.HasPrefix(b, []byte("end msg ")):
		l.kind = lineEnd
		l.msg, ok = wholeNumber(b[len("end msg "):])
	}
	if !ok && hasKeyword(b) {
		*l = line{kind: lineBad}
	} else if !ok {
		*l = line{}
	}
}

// parseInfo reads "N: bytes B from <S> qp Q uid U".
func parseInfo(l *line, b []byte) bool {
	var ok bool
	if l.msg, b, ok = number(b); !ok {
		return false
	}
	if b, ok = cutPrefix(b, ": bytes "); !ok {
		return false
	}
	if _, b, ok = number(b); !ok {
		return false
	}
	if b, ok = cutPrefix(b, " from <"); !ok {
		return false
	}
	// S holds no space, so "> qp " ends it wherever '>' is in S.
	i := bytes.Index(b, []byte("> qp "))
	if i < 0 {
		return false
	}
	l.sender, b = b[:i], b[i+len("> qp "):]
	if l.qp, b, ok = number(b); !ok {
		return false
	}
	if b, ok = cutPrefix(b, " uid "); !ok {
		return false
	}
	_, ok = wholeNumber(b)
	return ok
}

// number reads a decimal number at the start of b.
func number(b []byte) (uint64, []byte, bool) {
	var v uint64
	i := 0
	for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
		if i == maxDigits {
			return 0, b, false
		}
		v = v*10 + uint64(b[i]-'0')
	}
	return v, b[i:], i > 0
}

// wholeNumber reads b as a number, allowing trailing blanks (a CR).
func wholeNumber(b []byte) (uint64, bool) {
	v, r, ok := number(b)
	return v, ok && len(bytes.TrimRight(r, " \t\r")) == 0
}

func cutPrefix(b []byte, p string) ([]byte, bool) {
	if len(b) < len(p) || string(b[:len(p)]) != p {
		return b, false
	}
	return b[len(p):], true
}

// parseTAI64N reads 24 hex digits of a tai64n label; 0 when invalid.
func parseTAI64N(b []byte) int64 {
	if len(b) != 24 {
		return 0
	}
	var secs, nanos uint64
	for i, c := range b {
		var d uint64
		switch {
		case c >= '0' && c <= '9':
			d = uint64(c - '0')
		case c >= 'a' && c <= 'f':
			d = uint64(c-'a') + 10
		case c >= 'A' && c <= 'F':
			d = uint64(c-'A') + 10
		default:
			return 0
		}
		if i < 16 {
			secs = secs<<4 | d
		} else {
			nanos = nanos<<4 | d
		}
	}
	if secs < taiOffset || secs-taiOffset > maxUnix || nanos >= 1e9 {
		return 0
	}
	return int64(secs-taiOffset)*1e9 + int64(nanos)
}

// maxUnix bounds the seconds of a stamp so that nanoseconds fit an int64
// (year 2262).
const maxUnix = (1<<63 - 1) / 1_000_000_000

// parseSplogger reads splogger's "SECONDS.MICROS" and the byte after it,
// ' ' or '+' (a continuation). n is the length read, 0 when b does not
// start with one.
func parseSplogger(b []byte) (ns int64, n int, cont bool) {
	secs, r, ok := number(b)
	if !ok || len(r) < 8 || r[0] != '.' || secs > maxUnix-1 {
		return 0, 0, false
	}
	var micros int64
	for _, c := range r[1:7] {
		if c < '0' || c > '9' {
			return 0, 0, false
		}
		micros = micros*10 + int64(c-'0')
	}
	if r[7] != ' ' && r[7] != '+' {
		return 0, 0, false
	}
	return int64(secs)*1e9 + micros*1e3, len(b) - len(r) + 8, r[7] == '+'
}

// parseSyslogStamp reads an RFC 3339 stamp at the start of a syslog line
// (rsyslog's high-precision format); 0 for anything else (the classic
// "Mmm dd hh:mm:ss" has no year and no zone).
func parseSyslogStamp(b []byte) int64 {
	sp := bytes.IndexByte(b, ' ')
	if sp < 20 || sp > 40 {
		return 0
	}
	t, err := time.Parse(time.RFC3339Nano, string(b[:sp]))
	if err != nil {
		return 0
	}
	return t.UnixNano()
}

// logsafeEqual reports whether qmail's logsafe() of addr is s: how
// qmail-send writes the envelope sender relay handed to qmail-queue.
func logsafeEqual(addr string, s []byte) bool {
	if len(addr) != len(s) {
		return false
	}
	for i := 0; i < len(addr); i++ {
		c := addr[i]
		switch {
		case c == '\n':
			c = '/'
		case c < 33 || c > 126 || c == '%':
			c = '_'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}
