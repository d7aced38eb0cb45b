package relay

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/emersion/go-sasl"

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

// NewAuthenticator builds the Authenticator for cfg.
func NewAuthenticator(cfg config.Auth, opts AuthOptions) Authenticator { panic("TODO") }

// AuthOptions tunes the Authenticator; zero values are production defaults.
type AuthOptions struct {
	FailDelay func(n int) time.Duration // delay before answering a failure; default grows from 2s
	LockAfter int                       // failures from one IP before it is refused (default 10 in 10 min)
	LockFor   time.Duration
	Now       func() time.Time
}

// NewLoginServer returns a SASL LOGIN server (go-sasl has none):
// 334 VXNlcm5hbWU6, 334 UGFzc3dvcmQ6, initial response allowed.
func NewLoginServer(authenticate func(username, password string) error) sasl.Server { panic("TODO") }
