package relay

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// The wire format of the local check protocol (docs/local-check.md): what
// `relay qq` sends on the local socket instead of SMTP, and what the
// daemon answers. Every frame is a type byte, a 4-byte big-endian length
// and the payload.

// checkMagic opens a check request, and the daemon's answer to it. Its
// first byte, a NUL, starts no SMTP command: it tells a check client from
// an SMTP client on the local socket.
const checkMagic = "\x00RQ1"

// Frame types, client to daemon.
const (
	frameFrom    = 'F' // envelope sender
	frameTo      = 'T' // one recipient
	frameSize    = 'S' // message size, decimal
	frameHeader  = 'H' // the message's header
	frameEnd     = 'E' // end of the request, or of the message
	frameCommit  = 'C' // the real qmail-queue is about to run: charge it
	frameMessage = 'M' // a piece of the message, for the hold spool
)

// Frame types, daemon to client.
const (
	frameAccepted = 'A' // reserved; a commit is expected
	frameExempt   = 'X' // nothing counted, nothing to commit
	frameSign     = 'G' // reserved like A, and to be signed: send the message
	frameHold     = 'Q' // send the message for the hold spool
	frameDefer    = 'D' // the payload is the SMTP reply (4xx)
	frameReject   = 'R' // the payload is the SMTP reply (5xx)
	frameOK       = 'K' // committed, or held
)

// Payload limits.
const (
	frameHeaderLen   = 5
	maxCheckAddress  = 4096
	maxCheckHeader   = maxHeadBytes
	maxCheckSize     = 19 // digits
	maxMessageFrame  = 64 << 10
	maxCheckReplyLen = 4096
	// maxSignatureFields bounds A's payload after G: the DKIM-Signature
	// fields relay qq puts on top of the message (about 1 KiB a key).
	maxSignatureFields = 64 << 10
)

// errCheckProtocol is a request that breaks the protocol's rules.
var errCheckProtocol = errors.New("check protocol")

// checkRequest is one decoded request.
type checkRequest struct {
	from  string
	rcpts []string
	size  int64
	head  []byte
}

// readCheckRequest reads the magic and one request: F, one or more T, S,
// H, E. It returns an error wrapping errCheckProtocol for a request that
// breaks the rules, or the reader's error.
func readCheckRequest(r *bufio.Reader) (*checkRequest, error) {
	var magic [len(checkMagic)]byte
	if _, err := io.ReadFull(r, magic[:]); err != nil {
		return nil, err
	}
	if string(magic[:]) != checkMagic {
		return nil, fmt.Errorf("%w: bad magic %q", errCheckProtocol, magic[:])
	}
	req := &checkRequest{}
	typ, p, err := readFrame(r, maxCheckAddress)
	if err != nil {
		return nil, err
	}
	if typ != frameFrom {
		return nil, fmt.Errorf("%w: request starts with frame %q, want F", errCheckProtocol, typ)
	}
	req.from = string(p)
	for {
		typ, p, err = readFrame(r, maxCheckAddress)
		if err != nil {
			return nil, err
		}
		if typ != frameTo {
			break
		}
		if len(p) == 0 {
			return nil, fmt.Errorf("%w: empty recipient", errCheckProtocol)
		}
		req.rcpts = append(req.rcpts, string(p))
	}
	if len(req.rcpts) == 0 {
		return nil, fmt.Errorf("%w: no recipient", errCheckProtocol)
	}
	if typ != frameSize {
		return nil, fmt.Errorf("%w: frame %q after the recipients, want S", errCheckProtocol, typ)
	}
	if req.size, err = parseCheckSize(p); err != nil {
		return nil, err
	}
	if typ, p, err = readFrame(r, maxCheckHeader); err != nil {
		return nil, err
	}
	if typ != frameHeader {
		return nil, fmt.Errorf("%w: frame %q after the size, want H", errCheckProtocol, typ)
	}
	if int64(len(p)) > req.size {
		return nil, fmt.Errorf("%w: header of %d bytes in a message of %d", errCheckProtocol, len(p), req.size)
	}
	req.head = p
	if err := expectFrame(r, frameEnd); err != nil {
		return nil, err
	}
	return req, nil
}

// parseCheckSize reads the S payload: 1 to 19 decimal digits, no leading
// zero.
func parseCheckSize(p []byte) (int64, error) {
	if len(p) == 0 || len(p) > maxCheckSize || (p[0] == '0' && len(p) > 1) {
		return 0, fmt.Errorf("%w: size %q", errCheckProtocol, p)
	}
	for _, c := range p {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%w: size %q", errCheckProtocol, p)
		}
	}
	n, err := strconv.ParseInt(string(p), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: size %q", errCheckProtocol, p)
	}
	return n, nil
}

