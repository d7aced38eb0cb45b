package queue

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// QmailDirect hands messages to `relay queue-writer` (QueueWriter), which
// writes them into qmail's queue itself: method qmail-direct. The writer's
// connections come from Attach; while there is none, a message waits up to
// WaitWriter for one and is then deferred (451), as is a message whose
// writer goes away or does not answer within Timeout. 250 comes only with
// the writer's word that the message's todo link is durable.
type QmailDirect struct {
	Timeout    time.Duration // per message; <= 0: DefaultTimeout
	WaitWriter time.Duration // how long a message waits for a writer; <= 0: 5s
	Logger     *slog.Logger  // nil: discard
	// UID is the invoker qmail-queue's Received line and intd name
	// (qmaild's makes "invoked from network"); -1: this process's uid.
	UID int

	mu     sync.Mutex
	cur    *qwConn
	ready  chan struct{} // closed when cur is set; replaced when it goes
	closed bool
	lastQP atomic.Uint64 // highest qp seen, for the next writer's hello
	chunks sync.Pool     // *[]byte of qwChunk: what a message is read into
}

// Texts of the qmail-direct hand-off's own failures (qmail-smtpd's and
// qmail.c's where they fit).
const (
	qdTextNoWriter = "qqt failure (#4.3.0)"
	qdTextLost     = "qq crashed (#4.3.0)"
)

// NewQmailDirect returns a hand-off without a writer yet.
func NewQmailDirect(timeout time.Duration, log *slog.Logger) *QmailDirect {
	return &QmailDirect{Timeout: timeout, Logger: log, UID: -1, ready: make(chan struct{})}
}

// Attach makes c (a connection to a queue writer) the one new messages
// use, after greeting the writer. An earlier connection is closed: its
// messages in flight are deferred.
func (q *QmailDirect) Attach(c net.Conn) {
	uid := q.UID
	if uid < 0 {
		uid = os.Getuid()
	}
	wc := &qwConn{c: c, wsem: make(chan struct{}, 1), pending: map[uint64]chan qwResult{}, dead: make(chan struct{}), q: q}
	// The hello is the first thing on a fresh socket: it fits its buffer.
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(appendQWFrame(nil, qwHello, 0, qwHelloPayload(uint32(uid), q.lastQP.Load()))); err != nil {
		orDiscard(q.Logger).Error("queue writer: hello failed", "err", err)
		c.Close()
		return
	}
	c.SetWriteDeadline(time.Time{})
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		c.Close()
		return
	}
	old := q.cur
	q.cur = wc
	close(q.ready)
	q.mu.Unlock()
	if old != nil {
		old.fail(errors.New("replaced by a new writer"))
	}
	go wc.readReplies()
}

// Close drops the writer connection; messages in flight are deferred and
// later ones are refused.
func (q *QmailDirect) Close() error {
	q.mu.Lock()
	q.closed = true
	cur := q.cur
	q.mu.Unlock()
	if cur != nil {
		cur.fail(errors.New("hand-off closed"))
	}
	return nil
}

// conn waits (within ctx and WaitWriter) for a live writer connection.
func (q *QmailDirect) conn(ctx context.Context) (*qwConn, error) {
	wait := q.WaitWriter
	if wait <= 0 {
		wait = 5 * time.Second
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		q.mu.Lock()
		cur, ready, closed := q.cur, q.ready, q.closed
		q.mu.Unlock()
		if closed {
			return nil, qmailError(451, qdTextNoWriter)
		}
		if cur != nil {
			return cur, nil
		}
		select {
		case <-ready:
		case <-timer.C:
			return nil, qmailError(451, qdTextNoWriter)
		case <-ctx.Done():
			return nil, qmailError(451, qdTextNoWriter)
		}
	}
}

// detach forgets wc if it is still the current connection.
func (q *QmailDirect) detach(wc *qwConn) {
	q.mu.Lock()
	if q.cur == wc {
		q.cur = nil
		q.ready = make(chan struct{})
	}
	q.mu.Unlock()
}

// Deliver streams the message to the writer and waits for its answer.
// The reply on success is qmail-smtpd's "ok <unixtime> qp <qp>".
func (q *QmailDirect) Deliver(ctx context.Context, env Envelope, msg io.Reader) (Receipt, error) {
	if err := checkEnvelope(env); err != nil {
		return Receipt{}, err
	}
	envelope := AppendEnvelope(make([]byte, 0, envelopeSize(env)), env)
	if len(envelope) > qwMaxPayload {
		return Receipt{}, qmailError(554, "envelope too large for qq (#5.3.4)")
	}
	log := orDiscard(q.Logger)
	ctx, cancel := withTimeout(ctx, q.Timeout)
	defer cancel()
	wc, err := q.conn(ctx)
	if err != nil {
		log.Warn("queue writer: none connected", "err", err)
		return Receipt{}, err
	}
	id, ch := wc.register()
	defer wc.unregister(id)

	bp, _ := q.chunks.Get().(*[]byte)
	if bp == nil {
		b := make([]byte, qwChunk)
		bp = &b
	}
	defer q.chunks.Put(bp)
	buf := *bp
	src := &readTracker{r: msg}
	typ := byte(qwBegin)
	for {
		n, rerr := io.ReadFull(src, buf)
		last := rerr != nil
		if src.err != nil {
			wc.abort(id)
			return Receipt{}, readError(src.err)
		}
		var werr error
		if last {
			werr = wc.send(ctx, typ, id, buf[:n], qwEnd, envelope)
		} else {
			werr = wc.send(ctx, typ, id, buf[:n], 0, nil)
		}
		if werr != nil {
			return Receipt{}, q.sendFailure(ctx, wc, werr, log)
		}
		if last {
			break
		}
		typ = qwData
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return Receipt{}, r.err
		}
		for {
			old := q.lastQP.Load()
			if r.qp <= old || q.lastQP.CompareAndSwap(old, r.qp) {
				break
			}
		}
		return Receipt{QP: int(r.qp), Reply: fmt.Sprintf("ok %d qp %d", time.Now().Unix(), r.qp)}, nil
	case <-wc.dead:
		log.Warn("queue writer: connection lost before the answer", "err", wc.deadErr())
		return Receipt{}, qmailError(451, qdTextLost)
	case <-ctx.Done():
		wc.abort(id)
		log.Warn("queue writer: no answer in time", "timeout", q.Timeout)
		return Receipt{}, qmailError(451, qqTextTimeout)
	}
}

