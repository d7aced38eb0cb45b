package dkim

import (
	"bytes"
	"crypto"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	msgdkim "github.com/emersion/go-msgauth/dkim"
	"golang.org/x/sys/unix"
)

// DefaultSpoolMemory is how much of a message being signed is kept in
// memory; a longer one goes whole to a nameless file. The signature heads
// the message but covers all of it, so the message must be kept until it
// is known: 50 concurrent 10 MB messages cost 50 × this much memory, not
// 500 MB.
const DefaultSpoolMemory = 256 << 10

// Message buffers: the first holds this much, and buffers up to
// pooledBufferMax go back to the Set's pool when a Signing closes, so
// that a relay signing small messages all day allocates almost none.
const (
	firstBuffer     = 8 << 10
	pooledBufferMax = 64 << 10
)

// Signing signs one message while it is written. The bytes written are the
// message exactly as it will be handed to qmail (stored form: LF line
// ends); go-msgauth reads them as DKIM's canonical form, LF as CRLF
// (RFC 6376 §5.3: what qmail-remote will send), 8-bit bytes unchanged. A
// message with a CR in it is not signed (ErrBareCR).
//
// A Signing from NewSigning keeps the message, to be handed off afterwards
// with the signatures on top (Finish); one from NewDetachedSigning only
// signs it, for a caller that holds the message itself and needs just the
// DKIM-Signature fields (Fields: relay qq's check).
//
// A message that fits in memory is handed to the signers whole at the end
// (one Write and a Close per key: go-msgauth's goroutine takes it in one
// hand-over, not one per read); a longer one goes to them as it is
// written, and to a file when kept.
type Signing struct {
	set     *Set
	keys    []*Key
	keep    bool              // keep the message for Finish; false: Fields only
	signers []*msgdkim.Signer // started when the message outgrows memory, or at the end
	signErr error             // the first signer failure: the message goes unsigned

	memMax  int
	buf     *[]byte // the pooled buffer mem lives in
	mem     []byte
	spilled bool     // the message outgrew memMax: it streams to the signers
	file    *os.File // kept and spilled: the whole message
	dir     string
	size    int64
	err     error // storage failure
	closed  bool
}

// NewSigning starts signing with every key in keys, relaxed/relaxed,
// sha256, over the Set's header list, keeping the message for Finish. A
// message longer than memMax (0: DefaultSpoolMemory) is kept in a
// nameless file in spoolDir ("": the system's temporary directory). Close
// must be called in every case.
func (s *Set) NewSigning(keys []*Key, spoolDir string, memMax int) (*Signing, error) {
	return s.newSigning(keys, true, spoolDir, memMax)
}

// NewDetachedSigning starts signing as NewSigning does, but keeps nothing
// of a message longer than memMax (0: DefaultSpoolMemory): the caller
// hands the message off itself and asks only for the signatures (Fields).
// Close must be called in every case.
func (s *Set) NewDetachedSigning(keys []*Key, memMax int) (*Signing, error) {
	return s.newSigning(keys, false, "", memMax)
}

func (s *Set) newSigning(keys []*Key, keep bool, spoolDir string, memMax int) (*Signing, error) {
	if memMax <= 0 {
		memMax = DefaultSpoolMemory
	}
	if len(keys) == 0 {
		return nil, errors.New("dkim: no keys to sign with")
	}
	return &Signing{set: s, keys: keys, keep: keep, memMax: memMax, dir: spoolDir}, nil
}

// signOptions are go-msgauth's options for signing with k over headers.
func signOptions(k *Key, headers []string) *msgdkim.SignOptions {
	return &msgdkim.SignOptions{
		Domain:                 k.Domain,
		Selector:               k.Selector,
		Signer:                 k.signer,
		Hash:                   crypto.SHA256,
		HeaderCanonicalization: msgdkim.CanonicalizationRelaxed,
		BodyCanonicalization:   msgdkim.CanonicalizationRelaxed,
		HeaderKeys:             headers,
	}
}

// startSigners starts one go-msgauth signer per key, with the options
// Load made for it.
func (g *Signing) startSigners() {
	for _, k := range g.keys {
		opts := g.set.opts[k]
		if opts == nil { // a key from outside the Set (relay dkim check)
			opts = signOptions(k, g.set.headers)
		}
		sg, err := msgdkim.NewSigner(opts)
		if err != nil {
			g.signErr = fmt.Errorf("%s: %v", k.Path, err)
			return
		}
		g.signers = append(g.signers, sg)
	}
}

