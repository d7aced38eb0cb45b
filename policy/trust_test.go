package policy

import (
	"strings"
	"testing"
	"time"

	"relay/config"
)

// Issue 12 in policy: suspensions follow the strong identities, reservations
// lapse, ids have one normal form, scripts are identities of their own.

func TestNormalAddress(t *testing.T) {
	for _, c := range []struct {
		in, sender, domain string
		ok                 bool
	}{
		{"spam@x.org.", "sender:spam@x.org", "domain:x.org", true},
		{"SPAM@X.ORG.", "sender:spam@x.org", "domain:x.org", true},
		{"Spam@X.Org", "sender:spam@x.org", "domain:x.org", true},
		{"a@x.org..", "sender:a@x.org", "domain:x.org", true},
		{"a@[192.0.2.1]", "sender:a@[192.0.2.1]", "domain:[192.0.2.1]", true},
		{"a@[IPv6:2001:DB8:0::1]", "sender:a@[ipv6:2001:db8::1]", "domain:[ipv6:2001:db8::1]", true},
		{"a@[x.org]", "sender:a@[x.org]", "domain:[x.org]", false},
		{"a@[IPv6:192.0.2.1]", "", "", false},
		{"a@[192.0.2.1", "", "", false},
		{"a@[300.1.1.1]", "", "", false},
		{"a@x[y].org", "", "", false},
		{"postmaster", "sender:postmaster", "", true},
	} {
		_, ok := NormalAddress(c.in)
		if ok != c.ok {
			t.Errorf("NormalAddress(%q) ok = %v, want %v", c.in, ok, c.ok)
		}
		if c.sender == "" {
			continue
		}
		if got := SenderID(c.in).ID; got != c.sender {
			t.Errorf("SenderID(%q) = %q, want %q", c.in, got, c.sender)
		}
		d, ok := DomainID(c.in)
		if c.domain == "" && ok || c.domain != "" && d.ID != c.domain {
			t.Errorf("DomainID(%q) = %q %v, want %q", c.in, d.ID, ok, c.domain)
		}
	}
	// Allow rules match the normal form.
	cfg := baseConfig()
	cfg.Policy.Limits.Sender = &config.Limits{Rcpts: rates(t, "1/1h")}
	cfg.Policy.Allow = []config.AllowRule{{Match: "sender:news@Lists.example.com", Unlimited: true}}
	e := openTest(t, t.TempDir(), cfg, newClock(), Options{})
	for range 3 {
		if d := send(e.Engine, []Identity{SenderID("NEWS@lists.example.COM.")}, 2); d.Action != Accept {
			t.Fatalf("allowed list refused: %+v", d)
		}
	}
}

func TestScriptID(t *testing.T) {
	id := ScriptID("web1", 1001, "bob", "form.php")
	if id.ID != "script:web1:1001:form.php" || id.Kind != config.KindScript || id.Account != "bob" || id.Script != "form.php" || KindOf(id.ID) != "script" {
		t.Fatalf("ScriptID: %+v", id)
	}
	if id := ScriptID("local", 33, "", "/var/www/a b.php"); id.ID != "script:local:33:/var/www/a b.php" {
		t.Fatalf("local ScriptID: %+v", id)
	}
	if u, ok := UIDOfScript("script:web1:1001:dir:with:colons.php"); !ok || u != "uid:web1:1001" {
		t.Errorf("UIDOfScript = %q %v", u, ok)
	}
	if s, ok := ScriptOfUID("uid:local:33", "a:b.php"); !ok || s != "script:local:33:a:b.php" {
		t.Errorf("ScriptOfUID = %q %v", s, ok)
	}
	for _, bad := range []string{"uid:web1:1", "script:web1", "script::1:x"} {
		if _, ok := UIDOfScript(bad); ok {
			t.Errorf("UIDOfScript(%q) ok", bad)
		}
	}
	if _, ok := ScriptOfUID("user:bob", "x"); ok {
		t.Error("ScriptOfUID of a user")
	}
	for id, ok := range map[string]bool{"script:web1:1:x.php": true, "script:": false, "mailbox:x": false, "uid": false} {
		if ValidID(id) != ok {
			t.Errorf("ValidID(%q) = %v", id, !ok)
		}
	}
}

