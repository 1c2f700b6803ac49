package pubsub_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/effecttest"
	"github.com/exactlyonce/exactly/pubsub"
)

// policyTopic creates a topic with an ordered subscription whose
// dead-letter policy moves a message to the topic's ".dlq" topic after
// maxDeliveries deliveries, with a subscription of its own on that topic,
// and returns the topic's ID. The ack deadline is 10s, pstest's and the
// client library's shortest. ordered sets the subscription's message
// ordering.
func (f *fake) policyTopic(t *testing.T, maxDeliveries int32, ordered bool) string {
	t.Helper()
	id := f.topic(t)
	ctx := context.Background()
	dlq := id + ".dlq"
	if _, err := f.client.TopicAdminClient.CreateTopic(ctx, &pb.Topic{Name: f.name(dlq)}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.SubscriptionAdminClient.CreateSubscription(ctx, &pb.Subscription{
		Name: "projects/" + project + "/subscriptions/" + dlq, Topic: f.name(dlq),
	}); err != nil {
		t.Fatal(err)
	}
	sub := "projects/" + project + "/subscriptions/" + id
	if err := f.client.SubscriptionAdminClient.DeleteSubscription(ctx, &pb.DeleteSubscriptionRequest{Subscription: sub}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.SubscriptionAdminClient.CreateSubscription(ctx, &pb.Subscription{
		Name: sub, Topic: f.name(id), EnableMessageOrdering: ordered, AckDeadlineSeconds: 10,
		DeadLetterPolicy: &pb.DeadLetterPolicy{DeadLetterTopic: f.name(dlq), MaxDeliveryAttempts: maxDeliveries},
	}); err != nil {
		t.Fatal(err)
	}
	return id
}

// crashingRun runs consumers of sub one after another, as an orchestrator
// restarts a process that died: a handler calls the crash function it is
// given to kill its own consumer (its client closed, then its context
// ended, so nothing it holds is acknowledged or nacked); the next consumer
// starts once the dead one's Run returned. It returns once done closes,
// with the number of consumers it ran.
func (f *fake) crashingRun(t *testing.T, sub string, cfg func(crash func()) exactly.ConsumerConfig, done <-chan struct{}) int {
	t.Helper()
	n := 0
	for {
		n++
		var (
			tc     exactlytest.TestConsumer
			ctx    context.Context
			cancel context.CancelFunc
			dead   = make(chan struct{})
			once   sync.Once
		)
		ctx, cancel = context.WithCancel(context.Background())
		crash := func() {
			once.Do(func() {
				tc.Crash()
				cancel()
				close(dead)
			})
		}
		tc = f.consumer(t, sub, cfg(crash))
		ran := make(chan error, 1)
		go func() { ran <- tc.Run(ctx) }()
		select {
		case <-dead:
			if err := waitRun(ran); err != nil {
				t.Fatalf("consumer %d's Run after its crash: %v", n, err)
			}
		case <-done:
			cancel()
			if err := waitRun(ran); err != nil {
				t.Fatalf("consumer %d's Run: %v", n, err)
			}
			return n
		case <-time.After(3 * time.Minute):
			cancel()
			t.Fatalf("consumer %d: nothing happened in 3 minutes", n)
		}
	}
}

// watch returns a channel closed once cond holds, polled until the test
// ends.
func watch(t *testing.T, cond func() bool) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		for t.Context().Err() == nil {
			if cond() {
				close(done)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	return done
}

func waitRun(ran <-chan error) error {
	select {
	case err := <-ran:
		return err
	case <-time.After(time.Minute):
		return errors.New("Run did not return within a minute of its context ending")
	}
}

// On a subscription with a dead-letter policy Pub/Sub counts deliveries,
// and the Consumer carries the count over: a message whose first two
// deliveries end in a crash of their consumer (nothing acknowledged, no
// nack) starts its third delivery at attempt 3, so with Retry.MaxAttempts 3
// its first failure there dead-letters it: 3 handler runs in all, not the 5
// of a consumer that starts over on each delivery. The other messages are
// applied once each through the SQL inbox, in their keys' order; the
// dead letter says 3 attempts; the policy's own dead-letter topic (after 10
// deliveries) gets nothing.
func TestDeliveryAttemptCarriesOverCrashes(t *testing.T) {
	t.Parallel()
	ef := effecttest.New(t, "exactly_ps_", "pubsub-faults")
	f := newFake(t)
	topic := f.policyTopic(t, 10, true)
	msgs := messages(topic, []string{"a", "b"}, 4)
	poison := msgs[2] // a:1
	if err := f.publisher(t, pubsub.PublisherConfig{}).Publish(t.Context(), msgs); err != nil {
		t.Fatal(err)
	}
	others := slices.DeleteFunc(slices.Clone(msgs), func(m *exactly.Message) bool { return m == poison })
	dlq := &exactlytest.Recorder{}
	var runs atomic.Int32
	done := watch(t, func() bool { return len(dlq.Delivered()) > 0 && ef.Missing(others) == 0 })
	consumers := f.crashingRun(t, topic, func(crash func()) exactly.ConsumerConfig {
		return exactly.ConsumerConfig{
			Handler: ef.Handler(func(ctx context.Context, m *exactly.Message) error {
				if m.ID != poison.ID {
					return nil
				}
				if runs.Add(1) <= 2 {
					crash()
					<-ctx.Done()
					return ctx.Err()
				}
				return errors.New("cannot apply")
			}, nil),
			Retry:      exactly.RetryPolicy{MaxAttempts: 3, InitialBackoff: 10 * time.Millisecond},
			DeadLetter: dlq,
			Workers:    2,
		}
	}, done)
	ef.CheckOnce(others)
	ef.CheckKeyOrder(others)
	if n := runs.Load(); n != 3 {
		t.Fatalf("the poison message ran %d times over %d consumers, want 3: attempts 1 and 2 crashed, attempt 3 failed and was the last", n, consumers)
	}
	d := dlq.Delivered()
	if len(d) != 1 || d[0].ID != poison.ID || d[0].Headers[exactly.HeaderDeadAttempts] != "3" {
		t.Fatalf("dead letters %+v, want the poison message once with %s 3", d, exactly.HeaderDeadAttempts)
	}
	if got := f.pull(t, topic+".dlq", 2*time.Second); len(got) != 0 {
		t.Fatalf("the policy's dead-letter topic got %d messages, want none: the consumer dead-lettered first", len(got))
	}
	if consumers != 3 {
		t.Fatalf("%d consumers ran, want 3 (two crashed)", consumers)
	}
}

// A message that kills its consumer on every delivery (a poison pill the
// Consumer never gets to dead-letter itself) is moved by the
// subscription's dead-letter policy after MaxDeliveryAttempts 5, Pub/Sub's
// minimum, counted by the server: it has run at most 5 times, it is never
// handed to a consumer again, and the policy's dead-letter topic holds it
// with its exactly-id; every other message is applied once through the SQL
// inbox, nothing dead-lettered by the Consumer.
//
// The subscription is unordered: on an ordered one, pstest (v2.9.0) keeps
// a dead-lettered message that was delivered in the subscription (it acks
// it by message ID where its ack takes an ack ID), so the message's key
// never moves again and the message is published to the dead-letter topic
// anew every 10ms. That case, and the policy's copy arriving once, are
// left to the real service (see the package documentation).
func TestSubscriptionDeadLetterPolicy(t *testing.T) {
	t.Parallel()
	ef := effecttest.New(t, "exactly_ps_", "pubsub-faults")
	f := newFake(t)
	topic := f.policyTopic(t, 5, false)
	msgs := messages(topic, []string{"a", "b"}, 4)
	poison := msgs[2] // a:1
	others := slices.DeleteFunc(slices.Clone(msgs), func(m *exactly.Message) bool { return m == poison })
	// The others go first and the poison only once the server has their
	// acknowledgements: a crash kills every delivery in flight, and an
	// innocent message caught in five of them would be moved by the policy
	// too, as Pub/Sub would.
	pub := f.publisher(t, pubsub.PublisherConfig{})
	if err := pub.Publish(t.Context(), others); err != nil {
		t.Fatal(err)
	}
	go func() {
		for t.Context().Err() == nil && f.unacked(topic) > 0 {
			time.Sleep(20 * time.Millisecond)
		}
		if err := pub.Publish(t.Context(), []*exactly.Message{poison}); err != nil && t.Context().Err() == nil {
			t.Errorf("publishing the poison message: %v", err)
		}
	}()
	dlq := &exactlytest.Recorder{}
	var runs atomic.Int32
	// Done once the others are applied and the poison has stopped coming:
	// no run of it for 12s, past the 10s a crashed consumer's lease lasts.
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	done := watch(t, func() bool {
		return ef.Missing(others) == 0 && runs.Load() > 0 && time.Since(time.Unix(0, last.Load())) > 12*time.Second
	})
	consumers := f.crashingRun(t, topic, func(crash func()) exactly.ConsumerConfig {
		return exactly.ConsumerConfig{
			Handler: ef.Handler(func(ctx context.Context, m *exactly.Message) error {
				if m.ID != poison.ID {
					return nil
				}
				runs.Add(1)
				last.Store(time.Now().UnixNano())
				crash()
				<-ctx.Done()
				return ctx.Err()
			}, nil),
			Retry:      exactly.RetryPolicy{MaxAttempts: 100, InitialBackoff: 10 * time.Millisecond},
			DeadLetter: dlq,
			Workers:    2,
		}
	}, done)
	ef.CheckOnce(others)
	if n := runs.Load(); n < 2 || n > 5 {
		t.Fatalf("the poison message ran %d times, want between 2 (it was redelivered) and 5 (MaxDeliveryAttempts)", n)
	}
	got := f.pull(t, topic+".dlq", 2*time.Second)
	if len(got) == 0 {
		t.Fatal("the policy's dead-letter topic holds nothing, want the poison message")
	}
	for _, m := range got {
		if m.Attributes[exactly.HeaderID] != poison.ID || string(m.Data) != string(poison.Payload) {
			t.Fatalf("the policy's dead-letter topic holds %q (id %s), want only the poison message %s", m.Data, m.Attributes[exactly.HeaderID], poison.ID)
		}
	}
	if d := dlq.Delivered(); len(d) != 0 {
		t.Fatalf("the Consumer dead-lettered %d messages, want none", len(d))
	}
	t.Logf("the poison message ran %d times over %d consumers before the policy moved it; %d copies read from the dead-letter topic", runs.Load(), consumers, len(got))
}

// unacked counts the messages stored for topic that the server holds no
// acknowledgement of.
func (f *fake) unacked(topic string) int {
	n := 0
	for _, m := range f.srv.Messages() {
		if m.Topic == f.name(topic) && m.Acks == 0 {
			n++
		}
	}
	return n
}

// pull receives from the subscription named id for d and returns what came,
// acknowledged.
func (f *fake) pull(t *testing.T, id string, d time.Duration) []*gpubsub.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var (
		mu  sync.Mutex
		got []*gpubsub.Message
	)
	err := f.client.Subscriber(id).Receive(ctx, func(_ context.Context, m *gpubsub.Message) {
		mu.Lock()
		got = append(got, m)
		mu.Unlock()
		m.Ack()
	})
	if err != nil {
		t.Fatalf("receiving from %s: %v", id, err)
	}
	mu.Lock()
	defer mu.Unlock()
	return got
}
