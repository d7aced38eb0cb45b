package config

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Control is what relay takes from qmail's control directory (or, when
// relay.qmail_control_dir is empty, from relay.toml itself).
//
// Where a control file and relay.toml both give a value the control file
// wins, as qmail-smtpd would read it: databytes over
// relay.max_message_bytes, timeoutsmtpd over relay.timeout, me over an
// empty hostname. rcpthosts and morercpthosts are merged with
// relay.local_domains (which Load leaves empty when the file does not
// write it: qmail's lists are then the whole list).
//
// Two differences from qmail-smtpd, both on the safe side: an absent
// rcpthosts does not make an open relay (only local_domains are then
// accepted from anyone), and morercpthosts is read as the text file
// qmail-newmrh compiles, never morercpthosts.cdb, whether or not rcpthosts
// exists.
type Control struct {
	Me           string        // hostname, else control/me, else os.Hostname
	Greeting     string        // control/smtpgreeting first line, else Me
	Databytes    int64         // control/databytes, else relay.max_message_bytes; 0 = unlimited
	TimeoutSMTPD time.Duration // control/timeoutsmtpd, else relay.timeout
	rcptHosts    map[string]bool
	badMailFrom  map[string]bool
}

// NewControl derives Control from relay.toml alone, without reading any
// control file: Me and Greeting are cfg.Hostname, rcpthosts are
// relay.local_domains, badmailfrom is empty.
func NewControl(cfg *Config) *Control {
	c := &Control{
		Me:           cfg.Hostname,
		Greeting:     cfg.Hostname,
		Databytes:    cfg.Relay.MaxMessageBytes,
		TimeoutSMTPD: cfg.Relay.Timeout.Duration,
		rcptHosts:    map[string]bool{},
		badMailFrom:  map[string]bool{},
	}
	for _, d := range cfg.Relay.LocalDomains {
		c.rcptHosts[strings.ToLower(d)] = true
	}
	return c
}

// ControlFiles names the files of qmail's control directory that
// ReadControl reads: the daemon must be able to read each that exists.
func ControlFiles() []string {
	return []string{"me", "smtpgreeting", "rcpthosts", "morercpthosts", "badmailfrom", "databytes", "timeoutsmtpd"}
}

// ReadControl reads relay.qmail_control_dir (when set) on top of
// NewControl(cfg). Missing files keep relay.toml's values; unreadable or
// malformed ones are reported as Errors at the bad line. It does not
// change cfg, so callers may re-read the directory at any time (qmail-smtpd
// reads it at the start of every session); Load resolves an empty
// cfg.Hostname from the result.
func ReadControl(cfg *Config) (*Control, error) {
	c := NewControl(cfg)
	dir := cfg.Relay.QmailControlDir
	if dir == "" {
		return c, nil
	}
	var errs Errors
	if st, err := os.Stat(dir); err != nil {
		return nil, Errors{{File: dir, Msg: err.Error()}}
	} else if !st.IsDir() {
		return nil, Errors{{File: dir, Msg: "not a directory"}}
	}
	// read returns the file's lines after the first (for list files)
	// or its first line, and whether it exists.
	read := func(name string, list bool) ([]string, bool) {
		path := filepath.Join(dir, name)
		f, err := os.Open(path)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, false
		}
		if err != nil {
			errs = append(errs, Error{File: path, Msg: err.Error()})
			return nil, false
		}
		defer f.Close()
		if list {
			lines, err := ParseControlList(f)
			if err != nil {
				errs = append(errs, Error{File: path, Msg: err.Error()})
				return nil, false
			}
			return lines, true
		}
		line, err := readControlLine(f)
		if err != nil {
			errs = append(errs, Error{File: path, Line: 1, Col: 1, Msg: err.Error()})
			return nil, false
		}
		return []string{line}, true
	}
	if me, ok := read("me", false); ok && cfg.Hostname == "" {
		c.Me = me[0]
	}
	if c.Me == "" {
		if h, err := os.Hostname(); err == nil {
			c.Me = h
		}
	}
	c.Greeting = c.Me
	if g, ok := read("smtpgreeting", false); ok {
		c.Greeting = g[0]
	}
	for _, name := range []string{"rcpthosts", "morercpthosts"} {
		hosts, _ := read(name, true)
		for _, h := range hosts {
			c.rcptHosts[h] = true
		}
	}
	bad, _ := read("badmailfrom", true)
	for _, b := range bad {
		c.badMailFrom[b] = true
	}
	if v, ok := read("databytes", false); ok {
		n, err := parseControlInt(v[0])
		if err != nil {
			errs = append(errs, Error{File: filepath.Join(dir, "databytes"), Line: 1, Col: 1, Msg: err.Error()})
		} else {
			c.Databytes = max(n, 0)
		}
	}
	if v, ok := read("timeoutsmtpd", false); ok {
		n, err := parseControlInt(v[0])
		switch {
		case err != nil:
			errs = append(errs, Error{File: filepath.Join(dir, "timeoutsmtpd"), Line: 1, Col: 1, Msg: err.Error()})
		case n <= 0:
			c.TimeoutSMTPD = time.Second // qmail-smtpd: "if (timeout <= 0) timeout = 1;"
		case n > int64(maxWindow/time.Second):
			errs = append(errs, Error{File: filepath.Join(dir, "timeoutsmtpd"), Line: 1, Col: 1, Msg: "timeout too large"})
		default:
			c.TimeoutSMTPD = time.Duration(n) * time.Second
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return c, nil
}

// readControlMe returns the first line of dir/me, or "" when dir is empty
// or the file cannot be read.
func readControlMe(dir string) string {
	if dir == "" {
		return ""
	}
	f, err := os.Open(filepath.Join(dir, "me"))
	if err != nil {
		return ""
	}
	defer f.Close()
	me, err := readControlLine(f)
	if err != nil {
		return ""
	}
	return me
}

// parseControlInt reads a qmail control integer (databytes, timeoutsmtpd).
func parseControlInt(s string) (int64, error) {
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a whole number", s)
	}
	return n, nil
}