// One bad script stops; the account's other scripts go on.
func TestScriptCapAndSuspension(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.SuspendAfter = 2
	cfg.Policy.Limits.UID = &config.Limits{Rcpts: rates(t, "100/1h")}
	cfg.Policy.Limits.Script = &config.Limits{Rcpts: rates(t, "2/1h")}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	msg := func(script string, n int) Decision {
		tx := e.Begin([]Identity{IPID(mustAddr("10.0.0.11")), SenderID("www@example.com")})
		defer tx.Abort()
		for range n {
			if d := tx.AddRcpt(); d.Action != Accept {
				return d
			}
		}
		ids := []Identity{WebUID("web1", 1001, "bob", script)}
		if script != "" {
			ids = append(ids, ScriptID("web1", 1001, "bob", script))
		}
		if d := tx.AddIdentities(ids...); d.Action != Accept {
			return d
		}
		if d := tx.Message(); d.Action != Accept {
			return d
		}
		tx.Commit()
		return Decision{}
	}
	if d := msg("bad.php", 2); d.Action != Accept {
		t.Fatalf("first: %+v", d)
	}
	for i := range 2 {
		clk.Add(time.Minute)
		d := msg("bad.php", 1)
		if d.Action != Defer || d.Identity != "script:web1:1001:bad.php" || d.Limit != "2 recipients/1h" {
			t.Fatalf("over the script cap %d: %+v", i, d)
		}
	}
	if d := msg("bad.php", 1); d.Action != Reject || d.Identity != "script:web1:1001:bad.php" || !d.Suspended {
		t.Fatalf("after 2 over-limit attempts: %+v", d)
	}
	if d := msg("good.php", 2); d.Action != Accept {
		t.Fatalf("another script of the account: %+v", d)
	}
	if d := msg("", 2); d.Action != Accept {
		t.Fatalf("the account without a script: %+v", d)
	}
	if s, _ := e.Sender("uid:web1:1001"); s.Suspension != nil || s.Account != "bob" {
		t.Fatalf("the account: %+v", s)
	}
	s, ok := e.Sender("script:web1:1001:bad.php")
	if !ok || s.Kind != "script" || s.Account != "bob" || s.State != StateSuspended {
		t.Fatalf("the script: %+v", s)
	}
	// An admin lifts it.
	if err := e.Unsuspend(s.ID); err != nil {
		t.Fatal(err)
	}
}

// A customer forging MAIL FROM:<ceo@victim.org> until the sender cap trips
// is suspended himself; the address's owner never is.
func TestForgedSenderSuspendsTheForger(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.SuspendAfter = 3
	cfg.Policy.Limits.Sender = &config.Limits{Rcpts: rates(t, "2/1h")}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	forger := func(n int) Decision {
		ids := []Identity{UserID("mallory"), IPID(mustAddr("192.0.2.66")), SenderID("ceo@victim.org")}
		d, _ := DomainID("ceo@victim.org")
		return send(e.Engine, append(ids, d), n)
	}
	owner := []Identity{UserID("ceo"), IPID(mustAddr("192.0.2.10")), SenderID("CEO@victim.org.")}
	if d := forger(2); d.Action != Accept {
		t.Fatal(d)
	}
	for i := range 10 {
		clk.Add(time.Minute)
		d := forger(1)
		if i < 3 && (d.Action != Defer || d.Identity != "sender:ceo@victim.org") {
			t.Fatalf("attempt %d: %+v", i, d)
		}
		if i >= 3 && (d.Action != Reject || d.Identity != "user:mallory" || !d.Suspended) {
			t.Fatalf("attempt %d after 3: %+v", i, d)
		}
	}
	for _, id := range []string{"sender:ceo@victim.org", "domain:victim.org", "ip:192.0.2.66"} {
		if s, _ := e.Sender(id); s.Suspension != nil {
			t.Errorf("%s suspended: %+v", id, s.Suspension)
		}
	}
	s, _ := e.Sender("user:mallory")
	if s.Suspension == nil || !strings.Contains(s.Suspension.Reason, "sender:ceo@victim.org over 2 recipients/1h") {
		t.Fatalf("mallory: %+v", s.Suspension)
	}
	// The owner is deferred while the forger's mail fills the address's
	// cap (it is the address's cap), and never refused for good.
	if d := send(e.Engine, owner, 1); d.Action != Defer || d.Identity != "sender:ceo@victim.org" {
		t.Fatalf("owner within the hour: %+v", d)
	}
	clk.Add(time.Hour)
	if d := send(e.Engine, owner, 1); d.Action != Accept {
		t.Fatalf("owner an hour later: %+v", d)
	}

	// The admin may choose to suspend senders: then the attempts count
	// for the sender itself.
	cfg.Policy.SuspendKinds = []string{"user", "sender"}
	if err := e.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if err := e.Unsuspend("user:mallory"); err != nil {
		t.Fatal(err)
	}
	forger(2)
	for range 3 {
		clk.Add(time.Minute)
		forger(1)
	}
	if s, _ := e.Sender("sender:ceo@victim.org"); s.Suspension == nil {
		t.Fatal("sender in suspend_kinds not suspended")
	}
}

