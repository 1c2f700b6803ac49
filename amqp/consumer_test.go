package amqp_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/amqp"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// checkNoneLost fails unless every message of msgs was applied at least
// once, and logs how many were applied more than once.
func checkNoneLost(t *testing.T, eff *effects, msgs []*exactly.Message) {
	t.Helper()
	if lost := eff.lost(msgs); len(lost) > 0 {
		t.Fatalf("%d of %d messages lost, first %s", len(lost), len(msgs), lost[0])
	}
	dups := 0
	for _, m := range msgs {
		if eff.of(m.ID) > 1 {
			dups++
		}
	}
	t.Logf("%d messages: 0 lost, %d applied more than once (the inbox absorbs those)", len(msgs), dups)
}

// With nothing failing, every message is handled once, in queue order,
// decoded as it was published, and acknowledged.
func TestConsumerHandlesEachOnce(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	msgs := messages(q, []string{"a", "b", "c", "d"}, 100)
	publish(t, b.publisher(t), msgs...)

	eff := newEffects()
	c := consumer(t, q, func(ctx context.Context, m *exactly.Message) error {
		eff.apply(ctx, m)
		return nil
	})
	stop := run(t, c)
	eventually(t, 30*time.Second, "every message handled", func() bool { return eff.distinct() == len(msgs) })
	stop()

	applied := eff.applied()
	if len(applied) != len(msgs) {
		t.Fatalf("handled %d deliveries for %d messages, want each once", len(applied), len(msgs))
	}
	for i, got := range applied {
		want := msgs[i]
		switch {
		case got.ID != want.ID:
			t.Fatalf("delivery %d is message %s, want %s: queue order lost with one worker", i, got.ID, want.ID)
		case got.Topic != q || got.Key != want.Key || string(got.Payload) != string(want.Payload):
			t.Fatalf("delivery %d = topic %q key %q payload %q, want %q %q %q", i, got.Topic, got.Key, got.Payload, q, want.Key, want.Payload)
		case !got.CreatedAt.Equal(want.CreatedAt):
			t.Fatalf("delivery %d: CreatedAt %v, want %v", i, got.CreatedAt, want.CreatedAt)
		case got.Headers["x-seq"] != want.Headers["x-seq"]:
			t.Fatalf("delivery %d: headers %v, want x-seq %s", i, got.Headers, want.Headers["x-seq"])
		}
		if _, ok := got.Headers[exactly.HeaderID]; ok {
			t.Fatalf("delivery %d: Headers carries %s, which is Message.ID's", i, exactly.HeaderID)
		}
	}
	st := c.Stats()
	if st != (amqp.ConsumerStats{ConsumerStats: exactly.ConsumerStats{Received: int64(len(msgs)), Handled: int64(len(msgs))}}) {
		t.Fatalf("Stats = %+v, want %d handled and nothing else", st, len(msgs))
	}
	if n := b.ready(t, q); n != 0 {
		t.Fatalf("%d messages back in the queue after a clean run: acks missing", n)
	}
}

// The same message published five times is delivered five times with its
// ID intact: the inbox, not the consumer, makes that one effect.
func TestConsumerSameMessageFiveTimes(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	p := b.publisher(t)
	m := messages(q, []string{"order-1"}, 1)[0]
	for range 5 {
		publish(t, p, m)
	}
	eff := newEffects()
	c := consumer(t, q, func(ctx context.Context, got *exactly.Message) error {
		eff.apply(ctx, got)
		return nil
	})
	run(t, c)
	eventually(t, 30*time.Second, "five deliveries", func() bool { return eff.total() == 5 })
	if n := eff.of(m.ID); n != 5 {
		t.Fatalf("handler saw ID %s %d times, want 5 (IDs: %v)", m.ID, n, eff.applied())
	}
	for _, got := range eff.applied() {
		if got.ID != m.ID || got.Key != m.Key || string(got.Payload) != string(m.Payload) {
			t.Fatalf("a copy arrived altered: %+v", got)
		}
	}
}

