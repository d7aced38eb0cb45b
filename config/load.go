package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// Load reads, decodes (unknown keys rejected), defaults and validates the
// file at path, then reads the files it names: the qmail control directory,
// the tcprules text, auth.users_file, each webserver's passwd file and the
// TLS key pair. On failure the error is an Errors value listing every
// problem found, each at its file:line:col.
//
// Keys left out of the file keep their Default() value, with two
// exceptions so that a file says all of what it caps: when the file has a
// [policy.limits] table (or any [policy.limits.<kind>]), only the kinds it
// writes are capped; arrays ([[listen]], relay_networks, ...) written in the
// file replace the default array as a whole.
//
// Relative paths in the file (data_dir, local listener sockets,
// delivery.maildir, admin.token_file, auth.users_file, relay.tcprules,
// relay.qmail_control_dir, webserver passwd files, tls.cert and tls.key,
// admin.tls_cert and admin.tls_key, dkim.keys_dir)
// are taken relative to the directory holding the config file, and Load
// makes them absolute.
func Load(path string) (*Config, error) {
	cfg, errs, fatal := load(path)
	if fatal {
		return nil, errs
	}
	errs = append(errs, cfg.readExternal(cfg.pos)...)
	if len(errs) > 0 {
		return nil, errs
	}
	return cfg.cfg, nil
}

// LoadFile decodes and validates path like Load but reads none of the
// files it names but control/me: tcprules, users_file, passwd files, TLS
// keys and the other control files are left alone (cfg.Control is then
// derived from the TOML alone, cfg.TCPRules is nil). It is for `relay qq`
// and `relay sendmail`, which run as arbitrary users who may not be
// allowed to read those. An empty hostname is taken from control/me, as
// Load takes it (world-readable in qmail; when it cannot be read, from
// the system).
func LoadFile(path string) (*Config, error) {
	cfg, errs, _ := load(path)
	if len(errs) > 0 {
		return nil, errs
	}
	resolveHostname(cfg.cfg, readControlMe(cfg.cfg.Relay.QmailControlDir))
	cfg.cfg.Control = NewControl(cfg.cfg)
	return cfg.cfg, nil
}

// loaded is a decoded config with what is needed to report later problems
// at their place in the file.
type loaded struct {
	cfg *Config
	pos *positions
}

func load(path string) (*loaded, Errors, bool) {
	doc, err := os.ReadFile(path)
	if err != nil {
		return nil, Errors{{File: path, Line: 1, Col: 1, Msg: err.Error()}}, true
	}
	cfg, errs, fatal := decode(path, doc)
	if fatal {
		return nil, errs, true
	}
	dir, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return nil, append(errs, Error{File: path, Line: 1, Col: 1, Msg: err.Error()}), true
	}
	cfg.cfg.resolvePaths(dir)
	cfg.cfg.Path = path
	return cfg, errs, false
}

// decode parses doc on top of the defaults and validates it; path is only
// used in error positions. A value go-toml cannot decode (wrong type, bad
// rate or duration) is reported, its whole top-level key/value blanked out
// and the document decoded again, so that one bad value does not hide the
// other problems. Syntax errors are fatal: nothing after them is known.
func decode(path string, doc []byte) (*loaded, Errors, bool) {
	pos := mapPositions(doc)
	var errs Errors
	var cfg *Config
	blanked := map[string]bool{} // keys whose value could not be decoded
	for attempt := 0; ; attempt++ {
		cfg = defaults()
		if pos.has("policy.limits") {
			cfg.Policy.Limits = KindLimits{}
		}
		err := toml.NewDecoder(bytes.NewReader(doc)).DisallowUnknownFields().Decode(cfg)
		if err == nil {
			break
		}
		found, fatal := decodeErrors(path, err, pos)
		errs = append(errs, found...)
		if !fatal {
			break
		}
		// A DecodeError has a place; so has a bare value given to a key
		// that reads text (textValueError), found by its key.
		var de *toml.DecodeError
		if !pos.syntaxOK || attempt == maxDecodeRetries || (!errors.As(err, &de) && found[0].Key == "") {
			return nil, errs, true
		}
		blank, key, ok := pos.blankExpr(doc, found[0].Line, found[0].Col)
		if !ok {
			return nil, errs, true
		}
		doc, blanked[key] = blank, true
	}
	fileDefaults(cfg, pos)
	v := &validator{file: path, pos: pos, skip: blanked}
	v.config(cfg)
	errs = append(errs, v.errs...)
	sortErrors(errs)
	sortErrors(v.warns)
	cfg.Warnings = v.warns
	return &loaded{cfg: cfg, pos: pos}, errs, false
}

