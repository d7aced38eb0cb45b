package signals

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// stamp of the test lines: 2026-03-02 10:00:00.25 UTC.
var testTime = time.Date(2026, 3, 2, 10, 0, 0, 250_000_000, time.UTC)

// tai64n is multilog's stamp of t.
func tai64n(t time.Time) string {
	return fmt.Sprintf("@%016x%08x", uint64(t.Unix())+taiOffset, t.Nanosecond())
}

// multilogLine is msg as multilog with the t option writes it.
func multilogLine(t time.Time, msg string) string { return tai64n(t) + " " + msg }

// syslogLine is msg as splogger hands it to syslog and a classic syslog
// daemon writes it.
func syslogLine(t time.Time, msg string) string {
	return t.Local().Format("Jan _2 15:04:05") + " mail qmail: " + fmt.Sprintf("%d.%06d ", t.Unix(), t.Nanosecond()/1000) + msg
}

func TestParseLine(t *testing.T) {
	ns := testTime.UnixNano()
	us := testTime.Truncate(time.Microsecond).UnixNano()
	for _, c := range []struct {
		in   string
		want line
	}{
		{multilogLine(testTime, "info msg 1234: bytes 789 from <bob@example.com> qp 4242 uid 1001"),
			line{kind: lineInfo, stamp: ns, msg: 1234, qp: 4242, sender: []byte("bob@example.com")}},
		{syslogLine(testTime, "info msg 1234: bytes 789 from <> qp 4242 uid 0"),
			line{kind: lineInfo, stamp: us, msg: 1234, qp: 4242, sender: []byte{}}},
		{"2026-03-02T10:00:00.250000+00:00 mail qmail-send[77]: info msg 5: bytes 1 from <a>b@c> qp 9 uid 2",
			line{kind: lineInfo, stamp: ns, msg: 5, qp: 9, sender: []byte("a>b@c")}},
		{"info msg 5: bytes 1 from <x@y> qp 9 uid 2\r", line{kind: lineInfo, msg: 5, qp: 9, sender: []byte("x@y")}},
		{multilogLine(testTime, "starting delivery 17: msg 1234 to remote carol@example.net"),
			line{kind: lineStarting, stamp: ns, delivery: 17, msg: 1234}},
		{multilogLine(testTime, "starting delivery 18: msg 1234 to local bob@example.com"),
			line{kind: lineStarting, stamp: ns, delivery: 18, msg: 1234}},
		{multilogLine(testTime, "delivery 17: success: 1.2.3.4_accepted_message./Remote_host_said:_250_ok/"),
			line{kind: lineDelivery, stamp: ns, delivery: 17, outcome: outcomeSuccess}},
		{syslogLine(testTime, "delivery 17: failure: Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/"),
			line{kind: lineDelivery, stamp: us, delivery: 17, outcome: outcomeFailure}},
		{multilogLine(testTime, "delivery 17: deferral: Connected_to_1.2.3.4_but_greeting_failed./"),
			line{kind: lineDelivery, stamp: ns, delivery: 17, outcome: outcomeDeferral}},
		{multilogLine(testTime, "delivery 17: report mangled, will defer"),
			line{kind: lineDelivery, stamp: ns, delivery: 17, outcome: outcomeDeferral}},
		{multilogLine(testTime, "new msg 1234"), line{kind: lineNew, stamp: ns, msg: 1234}},
		{multilogLine(testTime, "end msg 1234"), line{kind: lineEnd, stamp: ns, msg: 1234}},
		{syslogLine(testTime, "end msg 1234"), line{kind: lineEnd, stamp: us, msg: 1234}},
		// A bad stamp is no stamp; the line still counts.
		{"@40000000zzzzzzzz00000000 end msg 1", line{kind: lineEnd, msg: 1}},
		{"@4000 end msg 1", line{kind: lineEnd, msg: 1}},
		{"@ffffffffffffffff00000000 end msg 1", line{kind: lineEnd, msg: 1}},
		// Unknown lines are skipped; broken ones too, as malformed.
		{multilogLine(testTime, "status: local 0/10 remote 1/20"), line{}},
		{multilogLine(testTime, "bounce msg 1234 qp 99"), line{}},
		{multilogLine(testTime, "delivery 17: victory: ok"), line{kind: lineBad}},
		{multilogLine(testTime, "delivery : success: x"), line{kind: lineBad}},
		{multilogLine(testTime, "end msg 12x"), line{kind: lineBad}},
		{multilogLine(testTime, "end msg 99999999999999999999"), line{kind: lineBad}},
		{multilogLine(testTime, "info msg 1: bytes 2 from <a> qp 99999999999999999999 uid 1"), line{kind: lineBad}},
		{multilogLine(testTime, "info msg 1: bytes 2 from <a> qp 3 uid"), line{kind: lineBad}},
		{multilogLine(testTime, "starting delivery 1: msg 2 to moon x"), line{kind: lineBad}},
		{"Mar  2 10:00:00 mail sshd[1]: Accepted publickey for root", line{}},
		{"Mar  2 10:00:00 mail evil: delivery 5: failure: forged", line{kind: lineDelivery, delivery: 5, outcome: outcomeFailure}},
		{"", line{}},
		{"\x00\xff\x00delivery 1: failure: x", line{}},
		{"@", line{}},
	} {
		got := parseLine([]byte(c.in))
		if !sameLine(got, c.want) {
			t.Errorf("parseLine(%q)\n got %+v\nwant %+v", c.in, got, c.want)
		}
	}
}

