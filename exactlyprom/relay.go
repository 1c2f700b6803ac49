package exactlyprom

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/relay"
)

// RelayConfig says which relay a Relay collector serves.
type RelayConfig struct {
	// CDC is true for the logical-replication relay (pgcdc.Relay): the
	// replication slot's lag is exported, and the failing gauges of the
	// polling relay, which the CDC relay cannot fill (it keeps its attempts
	// in memory), are not. Default false: the polling relay (relay.Relay).
	CDC bool
	// Partitions, when set, reports the outbox partitions the relay holds
	// (its Partitions method), as exactly_relay_partitions_held.
	Partitions func() int
}

// Relay collects a relay's metrics, the ones `exactly relay` serves on
// /metrics, from the relay's hooks: wire Hooks into relay.Config.Hooks, or
// Published, Failed, Dead and Lag into pgcdc.Config.Hooks, and register the
// Relay with a registry. With a CDC relay, which reads no backlog from the
// table, feed Backlog from outbox.Outbox.Status now and then.
//
// Metrics (no labels: one relay per registry):
//
//	exactly_relay_published_total          messages confirmed by the broker
//	exactly_relay_failed_total             failed publish attempts that will be retried
//	exactly_relay_dead_total               messages parked as dead
//	exactly_relay_publish_seconds          time a batch took to be confirmed (histogram)
//	exactly_relay_partitions_held          partitions of the outbox the relay holds (with RelayConfig.Partitions)
//	exactly_outbox_pending                 pending rows in the outbox table
//	exactly_outbox_oldest_pending_seconds  age of the oldest pending row, 0 when none is
//	exactly_relay_blocked_keys             polling: keys this relay holds back behind a failed head message
//	exactly_outbox_failing                 polling: pending rows whose last publish failed
//	exactly_outbox_blocked_keys            polling: keys whose head message failed, over every relay's partitions
//	exactly_outbox_oldest_failing_seconds  polling: age of the oldest failing row, 0 when none is
//	exactly_cdc_slot_lag_bytes             CDC: WAL the replication slot holds back
//	exactly_cdc_slot_lag_seconds           CDC: age of the oldest received transaction not yet confirmed
type Relay struct {
	published, failed, dead prometheus.Counter
	took                    prometheus.Histogram
	pending, oldest         prometheus.Gauge
	blockedKeys             prometheus.Gauge
	outboxFailing           prometheus.Gauge
	outboxBlocked           prometheus.Gauge
	outboxOldestFail        prometheus.Gauge
	cdcSlotLag              prometheus.Gauge
	cdcLagSeconds           prometheus.Gauge

	collectors []prometheus.Collector
}

// NewRelay returns the metrics of the relay cfg describes, all zero.
func NewRelay(cfg RelayConfig) *Relay {
	m := &Relay{
		published: prometheus.NewCounter(prometheus.CounterOpts{Name: "exactly_relay_published_total",
			Help: "Messages confirmed by the broker."}),
		failed: prometheus.NewCounter(prometheus.CounterOpts{Name: "exactly_relay_failed_total",
			Help: "Failed publish attempts that will be retried."}),
		dead: prometheus.NewCounter(prometheus.CounterOpts{Name: "exactly_relay_dead_total",
			Help: "Messages parked as dead after too many failures or an unpublishable error."}),
		took: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "exactly_relay_publish_seconds",
			Help: "Time a batch took to be confirmed by the broker.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{Name: "exactly_outbox_pending",
			Help: "Pending rows in the outbox table."}),
		oldest: prometheus.NewGauge(prometheus.GaugeOpts{Name: "exactly_outbox_oldest_pending_seconds",
			Help: "Age of the oldest pending row, 0 when none is."}),
		blockedKeys: prometheus.NewGauge(prometheus.GaugeOpts{Name: "exactly_relay_blocked_keys",
			Help: "Keys this relay holds back because their head message failed to publish: the key's later messages wait for its retry."}),
		outboxFailing: prometheus.NewGauge(prometheus.GaugeOpts{Name: "exactly_outbox_failing",
			Help: "Pending rows in the outbox table whose last publish failed (attempts above 0)."}),
		outboxBlocked: prometheus.NewGauge(prometheus.GaugeOpts{Name: "exactly_outbox_blocked_keys",
			Help: "Keys in the outbox table whose head message failed to publish, over every relay's partitions."}),
		outboxOldestFail: prometheus.NewGauge(prometheus.GaugeOpts{Name: "exactly_outbox_oldest_failing_seconds",
			Help: "Age (since it was enqueued) of the oldest pending row whose last publish failed, 0 when none is failing."}),
		cdcSlotLag: prometheus.NewGauge(prometheus.GaugeOpts{Name: "exactly_cdc_slot_lag_bytes",
			Help: "Bytes of WAL the replication slot holds back: the current WAL position minus the slot's confirmed flush position."}),
		cdcLagSeconds: prometheus.NewGauge(prometheus.GaugeOpts{Name: "exactly_cdc_slot_lag_seconds",
			Help: "Age of the oldest committed transaction received from the slot and not yet confirmed, 0 when all are."}),
	}
	m.collectors = []prometheus.Collector{m.published, m.failed, m.dead, m.took, m.pending, m.oldest}
	if cfg.Partitions != nil {
		m.collectors = append(m.collectors, prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "exactly_relay_partitions_held",
			Help: "Partitions of the outbox this relay holds."}, func() float64 { return float64(cfg.Partitions()) }))
	}
	if cfg.CDC {
		m.collectors = append(m.collectors, m.cdcSlotLag, m.cdcLagSeconds)
	} else {
		m.collectors = append(m.collectors, m.blockedKeys, m.outboxFailing, m.outboxBlocked, m.outboxOldestFail)
	}
	return m
}

// Hooks are the hooks of a polling relay (relay.Config.Hooks) that feed
// the metrics. BacklogInterval is left to the caller.
func (m *Relay) Hooks() relay.Hooks {
	return relay.Hooks{
		Published: m.Published,
		Failed:    m.Failed,
		Dead:      m.Dead,
		Backlog:   m.Backlog,
		Failing: func(f relay.FailingReport) {
			m.blockedKeys.Set(float64(f.BlockedKeys))
			m.outboxFailing.Set(float64(f.Table.Messages))
			m.outboxBlocked.Set(float64(f.Table.BlockedKeys))
			m.outboxOldestFail.Set(f.Table.OldestAge.Seconds())
		},
	}
}

// Published counts a batch the broker confirmed, and how long it took: a
// relay.Hooks or pgcdc.Hooks Published hook.
func (m *Relay) Published(msgs []*exactly.Message, took time.Duration) {
	m.published.Add(float64(len(msgs)))
	m.took.Observe(took.Seconds())
}

// Failed counts a failed publish attempt: a Failed hook.
func (m *Relay) Failed(*exactly.Message, int, error) { m.failed.Inc() }

// Dead counts a message parked as dead: a Dead hook.
func (m *Relay) Dead(*exactly.Message, error) { m.dead.Inc() }

// Backlog sets the outbox's pending rows and the age of the oldest.
func (m *Relay) Backlog(pending int64, oldest time.Duration) {
	m.pending.Set(float64(pending))
	m.oldest.Set(oldest.Seconds())
}

// Lag sets the replication slot's lag: a pgcdc.Hooks Lag hook.
func (m *Relay) Lag(bytes int64, seconds float64) {
	m.cdcSlotLag.Set(float64(bytes))
	m.cdcLagSeconds.Set(seconds)
}

// Describe implements prometheus.Collector.
func (m *Relay) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.collectors {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (m *Relay) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.collectors {
		c.Collect(ch)
	}
}
