package e2e

// Issue 12 end to end: the real binary attacked the way the attacks work,
// from several 127.0.0.0/8 addresses, with forged headers, with idle
// squatters and slow connections, and each time the owner unharmed.

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

const invokedBy = "Received: (qmail %d invoked by uid %d); 1 Jan 2026 00:00:00 -0000\r\n"

// A script on web1 talking SMTP itself cannot send, nor blame a customer;
// mail through web1's qmail is charged to its uid and script, and a script
// over its cap (or suspended) stops alone.
func TestTrustWebServerScripts(t *testing.T) {
	d := newDaemon(t, daemonOpts{
		policy:    policyWith("defer", 0, "[policy.limits.uid]\nrcpts = [\"100/1h\"]\n\n[policy.limits.script]\nrcpts = [\"2/1h\"]\n"),
		extraTOML: web1,
	})
	w := dialSMTPFrom(t, d.smtp, "127.0.0.2")
	w.expect("EHLO web1.example.test", "250")

	// The attacks: no qmail line first, whatever the rest says.
	for i, forged := range []string{
		"X-PHP-Originating-Script: 1002:form.php\r\nSubject: blame 1002\r\n\r\nx\r\n",
		"Received: from x by y; 1 Jan 2026 00:00:00 -0000\r\n" + fmt.Sprintf(invokedBy, 9, 1002) + "Subject: qmail line second\r\n\r\nx\r\n",
		"Subject: no Received at all\r\n\r\nx\r\n",
	} {
		if got := w.send("www@example.com", rcpts(fmt.Sprintf("f%d-", i), 1), forged); !strings.HasPrefix(got, "550 5.7.1 ") {
			t.Fatalf("forged message %d: %q, want 550 5.7.1", i, got)
		}
	}
	if q := d.queued(); len(q) != 0 {
		t.Fatalf("%d refused messages reached qmail-queue", len(q))
	}
	evs := d.events("refused")
	if len(evs) == 0 || !strings.Contains(evs[0].Detail, "web1") || evs[0].Identity != "ip:127.0.0.2" {
		t.Fatalf("refused events %+v, want one naming web1", evs)
	}

	// Through web1's qmail: uid 1001's form.php. A PHP header of another
	// uid cannot blame 1002: charged to 1001, no script under 1002.
	viaQmail := func(script, subject string) string {
		return fmt.Sprintf(invokedBy, 4242, 1001) + "X-PHP-Originating-Script: " + script + "\r\nSubject: " + subject + "\r\n\r\nx\r\n"
	}
	w.mustSend("www@example.com", rcpts("a", 1), viaQmail("1001:form.php", "1"))
	w.mustSend("www@example.com", rcpts("b", 1), viaQmail("1002:blame.php", "2"))
	all := d.senders("all")
	if u := all["uid:web1:1001"].Usage; len(u) != 1 || u[0].Used != 2 {
		t.Fatalf("uid:web1:1001 usage %+v, want 2 recipients", u)
	}
	for id := range all {
		if strings.Contains(id, ":1002") {
			t.Fatalf("the blamed uid 1002 got an identity: %s", id)
		}
	}
	if _, ok := all["script:web1:1001:form.php"]; !ok {
		t.Fatalf("script:web1:1001:form.php not in /api/senders?state=all: %v", all)
	}

	// form.php over its own cap; the account's other scripts go on.
	w.mustSend("www@example.com", rcpts("c", 1), viaQmail("1001:form.php", "3"))
	wantReply(t, "form.php over its cap", w.send("www@example.com", rcpts("d", 1), viaQmail("1001:form.php", "4")),
		overReply("451", "script:web1:1001:form.php", 2, "1h"))
	w.mustSend("www@example.com", rcpts("e", 1), viaQmail("1001:other.php", "5"))

	// An admin suspends other.php: it alone is refused.
	const other = "script:web1:1001:other.php"
	if code, body := d.api("POST", "/api/senders/"+pathID(other)+"/suspend"); code != 200 {
		t.Fatalf("suspend %s: %d %s", other, code, body)
	}
	if got, want := w.send("www@example.com", rcpts("f", 1), viaQmail("1001:other.php", "6")), "550 5.7.1 "+other+" is suspended"; got != want {
		t.Fatalf("suspended script: %q, want %q", got, want)
	}
	w.mustSend("www@example.com", rcpts("g", 1), viaQmail("1001:third.php", "7"))
	if st := d.senders("all")["uid:web1:1001"].State; st == "suspended" {
		t.Fatal("the account was suspended with its script")
	}
}