// A strong identity that is not in suspend_kinds (a web server's address,
// over its own cap) is never suspended, and its over-limit attempts are
// nobody else's.
func TestStrongKindOutsideSuspendKinds(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.SuspendAfter = 2
	cfg.Policy.SuspendKinds = []string{"user", "uid", "script"}
	cfg.Policy.Limits.IP = &config.Limits{Rcpts: rates(t, "1/1h")}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	ids := []Identity{IPID(mustAddr("10.0.0.11")), LocalUID(1001, "bob"), SenderID("a@b.example")}
	send(e.Engine, ids, 1)
	for range 5 {
		clk.Add(time.Minute)
		if d := send(e.Engine, ids, 1); d.Action != Defer || d.Identity != "ip:10.0.0.11" {
			t.Fatalf("%+v", d)
		}
	}
	if got := e.Senders(StateSuspended); len(got) != 0 {
		t.Fatalf("suspended: %+v", got)
	}
}

// reserve_timeout: a transaction that reserved and went quiet gives its
// room back; checked again, it gets what is left.
func TestReservationsLapse(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.IP = &config.Limits{Rcpts: rates(t, "3/1h"), Msgs: rates(t, "10/1h")}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	shared := IPID(mustAddr("10.0.0.11"))
	squatter := e.Begin([]Identity{shared, SenderID("squat@example.com")})
	for range 3 {
		if d := squatter.AddRcpt(); d.Action != Accept {
			t.Fatal(d)
		}
	}
	owner := []Identity{shared, SenderID("owner@example.com")}
	if d := send(e.Engine, owner, 1); d.Action != Defer {
		t.Fatalf("owner while reserved: %+v", d)
	}
	clk.Add(59 * time.Second)
	e.sweepLapsed()
	if d := send(e.Engine, owner, 1); d.Action != Defer {
		t.Fatalf("owner before reserve_timeout: %+v", d)
	}
	clk.Add(time.Second)
	e.sweepLapsed() // the squatter sends nothing: the sweep releases it
	if d := send(e.Engine, owner, 2); d.Action != Accept {
		t.Fatalf("owner after reserve_timeout: %+v", d)
	}
	// The squatter's DATA is checked again: one recipient is left, it
	// holds three.
	if d := squatter.Message(); d.Action != Defer || d.Identity != "ip:10.0.0.11" {
		t.Fatalf("squatter at DATA: %+v", d)
	}
	squatter.Abort()
	if got := usage(t, e.Engine, "ip:10.0.0.11", "rcpts", "1h"); got != 2 {
		t.Fatalf("used %d, want the owner's 2", got)
	}

	// With room left, the lapsed transaction goes through and is
	// charged once.
	slow := e.Begin([]Identity{shared})
	slow.AddRcpt()
	clk.Add(2 * time.Minute) // no sweep: the transaction finds its own lapse
	if d := slow.Message(); d.Action != Accept {
		t.Fatalf("lapsed with room: %+v", d)
	}
	slow.Commit()
	if got := usage(t, e.Engine, "ip:10.0.0.11", "rcpts", "1h"); got != 3 {
		t.Fatalf("used %d, want 3", got)
	}
	for i := range e.lapses {
		if e.lapses[i].head != nil {
			t.Fatalf("lapse list %d not empty after every transaction ended", i)
		}
	}
}

