package signals

import (
	"fmt"
	"testing"
	"time"
)

// feed parses and applies lines to j as read at now; it returns the
// outcomes to count.
func feed(j *joinState, now time.Time, lines ...string) []record {
	var out []record
	for _, s := range lines {
		l := parseLine([]byte(s))
		if r, ok := j.line(&l, now.UnixNano()); ok {
			out = append(out, r)
		}
	}
	return out
}

// msgLines is the log of one message to n recipients, all with outcome.
func msgLines(at time.Time, n, qp int, from string, d0 int, outcome string, rcpts int) []string {
	ls := []string{
		multilogLine(at, fmt.Sprintf("new msg %d", n)),
		multilogLine(at, fmt.Sprintf("info msg %d: bytes 321 from <%s> qp %d uid 1001", n, from, qp)),
	}
	for i := range rcpts {
		ls = append(ls, multilogLine(at, fmt.Sprintf("starting delivery %d: msg %d to remote r%d@example.net", d0+i, n, i)))
	}
	for i := range rcpts {
		ls = append(ls, multilogLine(at, fmt.Sprintf("delivery %d: %s: x", d0+i, outcome)))
	}
	return append(ls, multilogLine(at, fmt.Sprintf("end msg %d", n)))
}

func TestJoinByQP(t *testing.T) {
	j := newJoinState(testMetrics())
	at := testTime
	ids := []string{"user:bob", "sender:bob@example.com"}
	j.handedOff(handoff{QP: 4242, From: "bob@example.com", IDs: ids, At: at.UnixNano()}, at.UnixNano())
	// Another program's message with the same sender, another qp: ignored.
	if out := feed(j, at, msgLines(at, 77, 5000, "bob@example.com", 1, "failure", 2)...); len(out) != 0 {
		t.Fatalf("joined by sender: %+v", out)
	}
	out := feed(j, at, msgLines(at.Add(time.Second), 78, 4242, "bob@example.com", 10, "failure", 3)...)
	if len(out) != 3 || out[0].outcome != "failure" || out[0].ids[0] != "user:bob" || !out[0].at.Equal(at.Add(time.Second)) {
		t.Fatalf("outcomes: %+v", out)
	}
	// The hand-off was used up: the same qp again joins nothing.
	if out := feed(j, at, msgLines(at.Add(2*time.Second), 79, 4242, "bob@example.com", 20, "failure", 1)...); len(out) != 0 {
		t.Fatalf("a hand-off joined twice: %+v", out)
	}
	// Other programs' ended messages wait for a hand-off as long as a
	// tentative line may, then go.
	if len(j.msgs) != 2 || len(j.tentative) != 2 {
		t.Fatalf("%d msgs, %d tentative; want the two unjoined ones", len(j.msgs), len(j.tentative))
	}
	j.expire(at.Add(tentativeSpan+time.Second).UnixNano(), true)
	if len(j.msgs) != 0 || len(j.deliveries) != 0 || j.nHandoffs != 0 {
		t.Fatalf("state left: %d msgs, %d deliveries, %d hand-offs", len(j.msgs), len(j.deliveries), j.nHandoffs)
	}
}

// A reused pid: a hand-off joins neither an older line nor one with
// another sender.
func TestJoinPidReuse(t *testing.T) {
	j := newJoinState(testMetrics())
	at := testTime
	j.handedOff(handoff{QP: 99, From: "bob@example.com", IDs: []string{"user:bob"}, At: at.UnixNano()}, at.UnixNano())
	if out := feed(j, at, msgLines(at.Add(-time.Hour), 1, 99, "bob@example.com", 1, "failure", 1)...); len(out) != 0 {
		t.Fatalf("joined a line older than the hand-off: %+v", out)
	}
	if out := feed(j, at, msgLines(at.Add(time.Second), 2, 99, "eve@example.com", 2, "failure", 1)...); len(out) != 0 {
		t.Fatalf("joined another sender: %+v", out)
	}
	if out := feed(j, at, msgLines(at.Add(time.Second), 3, 99, "bob@example.com", 3, "success", 1)...); len(out) != 1 {
		t.Fatalf("the right line: %+v", out)
	}
}

