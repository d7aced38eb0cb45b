package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"relay/admin"
	"relay/config"
	"relay/local"
	"relay/policy"
	"relay/queue"
	"relay/relay"
	"relay/signals"
)

// runServe wires config, policy, queue, the SMTP front end and the admin
// API together and runs until SIGTERM or SIGINT; SIGHUP reloads.
func runServe(args []string, stdout, stderr io.Writer) int {
	path, rest, explicit := config.PathFromArgs(args)
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	grace := fs.Duration("grace", 30*time.Second, "how long transactions in flight may take to finish at shutdown")
	debug := fs.Bool("debug", false, "log at debug level")
	if err := fs.Parse(rest); err != nil {
		return 64
	}
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	cfg, err := loadForServe(path, explicit)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if cfg.Path == "" {
		log.Info("no config file: running on the embedded defaults", "looked_for", path)
	}
	if cfg.Delivery.Method == config.DeliverQmailDirect && os.Getenv(envSupervisorFD) == "" && os.Geteuid() == 0 {
		return superviseServe(args, cfg, log) // supervise.go
	}
	logWarnings(log, cfg)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	writers, stopWriters, err := writerConns(cfg, log, sigs)
	if err != nil {
		log.Error("cannot start", "err", err)
		return 1
	}
	defer stopWriters()
	d, err := startDaemon(cfg, log, writers)
	if err != nil {
		log.Error("cannot start", "err", err)
		return 1
	}
	log.Info("relay started", "config", cfg.Path, "smtp", d.smtp.Addrs(), "admin", d.admin.Addr())

	for sig := range sigs {
		if sig == syscall.SIGHUP {
			if err := d.reload(); err != nil {
				log.Error("reload failed: keeping the running config", "err", err)
				d.recordReload("SIGHUP: failed: " + err.Error())
			} else {
				d.recordReload("SIGHUP: config reloaded")
			}
			continue
		}
		log.Info("shutting down", "signal", sig.String(), "grace", grace.String())
		ctx, cancel := context.WithTimeout(context.Background(), *grace)
		err := d.shutdown(ctx)
		cancel()
		if err != nil {
			log.Error("shutdown", "err", err)
			return 1
		}
		return 0
	}
	return 0
}

// loadForServe reads the config file; without an explicit path and with no
// file at the default place it runs on the embedded defaults.
func loadForServe(path string, explicit bool) (*config.Config, error) {
	if !explicit {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			return config.Default(), nil
		}
	}
	return config.Load(path)
}

// daemon is everything serve runs, for reload and shutdown.
type daemon struct {
	cfg     *config.Config
	log     *slog.Logger
	policy  *policy.Engine
	signals *signals.Follower // nil without [signals] qmail_send_log
	handoff queue.Handoff
	hold    *queue.HoldSpool
	release *relay.Releaser
	smtp    *relay.Server
	admin   *admin.Server
	closeDB func() error
	// qqSocket is the local listener's path as bound at start (a reload
	// does not rebind), for qq.settings; "" without one.
	qqSocket string
}

