package signals

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Exactly once across a crash.
//
// The follower's place in the log, the join (hand-offs waiting for their
// info line, messages followed) and the number of the last hand-off taken
// into the join are records in relay.db, written by policy's flush in the
// same transaction as the counts they produced (Sink.AttachFlushPart): a
// flush takes the follower's changes and the changed counters under the
// follower's lock, so a crash (kill -9, power loss) keeps both or neither,
// and the restarted follower resumes at the first line whose counts were
// not written, counting every line exactly once.
//
// A hand-off is recorded before relay answers 250 (or relay qq's commit is
// confirmed): HandedOff appends it to a journal in data_dir/signals with
// one write(2), no fsync, which a kill -9 of relay cannot undo (the file's
// pages belong to the kernel). The flush that takes it into the join
// writes it to relay.db, fsynced with the counters; the journal files it
// covers are then deleted. A restart reads the journals and takes every
// hand-off numbered after the last one the stored join has. So a kill -9
// loses no hand-off; a crash of the whole system (power loss) loses those
// of the last flush interval (1 s), as it loses that second's counters.

// Keys of the follower's records in its bucket.
const (
	keyState      = "s" // stateVersion, the place in the log, the cut line, the last hand-off taken
	prefixHandoff = 'h' // + Seq, 8 bytes big-endian: a hand-off waiting for its info line
	prefixMessage = 'm' // + N, 8 bytes big-endian: a message followed
)

// Bucket is the follower's bucket in relay.db.
const Bucket = "signals.follower"

const stateVersion = 1

func recordKey(prefix byte, n uint64) []byte {
	k := make([]byte, 9)
	k[0] = prefix
	binary.BigEndian.PutUint64(k[1:], n)
	return k
}

// Record encodings: varints and length-prefixed strings, so that any bytes
// (an envelope sender need not be UTF-8) come back as they were.

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendStrings(b []byte, ss []string) []byte {
	b = binary.AppendUvarint(b, uint64(len(ss)))
	for _, s := range ss {
		b = appendString(b, s)
	}
	return b
}

func appendHandoff(b []byte, h *handoff) []byte {
	b = binary.AppendUvarint(b, h.Seq)
	b = binary.AppendVarint(b, int64(h.QP))
	b = binary.AppendVarint(b, h.At)
	b = appendString(b, h.From)
	return appendStrings(b, h.IDs)
}

func appendMessage(b []byte, m *message) []byte {
	b = binary.AppendUvarint(b, m.N)
	b = appendStrings(b, m.IDs) // none: tentative (a hand-off has identities)
	b = binary.AppendVarint(b, m.Seen)
	b = binary.AppendVarint(b, int64(m.QP))
	b = appendString(b, m.From)
	b = binary.AppendVarint(b, m.Stamp)
	b = binary.AppendUvarint(b, uint64(len(m.Pending)))
	for _, o := range m.Pending {
		b = append(b, outcomeByte(o.What))
		b = binary.AppendVarint(b, o.Stamp)
	}
	b = binary.AppendUvarint(b, uint64(len(m.Open)))
	for _, d := range m.Open {
		b = binary.AppendUvarint(b, d)
	}
	if m.Ended {
		return append(b, 1)
	}
	return append(b, 0)
}

var outcomes = [...]string{outcomeSuccess, outcomeFailure, outcomeDeferral}

func outcomeByte(s string) byte {
	return byte(slices.Index(outcomes[:], s))
}

// savedState is the state record.
type savedState struct {
	File     *filePos // nil: the log was never opened
	Cut      []byte   // an info line splogger cut, waiting for its continuation
	CutStamp int64
	LastSeq  uint64 // the last hand-off taken into the join
}

func appendState(b []byte, s *savedState) []byte {
	b = append(b, stateVersion)
	b = binary.AppendUvarint(b, s.LastSeq)
	if s.File == nil {
		b = append(b, 0)
	} else {
		b = append(b, 1)
		b = binary.AppendUvarint(b, s.File.Dev)
		b = binary.AppendUvarint(b, s.File.Ino)
		b = binary.AppendVarint(b, s.File.Offset)
		b = appendString(b, s.File.Name)
	}
	b = appendString(b, string(s.Cut))
	return binary.AppendVarint(b, s.CutStamp)
}

