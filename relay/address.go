package relay

import "strings"

// maxAddressLength bounds an envelope address. RFC 5321 §4.5.3.1.3 allows
// 256 octets in a path; relay takes four times that. Without a bound a
// client that may not relay could still have max_recipients addresses of
// a whole command line (64 KiB) each kept for local domains.
const maxAddressLength = 1024

// addressAcceptable reports whether an envelope address as go-smtp parsed
// it may be kept: at most maxAddressLength octets and no control
// characters. go-smtp passes a bare CR, NUL or ESC inside an address on,
// but RFC 5321 §4.1.2 allows none (qtextSMTP and quoted-pairSMTP are
// %d32-126), and in the stored envelope a CR would break the Return-Path
// and Delivered-To lines written at delivery, a NUL qmail-queue's
// envelope.
func addressAcceptable(addr string) bool {
	if len(addr) > maxAddressLength {
		return false
	}
	for i := 0; i < len(addr); i++ {
		if c := addr[i]; c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
}

// splitAddress splits an envelope address at its last '@', the way
// qmail-smtpd's addrallowed and bmfcheck do. ok is false when there is no '@'.
func splitAddress(addr string) (local, domain string, ok bool) {
	at := strings.LastIndexByte(addr, '@')
	if at < 0 {
		return addr, "", false
	}
	return addr[:at], addr[at+1:], true
}

// rcptAllowedFrom decides whether a client that may not relay may send to
// rcpt: the domain after the last '@' must pass hostAllowed (qmail's
// rcpthosts). go-smtp has already removed a source route ("@a,@b:") and the
// quotes of a quoted local part before rcpt gets here.
//
// qmail-smtpd checks only the domain; whatever sits in the local part is then
// qmail-send's business. relay is stricter, because the hand-off may go to
// an MTA that still honours the old routing hacks: a local part holding '@'
// (a quoted "user@evil"@local, or user@evil@local), '%' (the percent hack)
// or '!' (UUCP bang paths) could carry the mail off to another domain, so it
// is refused here. Of the recipients without '@', only "postmaster" is
// taken (RFC 5321 §4.5.1; qmail-send adds envnoathost), others are refused.
func rcptAllowedFrom(rcpt string, hostAllowed func(domain string) bool) bool {
	if rcpt == "postmaster" { // go-smtp's form of <Postmaster>, any case
		return true
	}
	local, domain, ok := splitAddress(rcpt)
	if !ok || local == "" || domain == "" {
		return false
	}
	if strings.ContainsAny(local, "@%!") {
		return false
	}
	// ASCII folding only (qmail's case_lowerb): strings.ToLower would
	// turn U+212A KELVIN SIGN into 'k' and a foreign domain into a local one.
	return hostAllowed(asciiLower(domain))
}

// asciiLower lowercases A-Z only.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}