// A reservation that lapses during DATA (a body dripped for minutes) is
// checked again at the end of DATA.
func TestRecheckAtEndOfData(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.UID = &config.Limits{Rcpts: rates(t, "2/1h")}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	uid := LocalUID(1001, "bob")
	slow := e.Begin([]Identity{uid})
	slow.AddRcpt()
	slow.AddRcpt()
	if d := slow.Message(); d.Action != Accept {
		t.Fatal(d)
	}
	if d := slow.Recheck(); d.Action != Accept {
		t.Fatalf("recheck before the lapse: %+v", d)
	}
	clk.Add(90 * time.Second)
	e.sweepLapsed()
	if d := send(e.Engine, []Identity{uid}, 1); d.Action != Accept {
		t.Fatalf("others after the lapse: %+v", d)
	}
	if d := slow.Recheck(); d.Action != Defer {
		t.Fatalf("recheck with 1 of 2 left: %+v", d)
	}
	slow.Abort()

	// Not lapsed, Recheck changes nothing; lapsed with room, it reserves
	// again and Commit charges once.
	clk.Add(2 * time.Hour)
	ok := e.Begin([]Identity{uid})
	ok.AddRcpt()
	ok.Message()
	clk.Add(2 * time.Minute)
	if d := ok.Recheck(); d.Action != Accept {
		t.Fatalf("recheck with room: %+v", d)
	}
	if d := send(e.Engine, []Identity{uid}, 2); d.Action != Defer {
		t.Fatalf("the rechecked transaction holds its room again: %+v", d)
	}
	ok.Commit()
	if got := usage(t, e.Engine, "uid:local:1001", "rcpts", "1h"); got != 1 {
		t.Fatalf("used %d, want 1", got)
	}
}

// The sweep races the session's own calls and ends: every reservation is
// given back once (run with -race).
func TestLapseSweepRaces(t *testing.T) {
	cfg := baseConfig()
	cfg.Policy.Limits.IP = &config.Limits{Rcpts: rates(t, "1000000/30d")}
	clk := newClock()
	e := openTest(t, t.TempDir(), cfg, clk, Options{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 2000 {
			e.sweepLapsed()
		}
	}()
	ids := []Identity{IPID(mustAddr("10.0.0.11"))}
	for i := range 2000 {
		tx := e.Begin(ids)
		tx.AddRcpt()
		clk.Add(35 * time.Second)
		tx.AddRcpt()
		clk.Add(30 * time.Second) // lapsed: the sweep or Message finds it
		if i%2 == 0 {
			tx.Message()
			tx.Commit()
		} else {
			tx.Abort()
		}
	}
	<-done
	s, _ := e.Sender("ip:10.0.0.11")
	if s.Usage[0].Used != 2000 {
		t.Fatalf("used %d (reservations left or lost), want 2000", s.Usage[0].Used)
	}
}

// The normal form is stable: normalizing twice changes nothing, and an
// address it accepts gives ids with no upper-case ASCII and no trailing
// dot in the domain.
func FuzzNormalAddress(f *testing.F) {
	for _, s := range []string{"spam@x.org.", "SPAM@X.ORG.", "a@[x.org]", "a@[IPv6:2001:DB8::1]", "a@[1.2.3.4]", "a@b@c.", "@", "", "x@..", "a@[", "a@]"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, addr string) {
		norm, ok := NormalAddress(addr)
		again, ok2 := NormalAddress(norm)
		if ok && (!ok2 || again != norm) {
			t.Fatalf("NormalAddress(%q) = %q, then %q %v", addr, norm, again, ok2)
		}
		if !ok {
			return
		}
		if strings.ContainsAny(norm, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") {
			t.Fatalf("upper case left in %q", norm)
		}
		if at := strings.LastIndexByte(norm, '@'); at >= 0 && at < len(norm)-1 && strings.HasSuffix(norm, ".") && strings.Trim(norm[at+1:], ".") != "" {
			t.Fatalf("trailing dot left in %q", norm)
		}
		if d, ok := DomainID(addr); ok && !strings.HasPrefix(SenderID(addr).ID, "sender:") {
			t.Fatalf("DomainID %q without a sender id", d.ID)
		}
	})
}

// A script id and its uid find each other whatever the path holds.
func FuzzScriptID(f *testing.F) {
	f.Add("web1", uint32(1001), "form.php")
	f.Add("local", uint32(0), "/var/www/a:b c.php")
	f.Fuzz(func(t *testing.T, origin string, uid uint32, path string) {
		if origin == "" || strings.Contains(origin, ":") {
			return // web server names hold no ':' (config checks them)
		}
		id := ScriptID(origin, uid, "", path)
		u, ok := UIDOfScript(id.ID)
		if !ok || u != WebUID(origin, uid, "", "").ID {
			t.Fatalf("UIDOfScript(%q) = %q %v", id.ID, u, ok)
		}
		if s, ok := ScriptOfUID(u, path); !ok || s != id.ID {
			t.Fatalf("ScriptOfUID(%q, %q) = %q %v, want %q", u, path, s, ok, id.ID)
		}
	})
}
