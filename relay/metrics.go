package relay

import "github.com/prometheus/client_golang/prometheus"

// metrics are the SMTP front end's Prometheus series. Labels carry results
// only, never an address or identity.
type metrics struct {
	connectionsOpen prometheus.Gauge
	transactions    *prometheus.CounterVec // result: accepted|held|queued|deferred|rejected|failed
	recipients      *prometheus.CounterVec // result: accepted|rejected|deferred|relay_denied
	connRefused     *prometheus.CounterVec // reason: conn_rate|max_connections|tcprules
	authRefused     *prometheus.CounterVec // reason: fail_limit_address|fail_limit_login
	queued          *prometheus.CounterVec // reason: over_limit|pace|behind
}

// Connection refusals.
const (
	refusedConnRate       = "conn_rate"       // [relay] conn_rate_per_ip: 421 4.7.0 at the greeting
	refusedMaxConnections = "max_connections" // max_connections or max_connections_per_ip: 421 4.7.0
	refusedTCPRules       = "tcprules"        // a tcprules deny: closed without a word
)

// AUTH refusals before the password is checked ([auth] fail_limit).
const (
	authRefusedAddress = "fail_limit_address"
	authRefusedLogin   = "fail_limit_login"
)

// Why a message joined a release queue.
const (
	queuedOverLimit = "over_limit"
	queuedPace      = "pace"
	queuedBehind    = "behind"
)

// Transaction results.
const (
	txAccepted = "accepted"
	txHeld     = "held"
	txQueued   = "queued" // into a release queue (releaser.go)
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
	m.connRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_connections_refused_total",
		Help: "Connections refused at the greeting by reason: conn_rate (conn_rate_per_ip), max_connections (in all or per address), tcprules (a deny rule).",
	}, []string{"reason"})
	m.authRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_auth_refused_total",
		Help: "AUTH refused with 454 4.7.0 before the password was checked, by reason: fail_limit_address, fail_limit_login.",
	}, []string{"reason"})
	m.queued = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "relay_queued_total",
		Help: "Messages accepted into a release queue, by reason: over_limit (a cap whose action is queue), pace, behind (mail of the identity waited already).",
	}, []string{"reason"})
	for _, r := range []string{refusedConnRate, refusedMaxConnections, refusedTCPRules} {
		m.connRefused.WithLabelValues(r)
	}
	for _, r := range []string{authRefusedAddress, authRefusedLogin} {
		m.authRefused.WithLabelValues(r)
	}
	for _, r := range []string{queuedOverLimit, queuedPace, queuedBehind} {
		m.queued.WithLabelValues(r)
	}
	for _, r := range []string{txAccepted, txHeld, txQueued, txDeferred, txRejected, txFailed} {
		m.transactions.WithLabelValues(r)
	}
	for _, r := range []string{rcptAccepted, rcptRejected, rcptDeferred, rcptRelayDenied} {
		m.recipients.WithLabelValues(r)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.connectionsOpen, m.transactions, m.recipients, m.connRefused, m.authRefused, m.queued} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}