// qmail-send may log the message before relay has recorded its hand-off.
func TestJoinInfoBeforeHandoff(t *testing.T) {
	j := newJoinState(testMetrics())
	at := testTime
	ls := msgLines(at, 5, 321, "bob@example.com", 1, "failure", 2)
	if out := feed(j, at, ls[:5]...); len(out) != 0 { // new, info, 2 starts, 1st failure
		t.Fatal(out)
	}
	out := j.handedOff(handoff{QP: 321, From: "bob@example.com", IDs: []string{"user:bob"}, At: at.Add(-time.Millisecond).UnixNano()}, at.UnixNano())
	if len(out) != 1 || out[0].outcome != "failure" {
		t.Fatalf("outcomes kept for the late hand-off: %+v", out)
	}
	if out := feed(j, at, ls[5:]...); len(out) != 1 {
		t.Fatalf("the rest: %+v", out)
	}
	// The whole message, end and all, logged before the hand-off.
	ls = msgLines(at, 7, 323, "bob@example.com", 20, "success", 1)
	if out := feed(j, at, ls...); len(out) != 0 {
		t.Fatal(out)
	}
	out = j.handedOff(handoff{QP: 323, From: "bob@example.com", IDs: []string{"user:bob"}, At: at.UnixNano()}, at.UnixNano())
	if len(out) != 1 || out[0].outcome != "success" || j.msgs[7] != nil || j.nHandoffs != 0 {
		t.Fatalf("an ended message's late hand-off: %+v, msg %+v, %d hand-offs waiting", out, j.msgs[7], j.nHandoffs)
	}
	// Too late: after tentativeSpan the line no longer waits.
	feed(j, at, msgLines(at, 6, 322, "bob@example.com", 10, "failure", 1)[:2]...)
	j.expire(at.Add(tentativeSpan+time.Second).UnixNano(), true)
	if out := j.handedOff(handoff{QP: 322, From: "bob@example.com", IDs: []string{"user:bob"}, At: at.UnixNano()}, at.Add(tentativeSpan+time.Second).UnixNano()); len(out) != 0 || j.nHandoffs != 1 {
		t.Fatalf("joined after the span: %+v", out)
	}
}

// qmail-send restarts number deliveries from 1 again; a message whose
// number is reused (inode) starts afresh.
func TestJoinReuse(t *testing.T) {
	j := newJoinState(testMetrics())
	at := testTime
	j.handedOff(handoff{QP: 1, From: "a@x", IDs: []string{"user:a"}, At: at.UnixNano()}, at.UnixNano())
	feed(j, at, multilogLine(at, "info msg 7: bytes 1 from <a@x> qp 1 uid 1"),
		multilogLine(at, "starting delivery 1: msg 7 to remote r@y"))
	// qmail-send restarted: delivery 1 is another message's now.
	out := feed(j, at, multilogLine(at, "starting delivery 1: msg 8 to remote r@y"), multilogLine(at, "delivery 1: failure: x"))
	if len(out) != 0 {
		t.Fatalf("a delivery counted for the wrong message: %+v", out)
	}
	// msg 7's inode reused by a message that is not ours.
	feed(j, at, multilogLine(at, "new msg 7"))
	if len(j.msgs) != 0 {
		t.Fatalf("msgs %+v", j.msgs)
	}
}

func TestJoinBounded(t *testing.T) {
	j := newJoinState(testMetrics())
	now := testTime.UnixNano()
	for i := range maxHandoffs + 10 {
		j.handedOff(handoff{QP: i + 1, From: "a@x", IDs: []string{"user:a"}, At: now + int64(i)}, now)
	}
	if j.nHandoffs != maxHandoffs || len(j.handoffs[1]) != 0 || len(j.handoffs[maxHandoffs+10]) != 1 {
		t.Fatalf("%d hand-offs; oldest kept %v", j.nHandoffs, j.handoffs[1])
	}
	j.expire(now+int64(handoffSpan)+int64(maxHandoffs+10), false)
	if j.nHandoffs != 0 || len(j.handoffs) != 0 {
		t.Fatalf("%d hand-offs after their span", j.nHandoffs)
	}
}

// The queue writer of qmail-direct numbers its messages with a microsecond
// clock, far above any pid: such a qp joins too.
func TestJoinWriterQP(t *testing.T) {
	j := newJoinState(testMetrics())
	qp := 1772445600250000
	j.handedOff(handoff{QP: qp, From: "a@x", IDs: []string{"user:a"}, At: testTime.UnixNano()}, testTime.UnixNano())
	if out := feed(j, testTime, msgLines(testTime, 1, qp, "a@x", 1, "failure", 1)...); len(out) != 1 {
		t.Fatalf("outcomes %+v", out)
	}
}

// testMetrics are metrics registered nowhere.
func testMetrics() *metrics {
	m, err := newMetrics(nil)
	if err != nil {
		panic(err)
	}
	return m
}
