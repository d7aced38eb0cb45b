package relay

import "github.com/prometheus/client_golang/prometheus"

// metrics are the SMTP front end's Prometheus series. Labels carry results
// only, never an address or identity.
type metrics struct {
	connectionsOpen prometheus.Gauge
	transactions    *prometheus.CounterVec // result: accepted|held|deferred|rejected|failed
	recipients      *prometheus.CounterVec // result: accepted|rejected|deferred|relay_denied
}

// Transaction results.
const (
	txAccepted = "accepted"
	txHeld     = "held"
	txDeferred = "deferred"
	txRejected = "rejected"
	txFailed   = "failed"
)

// Recipient results.
const (
	rcptAccepted    = "accepted"
	rcptRejected    = "rejected"
	rcptDeferred    = "deferred"
	rcptRelayDenied = "relay_denied"
)

// newMetrics creates the series and registers them with reg when it is not
// nil.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		connectionsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_connections_open",
			Help: "SMTP connections open now, local socket included.",
		}),
		transactions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_transactions_total",
			Help: "Mail transactions by how they ended.",
		}, []string{"result"}),
		recipients: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_recipients_total",
			Help: "RCPT commands by outcome.",
		}, []string{"result"}),
	}
	for _, r := range []string{txAccepted, txHeld, txDeferred, txRejected, txFailed} {
		m.transactions.WithLabelValues(r)
	}
	for _, r := range []string{rcptAccepted, rcptRejected, rcptDeferred, rcptRelayDenied} {
		m.recipients.WithLabelValues(r)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.connectionsOpen, m.transactions, m.recipients} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}
