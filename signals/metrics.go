package signals

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the follower's Prometheus series (relay_signals_*). Labels
// never carry an identity, an address or a file name.
type metrics struct {
	lines            prometheus.Counter // lines read (the long ones skipped too)
	malformed        prometheus.Counter // lines that begin as one the join reads but do not parse
	long             prometheus.Counter // lines over maxLine, skipped whole
	handoffs         prometheus.Counter // hand-offs recorded
	joined           prometheus.Counter // info lines joined to a hand-off
	unjoined         prometheus.Counter // info lines no hand-off of relay's claimed
	handoffsUnjoined prometheus.Counter // hand-offs whose info line never came
	deliveries       [3]prometheus.Counter
	errors           *prometheus.CounterVec
	position         prometheus.Gauge
	behind           prometheus.Gauge
	lastStamp        prometheus.Gauge
	missing          prometheus.Gauge
	pending          *prometheus.GaugeVec
}

// Error kinds of relay_signals_errors_total{op}.
const (
	errOpen    = "open"    // the log exists but cannot be opened
	errRead    = "read"    // reading the log failed
	errJournal = "journal" // writing the hand-off journal failed
	errLoad    = "load"    // a stored record or journal entry could not be read
)

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	skipped := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_signals_lines_skipped_total",
		Help: "Lines of qmail_send_log skipped as garbage: malformed (they begin as a line relay reads but do not parse) or long (over 16 KiB).",
	}, []string{"reason"})
	deliveries := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_signals_deliveries_total",
		Help: "Delivery outcomes of relay's own hand-offs counted for their identities, by result (success, failure, deferral); once per delivery, not per identity.",
	}, []string{"result"})
	m := &metrics{
		lines: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_signals_lines_total",
			Help: "Lines of qmail_send_log read (those skipped as garbage too).",
		}),
		malformed: skipped.WithLabelValues("malformed"),
		long:      skipped.WithLabelValues("long"),
		handoffs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_signals_handoffs_total",
			Help: "Hand-offs recorded for the join (qp and identities of a message relay handed to qmail).",
		}),
		joined: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_signals_messages_joined_total",
			Help: "qmail-send info lines joined to one of relay's hand-offs by their qp.",
		}),
		unjoined: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_signals_messages_unjoined_total",
			Help: "qmail-send info lines no hand-off of relay's claimed (other programs' mail, bounces), counted when given up: 2 minutes after the line, or when the message number comes back.",
		}),
		handoffsUnjoined: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_signals_handoffs_unjoined_total",
			Help: "Hand-offs whose info line never came within 24 hours (or that the bound pushed out): a log that is not this qmail-send's shows here.",
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_signals_errors_total",
			Help: "Log follower errors by op: open, read (qmail_send_log), journal (writing the hand-off journal), load (a stored record that could not be read).",
		}, []string{"op"}),
		position: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_signals_position_bytes",
			Help: "Offset in the log file being read of the first line not yet handled.",
		}),
		behind: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_signals_behind_bytes",
			Help: "Bytes of the log file being read that are not yet handled (0 when caught up).",
		}),
		lastStamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_signals_last_line_timestamp_seconds",
			Help: "Time stamp (unix seconds) of the last stamped line read; 0 before one.",
		}),
		missing: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_signals_log_missing",
			Help: "1 while qmail_send_log cannot be opened (missing, unreadable), else 0.",
		}),
		pending: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "relay_signals_pending",
			Help: "What the join holds: handoffs waiting for their info line, messages followed, tentative info lines waiting for their hand-off.",
		}, []string{"what"}),
	}
	for i, r := range []string{outcomeSuccess, outcomeFailure, outcomeDeferral} {
		m.deliveries[i] = deliveries.WithLabelValues(r)
	}
	for _, op := range []string{errOpen, errRead, errJournal, errLoad} {
		m.errors.WithLabelValues(op)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.lines, skipped, deliveries, m.handoffs, m.joined, m.unjoined, m.handoffsUnjoined,
			m.errors, m.position, m.behind, m.lastStamp, m.missing, m.pending} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// delivery counts one outcome handed to the sink.
func (m *metrics) delivery(outcome string) {
	switch outcome {
	case outcomeSuccess:
		m.deliveries[0].Inc()
	case outcomeFailure:
		m.deliveries[1].Inc()
	case outcomeDeferral:
		m.deliveries[2].Inc()
	}
}

func (m *metrics) error(op string) { m.errors.WithLabelValues(op).Inc() }

// joinSizes sets the pending gauges from j.
func (m *metrics) joinSizes(j *joinState) {
	m.pending.WithLabelValues("handoffs").Set(float64(j.nHandoffs))
	m.pending.WithLabelValues("messages").Set(float64(len(j.msgs) - len(j.tentative)))
	m.pending.WithLabelValues("tentative").Set(float64(len(j.tentative)))
}
