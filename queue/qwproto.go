package queue

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The queue writer's protocol: what `relay serve` (the daemon) and `relay
// queue-writer` say to each other over their private socket. Every frame
// is
//
//	length uint32 (big endian; the bytes after it) | type byte | id uint64 | payload
//
// The daemon sends one hello, then for each message a begin frame (the
// message's first bytes), data frames, and an end frame (the envelope in
// qmail-queue's fd 1 format), or an abort; frames of different messages
// interleave. The writer answers each message once: ok (qp and message
// id) once its todo link is durable, or fail (qmail-queue's exit code for
// what went wrong). id is the daemon's number for the message on this
// connection; hello uses 0.
const (
	qwHello = 'H' // payload: version byte, invoker uid uint32, lowest qp to use uint64
	qwBegin = 'B' // payload: the message's first bytes (may be empty)
	qwData  = 'D' // payload: more of the message
	qwEnd   = 'E' // payload: the envelope, F sender NUL, T recipient NUL ..., NUL
	qwAbort = 'A' // payload: none; forget the message unless it is already queued
	qwOK    = 'K' // payload: qp uint64, message id (inode) uint64
	qwFail  = 'X' // payload: qmail-queue exit code byte, then a detail for the log
)

// qwVersion is the protocol version the hello carries.
const qwVersion = 1

// qwHeaderLen is the length, type and id of a frame.
const qwHeaderLen = 4 + 1 + 8

// qwMaxPayload bounds a frame's payload. The daemon sends messages in
// chunks of qwChunk and refuses an envelope larger than this (16,000
// recipients of 1,002 bytes) before sending anything.
const (
	qwMaxPayload = 16 << 20
	qwChunk      = 64 << 10
)

// qwFrame is one decoded frame. payload aliases the reader's buffer until
// the next readFrame.
type qwFrame struct {
	typ     byte
	id      uint64
	payload []byte
}

var errQWProtocol = errors.New("queue writer protocol error")

// putQWHeader writes a frame header for a payload of n bytes into h.
func putQWHeader(h []byte, typ byte, id uint64, n int) {
	binary.BigEndian.PutUint32(h[0:4], uint32(1+8+n))
	h[4] = typ
	binary.BigEndian.PutUint64(h[5:13], id)
}

// appendQWFrame appends a whole frame to dst.
func appendQWFrame(dst []byte, typ byte, id uint64, payload []byte) []byte {
	var h [qwHeaderLen]byte
	putQWHeader(h[:], typ, id, len(payload))
	return append(append(dst, h[:]...), payload...)
}

// readQWFrame reads one frame from r. buf is reused for the payload and
// grown as needed; the returned frame's payload aliases it. A frame whose
// length is out of bounds is a protocol error; EOF before a frame's first
// byte is io.EOF, within it io.ErrUnexpectedEOF.
func readQWFrame(r *bufio.Reader, buf *[]byte) (qwFrame, error) {
	var h [qwHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return qwFrame{}, err
	}
	n := binary.BigEndian.Uint32(h[0:4])
	if n < 9 || n-9 > qwMaxPayload {
		return qwFrame{}, fmt.Errorf("%w: frame length %d", errQWProtocol, n)
	}
	size := int(n - 9)
	if cap(*buf) < size {
		*buf = make([]byte, size)
	}
	p := (*buf)[:size]
	if _, err := io.ReadFull(r, p); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return qwFrame{}, err
	}
	return qwFrame{typ: h[4], id: binary.BigEndian.Uint64(h[5:13]), payload: p}, nil
}

// qwHelloPayload is the hello's payload.
func qwHelloPayload(uid uint32, minQP uint64) []byte {
	p := make([]byte, 13)
	p[0] = qwVersion
	binary.BigEndian.PutUint32(p[1:5], uid)
	binary.BigEndian.PutUint64(p[5:13], minQP)
	return p
}

func parseQWHello(p []byte) (uid uint32, minQP uint64, err error) {
	if len(p) != 13 || p[0] != qwVersion {
		return 0, 0, fmt.Errorf("%w: hello of %d bytes, version %d", errQWProtocol, len(p), firstByte(p))
	}
	return binary.BigEndian.Uint32(p[1:5]), binary.BigEndian.Uint64(p[5:13]), nil
}

func qwOKPayload(qp, msgID uint64) []byte {
	p := make([]byte, 16)
	binary.BigEndian.PutUint64(p[0:8], qp)
	binary.BigEndian.PutUint64(p[8:16], msgID)
	return p
}

func parseQWOK(p []byte) (qp, msgID uint64, err error) {
	if len(p) != 16 {
		return 0, 0, fmt.Errorf("%w: ok of %d bytes", errQWProtocol, len(p))
	}
	return binary.BigEndian.Uint64(p[0:8]), binary.BigEndian.Uint64(p[8:16]), nil
}

func firstByte(p []byte) int {
	if len(p) == 0 {
		return -1
	}
	return int(p[0])
}

// qqAddrMax is qmail-queue's ADDR: an address of this many bytes or more
// (without its NUL) is refused with exit 11.
const qqAddrMax = 1003

// Exit codes of qmail-queue(8) the writer answers with.
const (
	qqExitAddrTooLong = 11
	qqExitWrite       = 53
	qqExitRead        = 54
	qqExitPidFile     = 63
	qqExitMess        = 64
	qqExitIntd        = 65
	qqExitTodo        = 66
	qqExitBug         = 81
	qqExitEnvelope    = 91
)

// parseQQEnvelope checks an envelope in qmail-queue's fd 1 format exactly as
// qmail-queue.c reads it and returns the records it copies into intd: the
// F record and every T record with their NULs, without the final NUL.
// code is qmail-queue's exit code when it would refuse: 54 when the
// envelope ends early, 91 when a record has the wrong type, 11 when an
// address is 1,003 bytes or longer. Bytes after the final NUL are ignored,
// as qmail-queue never reads them.
func parseQQEnvelope(env []byte) (records []byte, code int) {
	if len(env) == 0 {
		return nil, qqExitRead
	}
	if env[0] != 'F' {
		return nil, qqExitEnvelope
	}
	i := 1
	addr := func() int {
		for n := 0; n < qqAddrMax; n++ {
			if i >= len(env) {
				return qqExitRead
			}
			c := env[i]
			i++
			if c == 0 {
				return 0
			}
		}
		return qqExitAddrTooLong
	}
	if c := addr(); c != 0 {
		return nil, c
	}
	for {
		if i >= len(env) {
			return nil, qqExitRead
		}
		c := env[i]
		if c == 0 {
			return env[:i], 0
		}
		if c != 'T' {
			return nil, qqExitEnvelope
		}
		i++
		if c := addr(); c != 0 {
			return nil, c
		}
	}
}
