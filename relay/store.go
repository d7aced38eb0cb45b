package relay

import (
	"bytes"
	"errors"
	"io"
)

// Reasons a message cannot be stored. storeReader returns them in place of
// more data, so a hand-off reading from it fails before qmail-queue is given
// an envelope, and nothing is queued.
var (
	// errBareNewline: a CR or LF that is not part of a CRLF pair. RFC 5321
	// §2.3.8 forbids them; qmail-smtpd refuses a bare LF ("451 See
	// https://cr.yp.to/docs/smtplf.html."). Refusing bare CR as well means
	// relay never stores or forwards a "\r.\r" or "\n.\n" that a weaker
	// MTA further on could take for the end of the data (SMTP smuggling).
	errBareNewline = errors.New("bare CR or LF in message")
	// errTooBig: more bytes than databytes, counted as stored.
	errTooBig = errors.New("message exceeds databytes")
	// errTooManyHops: maxHops or more Received:/Delivered-To: header lines.
	errTooManyHops = errors.New("too many hops")
)

// maxHops is qmail-smtpd's MAXHOPS: at 100 hop lines the message is looping.
const maxHops = 100

// storeReader turns message text as SMTP carries it (CRLF line ends, already
// dot-unstuffed by go-smtp's DATA reader) into the form qmail stores: LF line
// ends (qmail-smtpd's blast). It counts stored bytes against a databytes
// limit and, in the header, the hop lines qmail-smtpd counts. A bare CR or
// LF, the databytes limit and the hop count end the stream with an error.
type storeReader struct {
	src   io.Reader
	limit int64 // databytes; 0 = unlimited

	// atEOF, when set, runs once when src ends cleanly; an error it
	// returns ends the stream in place of io.EOF (the policy check at the
	// end of DATA).
	atEOF func() error

	in      []byte // raw bytes from src
	out     []byte // converted bytes not yet returned
	pending []byte // unread part of out
	err     error  // sticky: io.EOF, a src error or one of the errors above

	size       int64 // stored bytes so far
	cr         bool  // the last raw byte was a CR not yet written
	inHeader   bool  // still before the first empty line
	linePos    int   // bytes of the current header line seen (up to 9)
	maybeRecv  bool  // the header line so far matches "received"
	maybeDeliv bool  // the header line so far matches "delivered"
	hops       int
}

// storeBuffers are the buffers one message's DATA needs: the
// storeReader's input and output and the header kept for attribution.
// 72 KiB a message is worth reusing (Server.storeBufs): allocated fresh
// each time, they were most of what relay allocated per message.
type storeBuffers struct {
	in, out, head []byte
}

func newStoreBuffers() *storeBuffers {
	return &storeBuffers{
		in:   make([]byte, 32<<10),
		out:  make([]byte, 0, 32<<10+1),
		head: make([]byte, 0, 8<<10),
	}
}

// newStoreReader reads src through bufs (nil: fresh ones), which it uses
// until the message is done with.
func newStoreReader(src io.Reader, limit int64, bufs *storeBuffers) *storeReader {
	if bufs == nil {
		bufs = newStoreBuffers()
	}
	return &storeReader{
		src:        src,
		limit:      limit,
		in:         bufs.in,
		out:        bufs.out[:0],
		inHeader:   true,
		maybeRecv:  true,
		maybeDeliv: true,
	}
}

// Size is the number of stored bytes produced so far.
func (r *storeReader) Size() int64 { return r.size }

// Err is the reason the stream ended early: errBareNewline, errTooBig,
// errTooManyHops or an error from the source; nil at a clean EOF or while
// still reading.
func (r *storeReader) Err() error {
	if r.err == io.EOF {
		return nil
	}
	return r.err
}

func (r *storeReader) Read(p []byte) (int, error) {
	for len(r.pending) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		r.fill()
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

// fill reads one chunk from src and converts it into out. In the body,
// outside a CR, the bytes up to the next CR or LF are copied as one run;
// everything else goes byte by byte.
func (r *storeReader) fill() {
	n, err := r.src.Read(r.in)
	r.out = r.out[:0]
	in := r.in[:n]
	for i := 0; i < len(in); {
		if !r.cr && !r.inHeader {
			end := i + crOrLF(in[i:])
			if end > i {
				if !r.emitRun(in[i:end]) {
					break
				}
				i = end
				continue
			}
		}
		if !r.step(in[i]) {
			break
		}
		i++
	}
	if r.err == nil && err != nil {
		if err == io.EOF && r.cr {
			r.cr = false
			r.err = errBareNewline
		}
		if r.err == nil && err == io.EOF && r.atEOF != nil {
			if refused := r.atEOF(); refused != nil {
				err = refused
			}
		}
		if r.err == nil {
			r.err = err
		}
	}
	r.pending = r.out
}

// step converts one raw byte; it reports false when that ended the stream.
func (r *storeReader) step(b byte) bool {
	if r.cr {
		r.cr = false
		if b == '\n' {
			return r.emit('\n')
		}
		r.err = errBareNewline
		return false
	}
	switch {
	case b == '\r':
		r.cr = true
		return true
	case b == '\n':
		r.err = errBareNewline
		return false
	}
	return r.emit(b)
}

// crOrLF returns the index of the first CR or LF in b, or len(b).
func crOrLF(b []byte) int {
	end := len(b)
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		end = i
	}
	if i := bytes.IndexByte(b[:end], '\r'); i >= 0 {
		end = i
	}
	return end
}

// emitRun appends body bytes that hold no CR or LF, as emit would one by
// one: up to the databytes limit, then errTooBig.
func (r *storeReader) emitRun(run []byte) bool {
	if r.limit > 0 && r.size+int64(len(run)) > r.limit {
		room := r.limit - r.size
		r.out = append(r.out, run[:room]...)
		r.size = r.limit + 1
		r.err = errTooBig
		return false
	}
	r.size += int64(len(run))
	r.out = append(r.out, run...)
	return true
}

// emit appends one stored byte, counting size and hops; it reports false
// when that ended the stream.
func (r *storeReader) emit(b byte) bool {
	r.size++
	if r.limit > 0 && r.size > r.limit {
		r.err = errTooBig
		return false
	}
	r.out = append(r.out, b)
	if r.inHeader {
		r.countHop(b)
		if r.hops >= maxHops {
			r.err = errTooManyHops
			return false
		}
	}
	return true
}

// countHop follows qmail-smtpd's blast(): in the header, a line whose first
// 8 bytes are "received" or first 9 are "delivered" (each byte matching in
// either case) is one hop; an empty line ends the header.
func (r *storeReader) countHop(b byte) {
	const recv, deliv = "received", "delivered"
	if b == '\n' {
		if r.linePos == 0 {
			r.inHeader = false
		}
		r.linePos, r.maybeRecv, r.maybeDeliv = 0, true, true
		return
	}
	pos := r.linePos
	if pos < len(deliv) {
		if r.maybeDeliv && lower(b) != deliv[pos] {
			r.maybeDeliv = false
		}
		if r.maybeDeliv && pos == len(deliv)-1 {
			r.hops++
		}
		if pos < len(recv) {
			if r.maybeRecv && lower(b) != recv[pos] {
				r.maybeRecv = false
			}
			if r.maybeRecv && pos == len(recv)-1 {
				r.hops++
			}
		}
		r.linePos++
	}
}

func lower(b byte) byte {
	if 'A' <= b && b <= 'Z' {
		return b + 'a' - 'A'
	}
	return b
}
