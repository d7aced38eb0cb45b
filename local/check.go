package local

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// relay qq's side of the local check protocol (docs/local-check.md; the
// daemon's side is relay/check.go, the C client cmd/relay-qq).

// checkMagic opens a check request on the local socket, and the daemon's
// answer.
const checkMagic = "\x00RQ1"

// Frame types, client to daemon.
const (
	frameFrom    = 'F'
	frameTo      = 'T'
	frameSize    = 'S'
	frameHeader  = 'H'
	frameEnd     = 'E'
	frameCommit  = 'C'
	frameMessage = 'M'
)

// Frame types, daemon to client.
const (
	frameAccepted = 'A'
	frameSign     = 'G'
	frameExempt   = 'X'
	frameHold     = 'Q'
	frameDefer    = 'D'
	frameReject   = 'R'
	frameOK       = 'K'
)

const (
	maxCheckHeader  = 64 << 10 // the H frame
	maxMessageFrame = 64 << 10 // each M frame
	maxReplyFrame   = 8 << 10  // what relay qq reads of a daemon's frame
	maxGreetingLine = 4 << 10
	// maxSignatureFrame bounds the A that follows G: the DKIM-Signature
	// fields to put on top of the message. A spool file keeps this much
	// room in front of the message for them.
	maxSignatureFrame = 64 << 10
)

// errNotCheck is a listener that answers, but not in the check protocol.
var errNotCheck = errors.New("does not speak the check protocol")

// checkConn is one check conversation with the daemon.
type checkConn struct {
	conn    net.Conn
	r       *bufio.Reader
	timeout time.Duration
	greeted bool
}

// dialCheck connects to the daemon's local socket; a failure to connect
// is a *connectError.
func dialCheck(socket string, timeout time.Duration) (*checkConn, error) {
	conn, err := net.DialTimeout("unix", socket, timeout)
	if err != nil {
		return nil, &connectError{err}
	}
	return &checkConn{conn: conn, r: bufio.NewReaderSize(conn, maxGreetingLine), timeout: timeout}, nil
}

func (c *checkConn) Close() error { return c.conn.Close() }

// refusedError is an SMTP refusal where the greeting should be (the
// daemon's connection limits: "421 4.7.0 too many connections").
type refusedError struct{ line string }

func (e *refusedError) Error() string { return e.line }

// request sends the magic and the request: the envelope, the size and the
// message's header (headerOf).
func (c *checkConn) request(env *Envelope, sp *spool) error {
	b := []byte(checkMagic)
	b = appendFrame(b, frameFrom, env.Sender)
	for _, to := range env.Recipients {
		b = appendFrame(b, frameTo, to)
	}
	b = appendFrame(b, frameSize, strconv.FormatInt(sp.size, 10))
	head, err := sp.prefix(maxCheckHeader)
	if err != nil {
		return err
	}
	b = appendFrame(b, frameHeader, string(headerOf(head)))
	b = appendFrame(b, frameEnd, "")
	return c.write(b)
}

// verdict reads the greeting, the magic and the daemon's first frame.
func (c *checkConn) verdict() (byte, string, error) {
	for !c.greeted {
		c.conn.SetReadDeadline(time.Now().Add(c.timeout))
		line, err := c.r.ReadSlice('\n')
		if err != nil {
			return 0, "", err
		}
		text := strings.TrimRight(string(line), "\r\n")
		switch {
		case strings.HasPrefix(text, "220 "):
			c.greeted = true
		case strings.HasPrefix(text, "220-"):
		default:
			return 0, "", &refusedError{text}
		}
	}
	magic := make([]byte, len(checkMagic))
	if _, err := io.ReadFull(c.r, magic); err != nil {
		return 0, "", err
	}
	if string(magic) != checkMagic {
		return 0, "", errNotCheck
	}
	return c.frame(maxReplyFrame)
}

// frame reads one frame from the daemon, of at most max bytes.
func (c *checkConn) frame(max uint32) (byte, string, error) {
	c.conn.SetReadDeadline(time.Now().Add(c.timeout))
	var h [5]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return 0, "", err
	}
	n := binary.BigEndian.Uint32(h[1:])
	if n > max {
		return 0, "", fmt.Errorf("frame %q of %d bytes: %w", h[0], n, errNotCheck)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(c.r, p); err != nil {
		return 0, "", err
	}
	return h[0], string(p), nil
}

// commit sends C and reads the daemon's K. C carries this process's pid
// in decimal: the exec of the real qmail-queue keeps it, so it is the qp
// qmail-send logs for the message, which the daemon joins to the
// message's identities.
func (c *checkConn) commit() error {
	if err := c.write(appendFrame(nil, frameCommit, strconv.Itoa(os.Getpid()))); err != nil {
		return err
	}
	typ, text, err := c.frame(maxReplyFrame)
	switch {
	case err != nil:
		return err
	case typ != frameOK:
		return fmt.Errorf("answered %q %q", typ, text)
	}
	return nil
}

// sendMessage sends the whole message as M frames and an E, to be held or
// signed, and reads the daemon's answer, of at most max bytes.
func (c *checkConn) sendMessage(sp *spool, max uint32) (byte, string, error) {
	r := sp.reader()
	buf := make([]byte, maxMessageFrame)
	var b []byte
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			b = appendFrame(b[:0], frameMessage, string(buf[:n]))
			if err := c.write(b); err != nil {
				return 0, "", err
			}
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return 0, "", err
		}
	}
	if err := c.write(appendFrame(nil, frameEnd, "")); err != nil {
		return 0, "", err
	}
	return c.frame(max)
}

// signatureFields reports whether the payload of the A after G is what
// relay qq may put on top of a message: nothing, or DKIM-Signature header
// fields, each line ended by LF, no empty line (which would end the
// header). Anything else is no answer of this protocol.
func signatureFields(p string) bool {
	return p == "" || (strings.HasPrefix(p, "DKIM-Signature:") && strings.HasSuffix(p, "\n") && !strings.Contains(p, "\n\n") &&
		!strings.ContainsAny(p, "\r\x00"))
}

func (c *checkConn) write(b []byte) error {
	c.conn.SetWriteDeadline(time.Now().Add(c.timeout))
	_, err := c.conn.Write(b)
	return err
}

// appendFrame appends one frame: the type, the payload's length (4 bytes,
// big-endian), the payload.
func appendFrame(b []byte, typ byte, payload string) []byte {
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// headerOf is what the H frame carries of a message's start: through the
// first empty line ("\n" or "\r\n"), or all of b when it has none.
func headerOf(b []byte) []byte {
	for i := 0; i < len(b); {
		if b[i] == '\n' {
			return b[:i+1]
		}
		if b[i] == '\r' && i+1 < len(b) && b[i+1] == '\n' {
			return b[:i+2]
		}
		nl := bytes.IndexByte(b[i:], '\n')
		if nl < 0 {
			break
		}
		i += nl + 1
	}
	return b
}