// fileDefaults sets the defaults that depend on what the file writes:
//   - [[webserver]] require_uid is true unless the entry says otherwise;
//   - with relay.qmail_control_dir set, control/rcpthosts and
//     morercpthosts are the whole list of local domains unless the file
//     writes relay.local_domains too (the built-in "example.com" would
//     otherwise be accepted from anyone);
//   - with relay.tcprules set, relay rights are what tcprules says unless
//     the file writes relay.relay_networks too (the built-in 127.0.0.0/8
//     would otherwise relay as well).
func fileDefaults(cfg *Config, pos *positions) {
	for i := range cfg.Webservers {
		if !pos.has(fmt.Sprintf("webserver[%d].require_uid", i)) {
			cfg.Webservers[i].RequireUID = true
		}
	}
	if cfg.Relay.QmailControlDir != "" && !pos.has("relay.local_domains") {
		cfg.Relay.LocalDomains = nil
	}
	if cfg.Relay.TCPRules != "" && !pos.has("relay.relay_networks") {
		cfg.Relay.RelayNetworks = nil
	}
}

// maxDecodeRetries bounds how many bad values decode reports one by one.
const maxDecodeRetries = 100

// has reports whether the document writes path or anything below it.
func (p *positions) has(path string) bool {
	for k := range p.at {
		if k == path || strings.HasPrefix(k, path+".") || strings.HasPrefix(k, path+"[") {
			return true
		}
	}
	return false
}

// Default returns the embedded defaults: the same values relay.example.toml
// spells out, with relative paths made absolute against the current
// directory, hostname resolved through os.Hostname and Control derived
// from these values.
func Default() *Config {
	cfg := defaults()
	if dir, err := os.Getwd(); err == nil {
		cfg.resolvePaths(dir)
	}
	resolveHostname(cfg, "")
	cfg.Control = NewControl(cfg)
	return cfg
}

// defaults is Default before path and hostname resolution: literally what
// relay.example.toml says.
func defaults() *Config {
	return &Config{
		Hostname: "",
		DataDir:  "./relay-data",
		Listen: []Listener{
			{Addr: "127.0.0.1:2525", Mode: ModeSMTP},
			{Addr: "./relay-data/submit.sock", Mode: ModeLocal},
		},
		Relay: Relay{
			LocalDomains:        []string{"example.com"},
			RelayNetworks:       []string{"127.0.0.0/8", "::1/128"},
			MaxMessageBytes:     10485760,
			MaxRecipients:       100,
			MaxConnections:      1000,
			MaxConnectionsPerIP: 20,
			Timeout:             Duration{1200 * time.Second},
			MaxSession:          Duration{30 * time.Minute},
			ConnRatePerIP:       OptRate{Rate{60, time.Minute}},
		},
		Auth: Auth{
			RequireTLS: true,
			Timeout:    Duration{10 * time.Second},
			FailLimit:  OptRate{Rate{10, 10 * time.Minute}},
		},
		Delivery: Delivery{
			Method:   DeliverMaildir,
			Command:  "/var/qmail/bin/qmail-queue",
			Maildir:  "./relay-data/maildir",
			Timeout:  Duration{60 * time.Second},
			QueueDir: "/var/qmail/queue",
		},
		Local: Local{
			QmailQueue:     "/var/qmail/bin/qmail-queue.orig",
			OnDaemonDown:   "accept",
			ExemptUsers:    []string{"alias", "qmaild", "qmaill", "qmailp", "qmailq", "qmailr", "qmails"},
			MaxConnections: 200,
		},
		Admin: Admin{Listen: "127.0.0.1:8025"},
		DKIM: DKIM{
			Headers:      DefaultDKIMHeaders(),
			UnownedFrom:  FromAccept,
			ForeignDMARC: FromReject,
		},
		Policy: Policy{
			Mode:           PolicyEnforce,
			OverLimit:      OverLimitDefer,
			SuspendAfter:   5,
			SuspendKinds:   DefaultSuspendKinds(),
			ReserveTimeout: Duration{60 * time.Second},
			QueueMax:       10000,
			Limits: KindLimits{
				User: &Limits{
					MaxRcptsPerMsg: 50,
					Rcpts:          []Rate{{100, time.Minute}, {500, time.Hour}, {2000, 24 * time.Hour}},
					Msgs:           []Rate{{200, time.Hour}},
				},
				UID: &Limits{
					MaxRcptsPerMsg: 50,
					Rcpts:          []Rate{{100, time.Minute}, {500, time.Hour}, {2000, 24 * time.Hour}},
					Msgs:           []Rate{{200, time.Hour}},
				},
				Script: &Limits{
					MaxRcptsPerMsg: 50,
					Rcpts:          []Rate{{50, time.Minute}, {250, time.Hour}, {1000, 24 * time.Hour}},
					Msgs:           []Rate{{100, time.Hour}},
				},
				Sender: &Limits{
					Rcpts: []Rate{{1000, time.Hour}, {5000, 24 * time.Hour}},
					Msgs:  []Rate{{500, time.Hour}},
				},
				Domain: &Limits{
					Rcpts: []Rate{{5000, time.Hour}, {20000, 24 * time.Hour}},
				},
				IP: &Limits{
					Rcpts: []Rate{{1000, time.Hour}, {5000, 24 * time.Hour}},
				},
			},
		},
	}
}

