package admin

import (
	"github.com/prometheus/client_golang/prometheus"
)

// RegisterHeldGauge registers relay_held_messages, the number of messages in
// the hold spool h held for an admin (not those in a release queue, which
// relay_queued_messages counts), counted at each scrape. The other series that /metrics
// serves are registered by the packages that own them into the same
// registry (Options.Gatherer): relay_transactions_total,
// relay_recipients_total and relay_connections_open by relay;
// relay_policy_decisions_total and relay_suspended_identities by policy;
// relay_handoff_seconds by queue.
func RegisterHeldGauge(reg prometheus.Registerer, h Held) error {
	return reg.Register(&heldCollector{held: h, desc: prometheus.NewDesc(
		"relay_held_messages", "Messages in the hold spool now.", nil, nil)})
}

// heldCollector counts the hold spool at scrape time; a spool that cannot
// be listed is reported as a scrape error, not as zero.
type heldCollector struct {
	held Held
	desc *prometheus.Desc
}

func (c *heldCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *heldCollector) Collect(ch chan<- prometheus.Metric) {
	list, err := c.held.List()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	n := 0
	for _, m := range list {
		if m.Queue == "" {
			n++
		}
	}
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n))
}
