package exactlyprom

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/exactlyonce/exactly"
)

// Consumer returns a collector of a consumer's counters, the ones every
// consumer of this module keeps (exactly.ConsumerStats), labelled with
// consumer. stats is usually the consumer's Stats, reduced to the shared
// part:
//
//	exactlyprom.Consumer("billing", func() exactly.ConsumerStats { return c.Stats().ConsumerStats })
//
// Register one per consumer; two with the same name in one registry are
// refused by Prometheus as duplicates.
func Consumer(consumer string, stats func() exactly.ConsumerStats) prometheus.Collector {
	m := newMetrics[exactly.ConsumerStats]("exactly_consumer_", consumer)
	m.counter("received", "Messages taken from the broker, redeliveries included.", func(s exactly.ConsumerStats) int64 { return s.Received })
	m.counter("handled", "Handler runs that returned nil.", func(s exactly.ConsumerStats) int64 { return s.Handled })
	m.counter("failed", "Failed handler runs (every attempt counts), and messages without an id.", func(s exactly.ConsumerStats) int64 { return s.Failed })
	m.counter("dead_lettered", "Messages the dead-letter destination confirmed.", func(s exactly.ConsumerStats) int64 { return s.DeadLettered })
	m.counter("ack_failures", "Acknowledgements that failed or whose outcome is not known; each such message is delivered again.", func(s exactly.ConsumerStats) int64 { return s.AckFailures })
	m.counter("redeliveries", "Deliveries the broker marked as delivered before (0 on brokers that do not say).", func(s exactly.ConsumerStats) int64 { return s.Redeliveries })
	return m.collector(stats)
}

// Group is the state of one member of a consumer group, for ConsumerGroup.
type Group struct {
	// Partitions the group coordinator assigns the member.
	Partitions int64
	// Stalled is 1 while the member has held no partition, or its group has
	// not been Stable, for longer than its rebalance timeout; 0 otherwise.
	Stalled int64
}

// ConsumerGroup returns a collector of a consumer-group member's gauges,
// labelled with consumer: a Kafka consumer or processor, whose Stats carry
// Partitions and Stalled.
//
//	exactlyprom.ConsumerGroup("billing", func() exactlyprom.Group {
//		s := c.Stats()
//		return exactlyprom.Group{Partitions: s.Partitions, Stalled: s.Stalled}
//	})
//
// An alert on exactly_consumer_stalled == 1 catches a member that is up but
// consumes nothing (a group stuck rebalancing, a crash loop).
func ConsumerGroup(consumer string, group func() Group) prometheus.Collector {
	m := newMetrics[Group]("exactly_consumer_", consumer)
	m.gauge("partitions", "Partitions the group coordinator assigns this member.", func(g Group) int64 { return g.Partitions })
	m.gauge("stalled", "1 while this member has held no partition, or its group has not been Stable, for longer than its rebalance timeout; 0 otherwise.", func(g Group) int64 { return g.Stalled })
	return m.collector(group)
}
