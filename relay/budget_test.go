package relay

import (
	"strings"
	"testing"
	"time"

	"relay/config"
)

// Issue 12 point 4: the local socket's own connection budget, and the
// session limit on TCP.

// TCP clients holding every slot of relay.max_connections do not keep
// local scripts out: the local socket counts against local.max_connections.
func TestLocalSocketHasItsOwnBudget(t *testing.T) {
	path := sockPath(t)
	cfg := testConfig(config.Listener{Addr: "127.0.0.1:0", Mode: config.ModeSMTP}, config.Listener{Addr: path, Mode: config.ModeLocal})
	cfg.Relay.MaxConnections = 3
	cfg.Relay.MaxConnectionsPerIP = 1
	cfg.Local.MaxConnections = 2
	s := testServer(t, cfg, Deps{}, nil)
	addr := tcpAddr(s, 0)
	for _, ip := range []string{"127.0.0.11", "127.0.0.12", "127.0.0.13"} {
		if got := dialRawFrom(t, "tcp", addr, ip).reply(); !strings.HasPrefix(got, "220 ") {
			t.Fatalf("tcp from %s: %q", ip, got)
		}
	}
	if got := dialRawFrom(t, "tcp", addr, "127.0.0.14").reply(); got != "421 4.7.0 too many connections\r\n" {
		t.Fatalf("tcp over max_connections: %q", got)
	}
	// With max_connections_per_ip = 1, each uid gets one: this test's
	// process has one uid, so the second local connection is over the
	// per-uid cap, not the local budget. Lift it to see the budget.
	cfg2 := *cfg
	cfg2.Relay.MaxConnectionsPerIP = 0
	if err := s.Reload(&cfg2); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		c := dialRaw(t, "unix", path)
		if got := c.reply(); !strings.HasPrefix(got, "220 ") {
			t.Fatalf("local %d with every TCP slot taken: %q", i, got)
		}
		c.expect("EHLO localhost", "250")
	}
	if got := dialRaw(t, "unix", path).reply(); got != "421 4.7.0 too many connections\r\n" {
		t.Fatalf("local over local.max_connections: %q", got)
	}
	// Nor did the local connections take TCP slots back.
	if got := dialRawFrom(t, "tcp", addr, "127.0.0.15").reply(); got != "421 4.7.0 too many connections\r\n" {
		t.Fatalf("tcp: %q", got)
	}
}

// A client that keeps the session busy (a NOOP well within every timeout)
// is still cut off at relay.max_session; the local socket is not.
func TestMaxSession(t *testing.T) {
	path := sockPath(t)
	cfg := testConfig(config.Listener{Addr: "127.0.0.1:0", Mode: config.ModeSMTP}, config.Listener{Addr: path, Mode: config.ModeLocal})
	cfg.Relay.MaxSession = config.Duration{Duration: 1500 * time.Millisecond}
	s := testServer(t, cfg, Deps{}, nil)
	c := dialRaw(t, "tcp", tcpAddr(s, 0))
	c.hello("dripper")
	l := dialRaw(t, "unix", path)
	l.hello("localhost")
	var last string
	ok := 0
	for i := 0; i < 200; i++ { // 10 s at most
		c.send("NOOP\r\n")
		if last = c.reply(); !strings.HasPrefix(last, "250") {
			break
		}
		ok++
		time.Sleep(50 * time.Millisecond)
	}
	if ok == 0 || !strings.HasPrefix(last, "421 4.4.2") && last != "EOF" {
		t.Fatalf("after %d NOOPs answered: last reply %q, want the session ended", ok, last)
	}
	l.expect("NOOP", "250")
}
