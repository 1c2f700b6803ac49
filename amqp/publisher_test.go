package amqp_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/amqp"
	"github.com/exactlyonce/exactly/exactlytest"
)

func TestPublisherSuite(t *testing.T) {
	t.Parallel()
	b := connect(t)
	for _, tt := range []struct {
		name string
		opts []amqp.PublisherOption
	}{
		{"Default", nil},
		{"OneChannel", []amqp.PublisherOption{amqp.Channels(1), amqp.MaxMessageSize(1 << 20)}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			max := amqp.DefaultMaxMessageSize
			if len(tt.opts) > 0 {
				max = 1 << 20
			}
			exactlytest.RunPublisherSuite(t, exactlytest.PublisherHarness{
				New: func(t *testing.T) (exactly.Publisher, string) {
					return b.publisher(t, tt.opts...), b.queue(t, nil)
				},
				Read:           b.read,
				MaxMessageSize: max,
				// RabbitMQ stores every copy it is given.
				NativeDedup: false,
				// Read sees the queue's message count, so a message that
				// should not exist would show at once.
				Settle: 300 * time.Millisecond,
			})
		})
	}
}

// A message no queue takes comes back (basic.return) and fails alone, as a
// retryable error; once the queue exists the same message goes through.
func TestPublishUnroutable(t *testing.T) {
	t.Parallel()
	b := connect(t)
	p := b.publisher(t)
	q := b.queue(t, nil)
	missing := "exactly-test-missing-" + exactly.NewID()
	msgs := messages(q, []string{"k"}, 4)
	msgs[2].Topic = missing

	err := p.Publish(t.Context(), msgs)
	var be *exactly.BatchError
	if !errors.As(err, &be) || len(be.Errs) != len(msgs) {
		t.Fatalf("Publish = %v, want a *exactly.BatchError with %d entries", err, len(msgs))
	}
	for i, e := range be.Errs {
		switch {
		case i == 2 && (!errors.Is(e, amqp.ErrUnroutable) || errors.Is(e, exactly.ErrUnpublishable)):
			t.Fatalf("unroutable message: error %v, want ErrUnroutable and not unpublishable", e)
		case i != 2 && e != nil:
			t.Fatalf("message %d failed beside an unroutable one: %v", i, e)
		}
	}
	if !strings.Contains(be.Errs[2].Error(), missing) {
		t.Errorf("the error %q does not name the routing key", be.Errs[2])
	}
	if got := b.read(t, q, 4, 300*time.Millisecond); len(got) != 3 {
		t.Fatalf("queue holds %d messages, want the 3 routable ones", len(got))
	}

	// The queue is declared later: the relay's retry delivers it.
	if err := b.do(t, func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclare(missing, false, true, false, false, nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = b.do(t, func(ch *amqp091.Channel) error { _, err := ch.QueueDelete(missing, false, false, false); return err })
	})
	publish(t, p, msgs[2])
	got := b.read(t, missing, 1, 5*time.Second)
	if len(got) != 1 || got[0].ID != msgs[2].ID {
		t.Fatalf("read %+v from the new queue, want message %s", got, msgs[2].ID)
	}
}

// A duplicate in a batch whose copies are both returned fails both: a
// return carries no delivery tag, so neither may be reported confirmed.
func TestPublishUnroutableDuplicates(t *testing.T) {
	t.Parallel()
	b := connect(t)
	p := b.publisher(t)
	m := &exactly.Message{ID: exactly.NewID(), Topic: "exactly-test-missing-" + exactly.NewID(), Payload: []byte("x")}
	err := p.Publish(t.Context(), []*exactly.Message{m, m})
	for i, e := range exactly.PerMessage(err, 2) {
		if !errors.Is(e, amqp.ErrUnroutable) {
			t.Fatalf("copy %d: error %v, want ErrUnroutable", i, e)
		}
	}
}

