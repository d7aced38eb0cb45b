package relay

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/sys/unix"

	"relay/config"
)

// connInfo is what relay learns about a connection when it accepts it.
type connInfo struct {
	id        uint64
	st        *settings  // the configuration the connection was accepted under
	remote    netip.Addr // client address, unmapped; invalid on the local socket
	uid       uint32     // peer uid from SO_PEERCRED, local socket only
	local     bool
	rule      config.TCPRule // tcprules line that matched
	ruled     bool           // rule is set
	databytes int64          // databytes, or the tcprules DATABYTES of this client
}

// trackedConn is an accepted connection that gives its slot back when it is
// closed. On TCP it also ends the session at relay.max_session: every
// deadline go-smtp sets (per command, from relay.timeout) is cut to end,
// so a client that drips a byte at a time is still cut off.
type trackedConn struct {
	net.Conn
	info    connInfo
	release func()
	once    sync.Once
	smtp    *smtp.Server // its go-smtp server; set under Server.connMu
	end     time.Time    // zero: no session limit (the local socket)
}

// sessionEndGrace lets the reply go out that go-smtp writes when a read
// hits the session's end ("421 4.4.2 Idle timeout").
const sessionEndGrace = time.Second

func (c *trackedConn) SetDeadline(t time.Time) error {
	if c.end.IsZero() {
		return c.Conn.SetDeadline(t)
	}
	if err := c.Conn.SetReadDeadline(capTime(t, c.end)); err != nil {
		return err
	}
	return c.Conn.SetWriteDeadline(capTime(t, c.end.Add(sessionEndGrace)))
}

func (c *trackedConn) SetReadDeadline(t time.Time) error {
	if c.end.IsZero() {
		return c.Conn.SetReadDeadline(t)
	}
	return c.Conn.SetReadDeadline(capTime(t, c.end))
}

func (c *trackedConn) SetWriteDeadline(t time.Time) error {
	if c.end.IsZero() {
		return c.Conn.SetWriteDeadline(t)
	}
	return c.Conn.SetWriteDeadline(capTime(t, c.end.Add(sessionEndGrace)))
}

// capTime is t, or limit when t is later or zero (no deadline).
func capTime(t, limit time.Time) time.Time {
	if t.IsZero() || t.After(limit) {
		return limit
	}
	return t
}

func (c *trackedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// trackedConnOf finds relay's trackedConn under a connection go-smtp has
// (a *tls.Conn after STARTTLS or on smtps).
func trackedConnOf(c net.Conn) (*trackedConn, bool) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if sn, ok := c.(*checkSniffer); ok {
		c = sn.trackedConn
	}
	t, ok := c.(*trackedConn)
	return t, ok
}

// connInfoOf finds relay's connInfo under what go-smtp hands a session.
func connInfoOf(c net.Conn) (connInfo, bool) {
	t, ok := trackedConnOf(c)
	if !ok {
		return connInfo{}, false
	}
	return t.info, true
}

// gateListener applies the connection-level rules before go-smtp writes its
// banner: tcprules deny (closed without a word, as tcpserver does),
// max_connections and max_connections_per_ip ("421 4.7.0 too many
// connections", then closed), and it reads the peer's uid on the local
// socket. The local socket has its own budget, local.max_connections:
// however many TCP clients hold their slots, local scripts still get in;
// its connections may carry a check instead of SMTP (checkSniffer).
type gateListener struct {
	net.Listener
	srv   *Server
	local bool
	tls   bool // smtps: nothing may be written in clear text
}

func (l *gateListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		tc := l.srv.admit(c, l.local, l.tls)
		switch {
		case tc == nil:
		case l.local:
			return &checkSniffer{trackedConn: tc, srv: l.srv}, nil
		default:
			return tc, nil
		}
	}
}

// tooManyConnections is written by the gate before closing a connection
// over a limit.
const tooManyConnections = "421 4.7.0 too many connections\r\n"

