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

// Signing signs one message while it is written and keeps it, to be handed
// off afterwards with the signatures on top. The bytes written are the
// message exactly as it will be handed to qmail (stored form: LF line
// ends); go-msgauth reads them as DKIM's canonical form, LF as CRLF
// (RFC 6376 §5.3: what qmail-remote will send), 8-bit bytes unchanged.
//
// A message that fits in memory is handed to the signers whole at Finish
// (one hand-over to go-msgauth's goroutine per key, not one per write); a
// longer one goes to them as it is written, and to a file.
type Signing struct {
	set     *Set
	keys    []*Key
	signers []*msgdkim.Signer // started when the message outgrows memory, or at Finish
	signErr error             // the first signer failure: the message goes unsigned

	memMax int
	mem    []byte
	file   *os.File // the whole message once it outgrew memMax
	dir    string
	size   int64
	err    error // storage failure
	closed bool
}

// NewSigning starts signing with every key in keys, relaxed/relaxed,
// sha256, over the Set's header list. A message longer than memMax
// (0: DefaultSpoolMemory) is kept in a nameless file in spoolDir ("": the
// system's temporary directory). Close must be called in every case.
func (s *Set) NewSigning(keys []*Key, spoolDir string, memMax int) (*Signing, error) {
	if memMax <= 0 {
		memMax = DefaultSpoolMemory
	}
	if len(keys) == 0 {
		return nil, errors.New("dkim: no keys to sign with")
	}
	return &Signing{set: s, keys: keys, memMax: memMax, dir: spoolDir}, nil
}

// startSigners starts one go-msgauth signer per key.
func (g *Signing) startSigners() {
	for _, k := range g.keys {
		sg, err := msgdkim.NewSigner(&msgdkim.SignOptions{
			Domain:                 k.Domain,
			Selector:               k.Selector,
			Signer:                 k.signer,
			Hash:                   crypto.SHA256,
			HeaderCanonicalization: msgdkim.CanonicalizationRelaxed,
			BodyCanonicalization:   msgdkim.CanonicalizationRelaxed,
			HeaderKeys:             g.set.headers,
		})
		if err != nil {
			g.signErr = fmt.Errorf("%s: %v", k.Path, err)
			return
		}
		g.signers = append(g.signers, sg)
	}
}

// feed gives p to every signer; a failure is noted, not returned.
func (g *Signing) feed(p []byte) {
	if g.signErr != nil {
		return
	}
	for i, sg := range g.signers {
		if _, err := sg.Write(p); err != nil {
			g.signErr = fmt.Errorf("%s: %v", g.keys[i].Path, err)
			return
		}
	}
}

// Write keeps p (and feeds it to the signers once the message is in a
// file). Only a storage failure is an error; a signer that fails is noted,
// and Finish then gives the message back unsigned.
func (g *Signing) Write(p []byte) (int, error) {
	if g.err != nil {
		return 0, g.err
	}
	if g.file == nil && len(g.mem)+len(p) > g.memMax {
		if g.err = g.spill(); g.err != nil {
			return 0, g.err
		}
	}
	if g.file == nil {
		g.mem = append(g.mem, p...)
		g.size += int64(len(p))
		return len(p), nil
	}
	g.feed(p)
	if _, err := g.file.Write(p); err != nil {
		g.err = fmt.Errorf("dkim spool: %w", err)
		return 0, g.err
	}
	g.size += int64(len(p))
	return len(p), nil
}

// ReadFrom reads r to its end straight into the kept message (io.Copy
// uses it when r is not an io.WriterTo).
func (g *Signing) ReadFrom(r io.Reader) (int64, error) {
	var total int64
	var buf []byte // once in a file
	for g.err == nil {
		var p []byte
		switch {
		case g.file != nil:
			if buf == nil {
				buf = make([]byte, 32<<10)
			}
			p = buf
		case len(g.mem) < cap(g.mem):
			p = g.mem[len(g.mem):cap(g.mem)]
		case len(g.mem) < g.memMax:
			g.mem = slices.Grow(g.mem, min(max(2*cap(g.mem), 4<<10), g.memMax)-len(g.mem))
			continue
		default:
			if g.err = g.spill(); g.err != nil {
				return total, g.err
			}
			continue
		}
		n, err := r.Read(p)
		if n > 0 {
			total += int64(n)
			if g.file == nil {
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

// spill moves what is in memory to a nameless file and starts the signers
// on it.
func (g *Signing) spill() error {
	f, err := namelessFile(g.dir)
	if err != nil {
		return fmt.Errorf("dkim spool: %w", err)
	}
	g.file = f
	g.startSigners()
	g.feed(g.mem)
	if _, err := f.Write(g.mem); err != nil {
		return fmt.Errorf("dkim spool: %w", err)
	}
	g.mem = nil
	return nil
}

// Finish ends the message. It returns the message to hand off: the
// DKIM-Signature fields (one per key, in selector order, LF line ends) and
// then every byte written, or, when signing failed (signErr; the caller
// hands it off unsigned), just the bytes written. err is a storage
// failure: nothing may be handed off. The reader is valid until Close.
func (g *Signing) Finish() (msg io.Reader, signErr error, err error) {
	if g.err != nil {
		return nil, nil, g.err
	}
	var stored io.Reader = bytes.NewReader(g.mem)
	if g.file != nil {
		stored = io.NewSectionReader(g.file, 0, g.size)
	} else {
		g.startSigners()
		g.feed(g.mem)
	}
	var sigs strings.Builder
	for i, sg := range g.signers {
		err := sg.Close()
		if err == nil && g.signErr == nil {
			sigs.WriteString(strings.ReplaceAll(sg.Signature(), "\r\n", "\n"))
		} else if g.signErr == nil {
			g.signErr = fmt.Errorf("%s: %v", g.keys[i].Path, err)
		}
	}
	g.signers = nil
	if g.signErr != nil {
		return stored, g.signErr, nil
	}
	return io.MultiReader(strings.NewReader(sigs.String()), stored), nil, nil
}

// Size is the number of bytes written.
func (g *Signing) Size() int64 { return g.size }

// Spilled reports whether the message went to a file.
func (g *Signing) Spilled() bool { return g.file != nil }

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
	g.mem = nil
	if g.file != nil {
		return g.file.Close()
	}
	return nil
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
