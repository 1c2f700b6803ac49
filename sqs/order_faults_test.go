package sqs_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/effecttest"
	"github.com/exactlyonce/exactly/internal/sqstest"
	"github.com/exactlyonce/exactly/sqs"
)

// FIFO group order through handler failures and a consumer crash: in each
// of 4 groups of 12 messages, message #2 fails three times with a backoff
// of 2s (jittered down to 1s), so it is held, with the messages of its
// group queued behind it, for longer than the queue's 2s visibility
// timeout: only the Consumer's extensions keep SQS from handing them out
// again (the first consumer must see no redelivery before the crash).
// Then the consumer dies right after the effect of message #8 of group 0
// committed, before its delete; everything it held comes back after the
// visibility timeout to a second consumer. Counted per id through the SQL
// inbox: every message applied once, each group's effects in the group's
// order, the crash's victim handled twice and absorbed.
func TestFIFOGroupOrderThroughRetriesAndCrash(t *testing.T) {
	t.Parallel()
	e := sqstest.NewSQSQueues(t)
	ef := effecttest.New(t, "exactly_sqs_", "sqs-faults")
	name := sqstest.QueueName(true)
	url := e.CreateQueue(t, name, nil)
	p, err := sqs.NewPublisher(e.Client, sqs.PublisherConfig{})
	if err != nil {
		t.Fatal(err)
	}
	const groups, perGroup = 4, 12
	msgs := batch(name, groups, perGroup) // interleaved: message i is #i/groups of group k-(i%groups)
	if err := p.Publish(t.Context(), msgs); err != nil {
		t.Fatal(err)
	}
	flaky := map[string]bool{}
	for k := range groups {
		flaky[msgs[2*groups+k].ID] = true
	}
	victim := msgs[8*groups] // #8 of group k-0
	dlq := &exactlytest.Recorder{}

	var (
		mu       sync.Mutex
		failures = map[string]int{}
		first    = map[string]time.Time{}
		held     = map[string]time.Duration{} // first run to success, for the flaky ones
	)
	before := func(_ context.Context, m *exactly.Message) error {
		if !flaky[m.ID] {
			return nil
		}
		mu.Lock()
		defer mu.Unlock()
		if _, ok := first[m.ID]; !ok {
			first[m.ID] = time.Now()
		}
		if failures[m.ID] < 3 {
			failures[m.ID]++
			return fmt.Errorf("transient failure %d of message %s", failures[m.ID], m.ID)
		}
		held[m.ID] = time.Since(first[m.ID])
		return nil
	}

	var (
		current    atomic.Pointer[faultyAPI]
		kill       atomic.Pointer[context.CancelFunc]
		crashed    = make(chan struct{})
		crashOnce  sync.Once
		statsAtCut exactly.ConsumerStats
		consumers  []*sqs.Consumer
	)
	after := func(_ context.Context, m *exactly.Message) error {
		if m.ID == victim.ID {
			crashOnce.Do(func() {
				statsAtCut = consumers[0].Stats()
				// As a killed process: the connection goes, then
				// everything else.
				current.Load().cut.Store(true)
				(*kill.Load())()
				close(crashed)
			})
		}
		return nil
	}
	start := func() (stop func() error) {
		api := &faultyAPI{Client: e.Client}
		current.Store(api)
		c, err := sqs.NewConsumer(api, sqs.ConsumerConfig{QueueURL: url, VisibilityTimeout: visibility, WaitTime: time.Second,
			ConsumerConfig: exactly.ConsumerConfig{
				Handler:    ef.Handler(before, after),
				Workers:    4,
				Retry:      exactly.RetryPolicy{MaxAttempts: 10, InitialBackoff: 2 * time.Second, MaxBackoff: 2 * time.Second},
				DeadLetter: dlq,
				Logger:     slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
			}})
		if err != nil {
			t.Fatal(err)
		}
		consumers = append(consumers, c)
		ctx, cancel := context.WithCancel(context.Background())
		kill.Store(&cancel)
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()
		return func() error {
			cancel()
			select {
			case err := <-done:
				return err
			case <-time.After(30 * time.Second):
				return errors.New("Run did not return within 30s of its context ending")
			}
		}
	}

	stop := start()
	select {
	case <-crashed:
	case <-time.After(90 * time.Second):
		t.Fatalf("the victim was never applied; %s", ef)
	}
	if err := stop(); err != nil {
		t.Fatalf("the crashed consumer's Run: %v", err)
	}
	if statsAtCut.Redeliveries != 0 {
		t.Fatalf("the first consumer got %d redeliveries before the crash: a message held through its retries was handed out again (Stats %+v)", statsAtCut.Redeliveries, statsAtCut)
	}
	stop = start()
	ef.WaitApplied(msgs, 90*time.Second)
	if err := stop(); err != nil {
		t.Fatalf("the second consumer's Run: %v", err)
	}
	ef.CheckOnce(msgs)
	ef.CheckKeyOrder(msgs)

	if n := ef.RunsOf(victim.ID); n < 2 {
		t.Fatalf("the crash's victim ran %d times: SQS never gave it back, so it was deleted before the crash or the crash did not happen", n)
	}
	if d := ef.In.Stats().Duplicates; d < 1 {
		t.Fatalf("the inbox absorbed %d duplicates after the crash, want at least the victim's", d)
	}
	if d := dlq.Delivered(); len(d) != 0 {
		t.Fatalf("%d messages dead-lettered, want none", len(d))
	}
	mu.Lock()
	defer mu.Unlock()
	for id := range flaky {
		if failures[id] != 3 {
			t.Errorf("flaky message %s failed %d times, want 3", id, failures[id])
		}
		if held[id] <= visibility {
			t.Errorf("flaky message %s succeeded %v after its first run, want past the %v visibility timeout (the fault proved nothing)", id, held[id], visibility)
		}
	}
	second := consumers[1].Stats()
	if second.Redeliveries < 1 {
		t.Errorf("the second consumer saw no redelivery (Stats %+v), want what the dead one held", second)
	}
	t.Logf("first consumer at the crash %+v; second %+v; %s", statsAtCut, second, ef)
}