// Customers on three addresses forge MAIL FROM:<ceo@victim.org> (in every
// spelling) until the sender's cap trips and on: they get suspended, the
// address's owner never does.
func TestTrustForgedSenderNeverSuspendsOwner(t *testing.T) {
	const victim = "sender:ceo@victim.org"
	d := newDaemon(t, daemonOpts{policy: policyWith("defer", 3, "[policy.limits.sender]\nrcpts = [\"2/1h\"]\n")})
	attackers := []string{"127.0.0.3", "127.0.0.4", "127.0.0.5"}
	first := dialSMTPFrom(t, d.smtp, attackers[0])
	first.expect("EHLO spam.example.test", "250")
	first.mustSend("CEO@Victim.ORG.", rcpts("s", 2), "Subject: fill\r\n\r\nx\r\n")
	first.expect("MAIL FROM:<ceo@[victim.org]>", "501 5.1.7")
	for _, ip := range attackers {
		s := dialSMTPFrom(t, d.smtp, ip)
		s.expect("EHLO spam.example.test", "250")
		for i := range 3 {
			s.expect("MAIL FROM:<ceo@victim.org.>", "250")
			wantReply(t, fmt.Sprintf("%s attempt %d", ip, i), s.cmd("RCPT TO:<z@remote.example>"), overReply("451", victim, 2, "1h"))
			s.expect("RSET", "250")
		}
		if got, want := s.cmd("MAIL FROM:<ceo@victim.org>"), "550 5.7.1 ip:"+ip+" is suspended"; got != want {
			t.Fatalf("after 3 attempts from %s: %q, want %q", ip, got, want)
		}
	}
	suspended := d.senders("suspended")
	for _, ip := range attackers {
		if _, ok := suspended["ip:"+ip]; !ok {
			t.Errorf("attacker ip:%s not suspended", ip)
		}
	}
	for id := range suspended {
		if !strings.HasPrefix(id, "ip:") {
			t.Errorf("%s suspended", id)
		}
	}
	if got := d.senders("all")[victim].State; got == "suspended" {
		t.Fatalf("%s suspended", victim)
	}
	// The owner, from his own machine: never refused for good. His
	// address's cap is full for the hour (451); the admin resets it and he
	// sends.
	o := dialSMTPFrom(t, d.smtp, "127.0.0.10")
	o.expect("EHLO ceo.example.test", "250")
	o.expect("MAIL FROM:<ceo@victim.org>", "250")
	wantReply(t, "owner", o.cmd("RCPT TO:<board@remote.example>"), overReply("451", victim, 2, "1h"))
	o.expect("RSET", "250")
	if code, body := d.api("POST", "/api/senders/"+pathID(victim)+"/reset"); code != 200 {
		t.Fatalf("reset: %d %s", code, body)
	}
	o.mustSend("ceo@victim.org", rcpts("board", 2), "Subject: owner\r\n\r\nx\r\n")
}

