package queue

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"relay/queue/inspect"
)

// QueueWriter writes messages into qmail's queue exactly as qmail-queue.c
// does, for many messages at once: it is what `relay queue-writer` runs, as
// qmailq, for the daemon's qmail-direct hand-off.
//
// For each message, as qmail-queue: a new pid/<pid>.<time>.<seq> file,
// hard-linked as mess/<inode % split>/<inode> (the inode is the message
// id) and unlinked from pid/; into it qmail-queue's Received line
// "(qmail <qp> invoked from network|by uid U|...)" and the message; then
// intd/<inode> with u<uid>\0p<qp>\0F<sender>\0T<rcpt>\0...; both 0644.
// Then, for all messages that arrived together (group commit): every mess
// and intd file is fsynced, every intd is linked as todo/<inode> (the
// commit point), todo/ itself is fsynced once, qmail-send's trigger is
// pulled once, and each message is answered. qmail-queue's qp is its pid;
// the writer's qp is its microsecond clock, strictly increasing and above
// every possible process id, so it is unique per message across writer
// and daemon restarts and never equals the qp of a real qmail-queue.
type QueueWriter struct {
	dir     string
	split   int
	bigTodo bool
	qfd     int // the queue directory, for the *at calls
	todoFDs []int
	logger  *slog.Logger
	mypid   int
	aliasU  int // qmail-queue's "by alias", "from network", "for bounce" uids
	qmaildU int
	qmailsU int

	pidSeq  atomic.Uint64
	rounds  atomic.Uint64             // commit rounds done (tests, logs)
	queued  atomic.Uint64             // messages committed
	aborts  atomic.Uint64             // aborts the daemon sent
	roundHk func(stage string, n int) // tests: called at each stage of a round of n messages
}