// crashTest runs a consumer whose handler, right after applying the effect
// of one message, loses its connection in the way fail describes. The
// broker must redeliver that message, flagged as redelivered, with the same
// ID, and nothing may be lost.
func crashTest(t *testing.T, fail func(s *sockets)) {
	b := connect(t)
	q := b.queue(t, nil)
	msgs := messages(q, []string{"a", "b"}, 20)
	publish(t, b.publisher(t), msgs...)
	victim := msgs[5]

	var (
		s       sockets
		crashed atomic.Bool
		eff     = newEffects()
	)
	c := consumer(t, q, func(ctx context.Context, m *exactly.Message) error {
		eff.apply(ctx, m)
		if m.ID == victim.ID && crashed.CompareAndSwap(false, true) {
			fail(&s)
		}
		return nil
	}, dialVia(&s))
	stop := run(t, c)
	eventually(t, 30*time.Second, "every message handled and the victim redelivered", func() bool {
		return eff.distinct() == len(msgs) && eff.redeliveries(victim.ID) > 0
	})
	stop()
	checkNoneLost(t, eff, msgs)
	if n := eff.of(victim.ID); n < 2 {
		t.Fatalf("victim applied %d times, want a redelivery after the crash", n)
	}
	st := c.Stats()
	t.Logf("Stats = %+v", st)
	if st.Reconnects < 1 || st.Redeliveries < 1 {
		t.Fatalf("Stats = %+v, want a reconnect and a redelivery", st)
	}
	if s.dialed() < 2 {
		t.Fatalf("dialed %d connections, want a reconnect", s.dialed())
	}
	if n := b.ready(t, q); n != 0 {
		t.Fatalf("%d messages left in the queue", n)
	}
}

// The consumer dies after the effect and before its ack: its connection
// vanishes, the ack cannot be sent.
func TestConsumerCrashAfterEffectBeforeAck(t *testing.T) {
	t.Parallel()
	crashTest(t, func(s *sockets) { s.cut() })
}

// The ack is lost: the client sends it, as far as it can tell, but it never
// reaches the broker before the connection drops.
func TestConsumerAckLost(t *testing.T) {
	t.Parallel()
	crashTest(t, func(s *sockets) { s.loseWrites() })
}

// The broker closes the connection (an operator, a node shutting down)
// while a delivery is being handled.
func TestConsumerBrokerClosesConnection(t *testing.T) {
	t.Parallel()
	crashTest(t, func(s *sockets) {
		if !closeFromBroker(t, s.localPorts()) {
			t.Log("rabbitmqctl cannot close the connection here; cutting the socket instead")
			s.cut()
		}
	})
}

// The connection drops twice in the middle of a stream: the consumer
// reconnects each time and nothing is lost.
func TestConsumerSurvivesConnectionDrops(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	msgs := messages(q, []string{"a", "b", "c"}, 300)
	publish(t, b.publisher(t), msgs...)

	var s sockets
	eff := newEffects()
	c := consumer(t, q, func(ctx context.Context, m *exactly.Message) error {
		eff.apply(ctx, m)
		time.Sleep(2 * time.Millisecond)
		return nil
	}, dialVia(&s), func(c *amqp.ConsumerConfig) { c.Prefetch = 20 })
	stop := run(t, c)
	for _, at := range []int{60, 150} {
		eventually(t, 30*time.Second, fmt.Sprintf("%d messages handled", at), func() bool { return eff.distinct() >= at })
		s.cut()
	}
	eventually(t, 30*time.Second, "every message handled", func() bool { return eff.distinct() == len(msgs) })
	stop()
	checkNoneLost(t, eff, msgs)
	if st := c.Stats(); st.Reconnects < 2 {
		t.Fatalf("Stats = %+v, want at least 2 reconnects", st)
	}
	if n := b.ready(t, q); n != 0 {
		t.Fatalf("%d messages left in the queue", n)
	}
}

