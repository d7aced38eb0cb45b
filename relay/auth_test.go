package relay

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"relay/config"
)

var authTestClient = netip.MustParseAddr("192.0.2.7")

// authTestClock is a settable clock for AuthOptions.Now.
type authTestClock struct {
	mu  sync.Mutex
	now time.Time
}

func newAuthTestClock() *authTestClock {
	return &authTestClock{now: time.Unix(1700000000, 0)}
}

func (c *authTestClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *authTestClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// authDelays is a FailDelay for tests: no delay; it records the n it was given.
type authDelays struct {
	mu sync.Mutex
	ns []int
}

func (d *authDelays) delay(n int) time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ns = append(d.ns, n)
	return 0
}

func (d *authDelays) got() []int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]int(nil), d.ns...)
}

// writeAuthScript writes an executable /bin/sh script into dir.
func writeAuthScript(t *testing.T, dir, name, body string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func authTestHash(t testing.TB, password string, cost int) []byte {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(password), cost)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// countRuns reads how many times a script appended a line to file.
func countRuns(t *testing.T, file string) int {
	t.Helper()
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Count(b, []byte("\n"))
}

func TestCheckpasswordInputAndArgs(t *testing.T) {
	dir := t.TempDir()
	clock := newAuthTestClock()
	want := "alice@example.com\x00s3cr et\x00<" + strconv.Itoa(os.Getpid()) + ".1700000000@mail.example.com>\x00"
	if err := os.WriteFile(filepath.Join(dir, "want"), []byte(want), 0o644); err != nil {
		t.Fatal(err)
	}
	// The program reads fd 3 to EOF, compares it byte for byte, checks the
	// client address in its environment and the program it must exec.
	script := writeAuthScript(t, dir, "checkpw", `
cat <&3 >"`+dir+`/got" || exit 111
cmp -s "`+dir+`/got" "`+dir+`/want" || exit 1
[ "$TCPREMOTEIP" = "192.0.2.7" ] || exit 2
echo "$*" >"`+dir+`/args"
exec "$@"
`)
	for _, tc := range []struct {
		name, checkpassword, password, wantArgs string
		want                                    error
	}{
		{"default /bin/true", script, "s3cr et", "/bin/true", nil},
		{"explicit program", script + "  /bin/true  ", "s3cr et", "/bin/true", nil},
		{"program fails", script + " /bin/false", "s3cr et", "/bin/false", ErrAuthBad},
		{"wrong password", script, "s3cr", "", ErrAuthBad},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.Remove(filepath.Join(dir, "args"))
			a := NewAuthenticator(config.Auth{Checkpassword: tc.checkpassword},
				AuthOptions{FailDelay: func(int) time.Duration { return 0 }, Now: clock.Now, Hostname: "mail.example.com"})
			if !a.Enabled() {
				t.Fatal("Enabled() = false with checkpassword set")
			}
			err := a.Authenticate(context.Background(), "alice@example.com", tc.password, netip.MustParseAddr("::ffff:192.0.2.7"))
			if err != tc.want {
				got, _ := os.ReadFile(filepath.Join(dir, "got"))
				t.Fatalf("Authenticate = %v, want %v; fd 3 got %q, want %q", err, tc.want, got, want)
			}
			args, _ := os.ReadFile(filepath.Join(dir, "args"))
			if strings.TrimSpace(string(args)) != tc.wantArgs {
				t.Errorf("program args %q, want %q", args, tc.wantArgs)
			}
		})
	}
}

