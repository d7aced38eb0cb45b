package queue

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"relay/config"
)

func TestNewChoosesMethod(t *testing.T) {
	dur := config.Duration{Duration: 7 * time.Second}
	h, err := New(config.Delivery{Method: config.DeliverQmailQueue, Timeout: dur}, "h", Options{})
	if err != nil {
		t.Fatal(err)
	}
	if q, ok := h.(*QmailQueue); !ok || q.Path != DefaultQmailQueue || q.Timeout != dur.Duration {
		t.Errorf("qmail-queue: %#v", h)
	}
	h, err = New(config.Delivery{Method: config.DeliverQmailInject, Command: "/usr/sbin/inject -x"}, "h", Options{})
	if err != nil {
		t.Fatal(err)
	}
	if q, ok := h.(*QmailInject); !ok || q.Path != "/usr/sbin/inject" || len(q.Args) != 1 || q.Args[0] != "-x" {
		t.Errorf("qmail-inject: %#v", h)
	}
	h, err = New(config.Delivery{Method: config.DeliverSMTP, SMTPAddr: "127.0.0.1:25"}, "relay.example", Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s, ok := h.(*SMTP); !ok || s.Addr != "127.0.0.1:25" || s.Hostname != "relay.example" {
		t.Errorf("smtp: %#v", h)
	}
	h, err = New(config.Delivery{Method: config.DeliverMaildir, Maildir: t.TempDir()}, "h", Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := h.(*Maildir); !ok {
		t.Errorf("maildir: %#v", h)
	}
	for _, bad := range []config.Delivery{
		{Method: "lmtp"},
		{Method: config.DeliverQmailQueue, Command: "qmail-queue"},
		{Method: config.DeliverSMTP},
		{Method: config.DeliverMaildir},
	} {
		if _, err := New(bad, "h", Options{}); err == nil {
			t.Errorf("New(%+v) accepted", bad)
		}
	}
}

func TestHandoffMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	d := config.Delivery{Method: config.DeliverMaildir, Maildir: t.TempDir()}
	h, err := New(d, "h", Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	// A second New on the same registry (a reload) reuses the histogram.
	h2, err := New(d, "h", Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	env := Envelope{From: "a@b", To: []string{"c@d"}}
	if _, err := h.Deliver(context.Background(), env, strings.NewReader("x\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := h2.Deliver(context.Background(), env, &failingReader{}); err == nil {
		t.Fatal("failing reader delivered")
	}
	perm := &instrumented{next: permFail{}, method: "test", seconds: h.(*instrumented).seconds}
	perm.Deliver(context.Background(), env, strings.NewReader("x\n"))

	n := testutil.CollectAndCount(reg, "relay_handoff_seconds")
	if n != 3 {
		t.Errorf("%d series, want 3 (maildir ok, maildir temp, test perm)", n)
	}
	mfs, _ := reg.Gather()
	got := map[string]uint64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			labels := ""
			for _, l := range m.GetLabel() {
				labels += l.GetName() + "=" + l.GetValue() + " "
			}
			got[strings.TrimSpace(labels)] = m.GetHistogram().GetSampleCount()
		}
	}
	for _, k := range []string{"method=maildir result=ok", "method=maildir result=temp", "method=test result=perm"} {
		if got[k] != 1 {
			t.Errorf("%s: %d samples (all: %v)", k, got[k], got)
		}
	}
}

type permFail struct{}

func (permFail) Deliver(context.Context, Envelope, io.Reader) (Receipt, error) {
	return Receipt{}, qmailError(554, "no (#5.3.0)")
}

func TestParseEnhanced(t *testing.T) {
	cases := map[string][3]int{
		"qq write error or disk full (#4.3.0)": {4, 3, 0},
		"x (#5.1.3)\n":                         {5, 1, 3},
		"no code":                              {},
		"(#4.3)":                               {},
		"(#9.1.1)":                             {},
		"(#4.3.0":                              {},
		"(#4.a.0)":                             {},
		"(#4.1000.0)":                          {},
		"(#2.0.0)":                             {2, 0, 0},
	}
	for in, want := range cases {
		if got := parseEnhanced(in); got != want {
			t.Errorf("parseEnhanced(%q) = %v, want %v", in, got, want)
		}
	}
}

func FuzzParseEnhanced(f *testing.F) {
	f.Add("qq timeout (#4.3.0)")
	f.Add("(#5.999.999)")
	f.Add("(#)")
	f.Fuzz(func(t *testing.T, s string) {
		e := parseEnhanced(s)
		if e == ([3]int{}) {
			return
		}
		if e[0] != 2 && e[0] != 4 && e[0] != 5 || e[1] < 0 || e[1] > 999 || e[2] < 0 || e[2] > 999 {
			t.Fatalf("parseEnhanced(%q) = %v", s, e)
		}
	})
}
