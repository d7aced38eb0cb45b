package config

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// ReadPasswd reads a file in /etc/passwd format (name:pw:uid:gid:...)
// into uid -> account name. The first name of a uid wins, as getpwuid
// would return it; blank lines, '#' comments and NIS "+"/"-" lines are
// skipped. Bad lines are reported as Errors with their line (File empty).
func ReadPasswd(r io.Reader) (map[uint32]string, error) {
	accounts := map[uint32]string{}
	var errs Errors
	err := eachLine(r, func(lineNo int, line string) {
		if line[0] == '+' || line[0] == '-' {
			return
		}
		f := strings.SplitN(line, ":", 4)
		if len(f) < 4 || f[0] == "" {
			errs = append(errs, Error{Line: lineNo, Col: 1, Msg: "want name:password:uid:gid:..."})
			return
		}
		uid, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			errs = append(errs, Error{Line: lineNo, Col: len(f[0]) + len(f[1]) + 3, Msg: fmt.Sprintf("uid %q is not a number", f[2])})
			return
		}
		if _, dup := accounts[uint32(uid)]; !dup {
			accounts[uint32(uid)] = f[0]
		}
	})
	if err != nil {
		errs = append(errs, Error{Msg: err.Error()})
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return accounts, nil
}

// ReadPasswdFile is ReadPasswd on the file at path (e.g. /etc/passwd).
func ReadPasswdFile(path string) (map[uint32]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ReadPasswd(f)
}

// ReadUsers reads an auth.users_file: "login:bcrypt-hash" lines, blank
// lines and '#' comments skipped. Each hash must be a bcrypt hash with a
// valid cost; a login may appear once. Bad lines are reported as Errors
// with their line (File empty).
func ReadUsers(r io.Reader) (map[string][]byte, error) {
	users := map[string][]byte{}
	var errs Errors
	err := eachLine(r, func(lineNo int, line string) {
		login, hash, ok := strings.Cut(line, ":")
		switch {
		case !ok || login == "":
			errs = append(errs, Error{Line: lineNo, Col: 1, Msg: "want login:bcrypt-hash"})
		case users[login] != nil:
			errs = append(errs, Error{Line: lineNo, Col: 1, Msg: fmt.Sprintf("login %q appears twice", login)})
		default:
			if _, err := bcrypt.Cost([]byte(hash)); err != nil {
				errs = append(errs, Error{Line: lineNo, Col: len(login) + 2, Msg: fmt.Sprintf("login %q: not a bcrypt hash: %v", login, err)})
				return
			}
			users[login] = []byte(hash)
		}
	})
	if err != nil {
		errs = append(errs, Error{Msg: err.Error()})
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return users, nil
}

// eachLine calls fn with every line that is not blank or a '#' comment,
// trailing whitespace and CR removed.
func eachLine(r io.Reader, fn func(lineNo int, line string)) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimRight(sc.Text(), " \t\r")
		if line == "" || line[0] == '#' {
			continue
		}
		fn(n, line)
	}
	return sc.Err()
}

// readExternal reads every file the config names, in Load's second phase.
// A file that cannot be opened is reported at the key naming it; a bad
// line inside a file at that file's line.
func (l *loaded) readExternal(pos *positions) Errors {
	c := l.cfg
	var errs Errors
	// place turns errors from a named file into errors of the config:
	// positionless ones go to the key's place in the config file.
	place := func(key, file string, err error) {
		es, ok := err.(Errors)
		if !ok {
			es = Errors{{Msg: err.Error()}}
		}
		for _, e := range es {
			e.Key = key
			if e.File == "" {
				e.File = file
			}
			if e.Line == 0 {
				line, col := pos.pos(key)
				if !strings.Contains(e.Msg, e.File) {
					e.Msg = e.File + ": " + e.Msg
				}
				e.File, e.Line, e.Col = c.Path, line, col
			}
			errs = append(errs, e)
		}
	}
	open := func(key, path string, parse func(io.Reader) error) {
		f, err := os.Open(path)
		if err != nil {
			place(key, path, err)
			return
		}
		defer f.Close()
		if err := parse(f); err != nil {
			place(key, path, err)
		}
	}

	control, err := ReadControl(c)
	if err != nil {
		place("relay.qmail_control_dir", c.Relay.QmailControlDir, err)
		control = NewControl(c)
	}
	resolveHostname(c, control.Me)
	control.Me = c.Hostname
	if c.Relay.QmailControlDir == "" {
		control.Greeting = c.Hostname
	}
	c.Control = control

	if p := c.Relay.TCPRules; p != "" {
		open("relay.tcprules", p, func(r io.Reader) (err error) {
			c.TCPRules, err = ParseTCPRules(p, r)
			return err
		})
	}
	if p := c.Auth.UsersFile; p != "" {
		open("auth.users_file", p, func(r io.Reader) (err error) {
			c.Auth.Users, err = ReadUsers(r)
			return err
		})
	}
	for i := range c.Webservers {
		w := &c.Webservers[i]
		if w.Passwd == "" {
			continue
		}
		open(fmt.Sprintf("webserver[%d].passwd", i), w.Passwd, func(r io.Reader) (err error) {
			w.Accounts, err = ReadPasswd(r)
			return err
		})
	}
	if c.TLS.Cert != "" && c.TLS.Key != "" {
		if _, err := tls.LoadX509KeyPair(c.TLS.Cert, c.TLS.Key); err != nil {
			place("tls.cert", c.TLS.Cert, err)
		}
	}
	if c.Admin.TLSCert != "" && c.Admin.TLSKey != "" {
		if _, err := tls.LoadX509KeyPair(c.Admin.TLSCert, c.Admin.TLSKey); err != nil {
			place("admin.tls_cert", c.Admin.TLSCert, err)
		}
	}
	return errs
}