func TestCheckpasswordExitCodes(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, body string
		want       error
		counted    bool // a failure for the lockout
	}{
		{"exit 0", "exit 0\n", nil, false},
		{"exit 1 bad", "exit 1\n", ErrAuthBad, true},
		{"exit 2 misuse", "exit 2\n", ErrAuthBad, true},
		{"vchkpw exit 3", "exit 3\n", ErrAuthBad, true},
		{"exit 111 temporary", "exit 111\n", ErrAuthTemporary, false},
		{"killed by a signal", "kill -9 $$\n", ErrAuthTemporary, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			script := writeAuthScript(t, dir, strings.ReplaceAll(tc.name, " ", "_"), tc.body)
			var delays authDelays
			a := NewAuthenticator(config.Auth{Checkpassword: script}, AuthOptions{FailDelay: delays.delay})
			if err := a.Authenticate(context.Background(), "u", "p", authTestClient); err != tc.want {
				t.Fatalf("Authenticate = %v, want %v", err, tc.want)
			}
			if counted := len(delays.got()) > 0; counted != tc.counted {
				t.Errorf("failure counted = %v, want %v", counted, tc.counted)
			}
		})
	}
	t.Run("missing program", func(t *testing.T) {
		a := NewAuthenticator(config.Auth{Checkpassword: filepath.Join(dir, "nonexistent")}, AuthOptions{})
		if err := a.Authenticate(context.Background(), "u", "p", authTestClient); err != ErrAuthTemporary {
			t.Fatalf("Authenticate = %v, want ErrAuthTemporary", err)
		}
	})
}

func TestCheckpasswordRefusesInputItCannotPass(t *testing.T) {
	dir := t.TempDir()
	runs := filepath.Join(dir, "runs")
	script := writeAuthScript(t, dir, "checkpw", `echo run >>"`+runs+`"; exit 0`+"\n")
	a := NewAuthenticator(config.Auth{Checkpassword: script}, AuthOptions{FailDelay: func(int) time.Duration { return 0 }})
	for _, tc := range []struct{ name, login, password string }{
		{"longer than 512 bytes", "u", strings.Repeat("p", 512)},
		{"NUL in login", "u\x00x", "p"},
		{"NUL in password", "u", "p\x00x"},
		{"empty login", "", "p"},
		{"empty password", "u", ""},
	} {
		if err := a.Authenticate(context.Background(), tc.login, tc.password, authTestClient); err != ErrAuthBad {
			t.Errorf("%s: Authenticate = %v, want ErrAuthBad", tc.name, err)
		}
	}
	if n := countRuns(t, runs); n != 0 {
		t.Errorf("checkpassword ran %d times for input it cannot receive", n)
	}
}

func TestCheckpasswordKilledAfterTimeout(t *testing.T) {
	dir := t.TempDir()
	// A grandchild would create "survived" after 1s; the program itself
	// would succeed after 5s. Both must die at the timeout.
	script := writeAuthScript(t, dir, "slow", `
(sleep 1; touch "`+dir+`/survived") &
touch "`+dir+`/started"
sleep 5
exit 0
`)
	cfg := config.Auth{Checkpassword: script, Timeout: config.Duration{Duration: 500 * time.Millisecond}}
	a := NewAuthenticator(cfg, AuthOptions{})
	if err := a.Authenticate(context.Background(), "u", "p", authTestClient); err != ErrAuthTemporary {
		t.Fatalf("Authenticate = %v, want ErrAuthTemporary", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "started")); err != nil {
		t.Fatalf("the script did not get to start its child before the timeout: %v", err)
	}
	time.Sleep(1500 * time.Millisecond)
	if _, err := os.Stat(filepath.Join(dir, "survived")); err == nil {
		t.Fatal("the checkpassword's child outlived the timeout: the process group was not killed")
	}
}

