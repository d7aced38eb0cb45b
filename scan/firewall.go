package scan

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
)

// Firewall is what the printed rules allow: TCP to Port towards the mail
// servers only from qmail-remote's user and root, nothing else to Port
// anywhere. That is what makes a web server's uid trustworthy at the mail
// server: the only program that can talk SMTP to it is qmail-remote, which
// sends what the web server's qmail-queue queued, under qmail-queue's own
// "Received: (qmail N invoked by uid U)" line with the uid the kernel gave
// it. A script that opens port 25 itself, to write any Received line it
// likes, is refused here.
type Firewall struct {
	MailServers []netip.Prefix // addresses or networks; IPv6 ones go to ip6tables
	RemoteUser  string         // qmail-remote's user; "" is qmailr
	Port        uint16         // default 25
}

// DefaultRemoteUser is the user qmail-remote runs as.
const DefaultRemoteUser = "qmailr"

// userName is what nft and iptables' owner match take for a user: a POSIX
// portable name (useradd's default NAME_REGEX) or a numeric uid. Anything
// else could break out of the pasted command line.
var userName = regexp.MustCompile(`^([a-z_][a-z0-9_.-]*|[0-9]+)$`)

// ParseMailServer reads an address or a CIDR network.
func ParseMailServer(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("mail server %q: not an address or network", s)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("mail server %q: not an IP address (host names are not resolved)", s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// Validate checks the rules can be written safely.
func (f *Firewall) Validate() error {
	if len(f.MailServers) == 0 {
		return errors.New("no mail server given")
	}
	for _, p := range f.MailServers {
		if !p.IsValid() {
			return errors.New("invalid mail server prefix")
		}
	}
	if u := f.remoteUser(); !userName.MatchString(u) {
		return fmt.Errorf("remote user %q: not a user name or uid", u)
	}
	return nil
}

func (f *Firewall) remoteUser() string {
	if f.RemoteUser == "" {
		return DefaultRemoteUser
	}
	return f.RemoteUser
}

// WriteFirewall prints the nftables ruleset and then the same rules as
// iptables and ip6tables commands. It changes nothing; the admin pastes one
// of the two on each web server. Every rule that accepts traffic carries an
// owner match (qmail-remote's user, or root on a rule of its own); both
// families always end in a reject, so a web server cannot go around the
// IPv4 rules over IPv6.
func WriteFirewall(w io.Writer, f Firewall) error {
	if err := f.Validate(); err != nil {
		return err
	}
	port := strconv.Itoa(int(f.Port))
	if f.Port == 0 {
		port = "25"
	}
	var v4, v6 []string
	for _, p := range f.MailServers {
		s := p.String()
		if p.IsSingleIP() {
			s = p.Addr().String()
		}
		if p.Addr().Is4() {
			v4 = append(v4, s)
		} else {
			v6 = append(v6, s)
		}
	}
	users := []string{f.remoteUser()}
	if users[0] != "root" && users[0] != "0" {
		users = append(users, "root")
	}

	var b strings.Builder
	fmt.Fprintf(&b, "# nftables: outgoing TCP port %s only from %s to the mail servers.\n", port, strings.Join(users, " and "))
	b.WriteString("# Load with: nft -f FILE    Remove with: nft delete table inet relay_smtp\n")
	b.WriteString("table inet relay_smtp {\n")
	b.WriteString("\tchain output {\n")
	b.WriteString("\t\ttype filter hook output priority 0; policy accept;\n")
	for _, u := range users {
		if len(v4) > 0 {
			fmt.Fprintf(&b, "\t\ttcp dport %s ip daddr { %s } meta skuid %s accept\n", port, strings.Join(v4, ", "), u)
		}
		if len(v6) > 0 {
			fmt.Fprintf(&b, "\t\ttcp dport %s ip6 daddr { %s } meta skuid %s accept\n", port, strings.Join(v6, ", "), u)
		}
	}
	fmt.Fprintf(&b, "\t\ttcp dport %s reject with tcp reset\n", port)
	b.WriteString("\t}\n}\n\n")

	fmt.Fprintf(&b, "# iptables/ip6tables: the same rules in a chain RELAY_SMTP, jumped to first from OUTPUT.\n")
	fmt.Fprintf(&b, "# Remove with: iptables -D OUTPUT -p tcp --dport %s -j RELAY_SMTP; iptables -F RELAY_SMTP; iptables -X RELAY_SMTP\n", port)
	b.WriteString("# (and the same three with ip6tables).\n")
	for _, fam := range []struct {
		cmd   string
		dests []string
	}{{"iptables", v4}, {"ip6tables", v6}} {
		fmt.Fprintf(&b, "%s -N RELAY_SMTP\n", fam.cmd)
		for _, u := range users {
			for _, d := range fam.dests {
				fmt.Fprintf(&b, "%s -A RELAY_SMTP -d %s -m owner --uid-owner %s -j ACCEPT\n", fam.cmd, d, u)
			}
		}
		fmt.Fprintf(&b, "%s -A RELAY_SMTP -p tcp -j REJECT --reject-with tcp-reset\n", fam.cmd)
		fmt.Fprintf(&b, "%s -I OUTPUT -p tcp --dport %s -j RELAY_SMTP\n", fam.cmd, port)
	}
	_, err := io.WriteString(w, b.String())
	return err
}
