package queue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"
)

// Maildir delivers into one Maildir, for the quickstart and for tests. Each
// message becomes one file (not one per recipient, as qmail-local would
// write): "Return-Path: <sender>" and one "Delivered-To: <rcpt>" line per
// recipient are prepended, then the message in qmail's stored form. The
// file is written in tmp/, fsynced, linked into new/ and new/ fsynced, as
// qmail-local does (maildir(5)).
type Maildir struct {
	Dir      string
	Hostname string       // in file names; "/" and ":" are escaped as maildir(5) says
	Logger   *slog.Logger // the cause of a failure is logged here; nil: discard
	seq      atomic.Uint64
}

// NewMaildir creates dir/{tmp,new,cur} (mode 0700) if needed.
func NewMaildir(dir, hostname string) (*Maildir, error) {
	if dir == "" {
		return nil, errors.New("delivery.maildir is empty")
	}
	for _, sub := range []string{"tmp", "new", "cur"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, err
		}
	}
	if hostname == "" {
		hostname, _ = os.Hostname()
	}
	return &Maildir{Dir: dir, Hostname: hostname}, nil
}

// maildirHostEscaper escapes what may not appear in a Maildir file name's
// host part (maildir(5): "/" as \057, ":" as \072).
var maildirHostEscaper = strings.NewReplacer("/", `\057`, ":", `\072`)

// Deliver writes one message into new/. The reply names the file.
func (m *Maildir) Deliver(ctx context.Context, env Envelope, msg io.Reader) (Receipt, error) {
	if err := checkEnvelope(env); err != nil {
		return Receipt{}, err
	}
	if err := ctx.Err(); err != nil {
		return Receipt{}, qmailError(451, "maildir delivery timed out (#4.3.0)")
	}
	now := time.Now()
	name := fmt.Sprintf("%d.M%dP%dQ%d.%s", now.Unix(), now.Nanosecond()/1000, os.Getpid(), m.seq.Add(1),
		maildirHostEscaper.Replace(m.Hostname))
	tmp := filepath.Join(m.Dir, "tmp", name)
	dst := filepath.Join(m.Dir, "new", name)

	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return Receipt{}, m.fail(err)
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	head := make([]byte, 0, 64+len(env.From)+32*len(env.To))
	head = append(head, "Return-Path: <"...)
	head = append(head, env.From...)
	head = append(head, ">\n"...)
	for _, to := range env.To {
		head = append(head, "Delivered-To: "...)
		head = append(head, to...)
		head = append(head, '\n')
	}
	if _, err := f.Write(head); err != nil {
		return Receipt{}, m.fail(err)
	}
	src := &readTracker{r: msg}
	if _, err := io.Copy(f, src); err != nil {
		if src.err != nil {
			return Receipt{}, readError(src.err)
		}
		return Receipt{}, m.fail(err)
	}
	if err := f.Sync(); err != nil {
		return Receipt{}, m.fail(err)
	}
	if err := f.Close(); err != nil {
		return Receipt{}, m.fail(err)
	}
	if err := os.Link(tmp, dst); err != nil {
		return Receipt{}, m.fail(err)
	}
	ok = true
	os.Remove(tmp)
	if err := syncDir(filepath.Join(m.Dir, "new")); err != nil {
		// The file is in new/ but may not survive a crash: report a
		// temporary failure so the sender retries (a duplicate at worst).
		os.Remove(dst)
		return Receipt{}, m.fail(err)
	}
	return Receipt{Reply: "ok " + name}, nil
}

func (m *Maildir) fail(err error) error {
	if m.Logger != nil {
		m.Logger.Error("maildir delivery failed", "dir", m.Dir, "err", err)
	}
	return &Error{Code: 451, Enhanced: [3]int{4, 3, 0}, Text: "maildir delivery failed (#4.3.0)"}
}

// syncDir fsyncs a directory, making a new entry in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
