package policy

import (
	"github.com/prometheus/client_golang/prometheus"

	"relay/config"
)

// numActions is the number of Action values.
const numActions = int(Queue) + 1

// metrics are the engine's Prometheus series. Labels never carry an
// identity or address.
type metrics struct {
	decisions   *prometheus.CounterVec
	suspended   prometheus.Gauge
	storeErrors *prometheus.CounterVec // failed reads and writes of relay.db
	// Resolved once so the mail path does no label hashing: [observed][action][kind rank, numKinds = "none"].
	byLabel [2][numActions][numKinds + 1]prometheus.Counter
	// newRcpts counts first-time recipients by the kind of the identity
	// that counted them (recipients.go), by kind rank.
	newRcptsVec *prometheus.CounterVec
	newRcpts    [numKinds + 1]prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_policy_decisions_total",
			Help: "Policy decisions by action (observe_<action> in observe mode) and the kind of identity that decided (none for accept).",
		}, []string{"action", "kind"}),
		suspended: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_suspended_identities",
			Help: "Identities currently suspended.",
		}),
		storeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_store_errors_total",
			Help: "Failed transactions on relay.db by op (read, write): a full disk, a damaged file. /healthz says what fails now.",
		}, []string{"op"}),
		newRcptsVec: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_signals_new_recipients_total",
			Help: "First-time recipients (new_rcpts) counted, by the kind of the identity that had not sent to them; one per identity and recipient.",
		}, []string{"kind"}),
	}
	for _, op := range []string{"read", "write"} {
		m.storeErrors.WithLabelValues(op)
	}
	kindNames := config.IdentityKinds()
	for obs := range 2 {
		for a := range numActions {
			action := Action(a).String()
			if obs == 1 {
				action = "observe_" + action
			}
			for k := range numKinds + 1 {
				kind := "none"
				if k < numKinds {
					kind = kindNames[k]
				}
				m.byLabel[obs][a][k] = m.decisions.WithLabelValues(action, kind)
			}
		}
	}
	for k := range numKinds {
		m.newRcpts[k] = m.newRcptsVec.WithLabelValues(kindNames[k])
	}
	m.newRcpts[numKinds] = m.newRcptsVec.WithLabelValues("none")
	if reg != nil {
		for _, c := range []prometheus.Collector{m.decisions, m.suspended, m.storeErrors, m.newRcptsVec} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// decision counts one decision; kind is the deciding identity's kind.
func (m *metrics) decision(d Decision, kind string) {
	obs, a := 0, d.Action
	if d.Observed {
		obs, a = 1, d.WouldBe
	}
	if a < 0 || int(a) >= numActions {
		return
	}
	k := kindRank(kind)
	if d.Identity == "" || k > numKinds {
		k = numKinds
	}
	m.byLabel[obs][a][k].Inc()
}