// A queue that refuses messages when full (x-overflow=reject-publish) makes
// the broker nack them: those fail, as retryable, the others are confirmed.
func TestPublishNacked(t *testing.T) {
	t.Parallel()
	b := connect(t)
	p := b.publisher(t)
	q := b.queue(t, amqp091.Table{"x-max-length": int32(2), "x-overflow": "reject-publish"})
	msgs := messages(q, []string{"k"}, 4)
	err := p.Publish(t.Context(), msgs)
	errs := exactly.PerMessage(err, len(msgs))
	for i, e := range errs {
		switch {
		case i < 2 && e != nil:
			t.Fatalf("message %d, within the queue's length, failed: %v", i, e)
		case i >= 2 && (!errors.Is(e, amqp.ErrNacked) || errors.Is(e, exactly.ErrUnpublishable)):
			t.Fatalf("message %d, beyond the queue's length: error %v, want ErrNacked and not unpublishable", i, e)
		}
	}
	got := b.read(t, q, 3, 300*time.Millisecond)
	if len(got) != 2 || got[0].ID != msgs[0].ID || got[1].ID != msgs[1].ID {
		t.Fatalf("queue holds %d messages, want the first 2", len(got))
	}
}

// Exchange and RoutingKeyFunc route through a declared exchange; a missing
// exchange fails the batch as retryable, and the publisher recovers once
// it exists.
func TestPublishToExchange(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	exchange := "exactly-test-x-" + exactly.NewID()
	p := b.publisher(t, amqp.Exchange(exchange), amqp.RoutingKeyFunc(func(m *exactly.Message) string {
		return "orders." + m.Key
	}))
	msgs := messages("orders", []string{"a"}, 3)

	err := p.Publish(t.Context(), msgs)
	for i, e := range exactly.PerMessage(err, len(msgs)) {
		if e == nil || errors.Is(e, exactly.ErrUnpublishable) {
			t.Fatalf("message %d to a missing exchange: error %v, want a retryable error", i, e)
		}
	}
	if err := b.do(t, func(ch *amqp091.Channel) error {
		if err := ch.ExchangeDeclare(exchange, "topic", false, true, false, false, nil); err != nil {
			return err
		}
		return ch.QueueBind(q, "orders.*", exchange, false, nil)
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = b.do(t, func(ch *amqp091.Channel) error { return ch.ExchangeDelete(exchange, false, false) })
	})
	publish(t, p, msgs...)
	got := b.read(t, q, len(msgs), 5*time.Second)
	if len(got) != len(msgs) {
		t.Fatalf("read %d messages, want %d", len(got), len(msgs))
	}
	for i, r := range got {
		if r.ID != msgs[i].ID || r.NativeID != msgs[i].ID {
			t.Fatalf("message %d: ids %q/%q, want %q", i, r.ID, r.NativeID, msgs[i].ID)
		}
	}
}

// The publisher survives the loss of its connection: the batch in flight
// fails as retryable (never unpublishable), and a later Publish reconnects.
func TestPublisherReconnects(t *testing.T) {
	t.Parallel()
	b := connect(t)
	var s sockets
	p := b.publisher(t, amqp.DialConfig(s.config()))
	q := b.queue(t, nil)
	first := messages(q, []string{"k"}, 5)
	publish(t, p, first...)

	s.cut()
	second := messages(q, []string{"k"}, 5)
	var err error
	for try := 0; try < 10; try++ {
		if err = p.Publish(t.Context(), second); err == nil {
			break
		}
		for i, e := range exactly.PerMessage(err, len(second)) {
			if errors.Is(e, exactly.ErrUnpublishable) {
				t.Fatalf("message %d unpublishable after a connection loss: %v", i, e)
			}
		}
		t.Logf("publish after the connection was cut: %v", err)
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("Publish after reconnecting: %v", err)
	}
	if s.dialed() < 2 {
		t.Fatalf("dialed %d connections, want a reconnect", s.dialed())
	}
	got := b.read(t, q, 10, 5*time.Second)
	counts := map[string]int{}
	for _, r := range got {
		counts[r.ID]++
	}
	for _, m := range append(first, second...) {
		if counts[m.ID] == 0 {
			t.Fatalf("message %s lost", m.ID)
		}
	}
}

