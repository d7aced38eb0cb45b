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
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"relay/config"
)

// Sink receives the outcomes and keeps the follower's state; *policy.Engine
// implements it.
type Sink interface {
	// RecordDelivery counts one delivery of a message handed off for ids:
	// outcome is "success", "failure" or "deferral", at when qmail-send
	// logged it (zero when the log has no stamps).
	RecordDelivery(ids []string, outcome string, at time.Time)
	// AttachFlushPart calls load with each record stored in bucket, then
	// writes part's changes in every flush of the counts, in the same
	// transaction (persist.go).
	AttachFlushPart(bucket string, part FlushPart, load func(key, val []byte) error) error
}

// FlushPart is what a Sink writes with its counts: policy.FlushPart, the
// same unnamed interface type.
type FlushPart = interface {
	Lock()
	Unlock()
	TakeChanges(put func(key, val []byte)) (done func(committed bool))
}

// Defaults of Options.
const (
	defaultPoll = 500 * time.Millisecond
	expireEvery = time.Minute
)

// Options are a Follower's dependencies; all optional.
type Options struct {
	Logger     *slog.Logger          // nil: discard
	Now        func() time.Time      // nil: time.Now
	Poll       time.Duration         // how often the log is looked at (500ms)
	Registerer prometheus.Registerer // nil: metrics are kept but not registered
}