// resolvePaths makes every relative file path in cfg absolute against dir.
func (c *Config) resolvePaths(dir string) {
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	abs(&c.DataDir)
	for i := range c.Listen {
		if c.Listen[i].Mode == ModeLocal {
			abs(&c.Listen[i].Addr)
		}
	}
	abs(&c.TLS.Cert)
	abs(&c.TLS.Key)
	abs(&c.Relay.QmailControlDir)
	abs(&c.Relay.TCPRules)
	abs(&c.Auth.UsersFile)
	abs(&c.Delivery.Maildir)
	abs(&c.Admin.TokenFile)
	abs(&c.Admin.TLSCert)
	abs(&c.Admin.TLSKey)
	for i := range c.Webservers {
		abs(&c.Webservers[i].Passwd)
	}
	abs(&c.DKIM.KeysDir)
}

// DefaultDKIMHeaders returns [dkim] headers' default: RFC 6376 §5.4.1's
// list and the list headers receivers look at.
func DefaultDKIMHeaders() []string {
	return []string{"From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID", "In-Reply-To",
		"References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "List-Id", "List-Unsubscribe"}
}

// resolveHostname fills an empty hostname from control/me (me, when not
// empty), then os.Hostname.
func resolveHostname(c *Config, me string) {
	if c.Hostname != "" {
		return
	}
	if me != "" {
		c.Hostname = me
		return
	}
	if h, err := os.Hostname(); err == nil {
		c.Hostname = h
	}
}

var typeMismatch = regexp.MustCompile(`^cannot decode TOML (\w+) into .* of type (\S+)$`)

// friendlyDecodeMessage rewrites go-toml's type errors, which name Go
// types, into what the config file expects.
func friendlyDecodeMessage(msg string) string {
	m := typeMismatch.FindStringSubmatch(msg)
	if m == nil {
		return msg
	}
	want := m[2]
	switch {
	case strings.HasPrefix(want, "[]"):
		want = "an array"
	case want == "string":
		want = "a string"
	case want == "bool":
		want = "true or false"
	case strings.HasPrefix(want, "int") || strings.HasPrefix(want, "uint"):
		want = "an integer"
	case want == "config.Duration":
		want = `a duration string such as "60s"`
	case want == "config.Rate", want == "config.OptRate":
		want = `a rate string such as "500/1h"`
	default:
		want = "a table"
	}
	return "expected " + want + ", not a TOML " + m[1]
}