// readControlLine returns the first line of a one-line control file with
// trailing spaces, tabs and CR stripped (qmail control_readline).
func readControlLine(r io.Reader) (string, error) {
	br := bufio.NewReader(io.LimitReader(r, 64<<10))
	line, err := br.ReadString('\n')
	if err != nil && err != io.EOF {
		return "", err
	}
	return strings.TrimRight(line, " \t\r\n"), nil
}

// ParseControlList reads a qmail list control file (rcpthosts,
// morercpthosts, badmailfrom) the way qmail's control_readfile does:
// one entry per line, trailing spaces and tabs stripped, blank lines and
// lines starting with '#' ignored. Entries are lowercased because every
// list relay reads is matched case-insensitively.
func ParseControlList(r io.Reader) ([]string, error) {
	var out []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), " \t\r")
		if line == "" || line[0] == '#' {
			continue
		}
		out = append(out, strings.ToLower(line))
	}
	return out, sc.Err()
}

// RcptHostAllowed reports whether mail to domain is accepted from anyone
// (qmail rcpthosts semantics: the whole domain, or any suffix starting at
// a '.' that is listed with its leading dot). Case-insensitive. A trailing
// dot is not stripped: "example.test." does not match "example.test", as
// in qmail. The caller handles a recipient without '@' (qmail allows it).
func (c *Control) RcptHostAllowed(domain string) bool {
	if domain == "" {
		return false
	}
	// ASCII folding only, as qmail's case_lowerb: Unicode lowercasing
	// would turn a foreign domain into a listed one (U+212A KELVIN SIGN
	// becomes 'k').
	domain = asciiLower(domain)
	if c.rcptHosts[domain] {
		return true
	}
	for i := 1; i < len(domain); i++ {
		if domain[i] == '.' && c.rcptHosts[domain[i:]] {
			return true
		}
	}
	return false
}

// asciiLower lowercases A-Z only.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// BadMailFrom reports whether the envelope sender is in badmailfrom:
// the exact address, or an "@domain" line matching the sender from its
// last '@' on (qmail-smtpd bmfcheck). Case-insensitive.
func (c *Control) BadMailFrom(sender string) bool {
	if len(c.badMailFrom) == 0 || sender == "" {
		return false
	}
	sender = strings.ToLower(sender)
	if c.badMailFrom[sender] {
		return true
	}
	if i := strings.LastIndexByte(sender, '@'); i >= 0 {
		return c.badMailFrom[sender[i:]]
	}
	return false
}