// ErrBareCR is why a message with a CR in it is not signed. Stored line
// ends are LF, so every CR is a bare one on the wire (qmail-remote sends a
// CR stored before an LF as CR CR LF), which RFC 5322 forbids and on which
// DKIM implementations disagree: go-msgauth takes CRs at the end of a line
// for part of the line end and for whitespace in a header, python3-dkim
// (and RFC 6376's relaxed rules) for ordinary characters, so a signature
// over such a message verifies at some receivers and fails at others. PHP
// 8's mail() writes CRLF header lines (php.ini mail.mixed_lf_and_crlf = On
// makes them LF), and qmail-inject keeps the CRs of the lines it does not
// rewrite.
var ErrBareCR = errors.New("a CR in the message, which goes out as a bare CR: not signed (DKIM verifiers disagree on bare CRs)")

// feed gives p to every signer; a failure is noted, not returned, and so
// is a CR (ErrBareCR).
func (g *Signing) feed(p []byte) {
	if g.signErr != nil {
		return
	}
	if bytes.IndexByte(p, '\r') >= 0 {
		g.signErr = ErrBareCR
		return
	}
	for i, sg := range g.signers {
		if _, err := sg.Write(p); err != nil {
			g.signErr = fmt.Errorf("%s: %v", g.keys[i].Path, err)
			return
		}
	}
}

// Write keeps p (and feeds it to the signers once the message outgrew
// memory). Only a storage failure is an error; a signer that fails is
// noted, and the message then goes unsigned.
func (g *Signing) Write(p []byte) (int, error) {
	if g.err != nil {
		return 0, g.err
	}
	if !g.spilled && len(g.mem)+len(p) > g.memMax {
		if g.err = g.spill(); g.err != nil {
			return 0, g.err
		}
	}
	if !g.spilled {
		if len(g.mem)+len(p) > cap(g.mem) {
			g.grow(len(p))
		}
		g.mem = append(g.mem, p...)
		g.size += int64(len(p))
		return len(p), nil
	}
	g.feed(p)
	if g.file != nil {
		if _, err := g.file.Write(p); err != nil {
			g.err = fmt.Errorf("dkim spool: %w", err)
			return 0, g.err
		}
	}
	g.size += int64(len(p))
	return len(p), nil
}

// grow makes room in mem for n more bytes (at most memMax in all): a
// buffer from the pool first, then doubling.
func (g *Signing) grow(n int) {
	if g.buf == nil {
		g.buf = g.set.getBuffer()
		g.mem = (*g.buf)[:0]
		if n <= cap(g.mem) {
			return
		}
	}
	size := min(max(2*cap(g.mem), len(g.mem)+n, firstBuffer), g.memMax)
	g.mem = slices.Grow(g.mem, size-len(g.mem))
}

