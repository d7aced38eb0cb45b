package relay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/emersion/go-sasl"
	"golang.org/x/crypto/bcrypt"

	"relay/config"
)

// Authentication outcomes the SMTP session maps to replies.
var (
	ErrAuthBad       = errors.New("authentication failed")           // 535 5.7.8, after the delay
	ErrAuthTemporary = errors.New("authentication unavailable")      // 454 4.7.0
	ErrAuthLocked    = errors.New("too many failed authentications") // 454 4.7.0: refused for a while
	// The two ways to be over [auth] fail_limit; both are ErrAuthLocked.
	ErrAuthLockedAddress = fmt.Errorf("%w from this address", ErrAuthLocked)
	ErrAuthLockedLogin   = fmt.Errorf("%w for this login", ErrAuthLocked)
)

// Authenticator checks a login and password (checkpassword program or
// users_file) and tracks failures per client address and per login.
type Authenticator interface {
	// Authenticate returns nil, ErrAuthBad, ErrAuthTemporary or an
	// ErrAuthLocked (ErrAuthLockedAddress, ErrAuthLockedLogin). On
	// ErrAuthBad it has already waited the failure delay.
	Authenticate(ctx context.Context, login, password string, remote netip.Addr) error
	// Enabled reports whether any backend (checkpassword or users_file) is configured.
	Enabled() bool
}

// AuthOptions tunes the Authenticator; zero values are production defaults.
type AuthOptions struct {
	FailDelay func(n int) time.Duration // delay before answering the n-th failure held against the client; default grows from 2s
	Now       func() time.Time
	// Hostname goes into the checkpassword timestamp field; default os.Hostname().
	Hostname string
}

// Defaults for AuthOptions and config.Auth.
const (
	defaultCheckpasswordTimeout = 10 * time.Second
	failDelayStep               = 2 * time.Second
	failDelayMax                = 10 * time.Second

	// checkpasswordMaxInput is what a checkpassword program reads from
	// fd 3 at most (cr.yp.to/checkpwd/interface.html).
	checkpasswordMaxInput = 512
	// checkpasswordTempFail is the interface's "temporary problem" exit code.
	checkpasswordTempFail = 111
)

// defaultFailDelay waits 2s after the first failure, 4s after the second,
// and so on up to 10s.
func defaultFailDelay(n int) time.Duration {
	if n >= int(failDelayMax/failDelayStep) {
		return failDelayMax
	}
	return time.Duration(n) * failDelayStep
}

// authenticator implements Authenticator.
type authenticator struct {
	usersFile bool              // users_file is configured
	users     map[string][]byte // login → bcrypt hash, from users_file
	dummyHash []byte            // compared for unknown logins so timing does not reveal them

	checkpassword []string // program and arguments; empty: none
	timeout       time.Duration
	hostname      string

	failDelay func(n int) time.Duration
	now       func() time.Time
	// [auth] fail_limit: failures per client address (IPv6 by /64) and
	// per login (lowercased); both nil when it is off.
	byAddress *limiterTable[netip.Prefix]
	byLogin   *limiterTable[string]
}

// NewAuthenticator builds the Authenticator for cfg.
//
// A login listed in users_file is decided by its bcrypt hash alone; any other
// login goes to the checkpassword program when one is configured.
// cfg.Checkpassword is split on spaces; a program given without arguments
// gets /bin/true, the program a checkpassword execs on success.
func NewAuthenticator(cfg config.Auth, opts AuthOptions) Authenticator {
	return newAuthenticator(cfg, opts)
}

func newAuthenticator(cfg config.Auth, opts AuthOptions) *authenticator {
	a := &authenticator{
		checkpassword: strings.Fields(cfg.Checkpassword),
		timeout:       cfg.Timeout.Duration,
		hostname:      opts.Hostname,
		failDelay:     opts.FailDelay,
		now:           opts.Now,
	}
	if len(a.checkpassword) == 1 {
		a.checkpassword = append(a.checkpassword, "/bin/true")
	}
	if a.timeout <= 0 {
		a.timeout = defaultCheckpasswordTimeout
	}
	if a.hostname == "" {
		a.hostname, _ = os.Hostname()
		if a.hostname == "" {
			a.hostname = "localhost"
		}
	}
	if a.failDelay == nil {
		a.failDelay = defaultFailDelay
	}
	if a.now == nil {
		a.now = time.Now
	}
	a.byAddress = newLimiterTable[netip.Prefix](cfg.FailLimit, maxLimiterKeys)
	a.byLogin = newLimiterTable[string](cfg.FailLimit, maxLimiterKeys)

	if cfg.UsersFile != "" || len(cfg.Users) > 0 {
		a.usersFile, a.users = true, cfg.Users
		cost := bcrypt.MinCost
		for _, hash := range cfg.Users {
			if c, err := bcrypt.Cost(hash); err == nil && c > cost {
				cost = c
			}
		}
		// The dummy costs as much as the dearest real hash, so an unknown
		// login takes as long as a known one.
		a.dummyHash, _ = bcrypt.GenerateFromPassword([]byte("relay: no such login"), cost)
	}
	return a
}