// startDaemon starts everything; writers brings method qmail-direct its
// queue-writer connections.
func startDaemon(cfg *config.Config, log *slog.Logger, writers <-chan net.Conn) (*daemon, error) {
	db, err := policy.OpenDB(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	d := &daemon{cfg: cfg, log: log, closeDB: db.Close}
	fail := func(err error) (*daemon, error) {
		db.Close()
		return nil, err
	}
	d.handoff, err = queue.New(cfg.Delivery, cfg.Control.Me, queue.Options{Logger: log, Registerer: reg, ChildStderr: os.Stderr, Writers: writers})
	if err != nil {
		return fail(err)
	}
	d.hold, err = queue.OpenHold(filepath.Join(cfg.DataDir, "hold"), db)
	if err != nil {
		return fail(err)
	}
	if len(d.hold.Released) > 0 {
		log.Warn("hold spool: messages handed off just before relay stopped are gone from it now", "ids", d.hold.Released)
	}

	// Notifications go straight to the delivery path: never counted.
	sendMail := func(ctx context.Context, from string, to []string, msg []byte) error {
		_, err := d.handoff.Deliver(ctx, queue.Envelope{From: from, To: to}, bytes.NewReader(msg))
		return err
	}
	d.policy, err = policy.New(db, cfg, policy.Options{Logger: log, SendMail: sendMail, Registerer: reg})
	if err != nil {
		return fail(err)
	}
	var handoffs relay.HandoffRecorder
	if cfg.Signals.QmailSendLog != "" {
		if d.signals, err = signals.New(cfg, d.policy, signals.Options{Logger: log, Registerer: reg}); err != nil {
			d.policy.Close()
			return fail(err)
		}
		d.signals.Start()
		handoffs = d.signals
	}
	stopSignals := func() {
		if d.signals != nil {
			d.signals.Close()
		}
	}
	// The releaser learns what waits in the release queues before the
	// first SMTP connection, so new mail of those identities queues behind.
	d.release, err = relay.NewReleaser(relay.ReleaserOptions{Policy: d.policy, Spool: d.hold, Handoff: d.handoff, Handoffs: handoffs, Logger: log, Registerer: reg})
	if err == nil {
		err = d.release.Start()
	}
	if err != nil {
		stopSignals()
		d.policy.Close()
		return fail(err)
	}
	stopRelease := func() { d.release.Stop(context.Background()) }
	d.smtp, err = relay.New(cfg, relay.Deps{
		Policy:     d.policy,
		Handoffs:   handoffs,
		Handoff:    d.handoff,
		Hold:       d.hold,
		Queue:      d.release,
		Auth:       relay.NewAuthenticator(cfg.Auth, relay.AuthOptions{}),
		Logger:     log,
		Registerer: reg,
	})
	if err != nil {
		stopRelease()
		stopSignals()
		d.policy.Close()
		return fail(err)
	}
	if err := d.smtp.Start(); err != nil {
		stopRelease()
		stopSignals()
		d.policy.Close()
		return fail(err)
	}
	d.qqSocket, _ = local.SocketPath(cfg)
	if err := d.writeQQSettings(cfg); err != nil {
		log.Error("relay-qq's settings not written: it runs relay-local for every message", "err", err)
	}
	token, tokenPath, created, err := admin.LoadOrCreateToken(cfg.Admin.TokenFile, cfg.DataDir)
	if err != nil {
		d.smtp.Shutdown(context.Background())
		stopRelease()
		stopSignals()
		d.policy.Close()
		return fail(err)
	}
	if created {
		log.Info("admin token created", "path", tokenPath)
	}
	held := heldActions{HoldSpool: d.hold, release: d.release}
	if err := admin.RegisterHeldGauge(reg, held); err != nil {
		d.smtp.Shutdown(context.Background())
		stopRelease()
		stopSignals()
		d.policy.Close()
		return fail(err)
	}
	d.admin, err = admin.New(admin.Options{
		Listen:   cfg.Admin.Listen,
		Token:    token,
		Policy:   d.policy,
		Held:     held,
		Queues:   d.release.Queues,
		Reload:   d.reload,
		Gatherer: reg,
		Logger:   log,
		Pprof:    cfg.Admin.Pprof,
		Health:   d.policy.Health,
		TLSCert:  cfg.Admin.TLSCert,
		TLSKey:   cfg.Admin.TLSKey,
		DKIM:     d.smtp,
	})
	if err == nil {
		err = d.admin.Start()
	}
	if err != nil {
		d.smtp.Shutdown(context.Background())
		stopRelease()
		stopSignals()
		d.policy.Close()
		return fail(err)
	}
	return d, nil
}

// reload re-reads the config file (and the qmail files it names). A bad file
// keeps the running config; the error says where the file is wrong.
func (d *daemon) reload() error {
	if d.cfg.Path == "" {
		return errors.New("running on the embedded defaults: there is no file to reload")
	}
	cfg, err := config.Load(d.cfg.Path)
	if err != nil {
		return err
	}
	for _, w := range restartOnly(d.cfg, cfg) {
		d.log.Warn("reload: this setting changes only at restart", "key", w)
	}
	logWarnings(d.log, cfg)
	if err := d.smtp.Reload(cfg); err != nil {
		return err
	}
	if err := d.policy.Reload(cfg); err != nil {
		return fmt.Errorf("the SMTP front end runs the new file but policy kept the old caps: %w", err)
	}
	d.log.Info("config reloaded", "config", cfg.Path)
	d.cfg = cfg
	if err := d.writeQQSettings(cfg); err != nil {
		return fmt.Errorf("config reloaded, but relay-qq's settings were not written (it runs relay-local for every message): %w", err)
	}
	return nil
}

// writeQQSettings writes <data_dir>/qq.settings for relay-qq: the local
// socket bound at start, the rest from cfg, exempt users as uids from
// /etc/passwd. Without a local listener, or when the file cannot be
// written, an old file is removed, so relay-qq hands every message to
// relay-local (which reads relay.toml) rather than follow stale settings.
func (d *daemon) writeQQSettings(cfg *config.Config) error {
	path := filepath.Join(cfg.DataDir, local.SettingsFile)
	if d.qqSocket == "" {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	accounts, err := config.ReadPasswdFile(passwdFile)
	if err != nil {
		d.log.Warn("cannot read local accounts: no exempt uids for relay-qq", "file", passwdFile, "err", err)
	}
	st, err := local.NewSettings(cfg, accounts)
	if err == nil {
		st.Socket = d.qqSocket
		err = local.WriteSettings(path, st)
	}
	if err != nil {
		os.Remove(path)
		return err
	}
	if err := local.OthersCanRead(path); err != nil {
		d.log.Warn("relay-qq runs as the caller and cannot read its settings: it runs relay-local for every message", "err", err)
	}
	return nil
}

// passwdFile is where local.exempt_users are looked up.
const passwdFile = "/etc/passwd"

// logWarnings logs what check-config warns about in cfg.
func logWarnings(log *slog.Logger, cfg *config.Config) {
	for _, w := range cfg.Warnings {
		log.Warn("config: " + w.Error())
	}
}

func (d *daemon) recordReload(detail string) {
	if err := d.policy.RecordEvent(policy.Event{Kind: policy.EventReload, Detail: detail}); err != nil {
		d.log.Error("recording the reload event", "err", err)
	}
}

// restartOnly names the settings a reload cannot change.
func restartOnly(old, cur *config.Config) []string {
	var keys []string
	if fmt.Sprint(old.Listen) != fmt.Sprint(cur.Listen) {
		keys = append(keys, "listen")
	}
	if old.DataDir != cur.DataDir {
		keys = append(keys, "data_dir")
	}
	if old.Delivery != cur.Delivery {
		keys = append(keys, "delivery")
	}
	if old.Admin != cur.Admin {
		keys = append(keys, "admin")
	}
	if old.Signals != cur.Signals {
		keys = append(keys, "signals")
	}
	if old.Auth.FailLimit != cur.Auth.FailLimit {
		keys = append(keys, "auth.fail_limit")
	}
	return keys
}

// shutdown stops the admin API first (a release in flight finishes), then
// the SMTP front end (transactions in flight finish within ctx), then the
// releaser (hand-offs in flight finish within ctx), then the log follower,
// and only then flushes policy (the counts with the follower's place in
// the log and its join) and closes the database they all write to.
func (d *daemon) shutdown(ctx context.Context) error {
	errAdmin := d.admin.Shutdown(ctx)
	errSMTP := d.smtp.Shutdown(ctx)
	errRelease := d.release.Stop(ctx)
	var errSignals error
	if d.signals != nil {
		errSignals = d.signals.Close()
	}
	errPolicy := d.policy.Close()
	errDB := d.closeDB()
	return errors.Join(errAdmin, errSMTP, errRelease, errSignals, errPolicy, errDB)
}

// heldActions gives the admin API the hold spool, with release and delete
// through the releaser: released mail goes through the daemon's own
// hand-off, keeps its envelope and is not counted again, and queued mail
// leaves its release queue.
type heldActions struct {
	*queue.HoldSpool
	release *relay.Releaser
}

func (h heldActions) Release(ctx context.Context, id string) (queue.Receipt, error) {
	return h.release.Release(ctx, id)
}

func (h heldActions) Delete(id string) error { return h.release.Delete(id) }
