package relay

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
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
	ErrAuthLocked    = errors.New("too many failed authentications") // 421/454: this IP is refused for a while
)

// Authenticator checks a login and password (checkpassword program or
// users_file) and tracks failures per client address.
type Authenticator interface {
	// Authenticate returns nil, ErrAuthBad, ErrAuthTemporary or ErrAuthLocked.
	// On ErrAuthBad it has already waited the failure delay.
	Authenticate(ctx context.Context, login, password string, remote netip.Addr) error
	// Enabled reports whether any backend (checkpassword or users_file) is configured.
	Enabled() bool
}

// AuthOptions tunes the Authenticator; zero values are production defaults.
type AuthOptions struct {
	FailDelay func(n int) time.Duration // delay before answering a failure; default grows from 2s
	LockAfter int                       // failures from one IP before it is refused (default 10 in 10 min); negative: never
	LockFor   time.Duration
	Now       func() time.Time
	// Hostname goes into the checkpassword timestamp field; default os.Hostname().
	Hostname string
}

// Defaults for AuthOptions and config.Auth.
const (
	defaultCheckpasswordTimeout = 10 * time.Second
	defaultLockAfter            = 10
	defaultLockFor              = 10 * time.Minute
	failDelayStep               = 2 * time.Second
	failDelayMax                = 10 * time.Second

	// checkpasswordMaxInput is what a checkpassword program reads from
	// fd 3 at most (cr.yp.to/checkpwd/interface.html).
	checkpasswordMaxInput = 512
	// checkpasswordTempFail is the interface's "temporary problem" exit code.
	checkpasswordTempFail = 111

	// maxTrackedClients bounds the failure table's memory.
	maxTrackedClients = 10000
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
	failures  *failureTable
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
	lockAfter, lockFor := opts.LockAfter, opts.LockFor
	if lockAfter == 0 {
		lockAfter = defaultLockAfter
	}
	if lockFor <= 0 {
		lockFor = defaultLockFor
	}
	a.failures = newFailureTable(lockAfter, lockFor, maxTrackedClients)

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

// Authenticate checks login and password for a client at remote.
func (a *authenticator) Authenticate(ctx context.Context, login, password string, remote netip.Addr) error {
	client := clientKey(remote)
	if a.failures.locked(client, a.now()) {
		return ErrAuthLocked
	}
	err := a.check(ctx, login, password, remote)
	switch err {
	case nil:
		a.failures.clear(client)
		return nil
	case ErrAuthBad:
		n := a.failures.fail(client, a.now())
		sleepCtx(ctx, a.failDelay(n))
		return ErrAuthBad
	default:
		return err
	}
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

// failureTable counts failed authentications per client in fixed windows of
// lockFor: the lockAfter-th failure within one window refuses the client for
// lockFor from then. Its size is capped; idle clients are evicted first.
type failureTable struct {
	lockAfter  int // <0: never lock
	lockFor    time.Duration
	maxClients int

	mu      sync.Mutex
	clients map[netip.Prefix]*failureRecord
}

type failureRecord struct {
	count       int       // failures since windowStart
	windowStart time.Time // first failure of the current window
	lastFailure time.Time
	lockedUntil time.Time // zero: not locked
}

func newFailureTable(lockAfter int, lockFor time.Duration, maxClients int) *failureTable {
	return &failureTable{
		lockAfter:  lockAfter,
		lockFor:    lockFor,
		maxClients: maxClients,
		clients:    make(map[netip.Prefix]*failureRecord),
	}
}

// locked reports whether client is refused at now.
func (t *failureTable) locked(client netip.Prefix, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	rec := t.clients[client]
	return rec != nil && now.Before(rec.lockedUntil)
}

// fail records a failure of client at now and returns its failures in the
// current window, counting this one.
func (t *failureTable) fail(client netip.Prefix, now time.Time) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	rec := t.clients[client]
	if rec == nil {
		if len(t.clients) >= t.maxClients {
			t.evict(now)
		}
		rec = &failureRecord{}
		t.clients[client] = rec
	}
	if rec.count == 0 || !now.Before(rec.windowStart.Add(t.lockFor)) {
		rec.count, rec.windowStart = 0, now
	}
	rec.count++
	rec.lastFailure = now
	if t.lockAfter > 0 && rec.count >= t.lockAfter {
		rec.lockedUntil = now.Add(t.lockFor)
	}
	return rec.count
}

// clear forgets client's failures, after it authenticated.
func (t *failureTable) clear(client netip.Prefix) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.clients, client)
}

// evict makes room: it drops every record whose window and lock are over,
// and if none is, the unlocked record (else the record) idle the longest.
// Called with t.mu held.
func (t *failureTable) evict(now time.Time) {
	var victim netip.Prefix
	var victimRec *failureRecord
	for client, rec := range t.clients {
		if !now.Before(rec.windowStart.Add(t.lockFor)) && !now.Before(rec.lockedUntil) {
			delete(t.clients, client)
			continue
		}
		if victimRec == nil || evictBefore(rec, victimRec, now) {
			victim, victimRec = client, rec
		}
	}
	if len(t.clients) >= t.maxClients && victimRec != nil {
		delete(t.clients, victim)
	}
}

// evictBefore reports whether a should be evicted before b.
func evictBefore(a, b *failureRecord, now time.Time) bool {
	aLocked, bLocked := now.Before(a.lockedUntil), now.Before(b.lockedUntil)
	if aLocked != bLocked {
		return !aLocked
	}
	if aLocked {
		return a.lockedUntil.Before(b.lockedUntil)
	}
	return a.lastFailure.Before(b.lastFailure)
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
