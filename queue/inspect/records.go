package inspect

import (
	"bytes"
	"time"
)

// envelope is what todo/<id>, info/<split>/<id> and local|remote/<split>/<id>
// say about a message.
type envelope struct {
	sender       string
	recipients   []Recipient
	left, done   int
	preprocessed bool      // read from info/local/remote, not todo
	queued       time.Time // info's mtime
}

// records calls fn for each NUL-terminated record of a qmail queue file.
// A last record without its NUL is one qmail is still writing; it is left
// out, so a half-written file yields only what is complete.
func records(data []byte, fn func(rec []byte)) {
	for len(data) > 0 {
		i := bytes.IndexByte(data, 0)
		if i < 0 {
			return
		}
		fn(data[:i])
		data = data[i+1:]
	}
}

// parseTodo reads a todo file: u<uid>\0p<pid>\0F<sender>\0T<rcpt>\0…
// (qmail-queue.c writes no final extra NUL). The uid and pid are in the
// Received line too, so only the sender and recipients are taken. Recipients in todo are not yet
// split into local and remote, so Remote is false and none is done.
func parseTodo(data []byte, keep bool) envelope {
	var env envelope
	records(data, func(rec []byte) {
		if len(rec) == 0 {
			return
		}
		switch rec[0] {
		case 'F':
			env.sender = string(rec[1:])
		case 'T':
			env.left++
			if keep {
				env.recipients = append(env.recipients, Recipient{Addr: string(rec[1:])})
			}
		}
	})
	return env
}

// parseInfo returns the sender of an info file: F<sender>\0. ok is false
// when the file has no complete F record yet.
func parseInfo(data []byte) (sender string, ok bool) {
	records(data, func(rec []byte) {
		if len(rec) > 0 && rec[0] == 'F' {
			sender, ok = string(rec[1:]), true
		}
	})
	return sender, ok
}

// addRecipients adds the records of a local or remote file to env:
// T<addr>\0 is still to be delivered, D<addr>\0 is done (qmail-send
// overwrites the T in place once the delivery is final).
func addRecipients(env *envelope, data []byte, remote, keep bool) {
	records(data, func(rec []byte) {
		if len(rec) == 0 {
			return
		}
		var done bool
		switch rec[0] {
		case 'T':
			env.left++
		case 'D':
			env.done++
			done = true
		default:
			return
		}
		if keep {
			env.recipients = append(env.recipients, Recipient{Addr: string(rec[1:]), Remote: remote, Done: done})
		}
	})
}
