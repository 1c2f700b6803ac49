package kafka_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/kafka"
)

// syncBuffer is a log destination shared by goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestStalledGauge: of two members of a group on a one-partition topic,
// the one that holds nothing says so once a rebalance timeout has passed:
// Stats().Stalled is 1 and its log has a warning with the group's state;
// the holder's Stalled stays 0. When the holder stops, the other takes the
// partition and its gauge goes back to 0.
func TestStalledGauge(t *testing.T) {
	t.Parallel()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.GroupMinSessionTimeout(100*time.Millisecond), kfake.SeedTopics(1, "one"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	type member struct {
		c    *kafka.Consumer
		logs *syncBuffer
		stop context.CancelFunc
		done chan error
	}
	start := func(instance string) *member {
		logs := &syncBuffer{}
		cons, err := kafka.NewConsumer(c.ListenAddrs(), kafka.ConsumerConfig{
			ConsumerConfig: exactly.ConsumerConfig{
				Handler: func(context.Context, *exactly.Message) error { return nil },
				Logger:  slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})),
			},
			Group: "stalled", Topics: []string{"one"}, InstanceID: instance,
			SessionTimeout: time.Second, RebalanceTimeout: time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		m := &member{c: cons, logs: logs, stop: cancel, done: make(chan error, 1)}
		go func() { m.done <- cons.Run(ctx) }()
		t.Cleanup(func() { cancel(); <-m.done })
		return m
	}
	a, b := start("a"), start("b")
	var holder, idle *member
	deadline := time.Now().Add(20 * time.Second)
	for holder == nil {
		if time.Now().After(deadline) {
			t.Fatalf("no member settled as the holder with the other stalled: a %+v, b %+v", a.c.Stats(), b.c.Stats())
		}
		time.Sleep(100 * time.Millisecond)
		sa, sb := a.c.Stats(), b.c.Stats()
		switch {
		case sa.Partitions == 1 && sa.Stalled == 0 && sb.Partitions == 0 && sb.Stalled == 1:
			holder, idle = a, b
		case sb.Partitions == 1 && sb.Stalled == 0 && sa.Partitions == 0 && sa.Stalled == 1:
			holder, idle = b, a
		}
	}
	if logs := idle.logs.String(); !strings.Contains(logs, "consumer group not settled") || !strings.Contains(logs, "state=Stable") ||
		!strings.Contains(logs, "partitions=0") {
		t.Errorf("the idle member's log has no warning with the group's state:\n%s", logs)
	}
	if strings.Contains(holder.logs.String(), "consumer group not settled") {
		t.Errorf("the holder warned:\n%s", holder.logs.String())
	}

	// A static member does not leave: the idle one takes over once the
	// holder's session timed out.
	holder.stop()
	if err := <-holder.done; err != nil {
		t.Fatal(err)
	}
	holder.done <- nil
	for deadline := time.Now().Add(20 * time.Second); ; {
		if st := idle.c.Stats(); st.Partitions == 1 && st.Stalled == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the idle member did not take over: %+v", idle.c.Stats())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(idle.logs.String(), "consumer group settled again") {
		t.Errorf("no log line says the group settled again:\n%s", idle.logs.String())
	}
}

// TestProcessorStalledGauge: the same watch in the Processor: of two
// instances on a one-partition input, the one holding nothing reports
// Stalled once a rebalance timeout has passed, the holder does not.
func TestProcessorStalledGauge(t *testing.T) {
	t.Parallel()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.GroupMinSessionTimeout(100*time.Millisecond), kfake.SeedTopics(1, "in", "out"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	start := func(instance string) *kafka.Processor {
		p, err := kafka.NewProcessor(kafka.ProcessorConfig{
			Seeds: c.ListenAddrs(), Group: "stalled-p", Topics: []string{"in"}, InstanceID: instance,
			StaticMembership: true, SessionTimeout: time.Second, RebalanceTimeout: time.Second,
			Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
		}, copyTo("out"))
		if err != nil {
			t.Fatal(err)
		}
		stop := runProcessor(t, p)
		t.Cleanup(func() { stop() })
		return p
	}
	a, b := start("a"), start("b")
	for deadline := time.Now().Add(20 * time.Second); ; {
		sa, sb := a.Stats(), b.Stats()
		if sa.Partitions+sb.Partitions == 1 && sa.Stalled+sb.Stalled == 1 && (sa.Partitions == 0) == (sa.Stalled == 1) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("want one holder and one stalled instance: a %+v, b %+v", sa, sb)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