// ReadFrom reads r to its end straight into the kept message (io.Copy
// uses it when r is not an io.WriterTo).
func (g *Signing) ReadFrom(r io.Reader) (int64, error) {
	var total int64
	var chunk []byte // once spilled
	for g.err == nil {
		var p []byte
		switch {
		case g.spilled:
			if chunk == nil {
				chunk = make([]byte, 32<<10)
			}
			p = chunk
		case len(g.mem) < g.memMax:
			if len(g.mem) == cap(g.mem) {
				g.grow(1)
			}
			p = g.mem[len(g.mem):min(cap(g.mem), g.memMax)]
		default:
			if g.err = g.spill(); g.err != nil {
				return total, g.err
			}
			continue
		}
		n, err := r.Read(p)
		if n > 0 {
			total += int64(n)
			if !g.spilled {
				g.mem = g.mem[:len(g.mem)+n]
				g.size += int64(n)
			} else if _, werr := g.Write(p[:n]); werr != nil {
				return total, werr
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
	return total, g.err
}

// spill starts streaming: the signers get what is in memory and from now
// on every write; a kept message moves to a nameless file.
func (g *Signing) spill() error {
	g.spilled = true
	if g.keep {
		f, err := namelessFile(g.dir)
		if err != nil {
			return fmt.Errorf("dkim spool: %w", err)
		}
		g.file = f
		if _, err := f.Write(g.mem); err != nil {
			return fmt.Errorf("dkim spool: %w", err)
		}
	}
	g.startSigners()
	g.feed(g.mem)
	g.putBuffer()
	return nil
}

// signatures ends the message for the signers and returns their
// DKIM-Signature fields, one per key in selector order, LF line ends.
func (g *Signing) signatures() []byte {
	if !g.spilled && bytes.IndexByte(g.mem, '\r') >= 0 {
		g.signErr = ErrBareCR // no signer started for nothing
	}
	if !g.spilled && g.signErr == nil {
		g.startSigners()
		g.feed(g.mem)
	}
	var sigs []byte
	for i, sg := range g.signers {
		err := sg.Close()
		switch {
		case err == nil && g.signErr == nil:
			if sigs == nil {
				sigs = make([]byte, 0, 1024*len(g.signers))
			}
			sigs = appendLF(sigs, sg.Signature())
		case g.signErr == nil:
			g.signErr = fmt.Errorf("%s: %v", g.keys[i].Path, err)
		}
	}
	g.signers = nil
	return sigs
}

// appendLF appends s (a header field as go-msgauth formats it) with its
// CRLF line ends made LF, the stored form.
func appendLF(b []byte, s string) []byte {
	for {
		i := strings.Index(s, "\r\n")
		if i < 0 {
			return append(b, s...)
		}
		b = append(append(b, s[:i]...), '\n')
		s = s[i+2:]
	}
}

// Finish ends a kept message (NewSigning). It returns the message to hand
// off: the DKIM-Signature fields (one per key, in selector order, LF line
// ends) and then every byte written, or, when signing failed (signErr;
// the caller hands it off unsigned), just the bytes written. err is a
// storage failure: nothing may be handed off. The reader is valid until
// Close.
func (g *Signing) Finish() (msg io.Reader, signErr error, err error) {
	if g.err != nil {
		return nil, nil, g.err
	}
	if !g.keep {
		return nil, nil, errors.New("dkim: Finish on a detached signing")
	}
	var stored io.Reader = bytes.NewReader(g.mem)
	if g.file != nil {
		stored = io.NewSectionReader(g.file, 0, g.size)
	}
	sigs := g.signatures()
	if g.signErr != nil {
		return stored, g.signErr, nil
	}
	return io.MultiReader(bytes.NewReader(sigs), stored), nil, nil
}

// Fields ends the message and returns only the DKIM-Signature fields (one
// per key, in selector order, LF line ends) to put on top of it, or
// signErr when signing failed (the message then goes unsigned).
func (g *Signing) Fields() (fields string, signErr error) {
	if g.err != nil {
		return "", g.err
	}
	sigs := g.signatures()
	if g.signErr != nil {
		return "", g.signErr
	}
	return string(sigs), nil
}

// Size is the number of bytes written.
func (g *Signing) Size() int64 { return g.size }

// Spilled reports whether the message outgrew memory (kept: it went to a
// file).
func (g *Signing) Spilled() bool { return g.spilled }

// Close stops the signers still running and drops the kept message.
func (g *Signing) Close() error {
	if g.closed {
		return nil
	}
	g.closed = true
	for _, sg := range g.signers {
		sg.Close()
	}
	g.signers = nil
	g.putBuffer()
	if g.file != nil {
		return g.file.Close()
	}
	return nil
}

// getBuffer takes a message buffer from the pool, or makes one.
func (s *Set) getBuffer() *[]byte {
	if b, ok := s.bufs.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 0, firstBuffer)
	return &b
}

// putBuffer gives mem's buffer back to the pool when it is small enough
// to be worth keeping, and drops mem.
func (g *Signing) putBuffer() {
	if g.buf != nil && cap(g.mem) <= pooledBufferMax {
		*g.buf = g.mem[:0]
		g.set.bufs.Put(g.buf)
	}
	g.buf, g.mem = nil, nil
}

// namelessFile is a file in dir ("": os.TempDir()) that never has a name
// (O_TMPFILE), so nothing is left behind whatever happens to the process;
// where the filesystem has no O_TMPFILE, a temporary file unlinked at once.
func namelessFile(dir string) (*os.File, error) {
	if dir == "" {
		dir = os.TempDir()
	}
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err == nil {
		return os.NewFile(uintptr(fd), dir+"/(dkim spool)"), nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EINVAL) {
		return nil, &os.PathError{Op: "open O_TMPFILE", Path: dir, Err: err}
	}
	f, err := os.CreateTemp(dir, ".dkim-spool-*")
	if err != nil {
		return nil, err
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