// admit decides on one new connection; it returns nil after closing it.
func (s *Server) admit(c net.Conn, local, isTLS bool) *trackedConn {
	st := s.settings.Load()
	info := connInfo{id: s.nextConnID.Add(1), st: st, local: local, databytes: st.databytes}
	if local {
		uid, err := peerUID(c)
		if err != nil {
			s.log.Warn("local socket: no peer credentials", "err", err)
			c.Close()
			return nil
		}
		info.uid = uid
	} else {
		ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
		if err != nil {
			c.Close()
			return nil
		}
		info.remote = ap.Addr().Unmap().WithZone("")
		if st.tcpRules != nil {
			info.rule, info.ruled = st.tcpRules(info.remote)
			if info.ruled && !info.rule.Allow {
				s.log.Info("tcprules deny", "remote", info.remote.String())
				s.metrics.connRefused.WithLabelValues(refusedTCPRules).Inc()
				c.Close()
				return nil
			}
			if v, ok := info.rule.Env["DATABYTES"]; ok && info.ruled {
				if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil && n >= 0 {
					info.databytes = n
				}
			}
		}
	}
	// A [[webserver]]'s qmail-remote opens a connection per message; its
	// mail is counted per uid and script, so its address is not rate
	// limited as a whole.
	if !local && st.webserverAt(info.remote) == nil && !s.connAllowed(info.remote) {
		s.log.Info("too many connections from the address", "remote", info.remote.String())
		s.metrics.connRefused.WithLabelValues(refusedConnRate).Inc()
		refuse(c, isTLS, tooManyFromAddress)
		return nil
	}
	key := clientKeyOf(info)
	total, limit := &s.connTotal, st.maxConns
	if local {
		total, limit = &s.localTotal, st.maxLocalConns
	}
	s.connMu.Lock()
	over := (limit > 0 && *total >= limit) ||
		(st.maxConnsPerIP > 0 && s.connPerClient[key] >= st.maxConnsPerIP)
	if !over {
		*total++
		s.connPerClient[key]++
	}
	s.connMu.Unlock()
	if over {
		s.log.Info("too many connections", "remote", info.remote.String(), "local", local)
		s.metrics.connRefused.WithLabelValues(refusedMaxConnections).Inc()
		refuse(c, isTLS, tooManyConnections)
		return nil
	}
	s.metrics.connectionsOpen.Inc()
	tc := &trackedConn{Conn: c, info: info}
	if !local && st.maxSession > 0 {
		tc.end = time.Now().Add(st.maxSession)
		tc.SetDeadline(time.Time{})
	}
	tc.release = func() {
		s.metrics.connectionsOpen.Dec()
		s.connMu.Lock()
		delete(s.conns, tc)
		*total--
		if s.connPerClient[key]--; s.connPerClient[key] <= 0 {
			delete(s.connPerClient, key)
		}
		s.connMu.Unlock()
	}
	s.connMu.Lock()
	s.conns[tc] = struct{}{}
	s.connMu.Unlock()
	return tc
}

// refuse writes reply (not on implicit TLS, where nothing may be written
// in clear text) and closes c.
func refuse(c net.Conn, isTLS bool, reply string) {
	if !isTLS {
		c.SetWriteDeadline(time.Now().Add(time.Second))
		c.Write([]byte(reply))
	}
	c.Close()
}

// connKey is what max_connections_per_ip counts: the client address on
// the network, the peer's uid on the local socket (so that one local user
// cannot take every slot and make `relay qq` wait for everyone else).
type connKey struct {
	ip    netip.Prefix
	uid   uint32
	local bool
}

func clientKeyOf(info connInfo) connKey {
	if info.local {
		return connKey{uid: info.uid, local: true}
	}
	return connKey{ip: ipKey(info.remote)}
}

// ipKey groups client addresses for max_connections_per_ip the way ip:
// identities are grouped: IPv6 by /64, which one customer controls whole.
func ipKey(a netip.Addr) netip.Prefix {
	if !a.IsValid() {
		return netip.Prefix{}
	}
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.Prefix(64)
	return p
}

// peerUID reads the uid of the process at the other end of a unix socket
// (SO_PEERCRED, unix(7)); the kernel fills it in, so it cannot be forged.
func peerUID(c net.Conn) (uint32, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, fmt.Errorf("not a unix socket: %T", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, credErr
	}
	return cred.Uid, nil
}
