// Package exactlyprom exports the counters of the parts that run in your
// own processes (the inbox, above all) as Prometheus metrics, the way
// `exactly relay` exports the relay's. Register the collectors with your
// registry and serve it as you already do:
//
//	in, _ := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Consumer: "promotions"})
//	prometheus.MustRegister(exactlyprom.Inbox("promotions", in.Stats))
//
// Metrics (counters, label consumer):
//
//	exactly_inbox_processed_total       effects applied and recorded as done
//	exactly_inbox_duplicates_total      deliveries suppressed as duplicates
//	exactly_inbox_failed_total          deliveries not processed (handler or store failure; retried)
//	exactly_inbox_in_progress_total     Redis: deliveries refused while another runner held the lease
//	exactly_inbox_lease_expired_total   Redis: handlers that outlived their lease
//	exactly_inbox_overlapped_total      Redis: of those, messages another runner claimed meanwhile (a possible double effect)
//	exactly_inbox_mark_failed_total     Redis: done markers that could not be written
//
// The values are read from the store's Stats when Prometheus scrapes, so
// the collector costs nothing between scrapes.
package exactlyprom

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/exactlyonce/exactly/inbox"
)

type inboxMetric struct {
	desc *prometheus.Desc
	get  func(inbox.Stats) int64
}

// Inbox returns a collector of an inbox store's counters (inbox.SQL.Stats or
// inbox.Redis.Stats), labelled with consumer. Register one per store; two
// stores with the same consumer name in one registry are refused by
// Prometheus as duplicates.
func Inbox(consumer string, stats func() inbox.Stats) prometheus.Collector {
	label := prometheus.Labels{"consumer": consumer}
	m := func(name, help string, get func(inbox.Stats) int64) inboxMetric {
		return inboxMetric{prometheus.NewDesc("exactly_inbox_"+name+"_total", help, nil, label), get}
	}
	return &inboxCollector{stats: stats, metrics: []inboxMetric{
		m("processed", "Effects applied and recorded as done.", func(s inbox.Stats) int64 { return s.Processed }),
		m("duplicates", "Deliveries suppressed as duplicates.", func(s inbox.Stats) int64 { return s.Duplicates }),
		m("failed", "Deliveries not processed (handler or store failure); they are retried.", func(s inbox.Stats) int64 { return s.Failed }),
		m("in_progress", "Redis: deliveries refused while another runner held the lease.", func(s inbox.Stats) int64 { return s.InProgress }),
		m("lease_expired", "Redis: handlers that outlived their lease.", func(s inbox.Stats) int64 { return s.LeaseExpired }),
		m("overlapped", "Redis: messages another runner claimed while a handler outlived its lease (a possible double effect).", func(s inbox.Stats) int64 { return s.Overlapped }),
		m("mark_failed", "Redis: done markers that could not be written.", func(s inbox.Stats) int64 { return s.MarkFailed }),
	}}
}

type inboxCollector struct {
	stats   func() inbox.Stats
	metrics []inboxMetric
}

func (c *inboxCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics {
		ch <- m.desc
	}
}

func (c *inboxCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	for _, m := range c.metrics {
		ch <- prometheus.MustNewConstMetric(m.desc, prometheus.CounterValue, float64(m.get(s)))
	}
}