func sameLine(a, b line) bool {
	return a.kind == b.kind && a.stamp == b.stamp && a.msg == b.msg && a.delivery == b.delivery &&
		a.qp == b.qp && bytes.Equal(a.sender, b.sender) && a.outcome == b.outcome
}

// splogger splits lines longer than 800 bytes: "STAMP+REST" continues.
func TestParseSploggerContinuation(t *testing.T) {
	l := parseLine([]byte("Mar  2 10:00:00 mail qmail: 1772445600.250000 info msg 5: bytes 1 from <" + strings.Repeat("a", 700)))
	if l.kind != lineCut || !bytes.HasPrefix(l.rest, []byte("info msg 5:")) {
		t.Fatalf("cut line: %+v", l.kind)
	}
	c := parseLine([]byte("Mar  2 10:00:00 mail qmail: 1772445600.250000+@x> qp 77 uid 1"))
	if c.kind != lineCont || string(c.rest) != "@x> qp 77 uid 1" || c.stamp != l.stamp {
		t.Fatalf("continuation: %+v %q", c, c.rest)
	}
}

func TestTAI64N(t *testing.T) {
	if got := parseTAI64N([]byte(tai64n(testTime)[1:])); got != testTime.UnixNano() {
		t.Fatalf("%d, want %d", got, testTime.UnixNano())
	}
	// daemontools' tai_now: 2^62 + 10 + unix seconds.
	if got := parseTAI64N([]byte("400000000000000a00000000")); got != 0 {
		t.Fatalf("the epoch: %d", got)
	}
	if got := parseTAI64N([]byte("400000000000000a3b9aca00")); got != 0 {
		t.Fatalf("nanoseconds past 999999999 accepted: %d", got)
	}
}

func TestLogsafeEqual(t *testing.T) {
	for _, c := range []struct {
		addr, logged string
		ok           bool
	}{
		{"bob@example.com", "bob@example.com", true},
		{"", "", true},
		{"a b%c\x01\n\xffd@x", "a_b_c_/_d@x", true},
		{"a b@x", "a b@x", false},
		{"bob@example.com", "bob@example.co", false},
		{"Bob@example.com", "bob@example.com", false},
	} {
		if got := logsafeEqual(c.addr, []byte(c.logged)); got != c.ok {
			t.Errorf("logsafeEqual(%q, %q) = %v", c.addr, c.logged, got)
		}
	}
}

// FuzzParseLine: the line parser never panics and never reads a field
// that is not in the line; what it reads, written back in qmail-send's
// form, reads the same.
func FuzzParseLine(f *testing.F) {
	for _, s := range []string{
		multilogLine(testTime, "info msg 1234: bytes 789 from <bob@example.com> qp 4242 uid 1001"),
		syslogLine(testTime, "starting delivery 17: msg 1234 to remote carol@example.net"),
		multilogLine(testTime, "delivery 17: failure: 550_no"),
		"2026-03-02T10:00:00.250000+00:00 mail qmail: delivery 3: deferral: x",
		"Mar  2 10:00:00 mail qmail: 1772445600.250000+@x> qp 77 uid 1",
		multilogLine(testTime, "new msg 1"), "end msg 18446744073709551615", "@\x00\xff", "info msg 1: bytes 2 from <> qp  uid 1",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		l := parseLine(b)
		var again string
		switch l.kind {
		case lineInfo:
			if bytes.Contains(l.sender, []byte(" ")) && !bytes.Contains(b, []byte("> qp ")) {
				t.Fatalf("sender %q from %q", l.sender, b)
			}
			again = "info msg " + u(l.msg) + ": bytes 1 from <" + string(l.sender) + "> qp " + u(l.qp) + " uid 0"
		case lineStarting:
			again = "starting delivery " + u(l.delivery) + ": msg " + u(l.msg) + " to remote x"
		case lineDelivery:
			again = "delivery " + u(l.delivery) + ": " + l.outcome + ": x"
		case lineNew:
			again = "new msg " + u(l.msg)
		case lineEnd:
			again = "end msg " + u(l.msg)
		default:
			return
		}
		for _, n := range []uint64{l.msg, l.delivery, l.qp} {
			if n != 0 && !bytes.Contains(b, []byte(u(n))) {
				t.Fatalf("a number not in the line: %+v from %q", l, b)
			}
		}
		r := parseLine([]byte(again))
		r.stamp = l.stamp
		if !sameLine(r, l) {
			t.Fatalf("%q read %+v; written back %q reads %+v", b, l, again, r)
		}
	})
}

func u(v uint64) string { return strconv.FormatUint(v, 10) }