func TestCheckpasswordCanceledContext(t *testing.T) {
	dir := t.TempDir()
	script := writeAuthScript(t, dir, "slow", "sleep 5\nexit 0\n")
	a := NewAuthenticator(config.Auth{Checkpassword: script}, AuthOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	if err := a.Authenticate(ctx, "u", "p", authTestClient); err != ErrAuthTemporary {
		t.Fatalf("Authenticate = %v, want ErrAuthTemporary", err)
	}
}

func TestUsersFile(t *testing.T) {
	const cost = bcrypt.MinCost + 1
	cfg := config.Auth{UsersFile: "users", Users: map[string][]byte{
		"bob":   authTestHash(t, "hunter2", cost),
		"carol": authTestHash(t, "pw", bcrypt.MinCost),
	}}
	var delays authDelays
	a := newAuthenticator(cfg, AuthOptions{FailDelay: delays.delay})
	if !a.Enabled() {
		t.Fatal("Enabled() = false with users_file set")
	}
	for _, tc := range []struct {
		login, password string
		want            error
	}{
		{"bob", "hunter2", nil},
		{"carol", "pw", nil},
		{"bob", "hunter3", ErrAuthBad},
		{"bob", "", ErrAuthBad},
		{"Bob", "hunter2", ErrAuthBad},
		{"mallory", "hunter2", ErrAuthBad},
	} {
		if err := a.Authenticate(context.Background(), tc.login, tc.password, authTestClient); err != tc.want {
			t.Errorf("Authenticate(%q, %q) = %v, want %v", tc.login, tc.password, err, tc.want)
		}
	}
	if got := delays.got(); len(got) != 4 {
		t.Errorf("failure delays %v, want one per failure (4)", got)
	}
	// An unknown login spends a comparison as dear as the dearest hash.
	if c, err := bcrypt.Cost(a.dummyHash); err != nil || c != cost {
		t.Errorf("dummy hash cost %d (%v), want %d", c, err, cost)
	}
}

func TestUsersFileBeforeCheckpassword(t *testing.T) {
	dir := t.TempDir()
	runs := filepath.Join(dir, "runs")
	// This checkpassword accepts anyone and notes each run.
	script := writeAuthScript(t, dir, "checkpw", `echo run >>"`+runs+`"; exec "$@"`+"\n")
	cfg := config.Auth{Checkpassword: script, UsersFile: "users", Users: map[string][]byte{
		"bob": authTestHash(t, "hunter2", bcrypt.MinCost),
	}}
	a := NewAuthenticator(cfg, AuthOptions{FailDelay: func(int) time.Duration { return 0 }})
	ctx := context.Background()
	if err := a.Authenticate(ctx, "bob", "hunter2", authTestClient); err != nil {
		t.Fatalf("users_file login: %v", err)
	}
	if err := a.Authenticate(ctx, "bob", "wrong", authTestClient); err != ErrAuthBad {
		t.Fatalf("users_file login with a wrong password = %v, want ErrAuthBad (users_file decides its logins)", err)
	}
	if n := countRuns(t, runs); n != 0 {
		t.Fatalf("checkpassword ran %d times for a users_file login", n)
	}
	if err := a.Authenticate(ctx, "dave", "any", authTestClient); err != nil {
		t.Fatalf("login unknown to users_file, accepted by checkpassword: %v", err)
	}
	if n := countRuns(t, runs); n != 1 {
		t.Fatalf("checkpassword ran %d times, want 1", n)
	}
}

func TestAuthEnabled(t *testing.T) {
	for _, tc := range []struct {
		cfg  config.Auth
		want bool
	}{
		{config.Auth{}, false},
		{config.Auth{RequireTLS: true}, false},
		{config.Auth{Checkpassword: "/bin/checkpassword"}, true},
		{config.Auth{UsersFile: "/etc/relay/users"}, true},
	} {
		if got := NewAuthenticator(tc.cfg, AuthOptions{}).Enabled(); got != tc.want {
			t.Errorf("Enabled() for %+v = %v, want %v", tc.cfg, got, tc.want)
		}
	}
	// An empty users_file refuses everyone.
	a := NewAuthenticator(config.Auth{UsersFile: "/etc/relay/users"}, AuthOptions{FailDelay: func(int) time.Duration { return 0 }})
	if err := a.Authenticate(context.Background(), "u", "p", authTestClient); err != ErrAuthBad {
		t.Errorf("Authenticate with an empty users_file = %v, want ErrAuthBad", err)
	}
}

func TestAuthLockoutAndRecovery(t *testing.T) {
	dir := t.TempDir()
	runs := filepath.Join(dir, "runs")
	// checkpassword accepts the password "right" only, and notes each run.
	script := writeAuthScript(t, dir, "checkpw", `echo run >>"`+runs+`"
pass=$(tr '\000' '\n' <&3 | sed -n 2p)
[ "$pass" = right ] || exit 1
exec "$@"
`)
	clock := newAuthTestClock()
	var delays authDelays
	a := NewAuthenticator(config.Auth{Checkpassword: script, FailLimit: failLimit(t, "3/10m")},
		AuthOptions{FailDelay: delays.delay, Now: clock.Now})
	ctx := context.Background()
	client := netip.MustParseAddr("2001:db8:1:2::10")
	sameNet := netip.MustParseAddr("2001:db8:1:2:ffff::1")
	otherNet := netip.MustParseAddr("2001:db8:1:3::10")

	for i := range 3 {
		if err := a.Authenticate(ctx, "u", "wrong", client); err != ErrAuthBad {
			t.Fatalf("failure %d: %v, want ErrAuthBad", i+1, err)
		}
	}
	if got := delays.got(); len(got) != 3 || got[0] != 1 || got[1] != 2 || got[2] != 3 {
		t.Fatalf("FailDelay called with %v, want [1 2 3]", got)
	}
	before := countRuns(t, runs)
	for _, addr := range []netip.Addr{client, sameNet} {
		if err := a.Authenticate(ctx, "v", "right", addr); err != ErrAuthLockedAddress {
			t.Fatalf("right password from %v after 3 failures = %v, want ErrAuthLockedAddress", addr, err)
		}
	}
	// The login is over its limit from any address, in any letter case.
	if err := a.Authenticate(ctx, "U", "right", otherNet); err != ErrAuthLockedLogin || !errors.Is(err, ErrAuthLocked) {
		t.Fatalf("the locked login from another /64 = %v, want ErrAuthLockedLogin", err)
	}
	if n := countRuns(t, runs); n != before {
		t.Fatalf("checkpassword ran while the client was locked")
	}
	if err := a.Authenticate(ctx, "v", "right", otherNet); err != nil {
		t.Fatalf("another login from another /64 is not locked: %v", err)
	}
	// 3 per 10m: one token comes back every 200s.
	clock.Advance(200*time.Second - time.Second)
	if err := a.Authenticate(ctx, "u", "right", client); err != ErrAuthLockedAddress {
		t.Fatalf("before a token came back: %v, want ErrAuthLockedAddress", err)
	}
	clock.Advance(time.Second)
	if err := a.Authenticate(ctx, "u", "right", client); err != nil {
		t.Fatalf("once a token came back: %v, want success", err)
	}
	// A success gives nothing back: the next failure counts as the third
	// and locks again at once.
	if err := a.Authenticate(ctx, "u", "wrong", client); err != ErrAuthBad {
		t.Fatal(err)
	}
	if got := delays.got(); got[len(got)-1] != 3 {
		t.Fatalf("failure after a success counted as %d, want 3", got[len(got)-1])
	}
	if err := a.Authenticate(ctx, "u", "right", client); err != ErrAuthLockedAddress {
		t.Fatalf("after that failure: %v, want ErrAuthLockedAddress", err)
	}
}

func failLimit(t *testing.T, s string) config.OptRate {
	t.Helper()
	r, err := config.ParseRate(s)
	if err != nil {
		t.Fatal(err)
	}
	return config.OptRate{Rate: r}
}

// TestAuthFailLimitOff: without fail_limit nobody is locked and every
// failure waits the first delay.
func TestAuthFailLimitOff(t *testing.T) {
	cfg := config.Auth{UsersFile: "users", Users: map[string][]byte{"bob": authTestHash(t, "pw", bcrypt.MinCost)}}
	var delays authDelays
	a := NewAuthenticator(cfg, AuthOptions{FailDelay: delays.delay})
	for range 30 {
		if err := a.Authenticate(context.Background(), "bob", "bad", authTestClient); err != ErrAuthBad {
			t.Fatal(err)
		}
	}
	if err := a.Authenticate(context.Background(), "bob", "pw", authTestClient); err != nil {
		t.Fatalf("locked without fail_limit: %v", err)
	}
	for _, n := range delays.got() {
		if n != 1 {
			t.Fatalf("delays %v, want all 1", delays.got())
		}
	}
}

func TestAuthFailDelayRespectsContext(t *testing.T) {
	cfg := config.Auth{UsersFile: "users", Users: map[string][]byte{"bob": authTestHash(t, "pw", bcrypt.MinCost)}}
	a := NewAuthenticator(cfg, AuthOptions{FailDelay: func(int) time.Duration { return time.Hour }})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Authenticate(ctx, "bob", "bad", authTestClient) }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != ErrAuthBad {
			t.Fatalf("Authenticate = %v, want ErrAuthBad", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the failure delay ignored the canceled context")
	}
}

func TestAuthDefaultFailDelay(t *testing.T) {
	for n, want := range map[int]time.Duration{1: 2 * time.Second, 2: 4 * time.Second, 4: 8 * time.Second, 5: 10 * time.Second, 1000: 10 * time.Second} {
		if got := defaultFailDelay(n); got != want {
			t.Errorf("defaultFailDelay(%d) = %v, want %v", n, got, want)
		}
	}
}

func TestAuthClientKey(t *testing.T) {
	for _, tc := range []struct{ addr, want string }{
		{"192.0.2.7", "192.0.2.7/32"},
		{"::ffff:192.0.2.7", "192.0.2.7/32"},
		{"2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"},
		{"fe80::1%eth0", "fe80::/64"},
	} {
		if got := clientKey(netip.MustParseAddr(tc.addr)).String(); got != tc.want {
			t.Errorf("clientKey(%s) = %s, want %s", tc.addr, got, tc.want)
		}
	}
	if got := clientKey(netip.Addr{}); got != (netip.Prefix{}) {
		t.Errorf("clientKey(invalid) = %v, want the zero prefix", got)
	}
}

// loginRecorder is an authenticate callback that records its calls.
type loginRecorder struct {
	calls []string
	err   error
}

func (r *loginRecorder) authenticate(username, password string) error {
	r.calls = append(r.calls, username+"/"+password)
	return r.err
}

type saslStep struct {
	response      []byte
	wantChallenge string
	wantDone      bool
	wantErr       error
}

func runSASL(t *testing.T, s sasl.Server, steps []saslStep) {
	t.Helper()
	for i, st := range steps {
		ch, done, err := s.Next(st.response)
		if st.wantErr != nil {
			if err == nil || (st.wantErr != errAnySASL && err != st.wantErr) {
				t.Fatalf("step %d: err %v, want %v", i, err, st.wantErr)
			}
			return
		}
		if err != nil || done != st.wantDone || string(ch) != st.wantChallenge {
			t.Fatalf("step %d: Next(%q) = %q, %v, %v; want %q, %v, nil", i, st.response, ch, done, err, st.wantChallenge, st.wantDone)
		}
	}
}

var errAnySASL = errors.New("any error")

func TestLoginServer(t *testing.T) {
	for _, tc := range []struct {
		name      string
		steps     []saslStep
		wantCalls string
	}{
		{"without initial response", []saslStep{
			{nil, "Username:", false, nil},
			{[]byte("alice"), "Password:", false, nil},
			{[]byte("pw"), "", true, nil},
			{[]byte("more"), "", false, errAnySASL},
		}, "alice/pw"},
		{"with initial response", []saslStep{
			{[]byte("alice"), "Password:", false, nil},
			{[]byte("p w"), "", true, nil},
		}, "alice/p w"},
		{"empty initial response", []saslStep{
			{[]byte{}, "", false, replyAuthMalformed},
		}, ""},
		{"empty username", []saslStep{
			{nil, "Username:", false, nil},
			{[]byte{}, "", false, replyAuthMalformed},
		}, ""},
		{"empty password", []saslStep{
			{nil, "Username:", false, nil},
			{[]byte("alice"), "Password:", false, nil},
			{[]byte{}, "", false, replyAuthMalformed},
		}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rec loginRecorder
			runSASL(t, NewLoginServer(rec.authenticate), tc.steps)
			if got := strings.Join(rec.calls, ","); got != tc.wantCalls {
				t.Errorf("authenticate calls %q, want %q", got, tc.wantCalls)
			}
		})
	}
	t.Run("authenticate's error is returned", func(t *testing.T) {
		rec := loginRecorder{err: smtp.ErrAuthFailed}
		runSASL(t, NewLoginServer(rec.authenticate), []saslStep{
			{[]byte("alice"), "Password:", false, nil},
			{[]byte("bad"), "", false, smtp.ErrAuthFailed},
		})
	})
}

