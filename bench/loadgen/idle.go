package loadgen

import (
	"bufio"
	"net"
	"sync"
	"time"

	"relay/bench/proc"
)

// IdleConfig is an idle-connection run: open Conns connections, read each
// banner, hold them all for Hold, then close them.
type IdleConfig struct {
	Addr      string
	Conns     int
	Dialers   int           // connections opened at once (default 50)
	Hold      time.Duration // how long all of them stay open
	Timeout   time.Duration // per dial and banner (default 30s)
	ServerPID int           // >0: measure this process's memory
}

// IdleResult is what an idle run measured.
type IdleResult struct {
	Opened     int     `json:"opened"` // connections that got a 220 banner
	Failed     int     `json:"failed"`
	FirstError string  `json:"first_error,omitempty"`
	RSSBefore  int64   `json:"rss_before"` // server VmRSS before the first dial
	RSSHeld    int64   `json:"rss_held"`   // server VmRSS with every connection open
	PeakRSS    int64   `json:"peak_rss"`   // server VmHWM at the end of the hold
	Seconds    float64 `json:"seconds"`    // to open them all
}

// Idle holds many idle SMTP sessions open and measures the server's memory.
func Idle(cfg IdleConfig) (IdleResult, error) {
	if cfg.Dialers <= 0 {
		cfg.Dialers = 50
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	var res IdleResult
	if cfg.ServerPID > 0 {
		m, err := proc.ReadMemory(cfg.ServerPID)
		if err != nil {
			return res, err
		}
		res.RSSBefore = m.RSS
	}
	conns := make([]net.Conn, cfg.Conns)
	errs := make([]error, cfg.Conns)
	start := time.Now()
	var wg sync.WaitGroup
	sem := make(chan struct{}, cfg.Dialers)
	for i := range conns {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			conns[i], errs[i] = dialIdle(cfg.Addr, cfg.Timeout)
		})
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	for i, c := range conns {
		if c != nil {
			res.Opened++
			continue
		}
		res.Failed++
		if res.FirstError == "" {
			res.FirstError = errs[i].Error()
		}
	}
	time.Sleep(cfg.Hold)
	if cfg.ServerPID > 0 {
		if m, err := proc.ReadMemory(cfg.ServerPID); err == nil {
			res.RSSHeld, res.PeakRSS = m.RSS, m.Peak
		}
	}
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	return res, nil
}

// dialIdle connects and reads the banner; the session then sits idle.
func dialIdle(addr string, timeout time.Duration) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(timeout))
	s := &session{conn: c, r: bufio.NewReaderSize(c, 512)}
	code, _, err := s.reply()
	if err == nil && code != 220 {
		err = replyErr("banner", code, nil)
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}
