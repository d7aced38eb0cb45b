package admin

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"relay/queue"
)

// TestReleaseQueueOnPageAndAPI: GET /api/queue and the dashboard show per
// identity how much waits and when it drains; queued messages are listed
// with their release and delete buttons apart from held mail, and
// relay_held_messages counts held mail only; the counters of queued and
// refused mail and connections come from the registry.
func TestReleaseQueueOnPageAndAPI(t *testing.T) {
	f := newFixture(t)
	now := f.clock.Now()
	queues := []queue.ReleaseQueue{{Identity: newsID, Messages: 5, Recipients: 9, Paced: 2, Oldest: now.Add(-time.Minute),
		State: "waiting for a window", Detail: "sender:news@example.com is over 3 messages/10s; try again in 8s",
		NextTry: now.Add(8 * time.Second), DrainsBy: now.Add(20 * time.Second)}}
	f.held.put(queue.HeldMeta{ID: "18ee1add3a0467c5-00000001", Time: now.Add(-time.Minute), From: "news@example.com",
		To: []string{"a@far.example"}, Identities: []string{newsID}, Reason: "over 3 messages/10s", Subject: "Issue 7", Queue: newsID}, "Subject: Issue 7\n\nx\n")
	reg := prometheus.NewRegistry()
	if err := RegisterHeldGauge(reg, f.held); err != nil {
		t.Fatal(err)
	}
	refused := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "relay_connections_refused_total", Help: "x"}, []string{"reason"})
	refused.WithLabelValues("conn_rate").Add(7)
	reg.MustRegister(refused)
	srv, err := New(Options{Token: testToken, Policy: f.policy, Held: f.held, Now: f.clock.Now, Gatherer: reg,
		Queues: func() []queue.ReleaseQueue { return queues }})
	if err != nil {
		t.Fatal(err)
	}
	f.srv, f.ts = srv, newTestHTTP(t, srv)

	code, body := f.api(t, "GET", "/api/queue", nil)
	var got []queue.ReleaseQueue
	if code != http.StatusOK || json.Unmarshal([]byte(body), &got) != nil || len(got) != 1 || got[0].Messages != 5 || !got[0].DrainsBy.Equal(queues[0].DrainsBy) {
		t.Fatalf("GET /api/queue: %d %s", code, body)
	}
	code, body = f.api(t, "GET", "/api/held", nil)
	if code != http.StatusOK || !strings.Contains(body, `"queue":"sender:news@example.com"`) {
		t.Fatalf("GET /api/held does not mark the queued message: %s", body)
	}
	code, page := f.api(t, "GET", "/", nil)
	if code != http.StatusOK {
		t.Fatal(code)
	}
	section := page[strings.Index(page, `<section id="queue">`):]
	section = section[:strings.Index(section, "</section>")]
	for _, want := range []string{"Release queue (5 messages)", `<td class="num waiting">5</td>`, "waiting for a window", "in 8s", "in 20s",
		`action="/ui/held/18ee1add3a0467c5-00000001/release"`, "Issue 7"} {
		if !strings.Contains(section, want) {
			t.Errorf("queue section lacks %q:\n%s", want, section)
		}
	}
	held := page[strings.Index(page, `<section id="held">`):]
	held = held[:strings.Index(held, "</section>")]
	if strings.Contains(held, "Issue 7") || !strings.Contains(held, "Held mail (1)") {
		t.Errorf("held section lists queued mail:\n%s", held)
	}
	if !strings.Contains(page, "connections refused: conn_rate_per_ip</td><td class=\"num\">7</td>") {
		t.Errorf("page lacks the refusal counter")
	}
	code, metrics := f.api(t, "GET", "/metrics", nil)
	if code != http.StatusOK || !strings.Contains(metrics, "relay_held_messages 1\n") {
		t.Fatalf("relay_held_messages counts queued mail:\n%s", metrics)
	}
}
