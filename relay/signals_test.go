package relay

import (
	"strings"
	"sync"
	"testing"
	"time"

	"relay/policy"
	"relay/queue"
)

// fakeRecorder records hand-offs as package signals would get them.
type fakeRecorder struct {
	mu    sync.Mutex
	calls []handedOff
}

type handedOff struct {
	qp   int
	from string
	ids  string
	at   time.Time
}

func (r *fakeRecorder) HandedOff(qp int, from string, ids []string, at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, handedOff{qp, from, strings.Join(ids, ","), at})
}

func (r *fakeRecorder) got() []handedOff {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]handedOff(nil), r.calls...)
}

// Every counted message relay hands off is recorded with the qp of its
// reply; uncounted, failed and held ones are not.
func TestHandoffRecorded(t *testing.T) {
	cfg := testConfig()
	cfg.Relay.RelayNetworks = []string{"127.0.0.2/32"}
	rec := &fakeRecorder{}
	h := &fakeHandoff{}
	hold := &fakeHold{}
	ck := &fakeChecker{}
	s := testServer(t, cfg, Deps{Policy: ck, Handoff: h, Hold: hold, Handoffs: rec}, nil)
	addr := tcpAddr(s, 0)

	c := dialRawFrom(t, "tcp", addr, "127.0.0.2")
	c.hello("client")
	if got := c.mail("bob@example.com", []string{"x@far.test"}, "Subject: s\r\n\r\nb\r\n.\r\n"); !strings.HasPrefix(got, "250 ok 1795833709 qp 4242") {
		t.Fatal(got)
	}
	want := handedOff{qp: 4242, from: "bob@example.com", ids: "ip:127.0.0.2,sender:bob@example.com,domain:example.com", at: fixedNow}
	if got := rec.got(); len(got) != 1 || got[0] != want {
		t.Fatalf("recorded %+v, want %+v", got, want)
	}
	// Held: nothing handed off.
	ck.msg = policy.Decision{Action: policy.Hold, Identity: "ip:127.0.0.2", Limit: "1 message/1h"}
	if got := c.mail("bob@example.com", []string{"x@far.test"}, "Subject: s\r\n\r\nb\r\n.\r\n"); !strings.HasPrefix(got, "250 ok held") {
		t.Fatal(got)
	}
	ck.msg = policy.Decision{}
	// A failed hand-off.
	h.mu.Lock()
	h.err = &queue.Error{Code: 451, Text: "qq trouble"}
	h.mu.Unlock()
	if got := c.mail("bob@example.com", []string{"x@far.test"}, "Subject: s\r\n\r\nb\r\n.\r\n"); !strings.HasPrefix(got, "451") {
		t.Fatal(got)
	}
	h.mu.Lock()
	h.err = nil
	h.mu.Unlock()
	// Mail from the internet to a local domain is not counted, so not recorded.
	c2 := dialRawFrom(t, "tcp", addr, "127.0.0.3")
	c2.hello("mx")
	if got := c2.mail("someone@far.test", []string{"u@example.test"}, "Subject: s\r\n\r\nb\r\n.\r\n"); !strings.HasPrefix(got, "250 ok") {
		t.Fatal(got)
	}
	if got := rec.got(); len(got) != 1 {
		t.Fatalf("recorded %+v", got)
	}
}

// A check's commit carries relay qq's pid: the qp of the qmail-queue it
// execs, recorded with the message's identities. An empty commit charges
// without it; anything else in it breaks the protocol.
func TestCheckCommitRecordsPID(t *testing.T) {
	rec := &fakeRecorder{}
	ck := &fakeChecker{}
	path, _ := checkServer(t, Deps{Policy: ck, Handoffs: rec}, nil)
	msg := "Subject: s\n\nb\n"
	me := "uid:local:" + uidString()
	for _, c := range []struct {
		payload string
		qp      int
		ok      bool
	}{{"31337", 31337, true}, {"", 0, true}, {"12a", 0, false}, {"99999999999", 0, false}, {"-5", 0, false}, {"0", 0, false}} {
		cl := dialCheck(t, path)
		cl.request("www@example.test", []string{"x@far.test"}, msg)
		if typ, _ := cl.verdict(); typ != frameAccepted {
			t.Fatalf("verdict %q", typ)
		}
		cl.write(appendFrame(nil, frameCommit, c.payload))
		typ, text := cl.frame()
		if (typ == frameOK) != c.ok {
			t.Fatalf("commit %q answered %q %q", c.payload, typ, text)
		}
		got := rec.got()
		if c.qp == 0 {
			if len(got) != 0 {
				t.Fatalf("commit %q recorded %+v", c.payload, got)
			}
			continue
		}
		want := handedOff{qp: c.qp, from: "www@example.test", ids: me + ",sender:www@example.test,domain:example.test", at: fixedNow}
		if len(got) != 1 || got[0] != want {
			t.Fatalf("recorded %+v, want %+v", got, want)
		}
		rec.mu.Lock()
		rec.calls = nil
		rec.mu.Unlock()
	}
	waitFor(t, func() bool { return strings.Count(ck.log(), "commit") == 2 })
}

// Mail the releaser lets out of a release queue is recorded too, with the
// qp of its hand-off and the identities it was queued with; while it waits
// nothing is.
func TestReleasedHandoffRecorded(t *testing.T) {
	r := newQueueRig(t, "1/1h", "")
	if got := r.send(t, "m1"); !strings.HasPrefix(got, "250 ok 1795833709 qp 4242") {
		t.Fatal(got)
	}
	if got := r.send(t, "m2"); !strings.HasPrefix(got, "250 ok queued ") {
		t.Fatalf("over the cap: %q", got)
	}
	if got := r.rec.got(); len(got) != 1 || got[0].qp != 4242 || got[0].from != "news@example.test" {
		t.Fatalf("recorded %+v", got)
	}
	r.advance(time.Hour + 2*time.Minute)
	waitFor(t, func() bool { return len(r.rec.got()) == 2 })
	got := r.rec.got()[1]
	if got.qp != 4242 || got.from != "news@example.test" || !strings.Contains(got.ids, "sender:news@example.test") {
		t.Fatalf("release recorded %+v", got)
	}
}