// recReader decodes a record; the first error sticks.
type recReader struct {
	b   []byte
	err error
}

var errRecord = errors.New("truncated or malformed record")

func (r *recReader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = errRecord
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *recReader) varint() int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.err = errRecord
		return 0
	}
	r.b = r.b[n:]
	return v
}

// count reads a count of items that take at least one byte each.
func (r *recReader) count() int {
	n := r.uvarint()
	if r.err == nil && n > uint64(len(r.b)) {
		r.err = errRecord
		return 0
	}
	return int(n)
}

func (r *recReader) byte() byte {
	if r.err != nil || len(r.b) == 0 {
		r.err = errRecord
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *recReader) string() string {
	n := r.count()
	if r.err != nil {
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	return s
}

func (r *recReader) strings() []string {
	n := r.count()
	var ss []string
	for ; n > 0 && r.err == nil; n-- {
		ss = append(ss, r.string())
	}
	return ss
}

func (r *recReader) end() error {
	if r.err == nil && len(r.b) != 0 {
		r.err = errRecord
	}
	return r.err
}

func decodeHandoff(b []byte) (handoff, error) {
	r := &recReader{b: b}
	h := handoff{Seq: r.uvarint(), QP: int(r.varint()), At: r.varint(), From: r.string(), IDs: r.strings()}
	if r.err == nil && (h.Seq == 0 || h.QP <= 0 || len(h.IDs) == 0) {
		r.err = errRecord
	}
	return h, r.end()
}

func decodeMessage(b []byte) (*message, error) {
	r := &recReader{b: b}
	m := &message{N: r.uvarint(), IDs: r.strings(), Seen: r.varint(), QP: int(r.varint()), From: r.string(), Stamp: r.varint()}
	for n := r.count(); n > 0 && r.err == nil; n-- {
		c := r.byte()
		if int(c) >= len(outcomes) {
			r.err = errRecord
			break
		}
		m.Pending = append(m.Pending, outcome{What: outcomes[c], Stamp: r.varint()})
	}
	for n := r.count(); n > 0 && r.err == nil; n-- {
		m.Open = append(m.Open, r.uvarint())
	}
	switch r.byte() {
	case 0:
	case 1:
		m.Ended = true
	default:
		r.err = errRecord
	}
	return m, r.end()
}

func decodeState(b []byte) (savedState, error) {
	var s savedState
	r := &recReader{b: b}
	if v := r.byte(); r.err != nil || v != stateVersion {
		return s, fmt.Errorf("not a state record of version %d", stateVersion)
	}
	s.LastSeq = r.uvarint()
	if r.byte() == 1 {
		s.File = &filePos{Dev: r.uvarint(), Ino: r.uvarint(), Offset: r.varint(), Name: r.string()}
	}
	if cut := r.string(); cut != "" {
		s.Cut = []byte(cut)
	}
	s.CutStamp = r.varint()
	return s, r.end()
}

// The hand-off journal: files data_dir/signals/handoffs.<n>, each a
// sequence of records: 4 bytes of length and 4 of CRC-32C (little-endian)
// and a hand-off. Records are appended, one write(2) each; a file that
// ends in a torn or damaged record (the system crashed) is read up to it.

// JournalDir is the journal's directory in data_dir.
const JournalDir = "signals"

const journalPrefix = "handoffs."

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// journal appends hand-offs to the current file; a flush that takes them
// closes it, and the commit that makes them durable in relay.db deletes
// it. At most one closed file waits for its commit at a time (while
// flushes fail, the current one grows), so there are never more than two
// files, plus those a crash left, which the first commit after the
// restart deletes.
type journal struct {
	dir    string
	f      *os.File
	n      uint64 // the current file's number (its name), made at its first record
	last   uint64 // Seq of the current file's last record, 0: the file has none
	closed []journalFile
	buf    []byte
}

// journalFile is a closed file: its records are all numbered up to last.
type journalFile struct {
	path string
	last uint64
}

// openJournal reads the files of dir (creating it) and returns the
// journal with them closed, and the hand-offs they hold, in order.
// Records it cannot read are reported by bad (they end their file).
func openJournal(dir string, bad func(path string, read int, err error)) (*journal, []handoff, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("signals: creating the hand-off journal's directory: %w", err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("signals: reading the hand-off journal: %w", err)
	}
	j := &journal{dir: dir}
	var nums []uint64
	for _, e := range ents {
		if n, ok := strings.CutPrefix(e.Name(), journalPrefix); ok {
			if v, err := strconv.ParseUint(n, 10, 64); err == nil {
				nums = append(nums, v)
			}
		}
	}
	slices.Sort(nums)
	var hs []handoff
	for _, n := range nums {
		path := j.path(n)
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, nil, fmt.Errorf("signals: reading the hand-off journal: %w", err)
		}
		jf := journalFile{path: path}
		read := 0
		for len(b) > 0 {
			h, rest, err := nextJournalRecord(b)
			if err != nil {
				bad(path, read, err)
				break
			}
			hs = append(hs, h)
			jf.last = max(jf.last, h.Seq)
			b = rest
			read++
		}
		j.closed = append(j.closed, jf)
		j.n = n
	}
	return j, hs, nil
}

func nextJournalRecord(b []byte) (handoff, []byte, error) {
	if len(b) < 8 {
		return handoff{}, nil, errors.New("a torn record at its end")
	}
	size := binary.LittleEndian.Uint32(b)
	if uint64(size) > uint64(len(b)-8) {
		return handoff{}, nil, errors.New("a torn record at its end")
	}
	rec := b[8 : 8+size]
	if crc32.Checksum(rec, crcTable) != binary.LittleEndian.Uint32(b[4:]) {
		return handoff{}, nil, errors.New("a damaged record")
	}
	h, err := decodeHandoff(rec)
	return h, b[8+size:], err
}

func (j *journal) path(n uint64) string {
	return filepath.Join(j.dir, journalPrefix+strconv.FormatUint(n, 10))
}

// append writes h to the current file with one write(2). After a failed
// write the file is closed (it may end in a torn record) and the next
// record starts another.
func (j *journal) append(h *handoff) error {
	if j.f == nil {
		j.n++
		f, err := os.OpenFile(j.path(j.n), os.O_WRONLY|os.O_CREATE|os.O_APPEND|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		j.f, j.last = f, 0
	}
	b := append(j.buf[:0], 0, 0, 0, 0, 0, 0, 0, 0)
	b = appendHandoff(b, h)
	rec := b[8:]
	binary.LittleEndian.PutUint32(b, uint32(len(rec)))
	binary.LittleEndian.PutUint32(b[4:], crc32.Checksum(rec, crcTable))
	j.buf = b
	if _, err := j.f.Write(b); err != nil {
		j.rotate(true)
		return err
	}
	j.last = h.Seq
	return nil
}

// rotate closes the current file when it holds records and no closed
// file waits for its commit (or with force), so that a commit of
// everything taken so far can delete it.
func (j *journal) rotate(force bool) {
	if j.f == nil || (!force && (j.last == 0 || len(j.closed) > 0)) {
		return
	}
	j.f.Close()
	j.closed = append(j.closed, journalFile{path: j.path(j.n), last: j.last})
	j.f, j.last = nil, 0
}

// committed deletes the closed files whose records relay.db has now:
// every hand-off numbered up to lastSeq.
func (j *journal) committed(lastSeq uint64) {
	keep := j.closed[:0]
	for _, jf := range j.closed {
		if jf.last <= lastSeq {
			if err := os.Remove(jf.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				keep = append(keep, jf) // tried again at the next commit
			}
			continue
		}
		keep = append(keep, jf)
	}
	j.closed = keep
}

func (j *journal) close() {
	if j.f != nil {
		j.f.Close()
		j.closed = append(j.closed, journalFile{path: j.path(j.n), last: j.last})
		j.f, j.last = nil, 0
	}
}