// The connection dies in the middle of a batch: the messages not confirmed
// fail as retryable, the confirmed ones are stored, and publishing the
// batch again stores everything.
func TestPublisherConnectionDiesMidBatch(t *testing.T) {
	t.Parallel()
	b := connect(t)
	var s sockets
	p := b.publisher(t, amqp.DialConfig(s.config()))
	q := b.queue(t, nil)
	publish(t, p, messages(q, []string{"warm"}, 1)...)

	msgs := messages(q, []string{"a", "b", "c"}, 300)
	for _, m := range msgs {
		m.Payload = append(m.Payload, make([]byte, 1000)...)
	}
	s.cutAfter(100 << 10)
	err := p.Publish(t.Context(), msgs)
	if err == nil {
		t.Fatal("Publish over a connection cut mid-batch = nil")
	}
	per := exactly.PerMessage(err, len(msgs))
	confirmed := 0
	for i, e := range per {
		if errors.Is(e, exactly.ErrUnpublishable) {
			t.Fatalf("message %d unpublishable after a connection loss: %v", i, e)
		}
		if e == nil {
			confirmed++
		}
	}
	t.Logf("%d of %d messages confirmed before the cut; first failure: %v", confirmed, len(msgs), err)

	// The relay publishes the batch again: a new connection takes it.
	publish(t, p, msgs...)
	got := b.read(t, q, 1+2*len(msgs), 2*time.Second)
	counts := map[string]int{}
	for _, r := range got {
		counts[r.ID]++
	}
	for i, m := range msgs {
		if counts[m.ID] == 0 || (per[i] == nil && counts[m.ID] != 2) {
			t.Fatalf("message %d (confirmed first: %v) stored %d times", i, per[i] == nil, counts[m.ID])
		}
	}
}

// A broker that is not there fails the batch as retryable, within ctx.
func TestPublishBrokerDown(t *testing.T) {
	t.Parallel()
	ln, err := listenAndClose()
	if err != nil {
		t.Fatal(err)
	}
	p, err := amqp.NewPublisher("amqp://guest:guest@" + ln + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	msgs := messages("q", []string{"k"}, 2)
	err = p.Publish(ctx, msgs)
	if err == nil {
		t.Fatal("Publish to a broker that is down = nil")
	}
	for i, e := range exactly.PerMessage(err, len(msgs)) {
		if e == nil || errors.Is(e, exactly.ErrUnpublishable) {
			t.Fatalf("message %d: error %v, want a retryable error", i, e)
		}
	}
}

func TestPublisherClosed(t *testing.T) {
	t.Parallel()
	b := connect(t)
	p := b.publisher(t)
	q := b.queue(t, nil)
	publish(t, p, messages(q, []string{"k"}, 1)...)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Publish(t.Context(), messages(q, []string{"k"}, 1)); !errors.Is(err, amqp.ErrPublisherClosed) {
		t.Fatalf("Publish after Close = %v, want ErrPublisherClosed", err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
}

func TestNewPublisherRefusesBadOptions(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name string
		url  string
		opts []amqp.PublisherOption
		want string
	}{
		{"BadURL", "http://localhost", nil, "URL"},
		{"MaxMessageSize", brokerURL(), []amqp.PublisherOption{amqp.MaxMessageSize(0)}, "MaxMessageSize"},
		{"MaxMessageSizeAboveBroker", brokerURL(), []amqp.PublisherOption{amqp.MaxMessageSize(1 << 30)}, "MaxMessageSize"},
		{"Channels", brokerURL(), []amqp.PublisherOption{amqp.Channels(0)}, "Channels"},
		{"Exchange", brokerURL(), []amqp.PublisherOption{amqp.Exchange(strings.Repeat("x", 256))}, "Exchange"},
		{"Recovery", brokerURL(), []amqp.PublisherOption{amqp.DialConfig(amqp091.Config{Recovery: &amqp091.Recovery{}})}, "Recovery"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := amqp.NewPublisher(tt.url, tt.opts...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("NewPublisher = %v, want an error naming %s", err, tt.want)
			}
		})
	}
}

// What AMQP cannot carry fails alone as unpublishable, before sending.
func TestPublishRefusesWhatAMQPCannotCarry(t *testing.T) {
	t.Parallel()
	b := connect(t)
	q := b.queue(t, nil)
	p := b.publisher(t, amqp.RoutingKeyFunc(func(m *exactly.Message) string {
		if m.Key == "long" {
			return strings.Repeat("k", 256)
		}
		return m.Topic
	}))
	msgs := messages(q, []string{"k"}, 3)
	msgs[0].Key = "long"
	msgs[1].Headers = map[string]string{strings.Repeat("h", 256): "v"}
	errs := exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs))
	for i, e := range errs {
		switch {
		case i < 2 && !errors.Is(e, exactly.ErrUnpublishable):
			t.Fatalf("message %d: error %v, want unpublishable", i, e)
		case i == 2 && e != nil:
			t.Fatalf("valid message failed: %v", e)
		}
	}
}