// Follower follows qmail-send's log and joins it with relay's hand-offs.
// HandedOff may be called from any goroutine.
type Follower struct {
	path    string
	sink    Sink
	log     *slog.Logger
	now     func() time.Time
	poll    time.Duration
	metrics *metrics

	// Hand-offs come in here (HandedOff): journalled, then queued for the
	// loop (or a flush) to take into the join.
	inMu    sync.Mutex
	queue   []handoff
	lastSeq uint64 // the last hand-off's number
	journal *journal
	// journalFailing: the last journal write failed (logged once a streak)
	journalFailing bool
	wake           chan struct{}

	// mu guards what follows. The loop holds it while it reads lines and
	// counts their outcomes; a flush holds it from TakeChanges until it
	// has taken the counters (persist.go).
	mu        sync.Mutex
	join      *joinState
	tail      *tail
	saved     *filePos // where the previous run was (nil: the log's end)
	cut       []byte   // an info line splogger cut, waiting for its continuation
	cutStamp  int64
	takenSeq  uint64 // the last hand-off taken into the join
	lastState []byte // the state record as last committed (nil: write it)
	recs      []record
	lines     int64 // for the log at Close
	counted   int64
	// linesReported is what the lines metric has of lines.
	linesReported int64
	// placeStored: relay.db has a place in the log (a state record with
	// a file); until then the start file keeps where the follower began.
	placeStored bool
	startNoted  bool   // the start file exists (written by noteStart or a previous run)
	legacyState string // an earlier relay's data_dir/signals.state, removed once relay.db has a place

	startOnce sync.Once
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// New prepares a Follower of cfg.Signals.QmailSendLog (a multilog
// directory stands for its "current"), its state kept in sink's flushes
// and its hand-off journal in cfg.DataDir. It loads the state a previous
// run left: where it was in the log, the join, and the hand-offs
// recorded after the last flush.
func New(cfg *config.Config, sink Sink, opts Options) (*Follower, error) {
	if cfg.Signals.QmailSendLog == "" {
		return nil, errors.New("signals: no qmail_send_log")
	}
	path := LogPath(cfg.Signals.QmailSendLog)
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, err
	}
	f := &Follower{
		path:    path,
		sink:    sink,
		log:     opts.Logger,
		now:     opts.Now,
		poll:    opts.Poll,
		metrics: m,
		join:    newJoinState(m),
		wake:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
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
	j, hs, err := openJournal(filepath.Join(cfg.DataDir, JournalDir), func(path string, read int, err error) {
		f.metrics.error(errLoad)
		f.log.Warn("signals: the hand-off journal ends early (the system crashed while it was written?); the hand-offs after it are lost",
			"file", path, "records_read", read, "err", err)
	})
	if err != nil {
		return nil, err
	}
	f.journal = j
	f.tail = newTail(path, f.log, m)
	// Where a previous run that never flushed began (a stored state
	// replaces it), and the journal's hand-offs (those the stored state
	// has taken are dropped when it is read).
	if b, err := os.ReadFile(f.startPath()); err == nil {
		if s, err := decodeState(b); err == nil {
			f.saved = s.File
		}
		f.startNoted = true // removed once relay.db has a place
	}
	for _, h := range hs {
		f.queue = append(f.queue, h)
		f.lastSeq = max(f.lastSeq, h.Seq)
	}
	// Last: from here on every flush of the sink takes the follower's
	// changes.
	if err := sink.AttachFlushPart(Bucket, (*part)(f), f.loadRecord); err != nil {
		return nil, fmt.Errorf("signals: reading the follower's state from relay.db: %w", err)
	}
	f.takeLegacyState(filepath.Join(cfg.DataDir, legacyStateFile))
	f.inMu.Lock()
	n := len(f.queue)
	f.inMu.Unlock()
	if n > 0 {
		f.log.Info("signals: hand-offs recorded after the last flush before relay stopped are taken from the journal", "handoffs", n)
	}
	return f, nil
}

// legacyStateFile is where relay kept the follower's place before it
// went into relay.db (a JSON object with the place under "file").
const legacyStateFile = "signals.state"

// takeLegacyState resumes at the place an earlier relay saved in
// data_dir/signals.state when relay.db has none yet; the file is removed
// once it has. The earlier join is not taken: the messages in flight at
// the upgrade are not joined.
func (f *Follower) takeLegacyState(path string) {
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	f.legacyState = path
	if f.placeStored || f.startNoted {
		return
	}
	var old struct {
		File *filePos `json:"file"`
	}
	if err := json.Unmarshal(b, &old); err != nil || old.File == nil {
		f.log.Warn("signals: an earlier relay's state file has no place in the log; the follower begins at the log's end", "path", path)
		return
	}
	f.saved = old.File
	f.log.Info("signals: resuming at the place an earlier relay saved; relay.db keeps it from now on and the file is removed", "path", path, "offset", old.File.Offset)
}

// loadRecord takes one stored record (AttachFlushPart's load). A record
// that cannot be read is logged and dropped: it costs the join one
// message (or its place in the log), never relay's start.
func (f *Follower) loadRecord(k, v []byte) error {
	var err error
	switch {
	case string(k) == keyState:
		var s savedState
		if s, err = decodeState(v); err == nil {
			if s.File != nil {
				f.saved, f.placeStored = s.File, true
			}
			f.cut, f.cutStamp, f.takenSeq = s.Cut, s.CutStamp, s.LastSeq
			f.lastSeq = max(f.lastSeq, s.LastSeq) // a number taken is never given again
			f.lastState = slices.Clone(v)
			// The journal's hand-offs up to LastSeq are in the stored join.
			f.queue = slices.DeleteFunc(f.queue, func(h handoff) bool { return h.Seq <= s.LastSeq })
		}
	case len(k) == 9 && k[0] == prefixHandoff:
		var h handoff
		if h, err = decodeHandoff(v); err == nil {
			f.join.handoffs[h.QP] = append(f.join.handoffs[h.QP], h)
			f.join.nHandoffs++
			f.lastSeq = max(f.lastSeq, h.Seq)
		}
	case len(k) == 9 && k[0] == prefixMessage:
		var m *message
		if m, err = decodeMessage(v); err == nil {
			j := f.join
			j.msgs[m.N] = m
			if m.IDs == nil {
				j.tentative[m.QP] = m.N
			}
			for _, d := range m.Open {
				j.deliveries[d] = m.N
			}
		}
	default:
		err = errors.New("unknown key")
	}
	if err != nil {
		f.metrics.error(errLoad)
		f.log.Error("signals: a record of the follower's state in relay.db cannot be read; dropped", "key", fmt.Sprintf("%q", k), "err", err)
	}
	return nil
}

// Start opens the log and starts following it.
func (f *Follower) Start() {
	f.startOnce.Do(func() {
		f.mu.Lock()
		f.tail.start(f.saved)
		f.noteStart()
		f.mu.Unlock()
		go f.loop()
	})
}

// startPath is where a follower that has no state in relay.db yet (its
// very first run) keeps the place it began at, until its first flush: a
// kill -9 before that flush must not move it to the log's end, past the
// lines it has not counted. Written with write(2), like the journal.
func (f *Follower) startPath() string { return filepath.Join(f.journal.dir, "start") }

// noteStart writes the start file when the log was just opened and
// relay.db has no place in it yet; f.mu is held.
func (f *Follower) noteStart() {
	if f.placeStored || f.tail.f == nil || f.startNoted {
		return
	}
	pos := f.tail.pos
	b := appendState(nil, &savedState{File: &pos})
	if err := os.WriteFile(f.startPath(), b, 0o600); err != nil {
		f.metrics.error(errJournal)
		f.log.Error("signals: writing where the follower begins", "path", f.startPath(), "err", err)
		return
	}
	f.startNoted = true
}

// Close stops following. What the follower changed since the last flush
// is written by the sink's next flush (policy's Close).
func (f *Follower) Close() error {
	f.closeOnce.Do(func() {
		f.Start()
		close(f.stop)
		<-f.done
		f.mu.Lock()
		f.tail.close()
		f.mu.Unlock()
		f.inMu.Lock()
		f.journal.close()
		f.inMu.Unlock()
		f.log.Info("signals: stopped", "lines", f.lines, "deliveries_counted", f.counted, "long_lines_skipped", f.tail.skipped)
	})
	return nil
}

// HandedOff records that qmail-queue process qp took a message from the
// envelope sender from for ids, the hand-off having begun at `at`. It
// returns once the record is in the journal (one write(2)), so that a
// kill -9 after the 250 that follows loses nothing.
func (f *Follower) HandedOff(qp int, from string, ids []string, at time.Time) {
	if qp <= 0 || len(ids) == 0 {
		return
	}
	h := handoff{QP: qp, From: from, IDs: slices.Clone(ids), At: at.UnixNano()}
	f.inMu.Lock()
	f.lastSeq++
	h.Seq = f.lastSeq
	err := f.journal.append(&h)
	f.queue = append(f.queue, h)
	first, recovered := err != nil && !f.journalFailing, err == nil && f.journalFailing
	f.journalFailing = err != nil
	f.inMu.Unlock()
	f.metrics.handoffs.Inc()
	if err != nil {
		f.metrics.error(errJournal) // every failure; the log says when it starts and ends
	}
	if first {
		f.log.Error("signals: writing the hand-off journal fails; hand-offs are kept in memory and written to relay.db by the next flush (a kill -9 before it loses them)",
			"dir", f.journal.dir, "qp", qp, "err", err)
	}
	if recovered {
		f.log.Info("signals: writing the hand-off journal works again", "dir", f.journal.dir)
	}
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// takeHandoffs moves the queued hand-offs into the join; f.mu is held.
// Outcomes that become known collect in f.recs.
func (f *Follower) takeHandoffs(rotate bool) {
	f.inMu.Lock()
	q := f.queue
	f.queue = nil
	f.takenSeq = f.lastSeq
	if rotate {
		f.journal.rotate(false)
	}
	f.inMu.Unlock()
	now := f.now().UnixNano()
	for _, h := range q {
		f.recs = append(f.recs, f.join.handedOff(h, now)...)
	}
}

// count hands the collected outcomes to the sink; f.mu is held.
func (f *Follower) count() {
	for _, r := range f.recs {
		f.sink.RecordDelivery(r.ids, r.outcome, r.at)
		f.metrics.delivery(r.outcome)
	}
	f.counted += int64(len(f.recs))
	clear(f.recs)
	f.recs = f.recs[:0]
}

// handle applies one log line; f.mu is held. Outcomes to count collect
// in f.recs.
func (f *Follower) handle(b []byte) {
	f.lines++
	l := parseLine(b)
	if l.stamp != 0 {
		f.tail.lastStamp = l.stamp
	}
	switch l.kind {
	case lineOther:
		f.cut = f.cut[:0]
		return
	case lineBad:
		f.cut = f.cut[:0]
		f.metrics.malformed.Inc()
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
	lastExpire := f.now()
	for {
		f.mu.Lock()
		f.takeHandoffs(false)
		wasOpen := f.tail.f != nil
		progressed := f.tail.step(f.handle)
		if !wasOpen {
			f.noteStart() // opened at its start (it was missing)
		}
		f.count()
		now := f.now()
		if now.Sub(lastExpire) >= expireEvery {
			f.join.expire(now.UnixNano(), false)
			lastExpire = now
		}
		f.metrics.joinSizes(f.join)
		f.metrics.lines.Add(float64(f.lines - f.linesReported))
		f.linesReported = f.lines
		f.tail.report()
		f.mu.Unlock()
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
		case <-f.wake:
		case <-time.After(f.poll):
		}
	}
}

// part is the Follower as the sink's FlushPart.
type part Follower

func (p *part) Lock()   { p.mu.Lock() }
func (p *part) Unlock() { p.mu.Unlock() }

// TakeChanges takes the queued hand-offs into the join (counting what
// they claim), then hands the records changed since the last call: the
// hand-offs and messages, and the state (place in the log, cut line,
// last hand-off taken) when it changed. f.mu is held.
func (p *part) TakeChanges(put func(key, val []byte)) func(committed bool) {
	f := (*Follower)(p)
	f.takeHandoffs(true)
	f.count()
	j := f.join
	hs, ms := j.dirtyH, j.dirtyM
	j.dirtyH, j.dirtyM = make(map[uint64]*handoff), make(map[uint64]struct{})
	// In key order: h..., m..., s.
	seqs := make([]uint64, 0, len(hs))
	for seq := range hs {
		seqs = append(seqs, seq)
	}
	slices.Sort(seqs)
	for _, seq := range seqs {
		var v []byte
		if h := hs[seq]; h != nil {
			v = appendHandoff(nil, h)
		}
		put(recordKey(prefixHandoff, seq), v)
	}
	for _, n := range sortedKeys(ms) {
		var v []byte
		if m := j.msgs[n]; m != nil {
			v = appendMessage(nil, m)
		}
		put(recordKey(prefixMessage, n), v)
	}
	s := savedState{File: f.saved, Cut: f.cut, CutStamp: f.cutStamp, LastSeq: f.takenSeq}
	if f.tail.pos.Ino != 0 {
		pos := f.tail.pos
		s.File = &pos
	}
	state := appendState(nil, &s)
	wrote := !slices.Equal(state, f.lastState)
	if wrote {
		put([]byte(keyState), state)
	}
	taken := f.takenSeq
	return func(committed bool) {
		f.mu.Lock()
		defer f.mu.Unlock()
		if !committed {
			for k, h := range hs {
				if _, newer := j.dirtyH[k]; !newer {
					j.dirtyH[k] = h
				}
			}
			for k := range ms {
				j.dirtyM[k] = struct{}{}
			}
			f.lastState = nil
			return
		}
		if wrote {
			if s.File != nil {
				f.placeStored = true
				if f.startNoted && os.Remove(f.startPath()) == nil { // relay.db has the place now
					f.startNoted = false
				}
				if f.legacyState != "" && os.Remove(f.legacyState) == nil {
					f.legacyState = ""
				}
			}
			f.lastState = state
		}
		f.inMu.Lock()
		f.journal.committed(taken)
		f.inMu.Unlock()
	}
}

// sortedKeys returns m's keys in order.
func sortedKeys(m map[uint64]struct{}) []uint64 {
	ks := make([]uint64, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
