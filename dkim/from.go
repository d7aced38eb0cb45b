package dkim

import (
	"io"
	"mime"
	"net/mail"
	"slices"
	"strings"

	"relay/config"
)

// FromDomains returns the domains of every address in the given From:
// field values, lower case, without a trailing dot, each once, in order.
// A value RFC 5322 cannot parse is read leniently, as a receiver's eye
// would: the addresses in <...>, or else every word holding an '@'. Domain
// literals and names that are not LDH domain names are left out (no key
// or DMARC record can be found for them).
func FromDomains(values []string) []string {
	// Display names may be in any charset: only the addresses matter.
	parser := mail.AddressParser{WordDecoder: &mime.WordDecoder{
		CharsetReader: func(_ string, r io.Reader) (io.Reader, error) { return r, nil },
	}}
	var out []string
	add := func(addr string) {
		at := strings.LastIndexByte(addr, '@')
		if at < 0 {
			return
		}
		d := strings.ToLower(strings.TrimSuffix(strings.TrimSpace(addr[at+1:]), "."))
		if config.IsDomainName(d) && !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	for _, v := range values {
		if list, err := parser.ParseList(v); err == nil {
			for _, a := range list {
				add(a.Address)
			}
			continue
		}
		for _, a := range lenientAddresses(v) {
			add(a)
		}
	}
	return out
}

// lenientAddresses finds the addresses of a From: value that does not
// parse: what stands in angle brackets, or, without any, the words that
// hold an '@'.
func lenientAddresses(v string) []string {
	var addrs []string
	for rest := v; ; {
		open := strings.IndexByte(rest, '<')
		if open < 0 {
			break
		}
		end := strings.IndexByte(rest[open:], '>')
		if end < 0 {
			addrs = append(addrs, rest[open+1:])
			break
		}
		addrs = append(addrs, rest[open+1:open+end])
		rest = rest[open+end+1:]
	}
	if len(addrs) > 0 {
		return addrs
	}
	for _, w := range strings.FieldsFunc(v, func(r rune) bool {
		return r == ',' || r == ';' || r == ' ' || r == '\t' || r == '(' || r == ')' || r == '"'
	}) {
		if strings.Contains(w, "@") {
			addrs = append(addrs, w)
		}
	}
	return addrs
}
