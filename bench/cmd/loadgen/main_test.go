package main

import (
	"testing"

	"relay/bench/loadgen"
)

// bench/run reads these lines with awk by key: the Summary's fields must
// come out flat, first_error only when set.
func TestLineFlattensSummary(t *testing.T) {
	res := loadgen.Result{Summary: loadgen.Summary{Accepted: 3, MsgsPerSec: 1.25, P50us: 10}, RcptFailures: 1}
	want := "x=1 accepted=3 deferred=0 rejected=0 errors=0 seconds=0.0 msgs_per_sec=1.2 p50_us=10.0 p99_us=0.0 max_us=0.0 rcpt_failures=1"
	got := line("x=1", res)
	if len(got) < len(want) || got[:len(want)] != want {
		t.Errorf("line:\n got %s\nwant %s...", got, want)
	}
}
