package inspect

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
)

// BenchmarkRead100k reads a generated queue of 100,000 messages (set
// INSPECT_BENCH_MESSAGES for another size), the size of a bad spam run:
// a mix of local script and authenticated SMTP messages with 5 recipients
// each and a 20 KiB body that must not be read. Generating the queue takes
// a while and is not timed. Reports messages read per second.
func BenchmarkRead100k(b *testing.B) {
	n := 100_000
	if v, err := strconv.Atoi(os.Getenv("INSPECT_BENCH_MESSAGES")); err == nil && v > 0 {
		n = v
	}
	dir := newQueue(b)
	body := strings.Repeat("spam spam spam spam spam spam spam spam spam spam\n", 400)
	rcpts := []string{"Ta@example.net", "Tb@example.net", "Dc@example.org", "Td@example.org", "Te@example.com"}
	for i := range n {
		var received []string
		if i%2 == 0 {
			received = []string{"Received: (qmail " + strconv.Itoa(i) + " invoked by uid " + strconv.Itoa(1000+i%50) + "); " + date}
		} else {
			received = networkLines(i, "unknown (HELO pc) (user"+strconv.Itoa(i%30)+"@192.0.2."+strconv.Itoa(i%200)+")", "ESMTPA")
		}
		addMessage(b, dir, fixtureMsg{
			mess:   messFile(received, "X-PHP-Originating-Script: 1000:mailer.php") + body,
			info:   "sender" + strconv.Itoa(i%100) + "@example.com",
			remote: rcpts,
			queued: t1,
		})
	}
	r := &Reader{Dir: dir}
	b.ResetTimer()
	for b.Loop() {
		msgs, st, err := r.Read(context.Background(), nil)
		if err != nil || len(msgs) != n || st.Failed != 0 {
			b.Fatalf("read %d of %d, stats %+v, err %v", len(msgs), n, st, err)
		}
		_ = Summarize(msgs, 10)
	}
	b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}