// readFrame reads one frame whose payload may be at most max bytes.
func readFrame(r *bufio.Reader, max int) (byte, []byte, error) {
	var h [frameHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, noEOF(err)
	}
	n := binary.BigEndian.Uint32(h[1:])
	if uint64(n) > uint64(max) {
		return 0, nil, fmt.Errorf("%w: frame %q of %d bytes (at most %d)", errCheckProtocol, h[0], n, max)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(r, p); err != nil {
		return 0, nil, noEOF(err)
	}
	return h[0], p, nil
}

// expectFrame reads one frame that must be of type typ and empty.
func expectFrame(r *bufio.Reader, typ byte) error {
	got, _, err := readFrame(r, 0)
	if err != nil {
		return err
	}
	if got != typ {
		return fmt.Errorf("%w: frame %q, want %q", errCheckProtocol, got, typ)
	}
	return nil
}

// maxCommitPID is the longest payload of a commit: a pid in decimal.
const maxCommitPID = 10

// readCommit reads the commit frame: C, with relay qq's pid in decimal
// (the qp qmail-send will log for the message), or empty when the client
// does not give it (then 0). Any other payload breaks the protocol.
func readCommit(r *bufio.Reader) (int, error) {
	got, p, err := readFrame(r, maxCommitPID)
	if err != nil {
		return 0, err
	}
	if got != frameCommit {
		return 0, fmt.Errorf("%w: frame %q, want %q", errCheckProtocol, got, frameCommit)
	}
	if len(p) == 0 {
		return 0, nil
	}
	pid := commitPID(p)
	if pid <= 0 {
		return 0, fmt.Errorf("%w: commit with %q, not a pid", errCheckProtocol, p)
	}
	return pid, nil
}

// commitPID reads the pid of a check's commit: 1 to 10 decimal digits,
// 0 when absent or not a pid.
func commitPID(resp []byte) int {
	if len(resp) == 0 || len(resp) > 10 {
		return 0
	}
	n := 0
	for _, c := range resp {
		if c < '0' || c > '9' {
			return 0
		}
		n = n*10 + int(c-'0')
	}
	if n > 1<<31-1 {
		return 0
	}
	return n
}

// noEOF turns an EOF inside a request into io.ErrUnexpectedEOF: the
// client hung up in the middle.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// appendFrame appends one frame to b.
func appendFrame(b []byte, typ byte, payload string) []byte {
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// headComplete reports whether an H payload holds the whole header: it
// ends with the empty line that ends a header (the message starts with it,
// checkMessageReader sees to that when the message follows).
func headComplete(head []byte) bool {
	b, ok := bytes.CutSuffix(head, []byte("\n"))
	if !ok {
		return false
	}
	b = bytes.TrimSuffix(b, []byte("\r"))
	return len(b) == 0 || b[len(b)-1] == '\n'
}

// checkMessageReader reads the M frames that follow a sign or hold
// verdict, up to the E, as the message: exactly size bytes starting with
// head (the header it was judged by), or an error. before is called ahead
// of every frame (to set a read deadline).
type checkMessageReader struct {
	r      *bufio.Reader
	before func()
	size   int64  // announced in the request
	head   []byte // the H frame: the message must start with it
	read   int64  // payload bytes returned so far
	left   int    // payload bytes of the current frame not yet returned
	err    error  // sticky
}

func (m *checkMessageReader) Read(p []byte) (int, error) {
	for m.left == 0 {
		if m.err != nil {
			return 0, m.err
		}
		m.next()
	}
	if len(p) > m.left {
		p = p[:m.left]
	}
	n, err := io.ReadFull(m.r, p)
	if m.read < int64(len(m.head)) {
		k := min(n, len(m.head)-int(m.read))
		if !bytes.Equal(p[:k], m.head[m.read:m.read+int64(k)]) {
			m.err = fmt.Errorf("%w: the message does not start with the header sent", errCheckProtocol)
			return 0, m.err
		}
	}
	m.left -= n
	m.read += int64(n)
	if err != nil {
		m.err = noEOF(err)
		return n, m.err
	}
	return n, nil
}

// next reads the next frame header: an M with room left in size, or the
// E that ends a message of exactly size bytes.
func (m *checkMessageReader) next() {
	if m.before != nil {
		m.before()
	}
	var h [frameHeaderLen]byte
	if _, err := io.ReadFull(m.r, h[:]); err != nil {
		m.err = noEOF(err)
		return
	}
	n := int64(binary.BigEndian.Uint32(h[1:]))
	switch {
	case h[0] == frameEnd && n == 0 && m.read == m.size:
		m.err = io.EOF
	case h[0] == frameEnd && n == 0:
		m.err = fmt.Errorf("%w: message of %d bytes, %d announced", errCheckProtocol, m.read, m.size)
	case h[0] != frameMessage || n == 0 || n > maxMessageFrame:
		m.err = fmt.Errorf("%w: frame %q of %d bytes in the message", errCheckProtocol, h[0], n)
	case m.read+n > m.size:
		m.err = fmt.Errorf("%w: message longer than the %d bytes announced", errCheckProtocol, m.size)
	default:
		m.left = int(n)
	}
}