// A handler that fails, then panics, then succeeds is retried until it
// succeeds; nothing is dead-lettered.
func TestConsumerRetriesThenSucceeds(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	msgs := messages(q, []string{"k"}, 3)
	publish(t, b.publisher(t), msgs...)

	var (
		mu       sync.Mutex
		attempts = map[string]int{}
		eff      = newEffects()
		hooked   atomic.Int64
	)
	c := consumer(t, q, func(ctx context.Context, m *exactly.Message) error {
		mu.Lock()
		attempts[m.ID]++
		n := attempts[m.ID]
		mu.Unlock()
		switch n {
		case 1:
			return errors.New("transient failure")
		case 2:
			panic("handler bug")
		}
		eff.apply(ctx, m)
		return nil
	}, func(c *amqp.ConsumerConfig) {
		c.Retry = exactly.RetryPolicy{MaxAttempts: 5, InitialBackoff: 5 * time.Millisecond, MaxBackoff: 20 * time.Millisecond}
		c.Hooks = exactly.ConsumerHooks{
			Handled: func(*exactly.Message, time.Duration) { hooked.Add(1) },
			Failed:  func(*exactly.Message, int, error) { hooked.Add(100) },
		}
	})
	stop := run(t, c)
	eventually(t, 30*time.Second, "every message handled", func() bool { return eff.distinct() == len(msgs) })
	stop()
	for _, m := range msgs {
		if eff.of(m.ID) != 1 || attempts[m.ID] != 3 {
			t.Fatalf("message %s: applied %d times in %d attempts, want once in 3", m.ID, eff.of(m.ID), attempts[m.ID])
		}
	}
	if st := c.Stats(); st != (amqp.ConsumerStats{ConsumerStats: exactly.ConsumerStats{Received: 3, Handled: 3, Failed: 6}}) {
		t.Fatalf("Stats = %+v, want 3 handled, 6 failed attempts", st)
	}
	if n := hooked.Load(); n != 603 {
		t.Fatalf("hooks counted %d, want 3 handled + 6 failed (603)", n)
	}
	if n := b.ready(t, q+".dlq"); n != 0 {
		t.Fatalf("%d messages dead-lettered, want none", n)
	}
}

// A handler that always fails for one message: after MaxAttempts that
// message is in the dead-letter queue with the reason, and the consumer
// goes on with the next ones.
func TestConsumerDeadLettersAndMovesOn(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	msgs := messages(q, []string{"k"}, 4)
	poison := msgs[0]
	publish(t, b.publisher(t), msgs...)

	eff := newEffects()
	c := consumer(t, q, func(ctx context.Context, m *exactly.Message) error {
		if m.ID == poison.ID {
			return fmt.Errorf("order %s: %w", m.Key, errors.New("cannot apply: schema mismatch"))
		}
		eff.apply(ctx, m)
		return nil
	})
	stop := run(t, c)
	eventually(t, 30*time.Second, "the others handled", func() bool { return eff.distinct() == len(msgs)-1 })
	stop()

	d, ok := b.get(t, q+".dlq", 5*time.Second)
	if !ok {
		t.Fatal("the dead-letter queue is empty")
	}
	h := received(d)
	switch {
	case d.MessageId != poison.ID || h.ID != poison.ID:
		t.Fatalf("dead letter ids %q/%q, want %s", d.MessageId, h.ID, poison.ID)
	case !strings.Contains(h.Headers[exactly.HeaderDeadReason], "schema mismatch"):
		t.Fatalf("dead letter reason %q, want the handler's error", h.Headers[exactly.HeaderDeadReason])
	case h.Headers[exactly.HeaderDeadAttempts] != "3" || h.Headers[exactly.HeaderDeadTopic] != q:
		t.Fatalf("dead letter headers %v, want 3 attempts from %s", h.Headers, q)
	case string(d.Body) != string(poison.Payload) || h.Key != poison.Key || h.Headers["x-seq"] != poison.Headers["x-seq"]:
		t.Fatalf("dead letter altered: %+v", h)
	}
	if st := c.Stats(); st != (amqp.ConsumerStats{ConsumerStats: exactly.ConsumerStats{Received: 4, Handled: 3, Failed: 3, DeadLettered: 1}}) {
		t.Fatalf("Stats = %+v, want 3 handled, 3 failed attempts, 1 dead-lettered", st)
	}
	if n := b.ready(t, q); n != 0 {
		t.Fatalf("%d messages left in the queue: the dead-lettered one was not acknowledged", n)
	}
}

