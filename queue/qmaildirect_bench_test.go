package queue

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkQmailDirect: messages of 1 KiB from 1, 4 and 20 concurrent
// senders through the writer into a queue on the test's temporary
// directory: every round's fsyncs included. Reports messages per round.
func BenchmarkQmailDirect(b *testing.B) {
	msg := strings.Repeat("Subject: bench\n\n"+strings.Repeat("x", 76)+"\n", 12)
	for _, senders := range []int{1, 4, 20} {
		b.Run(fmt.Sprintf("senders=%d", senders), func(b *testing.B) {
			dir := testQueue(b, 23)
			p := newDirectPair(b, dir, nil)
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			start := time.Now()
			r0 := p.w.Rounds()
			for range senders {
				wg.Go(func() {
					for next.Add(1) <= int64(b.N) {
						if _, err := p.q.Deliver(context.Background(), Envelope{From: "a@x", To: []string{"b@y"}}, strings.NewReader(msg)); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
			b.ReportMetric(float64(b.N)/float64(max(1, p.w.Rounds()-r0)), "msgs/round")
		})
	}
}
