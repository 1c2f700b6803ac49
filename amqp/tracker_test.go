package amqp

import (
	"errors"
	"io"
	"log/slog"
	"testing"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/exactlyonce/exactly"
)

// These tests drive a tracker with the notifications amqp091-go would
// deliver, for the cases a test broker cannot easily produce.

func testTracker(t *testing.T, maxSize int) (*Publisher, *tracker) {
	t.Helper()
	p, err := NewPublisher("amqp://guest:guest@127.0.0.1:5672/", MaxMessageSize(maxSize),
		Logger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err != nil {
		t.Fatal(err)
	}
	return p, &tracker{p: p, pending: make(map[uint64]*entry)}
}

// A broker whose max_message_size is below MaxMessageSize closes the
// channel: the message above its limit is unpublishable, the others
// retryable, and the limit applies to later batches.
func TestTrackerLearnsTheBrokersMaxMessageSize(t *testing.T) {
	p, tr := testTracker(t, 4096)
	b := newBatch(3, 3)
	tr.register(1, &entry{b: b, i: 0, id: "small", size: 100})
	tr.register(2, &entry{b: b, i: 1, id: "big", size: 2000})
	tr.register(3, &entry{b: b, i: 2, id: "after", size: 10})
	returns := make(chan amqp091.Return)
	confirms := make(chan amqp091.Confirmation, 1)
	closes := make(chan *amqp091.Error, 1)
	confirms <- amqp091.Confirmation{DeliveryTag: 1, Ack: true}
	close(confirms)
	close(returns)
	closes <- &amqp091.Error{Code: amqp091.PreconditionFailed, Reason: "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1024"}
	tr.run(returns, confirms, closes)
	<-b.done

	if b.errs[0] != nil {
		t.Fatalf("confirmed message: %v", b.errs[0])
	}
	if !errors.Is(b.errs[1], exactly.ErrUnpublishable) {
		t.Fatalf("message above the broker's limit: %v, want unpublishable", b.errs[1])
	}
	if b.errs[2] == nil || errors.Is(b.errs[2], exactly.ErrUnpublishable) {
		t.Fatalf("message lost with the channel: %v, want a retryable error", b.errs[2])
	}
	if got := p.limit(); got != 1024 {
		t.Fatalf("limit after the refusal = %d, want the broker's 1024", got)
	}
	if _, err := p.outgoing(&exactly.Message{ID: "x", Topic: "q", Payload: make([]byte, 1025)}); !errors.Is(err, exactly.ErrUnpublishable) {
		t.Fatalf("a later message above the broker's limit: %v, want unpublishable before sending", err)
	}
}

// A return is matched to its message even when acks for earlier messages
// are still to come, and a nack fails only its own message.
func TestTrackerMatchesReturnsAndNacks(t *testing.T) {
	_, tr := testTracker(t, 4096)
	b := newBatch(4, 4)
	for i, id := range []string{"a", "b", "c", "d"} {
		tr.register(uint64(i+1), &entry{b: b, i: i, id: id, key: "q"})
	}
	returns := make(chan amqp091.Return, 1)
	confirms := make(chan amqp091.Confirmation, 4)
	closes := make(chan *amqp091.Error, 1)
	returns <- amqp091.Return{ReplyCode: 312, ReplyText: "NO_ROUTE", RoutingKey: "q", MessageId: "c"}
	confirms <- amqp091.Confirmation{DeliveryTag: 1, Ack: true}
	confirms <- amqp091.Confirmation{DeliveryTag: 2, Ack: false}
	confirms <- amqp091.Confirmation{DeliveryTag: 3, Ack: true}
	confirms <- amqp091.Confirmation{DeliveryTag: 4, Ack: true}
	close(confirms)
	close(returns)
	close(closes)
	tr.run(returns, confirms, closes)
	<-b.done
	switch {
	case b.errs[0] != nil || b.errs[3] != nil:
		t.Fatalf("acked messages failed: %v, %v", b.errs[0], b.errs[3])
	case !errors.Is(b.errs[1], ErrNacked):
		t.Fatalf("nacked message: %v", b.errs[1])
	case !errors.Is(b.errs[2], ErrUnroutable):
		t.Fatalf("returned message: %v", b.errs[2])
	}
}