// Enabled reports whether users_file or checkpassword is configured.
func (a *authenticator) Enabled() bool {
	return a.usersFile || len(a.checkpassword) > 0
}

// Authenticate checks login and password for a client at remote. Over
// fail_limit, for the address or for the login, it refuses before asking
// any backend, even a right password; a success gives no failure back, so
// knowing one password does not buy more guesses at others. Each failure
// is answered after a delay that grows with the failures held against the
// address or the login (2s, 4s, ... 10s; 2s when fail_limit is off).
func (a *authenticator) Authenticate(ctx context.Context, login, password string, remote netip.Addr) error {
	client, user := clientKey(remote), strings.ToLower(login)
	now := a.now()
	if a.byAddress != nil {
		if remote.IsValid() && a.byAddress.exhausted(client, now) {
			return ErrAuthLockedAddress
		}
		if login != "" && a.byLogin.exhausted(user, now) {
			return ErrAuthLockedLogin
		}
	}
	err := a.check(ctx, login, password, remote)
	if err != ErrAuthBad {
		return err
	}
	n := 1
	if a.byAddress != nil {
		now = a.now()
		if remote.IsValid() {
			n = max(n, a.byAddress.take(client, now))
		}
		if login != "" {
			n = max(n, a.byLogin.take(user, now))
		}
	}
	sleepCtx(ctx, a.failDelay(n))
	return ErrAuthBad
}

// check asks the backends, users_file first.
func (a *authenticator) check(ctx context.Context, login, password string, remote netip.Addr) error {
	if login == "" || password == "" {
		return ErrAuthBad
	}
	if a.usersFile {
		if hash, ok := a.users[login]; ok {
			if bcrypt.CompareHashAndPassword(hash, []byte(password)) != nil {
				return ErrAuthBad
			}
			return nil
		}
		_ = bcrypt.CompareHashAndPassword(a.dummyHash, []byte(password))
	}
	if len(a.checkpassword) == 0 {
		return ErrAuthBad
	}
	return a.runCheckpassword(ctx, login, password, remote)
}

// runCheckpassword runs the qmail checkpassword program: it reads
// "login\0password\0timestamp\0" from fd 3 and exits 0 when the password is
// right (having exec'd its arguments), 111 on a temporary problem, and
// anything else when it is wrong (1; vchkpw uses other codes too). The
// timestamp is qmail-popup's "<pid.time@host>", which every checkpassword
// accepts beside a plain password. The program runs in its own process group,
// killed as a whole after the timeout.
func (a *authenticator) runCheckpassword(ctx context.Context, login, password string, remote netip.Addr) error {
	if strings.IndexByte(login, 0) >= 0 || strings.IndexByte(password, 0) >= 0 {
		return ErrAuthBad
	}
	var input bytes.Buffer
	input.WriteString(login)
	input.WriteByte(0)
	input.WriteString(password)
	input.WriteByte(0)
	input.WriteString("<" + strconv.Itoa(os.Getpid()) + "." + strconv.FormatInt(a.now().Unix(), 10) + "@" + a.hostname + ">")
	input.WriteByte(0)
	if input.Len() > checkpasswordMaxInput {
		return ErrAuthBad // the program would read it truncated
	}

	r, w, err := os.Pipe()
	if err != nil {
		return ErrAuthTemporary
	}
	defer r.Close()
	// The input is far smaller than a pipe's buffer: write it all now.
	_, err = w.Write(input.Bytes())
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return ErrAuthTemporary
	}

	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, a.checkpassword[0], a.checkpassword[1:]...)
	cmd.ExtraFiles = []*os.File{r} // fd 3
	cmd.Stderr = os.Stderr
	if remote.IsValid() {
		// vchkpw logs and records relay-after-auth by TCPREMOTEIP, as
		// tcpserver sets it for qmail-smtpd.
		cmd.Env = append(os.Environ(), "TCPREMOTEIP="+remote.Unmap().String())
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		// The leader is not reaped yet, so its pid still names the group.
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	err = cmd.Run()
	if ctx.Err() != nil {
		return ErrAuthTemporary // timed out or the client went away
	}
	var exit *exec.ExitError
	switch {
	case err == nil:
		return nil
	case !errors.As(err, &exit):
		return ErrAuthTemporary // could not start it
	case exit.ExitCode() == checkpasswordTempFail, exit.ExitCode() < 0:
		return ErrAuthTemporary // temporary, or killed by a signal
	default:
		return ErrAuthBad
	}
}

