package signals

import (
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// Following the log file.
//
// The tail reads the file in order and hands each complete line to the
// join; an incomplete last line waits for the rest. Its place is the
// start of the first line not yet handled, with the file's device and
// inode, so that a restart resumes exactly there. Lines longer than
// maxLine are skipped whole (qmail-send writes none).
//
// Rotation: multilog renames "current" to "@<tai64n>.s" and starts a new
// "current"; logrotate renames a syslog file (or truncates it). At the end
// of its file the tail compares the path's inode with its own: when they
// differ it reads its file to the end, then goes on with the next file in
// order: the multilog archives named after its own (when it was one of
// them), then the path. A file truncated under it is read again from its
// start. A restart whose saved file is no longer at the path finds it in
// the directory by inode and catches up the same way.

// maxLine bounds a line; longer ones are skipped (qmail-send's longest
// line, an info line with a 1000-byte sender, is far shorter).
const maxLine = 16 << 10

// readSize is how much one read takes.
const readSize = 64 << 10

// filePos is a place in the log: a file by device and inode, the name it
// had when opened, and the offset of the first line not yet handled.
type filePos struct {
	Dev    uint64 `json:"dev"`
	Ino    uint64 `json:"ino"`
	Name   string `json:"name"`
	Offset int64  `json:"offset"`
}

// tail follows one log path. It is used under the follower's lock.
type tail struct {
	path    string
	log     *slog.Logger
	metrics *metrics

	f       *os.File
	pos     filePos // pos.Offset: start of buf's first line
	readOff int64   // file offset after the last byte read
	buf     []byte  // bytes read but not handled: an incomplete line
	skip    bool    // in a line longer than maxLine: drop through its end
	skipped int64   // lines skipped for their length
	missing bool    // the path could not be opened at the last look (warned once)
	// lastStamp is the stamp of the last stamped line read (unix ns).
	lastStamp int64
}

func newTail(path string, log *slog.Logger, m *metrics) *tail {
	return &tail{path: path, log: log, metrics: m, buf: make([]byte, 0, readSize+maxLine)}
}

// start opens the log: at the saved place when there is one, else at the
// end of the file (what was logged before relay followed it joins nothing).
func (t *tail) start(saved *filePos) {
	if saved == nil {
		if t.openPath(true) {
			t.log.Info("signals: following qmail-send's log", "path", t.path, "from", "its end", "offset", t.pos.Offset)
		}
		return
	}
	st, err := os.Stat(t.path)
	if err == nil && sameFile(st, saved.Dev, saved.Ino) {
		if t.open(t.path, saved.Offset) {
			t.log.Info("signals: following qmail-send's log", "path", t.path, "offset", t.pos.Offset)
		}
		return
	}
	if name, ok := t.findInode(saved.Dev, saved.Ino); ok {
		if t.open(filepath.Join(filepath.Dir(t.path), name), saved.Offset) {
			t.log.Info("signals: the log was rotated while relay was down; catching up", "file", name, "offset", saved.Offset)
		}
		return
	}
	t.log.Warn("signals: the file relay last read is gone (rotated away or deleted); lines logged since may be lost",
		"path", t.path, "was", saved.Name)
	t.openPath(false)
}

// openPath opens the path at its start, or at its end with atEnd.
func (t *tail) openPath(atEnd bool) bool {
	var off int64
	if atEnd {
		if st, err := os.Stat(t.path); err == nil {
			off = st.Size()
		}
	}
	return t.open(t.path, off)
}

// open makes name the tail's file, from offset off (from its start when
// the file is now shorter). A missing file is warned about once.
func (t *tail) open(name string, off int64) bool {
	t.close()
	f, err := os.Open(name)
	if err != nil {
		if !t.missing {
			if errors.Is(err, fs.ErrNotExist) {
				t.log.Warn("signals: qmail_send_log does not exist (yet); relay keeps looking for it", "path", name)
			} else {
				t.metrics.error(errOpen)
				t.log.Warn("signals: cannot open qmail_send_log; relay keeps trying", "path", name, "err", err)
			}
		}
		t.setMissing(true)
		return false
	}
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		f.Close()
		if !t.missing {
			t.metrics.error(errOpen)
			t.log.Warn("signals: qmail_send_log is not a regular file", "path", name)
		}
		t.setMissing(true)
		return false
	}
	if t.missing {
		t.log.Info("signals: qmail_send_log is there now", "path", name)
	}
	t.setMissing(false)
	if off > st.Size() || off < 0 {
		off = 0
	}
	dev, ino := fileID(st)
	t.f = f
	t.pos = filePos{Dev: dev, Ino: ino, Name: filepath.Base(name), Offset: off}
	t.readOff = off
	t.buf = t.buf[:0]
	t.skip = false
	return true
}

// skipLong counts a line skipped for its length.
func (t *tail) skipLong() {
	t.skipped++
	t.metrics.long.Inc()
	t.metrics.lines.Inc()
}

func (t *tail) setMissing(v bool) {
	t.missing = v
	if v {
		t.metrics.missing.Set(1)
	} else {
		t.metrics.missing.Set(0)
	}
}

