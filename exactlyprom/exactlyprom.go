// Package exactlyprom exports the counters of exactly's parts as Prometheus
// metrics: the inbox, the consumers, and the relays (Relay, which `exactly
// relay` serves on /metrics, for a relay you run in your own process).
// Register the collectors with your registry and serve it as you already
// do:
//
//	in, _ := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Consumer: "promotions"})
//	prometheus.MustRegister(exactlyprom.Inbox("promotions", in.Stats))
//
//	c, _ := nats.NewConsumer(js, cfg)
//	prometheus.MustRegister(exactlyprom.Consumer("promotions", func() exactly.ConsumerStats { return c.Stats().ConsumerStats }))
//
// Inbox metrics (counters, label consumer):
//
//	exactly_inbox_processed_total       effects applied and recorded as done
//	exactly_inbox_duplicates_total      deliveries suppressed as duplicates
//	exactly_inbox_failed_total          deliveries not processed (handler or store failure; retried)
//	exactly_inbox_in_progress_total     Redis: deliveries refused while another runner held the lease
//	exactly_inbox_lease_expired_total   Redis: handlers that outlived their lease
//	exactly_inbox_overlapped_total      Redis: of those, messages another runner claimed meanwhile (a possible double effect)
//	exactly_inbox_mark_failed_total     Redis: done markers that could not be written
//
// Consumer metrics (counters, label consumer), the same for every broker:
//
//	exactly_consumer_received_total       messages taken from the broker, redeliveries included
//	exactly_consumer_handled_total        handler runs that returned nil
//	exactly_consumer_failed_total         failed handler runs (every attempt), and messages without an id
//	exactly_consumer_dead_lettered_total  messages the dead-letter destination confirmed
//	exactly_consumer_ack_failures_total   acknowledgements that failed or whose outcome is unknown (redelivered)
//	exactly_consumer_redeliveries_total   deliveries the broker marked as redelivered (0 where it does not say)
//
// Consumer-group gauges (label consumer), for Kafka consumers and
// processors (see ConsumerGroup):
//
//	exactly_consumer_partitions   partitions the group coordinator assigns this member
//	exactly_consumer_stalled      1 while the member has held no partition, or its group was not Stable, for longer than its rebalance timeout
//
// The values are read from the Stats functions when Prometheus scrapes, so
// the collectors cost nothing between scrapes.
package exactlyprom

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/exactlyonce/exactly/inbox"
)

// Inbox returns a collector of an inbox store's counters (inbox.SQL.Stats or
// inbox.Redis.Stats), labelled with consumer. Register one per store; two
// stores with the same consumer name in one registry are refused by
// Prometheus as duplicates.
func Inbox(consumer string, stats func() inbox.Stats) prometheus.Collector {
	m := newMetrics[inbox.Stats]("exactly_inbox_", consumer)
	m.counter("processed", "Effects applied and recorded as done.", func(s inbox.Stats) int64 { return s.Processed })
	m.counter("duplicates", "Deliveries suppressed as duplicates.", func(s inbox.Stats) int64 { return s.Duplicates })
	m.counter("failed", "Deliveries not processed (handler or store failure); they are retried.", func(s inbox.Stats) int64 { return s.Failed })
	m.counter("in_progress", "Redis: deliveries refused while another runner held the lease.", func(s inbox.Stats) int64 { return s.InProgress })
	m.counter("lease_expired", "Redis: handlers that outlived their lease.", func(s inbox.Stats) int64 { return s.LeaseExpired })
	m.counter("overlapped", "Redis: messages another runner claimed while a handler outlived its lease (a possible double effect).", func(s inbox.Stats) int64 { return s.Overlapped })
	m.counter("mark_failed", "Redis: done markers that could not be written.", func(s inbox.Stats) int64 { return s.MarkFailed })
	return m.collector(stats)
}

// metrics are the metrics of one collector, read from a stats value of type
// S at each scrape.
type metrics[S any] struct {
	prefix string
	label  prometheus.Labels
	list   []metric[S]
}

type metric[S any] struct {
	desc *prometheus.Desc
	kind prometheus.ValueType
	get  func(S) int64
}

func newMetrics[S any](prefix, consumer string) *metrics[S] {
	return &metrics[S]{prefix: prefix, label: prometheus.Labels{"consumer": consumer}}
}

func (m *metrics[S]) counter(name, help string, get func(S) int64) {
	m.list = append(m.list, metric[S]{prometheus.NewDesc(m.prefix+name+"_total", help, nil, m.label), prometheus.CounterValue, get})
}

func (m *metrics[S]) gauge(name, help string, get func(S) int64) {
	m.list = append(m.list, metric[S]{prometheus.NewDesc(m.prefix+name, help, nil, m.label), prometheus.GaugeValue, get})
}

func (m *metrics[S]) collector(stats func() S) prometheus.Collector {
	return &collector[S]{stats: stats, metrics: m.list}
}

type collector[S any] struct {
	stats   func() S
	metrics []metric[S]
}

func (c *collector[S]) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics {
		ch <- m.desc
	}
}

func (c *collector[S]) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	for _, m := range c.metrics {
		ch <- prometheus.MustNewConstMetric(m.desc, m.kind, float64(m.get(s)))
	}
}
