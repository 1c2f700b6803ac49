package exactlyprom_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlyprom"
	"github.com/exactlyonce/exactly/kafka"
)

// A real Kafka consumer (on kfake) handles three messages, one of them
// after a failed attempt: the collectors show what its Stats say.
func TestConsumerCollectors(t *testing.T) {
	t.Parallel()
	cluster, err := kfake.NewCluster(kfake.SeedTopics(2, "orders"))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	pub, err := kafka.NewClientPublisher(cluster.ListenAddrs())
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	msgs := []*exactly.Message{
		{ID: exactly.NewID(), Topic: "orders", Key: "a", Payload: []byte("1")},
		{ID: exactly.NewID(), Topic: "orders", Key: "b", Payload: []byte("2")},
		{ID: exactly.NewID(), Topic: "orders", Key: "c", Payload: []byte("3")},
	}
	if err := pub.Publish(t.Context(), msgs); err != nil {
		t.Fatal(err)
	}
	var handled, failedOnce atomic.Int32
	c, err := kafka.NewConsumer(cluster.ListenAddrs(), kafka.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: func(_ context.Context, m *exactly.Message) error {
				if m.ID == msgs[1].ID && failedOnce.Add(1) == 1 {
					return errors.New("not yet")
				}
				handled.Add(1)
				return nil
			},
			Retry: exactly.RetryPolicy{InitialBackoff: time.Millisecond, MaxBackoff: time.Millisecond},
		},
		Group: "billing", Topics: []string{"orders"}, RebalanceTimeout: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(
		exactlyprom.Consumer("billing", func() exactly.ConsumerStats { return c.Stats().ConsumerStats }),
		exactlyprom.ConsumerGroup("billing", func() exactlyprom.Group {
			s := c.Stats()
			return exactlyprom.Group{Partitions: s.Partitions, Stalled: s.Stalled}
		}),
	)
	deadline := time.Now().Add(30 * time.Second)
	for handled.Load() < 3 || c.Stats().Partitions != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("handled %d of 3, stats %+v", handled.Load(), c.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
	want := `
# HELP exactly_consumer_dead_lettered_total Messages the dead-letter destination confirmed.
# TYPE exactly_consumer_dead_lettered_total counter
exactly_consumer_dead_lettered_total{consumer="billing"} 0
# HELP exactly_consumer_failed_total Failed handler runs (every attempt counts), and messages without an id.
# TYPE exactly_consumer_failed_total counter
exactly_consumer_failed_total{consumer="billing"} 1
# HELP exactly_consumer_handled_total Handler runs that returned nil.
# TYPE exactly_consumer_handled_total counter
exactly_consumer_handled_total{consumer="billing"} 3
# HELP exactly_consumer_partitions Partitions the group coordinator assigns this member.
# TYPE exactly_consumer_partitions gauge
exactly_consumer_partitions{consumer="billing"} 2
# HELP exactly_consumer_received_total Messages taken from the broker, redeliveries included.
# TYPE exactly_consumer_received_total counter
exactly_consumer_received_total{consumer="billing"} 3
# HELP exactly_consumer_stalled 1 while this member has held no partition, or its group has not been Stable, for longer than its rebalance timeout; 0 otherwise.
# TYPE exactly_consumer_stalled gauge
exactly_consumer_stalled{consumer="billing"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"exactly_consumer_dead_lettered_total", "exactly_consumer_failed_total", "exactly_consumer_handled_total",
		"exactly_consumer_partitions", "exactly_consumer_received_total", "exactly_consumer_stalled"); err != nil {
		t.Fatal(err)
	}
	if n, err := testutil.GatherAndCount(reg); err != nil || n != 8 {
		t.Errorf("%d metrics (%v), want 8", n, err)
	}
}