// report sets the gauges of the place in the log.
func (t *tail) report() {
	t.metrics.position.Set(float64(t.pos.Offset))
	if t.f != nil {
		if st, err := t.f.Stat(); err == nil {
			t.metrics.behind.Set(float64(max(st.Size()-t.pos.Offset, 0)))
		}
	}
	if t.lastStamp != 0 {
		t.metrics.lastStamp.Set(float64(t.lastStamp) / 1e9)
	}
}

func (t *tail) close() {
	if t.f != nil {
		t.f.Close()
		t.f = nil
	}
}

// step reads once and hands the complete lines to handle; at the end of
// the file it looks for a rotation. It reports whether it made progress
// (read bytes or moved to another file).
func (t *tail) step(handle func([]byte)) bool {
	if t.f == nil {
		return t.openPath(false)
	}
	n, err := t.read()
	if n > 0 {
		t.lines(handle)
		return true
	}
	if err != nil && err != io.EOF {
		t.metrics.error(errRead)
		t.log.Warn("signals: reading qmail_send_log", "path", t.pos.Name, "err", err)
	}
	return t.rotated(handle)
}

// read appends what the file has after readOff to buf.
func (t *tail) read() (int, error) {
	if len(t.buf) == cap(t.buf) {
		return 0, nil // lines() always makes room; defensive
	}
	n, err := t.f.ReadAt(t.buf[len(t.buf):cap(t.buf)], t.readOff)
	t.buf = t.buf[:len(t.buf)+n]
	t.readOff += int64(n)
	return n, err
}

// lines hands over every complete line in buf and keeps the rest.
func (t *tail) lines(handle func([]byte)) {
	b := t.buf
	for {
		i := indexNewline(b)
		if i < 0 {
			break
		}
		switch {
		case t.skip:
		case i > maxLine:
			t.skipLong()
		default:
			handle(b[:i])
		}
		t.skip = false
		b = b[i+1:]
		t.pos.Offset = t.readOff - int64(len(b))
	}
	if len(b) > maxLine {
		// Too long to be qmail-send's: drop it through its end. The place
		// stays at its start, so a restart skips it again.
		if !t.skip {
			t.skipLong()
		}
		t.skip = true
		b = b[:0]
	}
	t.buf = t.buf[:copy(t.buf, b)]
}

func indexNewline(b []byte) int {
	for i, c := range b {
		if c == '\n' {
			return i
		}
	}
	return -1
}

// rotated checks, at the end of the file, whether the path names another
// file now (or ours was truncated), and moves on. It reports whether it
// moved.
func (t *tail) rotated(handle func([]byte)) bool {
	st, err := os.Stat(t.path)
	if err != nil {
		return false // between multilog's rename and its new current
	}
	if sameFile(st, t.pos.Dev, t.pos.Ino) {
		if st.Size() < t.readOff {
			t.log.Info("signals: qmail_send_log was truncated; reading it from its start", "path", t.path)
			t.open(t.path, 0)
			return true
		}
		return false
	}
	// Ours was renamed: read what was written before the rename.
	for {
		n, _ := t.read()
		if n == 0 {
			break
		}
		t.lines(handle)
	}
	if len(t.buf) > 0 && !t.skip {
		handle(t.buf) // a last line without its newline
	}
	name, found := t.findInode(t.pos.Dev, t.pos.Ino)
	next := ""
	if found && isArchive(name) {
		next = t.nextArchive(name)
	}
	if next == "" {
		t.open(t.path, 0)
	} else {
		t.open(filepath.Join(filepath.Dir(t.path), next), 0)
	}
	return true
}

// isArchive reports whether name is a multilog archive: "@" and a tai64n
// label, ".s" (rotated) or ".u" (cut short by a crash).
func isArchive(name string) bool {
	return len(name) == 27 && name[0] == '@' && (strings.HasSuffix(name, ".s") || strings.HasSuffix(name, ".u"))
}

// nextArchive is the archive that follows name in the path's directory,
// "" when name is the newest.
func (t *tail) nextArchive(name string) string {
	ents, err := os.ReadDir(filepath.Dir(t.path))
	if err != nil {
		return ""
	}
	var later []string
	for _, e := range ents {
		if n := e.Name(); isArchive(n) && n > name {
			later = append(later, n)
		}
	}
	if len(later) == 0 {
		return ""
	}
	return slices.Min(later)
}

// findInode looks for the file (dev, ino) in the path's directory.
func (t *tail) findInode(dev, ino uint64) (string, bool) {
	dir := filepath.Dir(t.path)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", false
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		info, err := e.Info()
		if err == nil && sameFile(info, dev, ino) {
			return e.Name(), true
		}
	}
	return "", false
}

func fileID(st fs.FileInfo) (dev, ino uint64) {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return uint64(s.Dev), s.Ino
	}
	return 0, 0
}

func sameFile(st fs.FileInfo, dev, ino uint64) bool {
	d, i := fileID(st)
	return d == dev && i == ino
}