func TestPlainServer(t *testing.T) {
	for _, tc := range []struct {
		name      string
		steps     []saslStep
		wantCalls string
	}{
		{"initial response", []saslStep{{[]byte("\x00alice\x00pw"), "", true, nil}}, "alice/pw"},
		{"authzid equals login", []saslStep{{[]byte("alice\x00alice\x00pw"), "", true, nil}}, "alice/pw"},
		{"empty challenge first", []saslStep{
			{nil, "", false, nil},
			{[]byte("\x00alice\x00pw"), "", true, nil},
			{[]byte("\x00alice\x00pw"), "", false, errAnySASL},
		}, "alice/pw"},
		{"other authzid", []saslStep{{[]byte("root\x00alice\x00pw"), "", false, replyAuthzid}}, ""},
		{"two fields", []saslStep{{[]byte("alice\x00pw"), "", false, replyAuthMalformed}}, ""},
		{"four fields", []saslStep{{[]byte("\x00alice\x00pw\x00x"), "", false, replyAuthMalformed}}, ""},
		{"empty login", []saslStep{{[]byte("\x00\x00pw"), "", false, replyAuthMalformed}}, ""},
		{"empty password", []saslStep{{[]byte("\x00alice\x00"), "", false, replyAuthMalformed}}, ""},
		{"empty response", []saslStep{{[]byte{}, "", false, replyAuthMalformed}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rec loginRecorder
			runSASL(t, NewPlainServer(rec.authenticate), tc.steps)
			if got := strings.Join(rec.calls, ","); got != tc.wantCalls {
				t.Errorf("authenticate calls %q, want %q", got, tc.wantCalls)
			}
		})
	}
}

