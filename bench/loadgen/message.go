package loadgen

import (
	"bufio"
	"bytes"
	"strconv"
)

// message is the content every transaction sends: a few headers that differ
// per message, then a body shared by all of them, already in SMTP's
// transparent form (CRLF, no line starting with '.').
type message struct {
	body []byte // body lines and the final ".\r\n"
}

// headerEstimate is about what the per-message headers take, so Size is
// the size of the whole message as sent.
const headerEstimate = 220

// bodyLine is one line of body text, 78 bytes with its CRLF.
const bodyLine = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tem\r\n"

func newMessage(size int) *message {
	n := max(size-headerEstimate, len(bodyLine))
	var b bytes.Buffer
	b.Grow(n + 8)
	b.WriteString("\r\n") // end of the header
	for b.Len()+len(bodyLine) <= n {
		b.WriteString(bodyLine)
	}
	if rest := n - b.Len(); rest > 2 {
		b.WriteString(bodyLine[:rest-2])
		b.WriteString("\r\n")
	}
	b.WriteString(".\r\n")
	return &message{body: b.Bytes()}
}

// write sends message n's content, the terminating dot included.
func (m *message) write(w *bufio.Writer, n int, from string, cfg *Config) error {
	if cfg.UIDs > 0 {
		// The line qmail-inject writes on a web server (qmail 1.03
		// received.c); relay reads the uid from the first one it finds.
		w.WriteString("Received: (qmail ")
		w.WriteString(strconv.Itoa(1000 + n%30000))
		w.WriteString(" invoked by uid ")
		w.WriteString(strconv.Itoa(FirstUID + n%cfg.UIDs))
		w.WriteString("); 5 Mar 2024 07:04:09 -0000\r\n")
	}
	w.WriteString("From: <" + from + ">\r\n")
	w.WriteString("To: <" + rcptAddr(n, 0, cfg.RcptDomain) + ">\r\n")
	w.WriteString("Subject: bench message " + strconv.Itoa(n) + "\r\n")
	w.WriteString("Message-ID: <" + strconv.Itoa(n))
	if cfg.Tag != "" {
		w.WriteString("." + cfg.Tag)
	}
	w.WriteString(".loadgen@bench.example>\r\n")
	w.WriteString("Date: Tue, 5 Mar 2024 07:04:09 +0000\r\n")
	w.Write(m.body)
	return w.Flush()
}