// OpenQueueWriter checks the queue at dir (its split and layout from the
// directories there, as qmail-send's conf-split made them) and looks up
// qmail's users that qmail-queue names in its Received line. It sets the
// process's umask to qmail-queue's 033.
func OpenQueueWriter(dir string, log *slog.Logger) (*QueueWriter, error) {
	split, err := inspect.SplitOf(dir)
	if err != nil {
		return nil, err
	}
	w := &QueueWriter{dir: dir, split: split, bigTodo: inspect.HasBigTodo(dir), logger: orDiscard(log), mypid: os.Getpid(), qfd: -1}
	for _, u := range []struct {
		name string
		dst  *int
	}{{"alias", &w.aliasU}, {"qmaild", &w.qmaildU}, {"qmails", &w.qmailsU}} {
		*u.dst = -1
		if pw, err := user.Lookup(u.name); err == nil {
			if n, err := strconv.Atoi(pw.Uid); err == nil {
				*u.dst = n
			}
		}
	}
	for _, sub := range []string{"pid", "intd", "todo", "mess"} {
		if err := unix.Access(filepath.Join(dir, sub), unix.W_OK|unix.X_OK); err != nil {
			return nil, fmt.Errorf("qmail queue %s: %s is not writable by uid %d: %w", dir, sub, os.Getuid(), err)
		}
	}
	if w.qfd, err = unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	todos := []string{"todo"}
	if w.bigTodo {
		todos = todos[:0]
		for s := range split {
			todos = append(todos, "todo/"+strconv.Itoa(s))
		}
	}
	for _, t := range todos {
		fd, err := unix.Openat(w.qfd, t, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			w.Close()
			return nil, &os.PathError{Op: "open", Path: filepath.Join(dir, t), Err: err}
		}
		w.todoFDs = append(w.todoFDs, fd)
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(w.qfd, &fs); err == nil && fs.Type != unix.EXT4_SUPER_MAGIC && fs.Type != unix.XFS_SUPER_MAGIC {
		// docs/performance.md: the group commit's safety is argued for
		// the journals of ext4 and XFS.
		w.logger.Warn("qmail's queue is not on ext4 or XFS: the writer's durability was argued for those only", "queue", dir, "fs_magic", fmt.Sprintf("%#x", fs.Type))
	}
	unix.Umask(0o033)
	return w, nil
}

// Close releases the queue's directory descriptors.
func (w *QueueWriter) Close() {
	for _, fd := range w.todoFDs {
		unix.Close(fd)
	}
	w.todoFDs = nil
	if w.qfd >= 0 {
		unix.Close(w.qfd)
		w.qfd = -1
	}
}

// Split is the queue's conf-split.
func (w *QueueWriter) Split() int { return w.split }

// Rounds is the number of commit rounds done so far; Queued the messages
// they committed.
func (w *QueueWriter) Rounds() uint64 { return w.rounds.Load() }

// Queued is the number of messages committed so far.
func (w *QueueWriter) Queued() uint64 { return w.queued.Load() }

// received formats qmail-queue's Received line for qp, the invoking uid
// and time t (receivedfmt in qmail-queue.c).
func (w *QueueWriter) received(qp uint64, uid int, t time.Time) []byte {
	var how string
	switch uid {
	case w.aliasU:
		how = "by alias"
	case w.qmaildU:
		how = "from network"
	case w.qmailsU:
		how = "for bounce"
	default:
		how = "by uid " + strconv.Itoa(uid)
	}
	return fmt.Appendf(nil, "Received: (qmail %d invoked %s); %s\n", qp, how, Date822(t))
}

// Date822 is qmail's date822fmt: "5 Mar 2024 07:04:09 -0000", in UTC.
func Date822(t time.Time) string {
	return t.UTC().Format("2 Jan 2006 15:04:05") + " -0000"
}

// minQP is the lowest qp the writer gives: above PID_MAX_LIMIT (2^22), so
// it never equals the pid of a real qmail-queue.
const minQP = 1 << 22

// wmsg is one message on its way into the queue.
type wmsg struct {
	id      uint64 // the daemon's number for it
	qp      uint64
	ino     uint64
	mess    int // descriptors; -1 once closed
	intd    int
	aborted atomic.Bool
}

// wconn is the writer's side of one daemon connection.
type wconn struct {
	w       *QueueWriter
	c       net.Conn
	uid     int
	lastQP  uint64
	msgs    map[uint64]*wmsg // begun and not yet handed to the committer
	failed  map[uint64]bool  // answered with a failure; later frames are ignored
	pending map[uint64]*wmsg // handed to the committer, for aborts
	pmu     sync.Mutex       // guards pending
	commit  chan *wmsg
	out     sync.Mutex // guards bw
	bw      *bufio.Writer
	scratch []byte
}

// Serve writes the messages of one daemon connection until it closes,
// then returns (nil on a clean EOF). Messages not yet linked into todo/
// are removed (the daemon that could answer 250 for them is gone); a round
// past its links is finished.
func (w *QueueWriter) Serve(c net.Conn) error {
	wc := &wconn{w: w, c: c, msgs: map[uint64]*wmsg{}, failed: map[uint64]bool{},
		pending: map[uint64]*wmsg{}, commit: make(chan *wmsg, 4096), bw: bufio.NewWriterSize(c, 64<<10)}
	done := make(chan struct{})
	go func() { wc.committer(); close(done) }()
	err := wc.read()
	// Nobody can be told of the messages still waiting for a round: they
	// are not queued (their clients were not answered 250, and retry).
	wc.pmu.Lock()
	for _, m := range wc.pending {
		m.aborted.Store(true)
	}
	wc.pmu.Unlock()
	close(wc.commit)
	<-done
	for _, m := range wc.msgs {
		w.cleanup(m)
	}
	c.Close()
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// read handles the daemon's frames until the connection ends.
func (wc *wconn) read() error {
	br := bufio.NewReaderSize(wc.c, 256<<10)
	var buf []byte
	f, err := readQWFrame(br, &buf)
	if err != nil {
		return err
	}
	if f.typ != qwHello {
		return fmt.Errorf("%w: first frame %q, want hello", errQWProtocol, f.typ)
	}
	uid, minq, err := parseQWHello(f.payload)
	if err != nil {
		return err
	}
	wc.uid, wc.lastQP = int(uid), max(minq, minQP)
	for {
		f, err := readQWFrame(br, &buf)
		if err != nil {
			return err
		}
		switch f.typ {
		case qwBegin:
			if wc.msgs[f.id] != nil || wc.failed[f.id] {
				return fmt.Errorf("%w: message %d begun twice", errQWProtocol, f.id)
			}
			m, code, err := wc.begin(f.id, f.payload)
			if err != nil {
				wc.fail(f.id, code, err)
				continue
			}
			wc.msgs[f.id] = m
		case qwData:
			m := wc.msgs[f.id]
			if m == nil {
				if wc.failed[f.id] {
					continue
				}
				return fmt.Errorf("%w: data for unknown message %d", errQWProtocol, f.id)
			}
			if err := writeAll(m.mess, f.payload); err != nil {
				delete(wc.msgs, f.id)
				wc.w.cleanup(m)
				wc.fail(f.id, qqExitWrite, err)
			}
		case qwEnd:
			m := wc.msgs[f.id]
			if m == nil {
				if wc.failed[f.id] {
					delete(wc.failed, f.id)
					continue
				}
				return fmt.Errorf("%w: end of unknown message %d", errQWProtocol, f.id)
			}
			delete(wc.msgs, f.id)
			if code, err := wc.end(m, f.payload); err != nil {
				wc.w.cleanup(m)
				delete(wc.failed, f.id) // answered here: nothing more comes for it
				wc.reply(qwFail, f.id, append([]byte{byte(code)}, err.Error()...), true)
				continue
			}
			wc.pmu.Lock()
			wc.pending[f.id] = m
			wc.pmu.Unlock()
			wc.commit <- m
		case qwAbort:
			wc.w.aborts.Add(1)
			if m := wc.msgs[f.id]; m != nil {
				delete(wc.msgs, f.id)
				wc.w.cleanup(m)
				continue
			}
			delete(wc.failed, f.id)
			wc.pmu.Lock()
			if m := wc.pending[f.id]; m != nil {
				m.aborted.Store(true)
			}
			wc.pmu.Unlock()
		default:
			return fmt.Errorf("%w: frame type %q", errQWProtocol, f.typ)
		}
	}
}

// fail answers message id with qmail-queue's exit code and forgets it.
func (wc *wconn) fail(id uint64, code int, err error) {
	wc.w.logger.Warn("queue writer: message failed", "id", id, "exit", code, "err", err)
	wc.failed[id] = true
	wc.reply(qwFail, id, append([]byte{byte(code)}, err.Error()...), true)
}

// reply sends one answer; flush sends it now.
func (wc *wconn) reply(typ byte, id uint64, payload []byte, flush bool) {
	wc.out.Lock()
	defer wc.out.Unlock()
	var h [qwHeaderLen]byte
	putQWHeader(h[:], typ, id, len(payload))
	wc.bw.Write(h[:])
	wc.bw.Write(payload)
	if flush {
		wc.bw.Flush()
	}
}

// begin starts a message as qmail-queue does up to its first write: the
// pid file, its link as mess/, the unlink of pid/, the Received line.
func (wc *wconn) begin(id uint64, first []byte) (*wmsg, int, error) {
	w := wc.w
	now := time.Now()
	qp := max(wc.lastQP+1, uint64(now.UnixMicro()))
	wc.lastQP = qp
	m := &wmsg{id: id, qp: qp, mess: -1, intd: -1}
	var pidName string
	for range 10 {
		pidName = "pid/" + strconv.Itoa(w.mypid) + "." + strconv.FormatInt(now.Unix(), 10) + "." + strconv.FormatUint(w.pidSeq.Add(1), 10)
		fd, err := unix.Openat(w.qfd, pidName, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
		if err == nil {
			m.mess = fd
			break
		}
		if err != unix.EEXIST {
			return nil, qqExitPidFile, &os.PathError{Op: "create", Path: pidName, Err: err}
		}
	}
	if m.mess < 0 {
		return nil, qqExitPidFile, errors.New("no free pid file name")
	}
	var st unix.Stat_t
	if err := unix.Fstat(m.mess, &st); err != nil {
		unix.Unlinkat(w.qfd, pidName, 0)
		unix.Close(m.mess)
		return nil, qqExitPidFile, err
	}
	m.ino = st.Ino
	if err := unix.Linkat(w.qfd, pidName, w.qfd, w.messName(m.ino), 0); err != nil {
		unix.Unlinkat(w.qfd, pidName, 0)
		unix.Close(m.mess)
		return nil, qqExitMess, &os.LinkError{Op: "link", Old: pidName, New: w.messName(m.ino), Err: err}
	}
	if err := unix.Unlinkat(w.qfd, pidName, 0); err != nil {
		// qmail-queue exits 63 here and leaves mess/ for qmail-send's
		// cleanup; so do we, but the mess file goes at once.
		w.cleanup(m)
		return nil, qqExitPidFile, err
	}
	wc.scratch = append(append(wc.scratch[:0], w.received(qp, wc.uid, now)...), first...)
	if err := writeAll(m.mess, wc.scratch); err != nil {
		w.cleanup(m)
		return nil, qqExitWrite, err
	}
	return m, 0, nil
}

// end writes intd/ from the envelope, as qmail-queue does after the
// message: u<uid>\0p<qp>\0 and the envelope's records.
func (wc *wconn) end(m *wmsg, env []byte) (int, error) {
	records, code := parseQQEnvelope(env)
	if code != 0 {
		return code, fmt.Errorf("envelope refused (qmail-queue exit %d)", code)
	}
	w := wc.w
	fd, err := unix.Openat(w.qfd, w.intdName(m.ino), unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return qqExitIntd, &os.PathError{Op: "create", Path: w.intdName(m.ino), Err: err}
	}
	m.intd = fd
	b := wc.scratch[:0]
	b = append(b, 'u')
	b = strconv.AppendInt(b, int64(wc.uid), 10)
	b = append(b, 0, 'p')
	b = strconv.AppendUint(b, m.qp, 10)
	b = append(b, 0)
	b = append(b, records...)
	wc.scratch = b
	if err := writeAll(fd, b); err != nil {
		return qqExitWrite, err
	}
	// Start the writeback now, so that the round's fsyncs find the data
	// on its way.
	unix.SyncFileRange(m.mess, 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	unix.SyncFileRange(m.intd, 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	return 0, nil
}

func (w *QueueWriter) messName(ino uint64) string {
	return "mess/" + strconv.FormatUint(ino%uint64(w.split), 10) + "/" + strconv.FormatUint(ino, 10)
}

func (w *QueueWriter) intdName(ino uint64) string {
	if w.bigTodo {
		return "intd/" + strconv.FormatUint(ino%uint64(w.split), 10) + "/" + strconv.FormatUint(ino, 10)
	}
	return "intd/" + strconv.FormatUint(ino, 10)
}

func (w *QueueWriter) todoName(ino uint64) string {
	if w.bigTodo {
		return "todo/" + strconv.FormatUint(ino%uint64(w.split), 10) + "/" + strconv.FormatUint(ino, 10)
	}
	return "todo/" + strconv.FormatUint(ino, 10)
}

func (w *QueueWriter) todoDirFD(ino uint64) int {
	if w.bigTodo {
		return w.todoFDs[ino%uint64(w.split)]
	}
	return w.todoFDs[0]
}

// cleanup removes a message that will not be queued, as qmail-queue's
// cleanup(): intd and mess truncated, then unlinked.
func (w *QueueWriter) cleanup(m *wmsg) {
	if m.intd >= 0 {
		unix.Ftruncate(m.intd, 0)
		unix.Unlinkat(w.qfd, w.intdName(m.ino), 0)
		unix.Close(m.intd)
		m.intd = -1
	}
	if m.mess >= 0 {
		unix.Ftruncate(m.mess, 0)
		unix.Unlinkat(w.qfd, w.messName(m.ino), 0)
		unix.Close(m.mess)
		m.mess = -1
	}
}

// release closes a committed message's descriptors.
func (m *wmsg) release() {
	unix.Close(m.mess)
	unix.Close(m.intd)
	m.mess, m.intd = -1, -1
}

// maxRound bounds the messages of one commit round.
const maxRound = 1024

// committer runs the commit rounds: it takes every finished message that
// is waiting, makes them durable together and answers them.
func (wc *wconn) committer() {
	batch := make([]*wmsg, 0, maxRound)
	for m := range wc.commit {
		batch = append(batch[:0], m)
	drain:
		for len(batch) < maxRound {
			select {
			case m, ok := <-wc.commit:
				if !ok {
					break drain
				}
				batch = append(batch, m)
			default:
				break drain
			}
		}
		wc.round(batch)
	}
}

// round commits batch: fsync every mess and intd; link every intd as
// todo/ (the commit point); fsync todo/; pull the trigger; answer.
func (wc *wconn) round(batch []*wmsg) {
	w := wc.w
	hook := func(stage string) {
		if w.roundHk != nil {
			w.roundHk(stage, len(batch))
		}
	}
	type result struct {
		code int
		err  error
	}
	res := make([]result, len(batch))
	fds := make([]int, 0, 2*len(batch))
	for _, m := range batch {
		fds = append(fds, m.mess, m.intd)
	}
	for i, err := range fsyncAll(fds) {
		if err != nil && res[i/2].err == nil {
			res[i/2] = result{qqExitWrite, err}
		}
	}
	hook("synced")
	linked := 0
	dirs := map[int]bool{}
	for i, m := range batch {
		if res[i].err != nil {
			continue
		}
		if m.aborted.Load() {
			res[i] = result{-1, nil}
			continue
		}
		if err := unix.Linkat(w.qfd, w.intdName(m.ino), w.qfd, w.todoName(m.ino), 0); err != nil {
			res[i] = result{qqExitTodo, &os.LinkError{Op: "link", Old: w.intdName(m.ino), New: w.todoName(m.ino), Err: err}}
			continue
		}
		dirs[w.todoDirFD(m.ino)] = true
		linked++
	}
	hook("linked")
	var dirErr error
	for fd := range dirs {
		if err := unix.Fsync(fd); err != nil && dirErr == nil {
			dirErr = err
		}
	}
	hook("durable")
	// qmail-queue pulls the trigger before it exits 0; so does the round
	// before it answers.
	if linked > 0 {
		w.pullTrigger()
	}
	w.rounds.Add(1)
	w.queued.Add(uint64(linked))
	wc.pmu.Lock()
	for _, m := range batch {
		delete(wc.pending, m.id)
	}
	wc.pmu.Unlock()
	wc.out.Lock()
	for i, m := range batch {
		var h [qwHeaderLen]byte
		switch {
		case res[i].code == -1: // aborted before the link: not queued
			w.cleanup(m)
		case res[i].err != nil:
			w.logger.Warn("queue writer: message failed", "id", m.id, "exit", res[i].code, "err", res[i].err)
			w.cleanup(m)
			putQWHeader(h[:], qwFail, m.id, 1)
			wc.bw.Write(h[:])
			wc.bw.WriteByte(byte(res[i].code))
		case dirErr != nil:
			// The link is there, and qmail-send may deliver the message,
			// but it is not known to be durable: no 250.
			m.release()
			putQWHeader(h[:], qwFail, m.id, 1)
			wc.bw.Write(h[:])
			wc.bw.WriteByte(qqExitWrite)
		default:
			m.release()
			putQWHeader(h[:], qwOK, m.id, 16)
			wc.bw.Write(h[:])
			wc.bw.Write(qwOKPayload(m.qp, m.ino))
		}
	}
	wc.bw.Flush()
	wc.out.Unlock()
	if dirErr != nil {
		w.logger.Error("queue writer: fsync of todo/ failed", "err", dirErr)
	}
}

// syncWorkers is how many fsyncs of a round run at once: each waits for
// its own writeback and journal commit, and the file system joins the
// commits of those that wait together.
const syncWorkers = 8

// fsyncAll fsyncs every descriptor, syncWorkers at a time, and returns
// each one's error.
func fsyncAll(fds []int) []error {
	errs := make([]error, len(fds))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(syncWorkers, len(fds)) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(fds) {
					return
				}
				errs[i] = unix.Fsync(fds[i])
			}
		})
	}
	wg.Wait()
	return errs
}

// pullTrigger wakes qmail-send as triggerpull.c does: one byte into
// lock/trigger, without waiting; nobody reading is not an error.
func (w *QueueWriter) pullTrigger() {
	fd, err := unix.Openat(w.qfd, "lock/trigger", unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	unix.Write(fd, []byte{0})
	unix.Close(fd)
}

// writeAll writes b to fd whole.
func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrShortWrite
		}
		b = b[n:]
	}
	return nil
}
