package policy

import (
	"net/netip"
	"strconv"
	"strings"

	"relay/config"
)

// Identity ids are "<kind>:<address part>" (docs/design.md §3).

// UserID is the identity of an SMTP AUTH login.
func UserID(login string) Identity {
	return Identity{ID: "user:" + login, Kind: config.KindUser}
}

// LocalUID is the identity of a local process that submitted through the
// local socket; the uid comes from SO_PEERCRED.
func LocalUID(uid uint32, account string) Identity {
	return Identity{ID: "uid:local:" + strconv.FormatUint(uint64(uid), 10), Kind: config.KindUID, Account: account}
}

// WebUID is the identity of a uid on the configured web server named server,
// taken from the first "Received: (qmail N invoked by uid U)" header or from
// "X-PHP-Originating-Script: U:script". script is recorded with the identity
// but is not part of its id.
func WebUID(server string, uid uint32, account, script string) Identity {
	return Identity{
		ID:      "uid:" + server + ":" + strconv.FormatUint(uint64(uid), 10),
		Kind:    config.KindUID,
		Account: account,
		Script:  script,
	}
}

// ScriptID is the identity of one script of a uid:
// "script:<origin>:<uid>:<path>", origin "local" for the local socket or a
// web server's name, path exactly as X-PHP-Originating-Script gives it
// after "U:". Only a script whose U is the message's proven uid gets one
// (docs/design.md §10), so it is as strong as that uid.
func ScriptID(origin string, uid uint32, account, path string) Identity {
	return Identity{
		ID:      "script:" + origin + ":" + strconv.FormatUint(uint64(uid), 10) + ":" + path,
		Kind:    config.KindScript,
		Account: account,
		Script:  path,
	}
}

// ScriptOfUID is the script identity of path under a uid identity
// ("uid:web1:1001", "form.php" -> "script:web1:1001:form.php"); ok is
// false when uidID is not a uid identity.
func ScriptOfUID(uidID, path string) (string, bool) {
	rest, ok := strings.CutPrefix(uidID, config.KindUID+":")
	if !ok || rest == "" {
		return "", false
	}
	return config.KindScript + ":" + rest + ":" + path, true
}

// UIDOfScript is the uid identity a script identity belongs to
// ("script:web1:1001:form.php" -> "uid:web1:1001"); ok is false when
// scriptID is not a script identity. Origins hold no ':' (web server names
// are letters, digits, '_', '.', '-'), so the path may.
func UIDOfScript(scriptID string) (string, bool) {
	rest, ok := strings.CutPrefix(scriptID, config.KindScript+":")
	if !ok {
		return "", false
	}
	origin, rest, ok := strings.Cut(rest, ":")
	if !ok || origin == "" {
		return "", false
	}
	uid, _, ok := strings.Cut(rest, ":")
	if !ok || uid == "" {
		return "", false
	}
	return config.KindUID + ":" + origin + ":" + uid, true
}

// SenderID is the identity of an envelope sender (MAIL FROM) in normal
// form (NormalAddress); the null sender is "sender:<>".
func SenderID(addr string) Identity {
	if addr == "" {
		return Identity{ID: nullSender, Kind: config.KindSender}
	}
	norm, _ := NormalAddress(addr)
	return Identity{ID: "sender:" + norm, Kind: config.KindSender}
}

// DomainID is the identity of the envelope sender's domain: the part after
// the last '@' in normal form. It reports false when addr has no domain.
func DomainID(addr string) (Identity, bool) {
	norm, _ := NormalAddress(addr)
	at := strings.LastIndexByte(norm, '@')
	if at < 0 || at == len(norm)-1 {
		return Identity{}, false
	}
	return Identity{ID: "domain:" + norm[at+1:], Kind: config.KindDomain}, true
}

// NormalAddress is an address as identities name it (docs/design.md §10):
// lowercased, with the trailing dots of its domain dropped
// ("SPAM@X.ORG." is "spam@x.org"), and a domain literal written the one
// way ("[IPv6:2001:DB8:0::1]" is "[ipv6:2001:db8::1]"). ok is false for a
// domain literal that is not an IP address ("[x.org]"), which no mail
// server can be at: the SMTP front end refuses it (501 5.1.7).
func NormalAddress(addr string) (norm string, ok bool) {
	at := strings.LastIndexByte(addr, '@')
	if at < 0 {
		return strings.ToLower(addr), true
	}
	local, domain := addr[:at], addr[at+1:]
	if strings.ContainsAny(domain, "[]") {
		lit, ok := normalLiteral(domain)
		if !ok {
			return strings.ToLower(addr), false
		}
		return strings.ToLower(local) + "@" + lit, true
	}
	if trimmed := strings.TrimRight(domain, "."); trimmed != "" {
		domain = trimmed
	}
	return strings.ToLower(local + "@" + domain), true
}

// normalLiteral checks an address literal (RFC 5321 §4.1.3): "[1.2.3.4]"
// or "[IPv6:...]", and writes it in normal form.
func normalLiteral(domain string) (string, bool) {
	inner, ok := strings.CutPrefix(domain, "[")
	if !ok {
		return "", false
	}
	if inner, ok = strings.CutSuffix(inner, "]"); !ok {
		return "", false
	}
	if v6, ok := cutPrefixFold(inner, "IPv6:"); ok {
		a, err := netip.ParseAddr(v6)
		if err != nil || !a.Is6() || a.Zone() != "" {
			return "", false
		}
		return "[ipv6:" + a.String() + "]", true
	}
	a, err := netip.ParseAddr(inner)
	if err != nil || !a.Is4() {
		return "", false
	}
	return "[" + a.String() + "]", true
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) < len(prefix) || !strings.EqualFold(s[:len(prefix)], prefix) {
		return s, false
	}
	return s[len(prefix):], true
}

// IPID is the identity of a client address: IPv4 (and IPv4-mapped IPv6) as
// is, IPv6 grouped by its /64, because one customer gets a whole /64 and can
// rotate addresses inside it at will.
func IPID(a netip.Addr) Identity {
	a = a.Unmap().WithZone("")
	if a.Is4() {
		return Identity{ID: "ip:" + a.String(), Kind: config.KindIP}
	}
	p, _ := a.Prefix(64) // cannot fail for a valid IPv6 address
	return Identity{ID: "ip:" + p.String(), Kind: config.KindIP}
}

// numKinds is the number of identity kinds (ranks 0..numKinds-1).
const numKinds = config.NumKinds

// kindRank orders identity kinds by strength, as config.IdentityKinds
// lists them; unknown kinds sort last (numKinds).
func kindRank(kind string) int { return config.KindRank(kind) }

// KindOf returns the kind of an identity id ("" when its prefix is not a
// kind).
func KindOf(id string) string {
	k, _, ok := strings.Cut(id, ":")
	if !ok || kindRank(k) == numKinds {
		return ""
	}
	return k
}

// ValidID reports whether id is "<kind>:<something>".
func ValidID(id string) bool {
	k := KindOf(id)
	return k != "" && len(id) > len(k)+1
}