// FuzzLoginPlainServer feeds newline-separated responses to the LOGIN or
// PLAIN server: it must never panic, call authenticate at most once and only
// with a non-empty login and password, and end the exchange after that.
func FuzzLoginPlainServer(f *testing.F) {
	f.Add(false, true, []byte("alice\npw"))
	f.Add(false, false, []byte("alice\npw\nextra"))
	f.Add(false, false, []byte("\n\n"))
	f.Add(true, true, []byte("\x00alice\x00pw"))
	f.Add(true, false, []byte("\x00alice\x00pw\nagain"))
	f.Add(true, true, []byte("a\x00b\x00c\x00d"))
	f.Add(true, true, []byte("root\x00alice\x00pw"))
	f.Fuzz(func(t *testing.T, plain, initial bool, data []byte) {
		var calls int
		auth := func(username, password string) error {
			calls++
			if username == "" || password == "" {
				t.Fatalf("authenticate(%q, %q) with an empty field", username, password)
			}
			if plain && (strings.IndexByte(username, 0) >= 0 || strings.IndexByte(password, 0) >= 0) {
				t.Fatalf("PLAIN passed a NUL: %q %q", username, password)
			}
			return nil
		}
		var s sasl.Server
		if plain {
			s = NewPlainServer(auth)
		} else {
			s = NewLoginServer(auth)
		}
		responses := bytes.Split(data, []byte("\n"))
		if !initial {
			responses = append([][]byte{nil}, responses...)
		}
		finished := false
		for _, r := range responses {
			_, done, err := s.Next(r)
			if finished && err == nil {
				t.Fatal("Next accepted a response after the exchange ended")
			}
			if done || err != nil {
				finished = true
			}
		}
		if calls > 1 {
			t.Fatalf("authenticate called %d times", calls)
		}
	})
}

