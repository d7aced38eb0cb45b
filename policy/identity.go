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

// SenderID is the identity of an envelope sender (MAIL FROM), lowercased;
// the null sender is "sender:<>".
func SenderID(addr string) Identity {
	if addr == "" {
		return Identity{ID: nullSender, Kind: config.KindSender}
	}
	return Identity{ID: "sender:" + strings.ToLower(addr), Kind: config.KindSender}
}

// DomainID is the identity of the envelope sender's domain: the lowercased
// part after the last '@'. It reports false when addr has no domain.
func DomainID(addr string) (Identity, bool) {
	at := strings.LastIndexByte(addr, '@')
	if at < 0 || at == len(addr)-1 {
		return Identity{}, false
	}
	return Identity{ID: "domain:" + strings.ToLower(addr[at+1:]), Kind: config.KindDomain}, true
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

// kindRank orders identity kinds by strength: user, uid, ip, sender, domain.
// Unknown kinds sort last.
func kindRank(kind string) int {
	switch kind {
	case config.KindUser:
		return 0
	case config.KindUID:
		return 1
	case config.KindIP:
		return 2
	case config.KindSender:
		return 3
	case config.KindDomain:
		return 4
	}
	return 5
}

// numKinds is the number of known kinds (ranks 0..numKinds-1).
const numKinds = 5

// kindNames lists the kinds in rank order.
var kindNames = [numKinds]string{config.KindUser, config.KindUID, config.KindIP, config.KindSender, config.KindDomain}

// kindOf returns the kind prefix of an identity id ("" when it has none).
func kindOf(id string) string {
	k, _, ok := strings.Cut(id, ":")
	if !ok || kindRank(k) == numKinds {
		return ""
	}
	return k
}
