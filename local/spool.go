package local

import (
	"bytes"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// DefaultSpoolMemory is how much of a message is kept in memory before the
// rest goes to an unlinked temporary file.
const DefaultSpoolMemory = 1 << 20

// spool holds a message read once and replayed twice (to the daemon and to
// the real qmail-queue): in memory, or, past the memory limit, whole in an
// unlinked temporary file (which then becomes the real qmail-queue's fd 0).
// In the file the message starts at spoolRoom: in front of it is a hole
// where the DKIM-Signature fields go when the daemon signs the message, so
// that fd 0 can start right at them without copying the message.
type spool struct {
	head []byte   // the message, when file is nil
	file *os.File // the whole message from spoolRoom, when it outgrew memory
	size int64
}

// spoolRoom is where the message starts in a spool file: room for the
// largest signatures the daemon sends (a hole in the file until used).
const spoolRoom = maxSignatureFrame

// readSpool reads r to EOF. Past memLimit bytes it continues into a
// nameless file in tmpDir ("" = os.TempDir(); see namelessFile). A read error is returned as
// is; a temporary-file error is wrapped in spoolWriteError.
func readSpool(r io.Reader, memLimit int64, tmpDir string) (*spool, error) {
	var head bytes.Buffer
	n, err := io.Copy(&head, io.LimitReader(r, memLimit))
	if err != nil {
		return nil, err
	}
	s := &spool{head: head.Bytes(), size: n}
	if n < memLimit {
		return s, nil
	}
	// Exactly memLimit bytes so far: there may be more.
	f, err := namelessFile(tmpDir)
	if err != nil {
		return nil, spoolWriteError{err}
	}
	if _, err := f.Seek(spoolRoom, io.SeekStart); err != nil {
		f.Close()
		return nil, spoolWriteError{err}
	}
	m, err := io.Copy(onlyWriter{f}, io.MultiReader(bytes.NewReader(s.head), r))
	if err != nil {
		f.Close()
		return nil, err // a spoolWriteError or the reader's error
	}
	if m == n {
		f.Close()
		return s, nil
	}
	s.head, s.file, s.size = nil, f, m
	return s, nil
}

// namelessFile returns a file in dir ("" = os.TempDir()) that never has a
// name (O_TMPFILE), so nobody, the caller included, can open it and change
// the message between the daemon's check and the real qmail-queue; a memfd
// where the filesystem has no O_TMPFILE. Nothing is left behind if relay
// qq dies.
func namelessFile(dir string) (*os.File, error) {
	if dir == "" {
		dir = os.TempDir()
	}
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		if fd, err = unix.MemfdCreate("relay-qq-message", unix.MFD_CLOEXEC); err != nil {
			return nil, err
		}
	}
	return os.NewFile(uintptr(fd), "relay-qq-spool"), nil
}

// onlyWriter hides os.File's ReadFrom so io.Copy's write errors can be told
// apart from read errors.
type onlyWriter struct{ f *os.File }

func (w onlyWriter) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	if err != nil {
		return n, spoolWriteError{err}
	}
	return n, nil
}

// spoolWriteError is a failure to write the temporary file (disk full):
// qmail-queue's exit 53, not a read error (54).
type spoolWriteError struct{ err error }

func (e spoolWriteError) Error() string { return "spooling message: " + e.err.Error() }
func (e spoolWriteError) Unwrap() error { return e.err }

// reader returns a fresh reader over the whole message.
func (s *spool) reader() io.Reader {
	if s.file == nil {
		return bytes.NewReader(s.head)
	}
	return io.NewSectionReader(s.file, spoolRoom, s.size)
}

// close releases the temporary file.
func (s *spool) close() {
	if s.file != nil {
		s.file.Close()
	}
}

// prefix returns the message's first n bytes, or all of it when shorter.
func (s *spool) prefix(n int) ([]byte, error) {
	if s.file == nil {
		return s.head[:min(len(s.head), n)], nil
	}
	b := make([]byte, min(int64(n), s.size))
	if _, err := s.file.ReadAt(b, spoolRoom); err != nil {
		return nil, err
	}
	return b, nil
}

// fd0 positions the spool file for the real qmail-queue's fd 0: the
// signatures written into the room in front of the message, the offset
// at their start (or at the message's, without any).
func (s *spool) fd0(signatures string) error {
	off := int64(spoolRoom - len(signatures))
	if off < 0 {
		return fmt.Errorf("%d bytes of signatures, room for %d", len(signatures), spoolRoom)
	}
	if _, err := s.file.WriteAt([]byte(signatures), off); err != nil {
		return err
	}
	_, err := s.file.Seek(off, io.SeekStart)
	return err
}