// DeadLetterPublisher sends dead letters elsewhere; the consumer then
// declares no dead-letter queue.
func TestConsumerDeadLetterPublisher(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	msgs := messages(q, []string{"k"}, 1)
	publish(t, b.publisher(t), msgs...)
	var dlq exactlytest.Recorder
	c := consumer(t, q, func(context.Context, *exactly.Message) error { return errors.New("no") },
		func(c *amqp.ConsumerConfig) {
			c.DeadLetter = &dlq
			c.DeadLetterTopic = func(*exactly.Message) string { return "parked" }
		})
	stop := run(t, c)
	eventually(t, 30*time.Second, "a dead letter", func() bool { return len(dlq.Delivered()) == 1 })
	stop()
	if d := dlq.Delivered()[0]; d.ID != msgs[0].ID || d.Topic != "parked" || d.Headers[exactly.HeaderDeadTopic] != q {
		t.Fatalf("dead letter = %+v", d)
	}
	err := b.do(t, func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclarePassive(q+".dlq", false, false, false, false, nil)
		return err
	})
	var ae *amqp091.Error
	if !errors.As(err, &ae) || ae.Code != amqp091.NotFound {
		t.Fatalf("passive declare of %s.dlq = %v, want 404: the consumer declared it", q, err)
	}
}

// A delivery with no id at all is dead-lettered with a clear reason and
// never reaches the handler; one with only the exactly-id header is handled
// under that ID.
func TestConsumerDeliveryWithoutID(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	b.publishRaw(t, q, amqp091.Publishing{Body: []byte("anonymous"), Headers: amqp091.Table{"x-from": "legacy"}})
	b.publishRaw(t, q, amqp091.Publishing{Body: []byte("header only"), Headers: amqp091.Table{exactly.HeaderID: "header-id-1", exactly.HeaderKey: "k1"}})
	good := messages(q, []string{"k"}, 1)
	publish(t, b.publisher(t), good...)

	eff := newEffects()
	c := consumer(t, q, func(ctx context.Context, m *exactly.Message) error {
		if m.ID == "" || strings.HasPrefix(m.ID, "amqp-noid-") {
			t.Errorf("the handler got a delivery without an id: %+v", m)
		}
		eff.apply(ctx, m)
		return nil
	})
	stop := run(t, c)
	eventually(t, 30*time.Second, "two handled and one dead-lettered", func() bool {
		return eff.distinct() == 2 && c.Stats().DeadLettered == 1
	})
	stop()
	if eff.of("header-id-1") != 1 || eff.of(good[0].ID) != 1 {
		t.Fatalf("handled %v, want header-id-1 and %s once each", eff.applied(), good[0].ID)
	}
	if k := eff.applied()[0].Key; k != "k1" {
		t.Fatalf("key %q from the exactly-key header, want k1", k)
	}
	d, ok := b.get(t, q+".dlq", 5*time.Second)
	if !ok {
		t.Fatal("the delivery without an id is not in the dead-letter queue")
	}
	h := received(d)
	switch {
	case string(d.Body) != "anonymous" || h.Headers["x-from"] != "legacy":
		t.Fatalf("dead letter altered: %+v", h)
	case !strings.Contains(h.Headers[exactly.HeaderDeadReason], "no message id"):
		t.Fatalf("dead letter reason %q, want one saying it has no message id", h.Headers[exactly.HeaderDeadReason])
	case !strings.HasPrefix(d.MessageId, "amqp-noid-") || h.ID != d.MessageId:
		t.Fatalf("dead letter ids %q/%q, want a synthetic amqp-noid- id", d.MessageId, h.ID)
	}
}

