package relay

import "strings"

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
// is refused here. A recipient without '@' is refused too (qmail would add
// its default host; go-smtp never passes one on).
func rcptAllowedFrom(rcpt string, hostAllowed func(domain string) bool) bool {
	local, domain, ok := splitAddress(rcpt)
	if !ok || local == "" || domain == "" {
		return false
	}
	if strings.ContainsAny(local, "@%!") {
		return false
	}
	return hostAllowed(strings.ToLower(domain))
}
