package local

import (
	"bufio"
	"errors"
	"fmt"
	"io"
)

// qmail-queue exit codes (qmail-queue.8; docs/qmail.md §2.3).
// relay qq returns them itself for what it detects, and passes the real
// qmail-queue's code through otherwise.
const (
	ExitQueued       = 0  // the message is queued
	ExitAddrTooLong  = 11 // an envelope address of 1003 bytes or more
	ExitRejected     = 31 // permanent refusal: the caller bounces (qmail-inject exits 100)
	ExitWriteError   = 53 // write error, e.g. disk full (spooling the message)
	ExitReadError    = 54 // cannot read the message or the envelope
	ExitConfigError  = 55 // cannot read the configuration
	ExitDeferred     = 71 // temporary refusal: the caller retries later
	ExitInternalBug  = 81 // internal bug, also used when the real qmail-queue crashed
	ExitBadEnvelope  = 91 // envelope format error
	maxEnvelopeAddr  = 1003
	envelopeReadSize = 4096
)

// Envelope is a qmail-queue envelope as read from fd 1:
// "F" sender NUL, then "T" recipient NUL for each recipient, then NUL.
type Envelope struct {
	Raw        []byte // the bytes read, through the final NUL, exactly as received
	Sender     string // "" for the null sender
	Recipients []string
}

// EnvelopeError is a malformed or unreadable envelope, with the exit code
// qmail-queue gives for it.
type EnvelopeError struct {
	Code int // ExitBadEnvelope, ExitAddrTooLong or ExitReadError
	Msg  string
}

func (e *EnvelopeError) Error() string { return fmt.Sprintf("envelope: %s (exit %d)", e.Msg, e.Code) }

// ReadEnvelope reads one envelope with qmail-queue's rules (qmail-queue.c):
// the first byte must be 'F' and every later record must start with 'T'
// (else 91); an address reaching 1003 bytes fails at once with 11; end of
// input before the final NUL, or a read error, is 54. Like qmail-queue it
// stops reading at the final NUL.
func ReadEnvelope(r io.Reader) (*Envelope, error) {
	br := bufio.NewReaderSize(r, envelopeReadSize)
	env := &Envelope{}
	readByte := func() (byte, error) {
		b, err := br.ReadByte()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return 0, &EnvelopeError{Code: ExitReadError, Msg: "end of input before the final NUL"}
			}
			return 0, &EnvelopeError{Code: ExitReadError, Msg: err.Error()}
		}
		env.Raw = append(env.Raw, b)
		return b, nil
	}
	readAddr := func() (string, error) {
		start := len(env.Raw)
		for {
			b, err := readByte()
			if err != nil {
				return "", err
			}
			if b == 0 {
				return string(env.Raw[start : len(env.Raw)-1]), nil
			}
			if len(env.Raw)-start >= maxEnvelopeAddr {
				return "", &EnvelopeError{Code: ExitAddrTooLong, Msg: "address too long"}
			}
		}
	}
	b, err := readByte()
	if err != nil {
		return nil, err
	}
	if b != 'F' {
		return nil, &EnvelopeError{Code: ExitBadEnvelope, Msg: "does not start with F"}
	}
	if env.Sender, err = readAddr(); err != nil {
		return nil, err
	}
	for {
		b, err := readByte()
		if err != nil {
			return nil, err
		}
		switch b {
		case 0:
			return env, nil
		case 'T':
			rcpt, err := readAddr()
			if err != nil {
				return nil, err
			}
			env.Recipients = append(env.Recipients, rcpt)
		default:
			return nil, &EnvelopeError{Code: ExitBadEnvelope, Msg: "record does not start with T"}
		}
	}
}