// A squatter reserves all of a shared cap and idles: after reserve_timeout
// the owner gets the room, and the squatter's DATA, checked again, is
// refused (at the final dot, even when its body came slowly); with room
// left it goes through.
func TestTrustReservationSquatter(t *testing.T) {
	d := newDaemon(t, daemonOpts{policy: `[policy]
mode = "enforce"
over_limit = "defer"
suspend_after = 0
reserve_timeout = "2s"

[policy.limits.domain]
rcpts = ["4/1h"]
`})
	const dom = "domain:shared.example"
	sq := dialSMTPFrom(t, d.smtp, "127.0.0.3")
	sq.expect("EHLO squat.example.test", "250")
	sq.expect("MAIL FROM:<squat@shared.example>", "250")
	for _, r := range rcpts("sq", 4) {
		sq.expect("RCPT TO:<"+r+">", "250")
	}
	owner := dialSMTPFrom(t, d.smtp, "127.0.0.4")
	owner.expect("EHLO owner.example.test", "250")
	if n, refusal := owner.capacity("owner@shared.example", 1); n != 0 {
		t.Fatalf("owner got room the squatter holds (%d, %q)", n, refusal)
	}
	waitRoom := func(n int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			if got, _ := owner.capacity("owner@shared.example", n); got == n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the squatter's reservation never lapsed:\n%s", d.logs())
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitRoom(2)
	owner.mustSend("owner@shared.example", rcpts("o", 2), "Subject: owner\r\n\r\nx\r\n")

	// The squatter comes back: 2 of 4 left, it wants 4.
	sq.expect("DATA", "354")
	if got := sq.sendData("Subject: late\r\n\r\nx\r\n"); !strings.HasPrefix(got, "451 4.7.1 "+dom+" is over 4 recipients/1h") {
		t.Fatalf("squatter's DATA: %q", got)
	}

	// A second squatter sends DATA in time, then drips its body past the
	// lapse: refused at the final dot once the owner took the room.
	sq2 := dialSMTPFrom(t, d.smtp, "127.0.0.5")
	sq2.expect("EHLO squat2.example.test", "250")
	sq2.expect("MAIL FROM:<squat2@shared.example>", "250")
	sq2.expect("RCPT TO:<x1@remote.example>", "250")
	sq2.expect("RCPT TO:<x2@remote.example>", "250")
	sq2.expect("DATA", "354")
	fmt.Fprintf(sq2.c, "Subject: slow\r\n\r\nfirst line\r\n")
	waitRoom(1)
	owner.mustSend("owner@shared.example", rcpts("p", 1), "Subject: owner 2\r\n\r\nx\r\n")
	if got := sq2.sendData("last line\r\n"); !strings.HasPrefix(got, "451 4.7.1 "+dom) {
		t.Fatalf("slow squatter at the final dot: %q", got)
	}
	if n := len(d.queued()); n != 2 {
		t.Fatalf("%d messages queued, want the owner's 2", n)
	}

	// With room left, a lapsed transaction goes through: 354, then 250.
	d.api("POST", "/api/senders/"+pathID(dom)+"/reset")
	late := dialSMTPFrom(t, d.smtp, "127.0.0.6")
	late.expect("EHLO late.example.test", "250")
	late.expect("MAIL FROM:<late@shared.example>", "250")
	late.expect("RCPT TO:<y@remote.example>", "250")
	time.Sleep(2500 * time.Millisecond) // past reserve_timeout: the DATA below is a re-check
	late.expect("DATA", "354")
	if got := late.sendData("Subject: late but fine\r\n\r\nx\r\n"); !strings.HasPrefix(got, "250 ok") {
		t.Fatalf("lapsed with room: %q", got)
	}
}

// sendData writes the rest of a message and the final dot, and returns
// the reply.
func (s *smtpConn) sendData(body string) string {
	s.t.Helper()
	fmt.Fprintf(s.c, "%s.\r\n", body)
	return s.reply()
}

// 1000 slow TCP clients from 50 addresses take every TCP slot (the
// default max_connections, 20 per address); scripts on the server still
// send through the local socket.
func TestTrustSlowClientsDoNotStarveLocalMail(t *testing.T) {
	d := newDaemon(t, daemonOpts{})
	var slow []net.Conn
	for i := range 50 {
		ip := "127.0.1." + strconv.Itoa(i+1)
		for range 20 {
			dl := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
			c, err := dl.Dial("tcp", d.smtp)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			slow = append(slow, c)
		}
	}
	for _, c := range slow { // each has its banner: all 1000 slots held
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		line := make([]byte, 4)
		if _, err := io.ReadFull(c, line); err != nil || string(line) != "220 " {
			t.Fatalf("slow client: %q %v", line, err)
		}
	}
	dl := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.2.1")}}
	over, err := dl.Dial("tcp", d.smtp)
	if err != nil {
		t.Fatal(err)
	}
	defer over.Close()
	over.SetReadDeadline(time.Now().Add(10 * time.Second))
	if got, _ := bufio.NewReader(over).ReadString('\n'); got != "421 4.7.0 too many connections\r\n" {
		t.Fatalf("TCP over max_connections: %q", got)
	}

	// PHP's mail() → sendmail: the local socket has its own budget.
	msg := "To: someone@remote.example\nSubject: from a script\n\nhello\n"
	for i := range 3 {
		cmd := exec.Command(bins.relay, "sendmail", "--config", d.config, "-t", "-i", "-fshop@example.com")
		cmd.Stdin = strings.NewReader(msg)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			t.Fatalf("relay sendmail %d with every TCP slot taken: %v\n%s", i, err, out.String())
		}
	}
	if n := len(d.queued()); n != 3 {
		t.Fatalf("%d queued, want 3", n)
	}

}