// sleepCtx waits d or until ctx is done.
func sleepCtx(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// clientKey groups client addresses the way policy's ip: identity does:
// an IPv4 address alone, IPv6 by /64. Addresses that are not IP (a unix
// socket) share the zero key.
func clientKey(addr netip.Addr) netip.Prefix {
	addr = addr.Unmap()
	switch {
	case addr.Is4():
		return netip.PrefixFrom(addr, 32)
	case addr.Is6():
		p, _ := addr.WithZone("").Prefix(64)
		return p
	default:
		return netip.Prefix{}
	}
}

// NewLoginServer returns a SASL LOGIN server (go-sasl has none):
// 334 VXNlcm5hbWU6, 334 UGFzc3dvcmQ6, initial response allowed.
//
// LOGIN (draft-murchison-sasl-login) sends "Username:" and "Password:" as
// challenges; go-smtp base64-encodes them. An initial response on the AUTH
// line is the username. An empty username or password is answered
// `501 5.5.4`; otherwise Next returns what authenticate returns.
func NewLoginServer(authenticate func(username, password string) error) sasl.Server {
	return &loginServer{authenticate: authenticate}
}

type loginState int

const (
	loginStart loginState = iota
	loginWantUsername
	loginWantPassword
	loginDone
)

type loginServer struct {
	authenticate func(username, password string) error
	state        loginState
	username     string
}

// Next implements sasl.Server.
func (s *loginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch s.state {
	case loginStart:
		if response == nil {
			s.state = loginWantUsername
			return []byte("Username:"), false, nil
		}
		return s.takeUsername(response)
	case loginWantUsername:
		return s.takeUsername(response)
	case loginWantPassword:
		s.state = loginDone
		if len(response) == 0 {
			return nil, true, replyAuthMalformed
		}
		return nil, true, s.authenticate(s.username, string(response))
	default:
		return nil, true, replyAuthMalformed
	}
}

func (s *loginServer) takeUsername(response []byte) ([]byte, bool, error) {
	if len(response) == 0 {
		s.state = loginDone
		return nil, true, replyAuthMalformed
	}
	s.username = string(response)
	s.state = loginWantPassword
	return []byte("Password:"), false, nil
}

// NewPlainServer returns a SASL PLAIN server (RFC 4616) that, unlike
// sasl.NewPlainServer, answers malformed input with relay's `501 5.5.4`
// and refuses an authorization identity other than the login itself, so
// authenticate needs only the login and password. Without an initial
// response it sends an empty challenge ("334 ").
func NewPlainServer(authenticate func(username, password string) error) sasl.Server {
	return &plainServer{authenticate: authenticate}
}

type plainServer struct {
	authenticate func(username, password string) error
	challenged   bool
	done         bool
}

// Next implements sasl.Server.
func (s *plainServer) Next(response []byte) (challenge []byte, done bool, err error) {
	if s.done {
		return nil, true, replyAuthMalformed
	}
	if response == nil && !s.challenged {
		s.challenged = true
		return []byte{}, false, nil
	}
	s.done = true
	// message = [authzid] NUL authcid NUL passwd (RFC 4616 §2)
	authzid, rest, ok1 := bytes.Cut(response, []byte{0})
	authcid, passwd, ok2 := bytes.Cut(rest, []byte{0})
	if !ok1 || !ok2 || len(authcid) == 0 || len(passwd) == 0 || bytes.IndexByte(passwd, 0) >= 0 {
		return nil, true, replyAuthMalformed
	}
	if len(authzid) > 0 && !bytes.Equal(authzid, authcid) {
		return nil, true, replyAuthzid
	}
	return nil, true, s.authenticate(string(authcid), string(passwd))
}
