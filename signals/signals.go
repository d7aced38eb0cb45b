// Package signals learns what became of the mail relay handed off: it
// follows qmail-send's log ([signals] qmail_send_log, a multilog "current"
// or a syslog file) across rotations and restarts, joins each message's
// "info msg N: ... qp Q" line with the qp (qmail-queue's pid) of relay's
// own hand-offs, and hands every delivery's outcome (success, failure,
// deferral) to the message's identities through a Sink, which package
// policy implements (DESIGN.md §12).
package signals

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"relay/config"
)

// Sink receives the outcomes; *policy.Engine implements it.
type Sink interface {
	// RecordDelivery counts one delivery of a message handed off for ids:
	// outcome is "success", "failure" or "deferral", at when qmail-send
	// logged it (zero when the log has no stamps).
	RecordDelivery(ids []string, outcome string, at time.Time)
	// Flush makes what RecordDelivery counted durable. The follower calls
	// it before it saves its place in the log, so that a crash re-reads
	// lines rather than losing them, and re-reads only lines whose counts
	// were lost with it.
	Flush() error
}

// StateFile is the follower's state in data_dir: its place in the log and
// the join.
const StateFile = "signals.state"

// Defaults of Options.
const (
	defaultPoll      = 500 * time.Millisecond
	defaultSaveEvery = 2 * time.Second
	expireEvery      = time.Minute
)

// Options are a Follower's dependencies; all optional.
type Options struct {
	Logger    *slog.Logger     // nil: discard
	Now       func() time.Time // nil: time.Now
	Poll      time.Duration    // how often the log is looked at (500ms)
	SaveEvery time.Duration    // how often the state is saved when changed (2s)
}

// Follower follows qmail-send's log and joins it with relay's hand-offs.
// HandedOff may be called from any goroutine.
type Follower struct {
	path      string
	statePath string
	sink      Sink
	log       *slog.Logger
	now       func() time.Time
	poll      time.Duration
	saveEvery time.Duration

	mu    sync.Mutex // guards join and dirty
	join  *joinState
	dirty bool

	tail  *tail // the loop goroutine's
	saved *filePos

	// The loop goroutine's: an info line splogger cut, waiting for its
	// continuation; outcomes to hand to the sink; counts for the log.
	cut            []byte
	cutStamp       int64
	recs, recBuf   []record
	lines, counted int64

	startOnce sync.Once
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// New prepares a Follower of cfg.Signals.QmailSendLog (a multilog
// directory stands for its "current") that saves its state in
// cfg.DataDir, reading the state a previous run saved. A state file that
// cannot be read is an error that names it: relay stops rather than
// count twice or lose its place silently.
func New(cfg *config.Config, sink Sink, opts Options) (*Follower, error) {
	path := cfg.Signals.QmailSendLog
	if path == "" {
		return nil, errors.New("signals: no qmail_send_log")
	}
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		path = filepath.Join(path, "current")
	}
	f := &Follower{
		path:      path,
		statePath: filepath.Join(cfg.DataDir, StateFile),
		sink:      sink,
		log:       opts.Logger,
		now:       opts.Now,
		poll:      opts.Poll,
		saveEvery: opts.SaveEvery,
		join:      newJoinState(),
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
	}
	if f.log == nil {
		f.log = slog.New(slog.DiscardHandler)
	}
	if f.now == nil {
		f.now = time.Now
	}
	if f.poll <= 0 {
		f.poll = defaultPoll
	}
	if f.saveEvery <= 0 {
		f.saveEvery = defaultSaveEvery
	}
	if err := f.load(); err != nil {
		return nil, err
	}
	f.tail = newTail(path, f.log)
	return f, nil
}

// Start opens the log and starts following it.
func (f *Follower) Start() {
	f.startOnce.Do(func() {
		f.tail.start(f.saved)
		go f.loop()
	})
}

// Close stops following and saves the state. The sink must still take
// Flush.
func (f *Follower) Close() error {
	f.closeOnce.Do(func() {
		f.Start() // a Follower never started still saves its hand-offs
		close(f.stop)
		<-f.done
		f.tail.close()
		f.closeErr = f.save()
		f.log.Info("signals: stopped", "lines", f.lines, "deliveries_counted", f.counted, "long_lines_skipped", f.tail.skipped)
	})
	return f.closeErr
}

// HandedOff records that qmail-queue process qp took a message from the
// envelope sender from for ids, the hand-off having begun at `at`.
func (f *Follower) HandedOff(qp int, from string, ids []string, at time.Time) {
	if qp <= 0 || len(ids) == 0 {
		return
	}
	h := handoff{QP: qp, From: from, IDs: append([]string(nil), ids...), At: at.UnixNano()}
	f.mu.Lock()
	recs := f.join.handedOff(h, f.now().UnixNano())
	f.dirty = true
	f.mu.Unlock()
	for _, r := range recs {
		f.sink.RecordDelivery(r.ids, r.outcome, r.at)
	}
}