// A client that answers within every timeout, dripping a command at a
// time, is still cut at max_session.
func TestTrustMaxSession(t *testing.T) {
	d := newDaemon(t, daemonOpts{relay: `[relay]
local_domains = ["example.com"]
relay_networks = ["127.0.0.0/8"]
timeout = "30s"
max_session = "2s"
`})
	s := dialSMTP(t, d.smtp)
	s.c.SetDeadline(time.Now().Add(60 * time.Second))
	answered, last := 0, ""
	for range 300 { // 30 s at most
		fmt.Fprintf(s.c, "NOOP\r\n")
		line, err := s.r.ReadString('\n')
		if last = strings.TrimRight(line, "\r\n"); err != nil || !strings.HasPrefix(last, "250") {
			break
		}
		answered++
		time.Sleep(100 * time.Millisecond)
	}
	if answered == 0 || last != "" && !strings.HasPrefix(last, "421 4.4.2") {
		t.Fatalf("dripping session: %d NOOPs answered, then %q; want it cut at max_session", answered, last)
	}
	// The local socket has no session limit.
	l := dialLocal(t, d.sock)
	l.expect("EHLO localhost", "250")
	time.Sleep(2500 * time.Millisecond)
	l.expect("NOOP", "250")
}

// The relay hole from defaults, against qmail's own control files: with
// qmail_control_dir and tcprules set and local_domains / relay_networks
// left out (README step 1), example.com is not accepted from anyone and
// 127.0.0.0/8 does not relay unless tcprules says so.
func TestTrustNoRelayHoleFromDefaults(t *testing.T) {
	ctl := filepath.Join(t.TempDir(), "control")
	if err := os.MkdirAll(ctl, 0o755); err != nil {
		t.Fatal(err)
	}
	if ents, err := os.ReadDir("/var/qmail/control"); err == nil { // the real qmail's files, when installed
		for _, e := range ents {
			if b, err := os.ReadFile(filepath.Join("/var/qmail/control", e.Name())); err == nil && e.Type().IsRegular() {
				os.WriteFile(filepath.Join(ctl, e.Name()), b, 0o644)
			}
		}
	}
	os.WriteFile(filepath.Join(ctl, "me"), []byte("mail.example.test\n"), 0o644)
	os.WriteFile(filepath.Join(ctl, "rcpthosts"), []byte("mail.example.test\n"), 0o644)
	rules := filepath.Join(t.TempDir(), "tcp.smtp")
	os.WriteFile(rules, []byte("127.0.0.5:allow,RELAYCLIENT=\"\"\n127.:allow\n"), 0o644)
	d := newDaemon(t, daemonOpts{relay: fmt.Sprintf(`[relay]
qmail_control_dir = %q
tcprules = %q
timeout = "30s"
`, ctl, rules)})

	s := dialSMTPFrom(t, d.smtp, "127.0.0.3")
	s.expect("EHLO anyone.example.test", "250")
	s.expect("MAIL FROM:<a@anywhere.example>", "250")
	for _, rc := range []string{"x@example.com", "x@far.example"} {
		if got := s.cmd("RCPT TO:<" + rc + ">"); !strings.HasPrefix(got, "553 5.7.1 ") {
			t.Errorf("RCPT TO:<%s> from 127.0.0.3: %q, want 553 (not in rcpthosts, not a relay client)", rc, got)
		}
	}
	s.expect("RCPT TO:<x@mail.example.test>", "250")
	r := dialSMTPFrom(t, d.smtp, "127.0.0.5")
	r.expect("EHLO relay.example.test", "250")
	r.mustSend("a@mail.example.test", []string{"x@far.example"}, "Subject: relayed\r\n\r\nx\r\n")
}
