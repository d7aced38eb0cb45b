package qmailtest

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestRealQmailDelivers: a message queued by the real qmail-queue reaches
// a Mailbox through the qmail-send StartSend runs, and its log says so.
func TestRealQmailDelivers(t *testing.T) {
	q := Require(t)
	q.StartSend()
	m := q.Mailbox()
	cmd := exec.Command(q.Home + "/bin/qmail-queue")
	cmd.Stdin = strings.NewReader("Subject: qmailtest\n\nhello\n")
	env := "Fsender@example.test\x00T" + m.Addr + "\x00\x00"
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = r // qmail-queue reads the envelope from fd 1
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r.Close()
	w.Write([]byte(env))
	w.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	msgs := q.Wait(m, 1, 60*time.Second)
	body, err := StripDelivery(msgs[0])
	if err != nil || !bytes.HasPrefix(body, []byte("Received: (qmail ")) || !bytes.HasSuffix(body, []byte("Subject: qmailtest\n\nhello\n")) {
		t.Fatalf("delivered %q (%v)", msgs[0], err)
	}
	q.WaitLog(30*time.Second, func(log string) bool { return strings.Contains(log, "from <sender@example.test> qp ") })
}