// sendFailure is the answer when a frame could not be sent.
func (q *QmailDirect) sendFailure(ctx context.Context, wc *qwConn, err error, log *slog.Logger) error {
	if ctx.Err() != nil {
		log.Warn("queue writer: sending timed out", "err", err)
		return qmailError(451, qqTextTimeout)
	}
	log.Warn("queue writer: connection lost while sending", "err", err)
	return qmailError(451, qdTextLost)
}

// qwResult is the writer's answer for one message.
type qwResult struct {
	qp  uint64
	err error
}

// qwConn is the daemon's side of one writer connection.
type qwConn struct {
	q       *QmailDirect
	c       net.Conn
	wsem    chan struct{} // the right to write a frame
	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan qwResult
	dead    chan struct{}
	once    sync.Once
	err     error
}

func (wc *qwConn) register() (uint64, chan qwResult) {
	ch := make(chan qwResult, 1)
	wc.mu.Lock()
	wc.nextID++
	id := wc.nextID
	wc.pending[id] = ch
	wc.mu.Unlock()
	return id, ch
}

func (wc *qwConn) unregister(id uint64) {
	wc.mu.Lock()
	delete(wc.pending, id)
	wc.mu.Unlock()
}

func (wc *qwConn) deadErr() error {
	wc.mu.Lock()
	defer wc.mu.Unlock()
	return wc.err
}

// fail ends the connection: every message waiting on it is deferred.
func (wc *qwConn) fail(err error) {
	wc.once.Do(func() {
		wc.mu.Lock()
		wc.err = err
		wc.mu.Unlock()
		wc.q.detach(wc)
		wc.c.Close()
		close(wc.dead)
	})
}

// send writes a frame of type t1 with payload p1 and, when t2 is not 0, a
// second one, in one write. A write that fails or runs past ctx leaves
// the stream broken: the connection is ended.
func (wc *qwConn) send(ctx context.Context, t1 byte, id uint64, p1 []byte, t2 byte, p2 []byte) error {
	select {
	case wc.wsem <- struct{}{}:
	case <-wc.dead:
		return wc.deadErr()
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-wc.wsem }()
	var h1, h2 [qwHeaderLen]byte
	putQWHeader(h1[:], t1, id, len(p1))
	bufs := net.Buffers{h1[:], p1}
	if t2 != 0 {
		putQWHeader(h2[:], t2, id, len(p2))
		bufs = append(bufs, h2[:], p2)
	}
	if d, ok := ctx.Deadline(); ok {
		wc.c.SetWriteDeadline(d)
	}
	if _, err := bufs.WriteTo(wc.c); err != nil {
		wc.fail(err)
		return err
	}
	return nil
}

// abort tells the writer to forget message id, without waiting long: a
// message whose todo link is already made stays queued.
func (wc *qwConn) abort(id uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	wc.send(ctx, qwAbort, id, nil, 0, nil)
}

// readReplies delivers the writer's answers until the connection ends.
func (wc *qwConn) readReplies() {
	br := bufio.NewReader(wc.c)
	var buf []byte
	for {
		f, err := readQWFrame(br, &buf)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("the queue writer closed the connection")
			}
			wc.fail(err)
			return
		}
		var r qwResult
		switch f.typ {
		case qwOK:
			qp, _, err := parseQWOK(f.payload)
			if err != nil {
				wc.fail(err)
				return
			}
			r.qp = qp
		case qwFail:
			if len(f.payload) == 0 {
				wc.fail(fmt.Errorf("%w: empty fail frame", errQWProtocol))
				return
			}
			r.err = qqExitError(int(f.payload[0]))
			if len(f.payload) > 1 {
				orDiscard(wc.q.Logger).Warn("queue writer refused a message", "exit", f.payload[0], "detail", string(f.payload[1:]))
			}
		default:
			wc.fail(fmt.Errorf("%w: reply type %q", errQWProtocol, f.typ))
			return
		}
		wc.mu.Lock()
		ch := wc.pending[f.id]
		delete(wc.pending, f.id)
		wc.mu.Unlock()
		if ch != nil {
			ch <- r
		}
	}
}