// When Run's context ends while a handler is at work, the handler is
// cancelled, the delivery is requeued, and Run returns; another consumer
// then gets it, flagged as redelivered.
func TestConsumerShutdownRequeuesInFlight(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	msgs := messages(q, []string{"k"}, 1)
	publish(t, b.publisher(t), msgs...)

	started := make(chan struct{})
	var once sync.Once
	first := consumer(t, q, func(ctx context.Context, m *exactly.Message) error {
		once.Do(func() { close(started) })
		<-ctx.Done()
		return ctx.Err()
	})
	stop := run(t, first)
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("the handler never ran")
	}
	stop()
	if st := first.Stats(); st != (amqp.ConsumerStats{ConsumerStats: exactly.ConsumerStats{Received: 1}}) {
		t.Fatalf("Stats = %+v after a cancelled handler, want zero: it neither failed nor succeeded", st)
	}

	eff := newEffects()
	second := consumer(t, q, func(ctx context.Context, m *exactly.Message) error {
		eff.apply(ctx, m)
		return nil
	})
	run(t, second)
	eventually(t, 30*time.Second, "the requeued message handled", func() bool { return eff.of(msgs[0].ID) == 1 })
	if eff.redeliveries(msgs[0].ID) != 1 {
		t.Fatal("the requeued delivery is not flagged as redelivered")
	}
}

// Workers > 1 handles deliveries concurrently, each key's in queue order.
func TestConsumerWorkers(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	msgs := messages(q, []string{"a", "b", "c", "d"}, 40)
	publish(t, b.publisher(t), msgs...)

	var inFlight, most atomic.Int32
	eff := newEffects()
	c := consumer(t, q, func(ctx context.Context, m *exactly.Message) error {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for cur := most.Load(); n > cur && !most.CompareAndSwap(cur, n); cur = most.Load() {
		}
		time.Sleep(10 * time.Millisecond)
		eff.apply(ctx, m)
		return nil
	}, func(c *amqp.ConsumerConfig) { c.Workers, c.Prefetch = 4, 8 })
	stop := run(t, c)
	eventually(t, 30*time.Second, "every message handled", func() bool { return eff.distinct() == len(msgs) })
	stop()
	checkNoneLost(t, eff, msgs)
	if most.Load() < 2 {
		t.Fatalf("at most %d handlers ran at once with 4 workers", most.Load())
	}
	next := map[string]int{}
	for _, m := range eff.applied() {
		if want := fmt.Sprintf("%s/%d", m.Key, next[m.Key]); string(m.Payload) != want {
			t.Fatalf("key %s: applied %s where %s was due: per-key order lost with 4 workers", m.Key, m.Payload, want)
		}
		next[m.Key]++
	}
}

// A queue that does not exist is a set-up error: Run returns it instead of
// retrying forever.
func TestConsumerMissingQueue(t *testing.T) {
	t.Parallel()
	connect(t)
	q := "exactly-test-missing-" + exactly.NewID()
	c := consumer(t, q, func(context.Context, *exactly.Message) error { return nil })
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	err := c.Run(ctx)
	var ae *amqp091.Error
	if !errors.As(err, &ae) || ae.Code != amqp091.NotFound || !strings.Contains(err.Error(), q) {
		t.Fatalf("Run on a missing queue = %v, want a 404 naming the queue", err)
	}
	// Nothing was declared for a queue that does not exist.
	err = connect(t).do(t, func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclarePassive(q+".dlq", false, false, false, false, nil)
		return err
	})
	if !errors.As(err, &ae) || ae.Code != amqp091.NotFound {
		t.Fatalf("passive declare of the dead-letter queue = %v, want 404", err)
	}
}