// handle applies one log line; f.mu is held. Outcomes to count collect
// in f.recs.
func (f *Follower) handle(b []byte) {
	f.lines++
	l := parseLine(b)
	switch l.kind {
	case lineOther:
		f.cut = f.cut[:0]
		return
	case lineCut:
		f.cut, f.cutStamp = append(f.cut[:0], l.rest...), l.stamp
		return
	case lineCont:
		if len(f.cut) == 0 || l.stamp != f.cutStamp {
			return
		}
		joined := append(f.cut, l.rest...)
		f.cut = f.cut[:0]
		l = line{}
		parseMessage(&l, joined)
		l.stamp = f.cutStamp
		if l.kind != lineInfo {
			return
		}
	default:
		f.cut = f.cut[:0]
	}
	if r, ok := f.join.line(&l, f.now().UnixNano()); ok {
		f.recs = append(f.recs, r)
	}
}

func (f *Follower) loop() {
	defer close(f.done)
	lastSave, lastExpire := f.now(), f.now()
	for {
		f.mu.Lock()
		progressed := f.tail.step(f.handle)
		if progressed {
			f.dirty = true
		}
		recs := f.recs
		f.recs = f.recBuf[:0]
		f.mu.Unlock()
		for _, r := range recs {
			f.sink.RecordDelivery(r.ids, r.outcome, r.at)
		}
		f.counted += int64(len(recs))
		f.recBuf = recs[:0]
		now := f.now()
		if now.Sub(lastExpire) >= expireEvery {
			f.mu.Lock()
			f.join.expire(now.UnixNano(), false)
			f.mu.Unlock()
			lastExpire = now
		}
		if now.Sub(lastSave) >= f.saveEvery {
			if err := f.save(); err != nil {
				f.log.Error("signals: saving the follower's state", "path", f.statePath, "err", err)
			}
			lastSave = now
		}
		if progressed {
			select {
			case <-f.stop:
				return
			default:
			}
			continue
		}
		select {
		case <-f.stop:
			return
		case <-time.After(f.poll):
		}
	}
}

// savedState is the state file: the place in the log and the join.
type savedState struct {
	Version    int         `json:"version"`
	File       *filePos    `json:"file,omitempty"`
	Handoffs   []handoff   `json:"handoffs"`
	Messages   []*message  `json:"messages"`
	Deliveries [][2]uint64 `json:"deliveries"` // D, msg number
}

const stateVersion = 1

// save makes the sink's counts durable, then writes the state (when it
// changed) atomically.
func (f *Follower) save() error {
	f.mu.Lock()
	dirty := f.dirty
	f.mu.Unlock()
	if !dirty {
		return nil
	}
	if err := f.sink.Flush(); err != nil {
		return fmt.Errorf("flushing the counts first: %w", err)
	}
	f.mu.Lock()
	s := savedState{Version: stateVersion}
	if f.tail.pos.Ino != 0 {
		pos := f.tail.pos
		s.File = &pos
	} else {
		s.File = f.saved // the log was never opened in this run
	}
	for _, hs := range f.join.handoffs {
		s.Handoffs = append(s.Handoffs, hs...)
	}
	for _, m := range f.join.msgs {
		s.Messages = append(s.Messages, m)
	}
	for d, n := range f.join.deliveries {
		s.Deliveries = append(s.Deliveries, [2]uint64{d, n})
	}
	b, err := json.Marshal(s)
	f.dirty = false
	f.mu.Unlock()
	if err == nil {
		err = writeAtomic(f.statePath, b)
	}
	if err != nil {
		f.mu.Lock()
		f.dirty = true
		f.mu.Unlock()
	}
	return err
}

// load reads the state a previous run saved, if any.
func (f *Follower) load() error {
	b, err := os.ReadFile(f.statePath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("signals: reading %s: %w", f.statePath, err)
	}
	var s savedState
	if err := json.Unmarshal(b, &s); err != nil || s.Version != stateVersion {
		if err == nil {
			err = fmt.Errorf("version %d", s.Version)
		}
		return fmt.Errorf("signals: %s is damaged (%v); move it aside to follow qmail_send_log from its end", f.statePath, err)
	}
	j := f.join
	for _, h := range s.Handoffs {
		j.handoffs[h.QP] = append(j.handoffs[h.QP], h)
		j.nHandoffs++
	}
	for _, m := range s.Messages {
		if m == nil {
			continue
		}
		j.msgs[m.N] = m
		if m.IDs == nil {
			j.tentative[m.QP] = m.N
		}
	}
	for _, d := range s.Deliveries {
		if _, ok := j.msgs[d[1]]; ok {
			j.deliveries[d[0]] = d[1]
		}
	}
	f.saved = s.File
	return nil
}

// writeAtomic replaces path with b: a temporary file, fsynced, renamed
// over it, and the directory fsynced.
func writeAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	fh, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = fh.Write(b)
	if err == nil {
		err = fh.Sync()
	}
	if cerr := fh.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
