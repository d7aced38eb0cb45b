package admin

import (
	"net/http"
	"slices"
	"time"

	dto "github.com/prometheus/client_model/go"

	"relay/policy"
	"relay/queue"
)

// The release queues (over_limit = "queue", pace) and the connection-level
// refusals, on the page and at GET /api/queue.

// Bounds of the page's queue section.
const dashboardQueued = 50 // queued messages listed, oldest first

// queues lists the release queues; never nil.
func (s *Server) queues() []queue.ReleaseQueue {
	if s.opts.Queues == nil {
		return []queue.ReleaseQueue{}
	}
	list := s.opts.Queues()
	if list == nil {
		list = []queue.ReleaseQueue{}
	}
	return list
}

// listQueues is GET /api/queue: per identity, how much waits and when it
// drains. The messages themselves are in GET /api/held (with "queue").
func (s *Server) listQueues(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.queues())
}

// queueRow is a release queue with what its row on the page needs.
type queueRow struct {
	queue.ReleaseQueue
	Next   string // "now", "in 8s"
	Drains string // "in about 2m"
}

// countRow is one counter of the page's smoothing and refusals table.
type countRow struct {
	What  string
	Count uint64
}

// inFuture writes how long after now t is ("now", "in 8s", "in 2h10m").
func inFuture(now, t time.Time) string {
	d := t.Sub(now)
	if d < time.Second {
		return "now"
	}
	return "in " + policy.FormatRetry(d)
}

// queueSection fills the page's release queue part: the queues, the
// oldest queued messages, and the counters of queued, paced and refused
// mail and connections since start.
func (s *Server) queueSection(p *pageData, held []HeldSummary) {
	for _, q := range s.queues() {
		p.Queues = append(p.Queues, queueRow{ReleaseQueue: q, Next: inFuture(p.Now, q.NextTry), Drains: inFuture(p.Now, q.DrainsBy)})
		p.QueuedTotal += q.Messages
	}
	var queued []heldRow
	for _, h := range held {
		if h.Queue != "" {
			queued = append(queued, heldRow{HeldSummary: h, CSRF: p.CSRF, Back: "/"})
		}
	}
	slices.SortStableFunc(queued, func(a, b heldRow) int { return a.Time.Compare(b.Time) })
	p.Queued = queued[:min(len(queued), dashboardQueued)]
	p.Counts = s.counts()
}

// counted are the series the page shows, with their words.
var counted = []struct{ name, label, value, what string }{
	{"relay_queued_total", "reason", "over_limit", "queued over a cap"},
	{"relay_queued_total", "reason", "pace", "queued over a pace"},
	{"relay_queued_total", "reason", "behind", "queued behind mail waiting"},
	{"relay_queue_released_total", "", "", "released from the queues"},
	{"relay_queue_release_failures_total", "", "", "failed releases (tried again)"},
	{"relay_connections_refused_total", "reason", "conn_rate", "connections refused: conn_rate_per_ip"},
	{"relay_connections_refused_total", "reason", "max_connections", "connections refused: max_connections"},
	{"relay_connections_refused_total", "reason", "tcprules", "connections refused: tcprules deny"},
	{"relay_auth_refused_total", "reason", "fail_limit_address", "AUTH refused: fail_limit of the address"},
	{"relay_auth_refused_total", "reason", "fail_limit_login", "AUTH refused: fail_limit of the login"},
}

// counts reads the counters the page shows from the metrics registry;
// none when there is no registry or it cannot be read.
func (s *Server) counts() []countRow {
	if s.opts.Gatherer == nil {
		return nil
	}
	families, err := s.opts.Gatherer.Gather()
	if err != nil && len(families) == 0 {
		return nil
	}
	byName := map[string]*dto.MetricFamily{}
	for _, f := range families {
		byName[f.GetName()] = f
	}
	var out []countRow
	for _, c := range counted {
		f := byName[c.name]
		if f == nil {
			continue
		}
		for _, m := range f.GetMetric() {
			if c.label != "" && !hasLabel(m, c.label, c.value) {
				continue
			}
			if ctr := m.GetCounter(); ctr != nil {
				out = append(out, countRow{What: c.what, Count: uint64(ctr.GetValue())})
			}
		}
	}
	return out
}

func hasLabel(m *dto.Metric, name, value string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue() == value
		}
	}
	return false
}