// authTestBackend is a go-smtp backend whose sessions offer LOGIN and PLAIN
// through an Authenticator, mapped to replies as the real session should.
type authTestBackend struct{ auth Authenticator }

type authTestSession struct{ auth Authenticator }

func (b authTestBackend) NewSession(*smtp.Conn) (smtp.Session, error) {
	return authTestSession(b), nil
}

func (s authTestSession) AuthMechanisms() []string { return []string{"LOGIN", "PLAIN"} }

func (s authTestSession) Auth(mech string) (sasl.Server, error) {
	check := func(username, password string) error {
		switch s.auth.Authenticate(context.Background(), username, password, authTestClient) {
		case nil:
			return nil
		case ErrAuthBad:
			return smtp.ErrAuthFailed
		default:
			return &smtp.SMTPError{Code: 454, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "try later"}
		}
	}
	if mech == sasl.Plain {
		return NewPlainServer(check), nil
	}
	return NewLoginServer(check), nil
}

func (authTestSession) Mail(string, *smtp.MailOptions) error { return nil }
func (authTestSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (authTestSession) Data(io.Reader) error                 { return nil }
func (authTestSession) Reset()                               {}
func (authTestSession) Logout() error                        { return nil }

// TestLoginOverSMTP checks the LOGIN exchange on the wire through go-smtp:
// the challenges are qmail's 334 VXNlcm5hbWU6 and 334 UGFzc3dvcmQ6.
func TestLoginOverSMTP(t *testing.T) {
	cfg := config.Auth{UsersFile: "users", Users: map[string][]byte{"bob": authTestHash(t, "hunter2", bcrypt.MinCost)}}
	srv := smtp.NewServer(authTestBackend{NewAuthenticator(cfg, AuthOptions{FailDelay: func(int) time.Duration { return 0 }})})
	srv.Domain = "mail.example.com"
	srv.AllowInsecureAuth = true
	srv.ReadTimeout, srv.WriteTimeout = 10*time.Second, 10*time.Second
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	for _, tc := range []struct {
		name  string
		lines []string // client line, then the reply it must get
	}{
		{"LOGIN", []string{
			"AUTH LOGIN", "334 VXNlcm5hbWU6",
			b64("bob"), "334 UGFzc3dvcmQ6",
			b64("hunter2"), "235 2.0.0 ",
		}},
		{"LOGIN initial response", []string{
			"AUTH LOGIN " + b64("bob"), "334 UGFzc3dvcmQ6",
			b64("wrong"), "535 5.7.8 ",
		}},
		{"LOGIN canceled", []string{
			"AUTH LOGIN", "334 VXNlcm5hbWU6",
			"*", "501 5.0.0 ",
		}},
		{"LOGIN empty username", []string{
			"AUTH LOGIN", "334 VXNlcm5hbWU6",
			"=", "501 5.5.4 ",
		}},
		{"PLAIN", []string{
			"AUTH PLAIN", "334 ",
			b64("\x00bob\x00hunter2"), "235 2.0.0 ",
		}},
		{"PLAIN initial response", []string{
			"AUTH PLAIN " + b64("\x00bob\x00nope"), "535 5.7.8 ",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.DialTimeout("tcp", l.Addr().String(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			r := bufio.NewReader(conn)
			readReply := func() string {
				var last string
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						t.Fatalf("reading reply: %v", err)
					}
					last = strings.TrimRight(line, "\r\n")
					if len(last) < 4 || last[3] != '-' {
						return last
					}
				}
			}
			readReply() // greeting
			conn.Write([]byte("EHLO client.example.com\r\n"))
			if reply := readReply(); !strings.HasPrefix(reply, "250 ") {
				t.Fatalf("EHLO: %q", reply)
			}
			for i := 0; i < len(tc.lines); i += 2 {
				conn.Write([]byte(tc.lines[i] + "\r\n"))
				if reply := readReply(); !strings.HasPrefix(reply, tc.lines[i+1]) || (tc.lines[i+1] == "334 " && reply != "334 ") {
					t.Fatalf("after %q: reply %q, want %q", tc.lines[i], reply, tc.lines[i+1])
				}
			}
		})
	}
}