// Credentials the broker refuses are a set-up error too.
func TestConsumerBadCredentials(t *testing.T) {
	t.Parallel()
	connect(t)
	c, err := amqp.NewConsumer("amqp://guest:wrong@"+testenv.RabbitMQ.Addr+"/",
		consumerConfig(t, "q", func(context.Context, *exactly.Message) error { return nil }))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	err = c.Run(ctx)
	var ae *amqp091.Error
	if !errors.As(err, &ae) || ae.Code != amqp091.AccessRefused {
		t.Fatalf("Run with a wrong password = %v, want a 403", err)
	}
}

func TestConsumerRunTwice(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	publish(t, b.publisher(t), messages(q, []string{"k"}, 1)...)
	eff := newEffects()
	c := consumer(t, q, func(ctx context.Context, m *exactly.Message) error {
		eff.apply(ctx, m)
		return nil
	})
	run(t, c)
	eventually(t, 30*time.Second, "the consumer to run", func() bool { return eff.total() == 1 })
	if err := c.Run(t.Context()); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Fatalf("a second, concurrent Run = %v, want an error", err)
	}
}

func TestNewConsumerRefusesBadConfig(t *testing.T) {
	t.Parallel()
	h := func(context.Context, *exactly.Message) error { return nil }
	for _, tt := range []struct {
		name string
		edit func(c *amqp.ConsumerConfig)
		url  string
		want string
	}{
		{"NoQueue", func(c *amqp.ConsumerConfig) { c.Queue = "" }, "", "Queue"},
		{"LongQueue", func(c *amqp.ConsumerConfig) { c.Queue = strings.Repeat("q", 256) }, "", "Queue"},
		{"NoHandler", func(c *amqp.ConsumerConfig) { c.Handler = nil }, "", "Handler"},
		{"Workers", func(c *amqp.ConsumerConfig) { c.Workers = -1 }, "", "Workers"},
		{"PrefetchBelowWorkers", func(c *amqp.ConsumerConfig) { c.Workers, c.Prefetch = 8, 4 }, "", "Prefetch"},
		{"Retry", func(c *amqp.ConsumerConfig) { c.Retry = exactly.RetryPolicy{MaxAttempts: -1} }, "", "Retry"},
		{"TwoDeadLetters", func(c *amqp.ConsumerConfig) { c.DeadLetterQueue, c.DeadLetter = "d", &exactlytest.Recorder{} }, "", "DeadLetter"},
		{"DeadLetterTopicWithoutPublisher", func(c *amqp.ConsumerConfig) {
			c.DeadLetterTopic = func(*exactly.Message) string { return "d" }
		}, "", "DeadLetterTopic"},
		{"DeadLetterIsQueue", func(c *amqp.ConsumerConfig) { c.DeadLetterQueue = c.Queue }, "", "DeadLetterQueue"},
		{"Reconnect", func(c *amqp.ConsumerConfig) {
			c.ReconnectBackoff, c.ReconnectMaxBackoff = time.Second, time.Millisecond
		}, "", "ReconnectMaxBackoff"},
		{"BadURL", func(*amqp.ConsumerConfig) {}, "nats://x", "URL"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := consumerConfig(t, "q", h)
			tt.edit(&cfg)
			url := brokerURL()
			if tt.url != "" {
				url = tt.url
			}
			_, err := amqp.NewConsumer(url, cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("NewConsumer = %v, want an error naming %q", err, tt.want)
			}
			var ce *exactly.ConfigError
			if tt.name != "BadURL" && (!errors.As(err, &ce) || !strings.HasPrefix(ce.Field, tt.want)) {
				t.Fatalf("NewConsumer = %v, want an *exactly.ConfigError with Field %q", err, tt.want)
			}
		})
	}
}
