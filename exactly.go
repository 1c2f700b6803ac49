package exactly

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
)

// Header names every adapter uses to carry the parts of a Message that have no
// native field in the broker's record.
const (
	// HeaderID carries Message.ID on every broker, beside the broker's own
	// dedup field (Nats-Msg-Id, AMQP message-id).
	HeaderID = "exactly-id"
	// HeaderKey carries Message.Key on brokers without a native record key.
	HeaderKey = "exactly-key"
	// HeaderCreatedAt carries Message.CreatedAt (RFC 3339, nanoseconds).
	HeaderCreatedAt = "exactly-created-at"
)

// Message is the one type that crosses every boundary: written to the outbox,
// published by the relay, delivered to consumers, deduplicated by the inbox.
type Message struct {
	// ID is the message's identity from the moment it is enqueued until it is
	// applied. Enqueue assigns a UUIDv7 when it is empty; a caller may set its
	// own (for example one derived from a business key) to make the enqueue
	// itself idempotent. Every redelivery carries the same ID.
	ID string
	// Topic is the destination: a Kafka topic, a NATS subject, an AMQP routing key.
	Topic string
	// Key is the ordering key, usually the aggregate id. Messages with the
	// same non-empty Key reach the broker in the order they were enqueued.
	// An empty Key means no ordering is required.
	Key string
	// Payload is the body, opaque to exactly.
	Payload []byte
	// Headers travel with the message. Names starting with "exactly-" are
	// reserved for exactly's own (outbox.Enqueue refuses them).
	Headers map[string]string
	// CreatedAt is set by Enqueue when zero.
	CreatedAt time.Time
}

// NewID returns a fresh message id: a UUIDv7 in its canonical text form, so
// ids sort by creation time.
func NewID() string {
	return uuid.Must(uuid.NewV7()).String()
}

// Limits on the parts of a Message that are stored in indexed columns.
const (
	MaxIDLen    = 128
	MaxTopicLen = 255
	MaxKeyLen   = 255
)

// Validate reports the first problem that would make the message impossible
// to store or route: an empty or oversized Topic, an oversized Key or ID, or
// a Topic or ID that is not valid UTF-8 or holds a NUL byte (no database
// column or broker field that carries them takes those). It does not check
// the ID when it is empty (Enqueue assigns one).
//
// Validate accepts a Key and Headers of any bytes, since brokers such as
// Kafka carry them as such (records from other producers often have binary
// keys). outbox.Enqueue refuses more, because the outbox stores them as
// text: a Key that is not valid UTF-8 or holds a NUL byte, a header value
// that is not valid UTF-8, an empty header name or one with spaces, control
// characters or invalid UTF-8, and names starting with "exactly-".
func (m *Message) Validate() error {
	switch {
	case m == nil:
		return errors.New("exactly: nil message")
	case strings.TrimSpace(m.Topic) == "":
		return errors.New("exactly: message has an empty Topic")
	case len(m.Topic) > MaxTopicLen:
		return fmt.Errorf("exactly: message Topic is %d bytes, the limit is %d", len(m.Topic), MaxTopicLen)
	case len(m.Key) > MaxKeyLen:
		return fmt.Errorf("exactly: message Key is %d bytes, the limit is %d", len(m.Key), MaxKeyLen)
	case len(m.ID) > MaxIDLen:
		return fmt.Errorf("exactly: message ID is %d bytes, the limit is %d", len(m.ID), MaxIDLen)
	}
	if err := checkText("Topic", m.Topic); err != nil {
		return err
	}
	return checkText("ID", m.ID)
}

// checkText reports why s, the message field named field, cannot be stored
// as text: it is not valid UTF-8, or it holds a NUL byte (PostgreSQL text
// refuses both, and aborts the transaction that tried).
func checkText(field, s string) error {
	if !utf8.ValidString(s) {
		return fmt.Errorf("exactly: message %s %.60q is not valid UTF-8", field, s)
	}
	if i := strings.IndexByte(s, 0); i >= 0 {
		return fmt.Errorf("exactly: message %s %.60q holds a NUL byte (at byte %d)", field, s, i)
	}
	return nil
}

// Publisher delivers batches of messages to a broker.
//
// Publish returns only when the broker has confirmed every message (acks=all,
// a JetStream PubAck, a publisher confirm), or when it knows which ones
// failed. A nil error means every message is durably accepted. Otherwise the
// error is a *BatchError naming the failed messages by index (the others are
// confirmed), or any other error, which means none of them may be assumed
// confirmed.
//
// A failed message is one of three things, and callers tell them apart with
// errors.Is: refused for good (ErrUnpublishable: park it, no retry helps);
// sent but not confirmed (ErrOutcomeUnknown: the broker may hold it, and
// publishing it again is safe and right); or refused for now (anything
// else: retry it). A publisher must never report an unconfirmed message as
// confirmed, and should wrap ErrOutcomeUnknown whenever the message may
// have reached the broker.
//
// Messages with the same Key must be handed to the broker in slice order.
// Publishers must carry Message.ID in the HeaderID header and in the
// broker's own dedup field where it has one, so a re-publish after an
// ambiguous outcome is recognisable downstream.
type Publisher interface {
	Publish(ctx context.Context, msgs []*Message) error
}

// PipelinedPublisher is a Publisher that takes the next batch before the
// last one has its outcome and keeps every key in order across the batches
// it holds at once. A relay hands such a publisher several batches at a
// time, messages of one key in more than one of them, instead of waiting
// for each batch's confirmations before handing over the next: what a
// broker with a round trip per request and key (Pub/Sub with ordering
// keys) needs to reach its throughput.
//
// Send hands msgs to the broker's client, after the messages of every
// earlier Send and in slice order within the call, and returns once they
// are handed over; wait, called once, waits for their outcome and returns
// it as Publish would. Send never blocks on the outcome of an earlier
// call. Once a message fails, no later message of its key, whichever Send
// handed it over, is sent until Resume is called for the key: they fail
// with a retryable error. Where the broker pauses the key itself (Pub/Sub)
// the messages it had not sent yet fail too, so none overtakes the failed
// one; where it does not (JetStream), messages of the key already sent when
// the failure came may still be stored after it, as within one Publish
// call, and the relay publishes them again after the failed one.
//
// Resume lets a key whose message failed be sent again. The relay calls it,
// before the Send that holds it, with the message that goes first when the
// key goes again: the failed message's retry, or the next one of the key
// once the failed one was parked. A publisher waits, within ctx, for the
// outcome of the key's earlier messages before it lets the key go; Resume
// of a key that is not held does nothing.
type PipelinedPublisher interface {
	Publisher
	Send(ctx context.Context, msgs []*Message) (wait func() error)
	Resume(ctx context.Context, m *Message)
}

// PublisherFunc adapts a function to the Publisher interface.
type PublisherFunc func(ctx context.Context, msgs []*Message) error

// Publish calls f.
func (f PublisherFunc) Publish(ctx context.Context, msgs []*Message) error { return f(ctx, msgs) }

// BatchError reports which messages of a batch failed. Errs has one entry per
// message of the batch, nil for the confirmed ones.
type BatchError struct {
	Errs []error
}

func (e *BatchError) Error() string {
	failed := 0
	var first error
	for _, err := range e.Errs {
		if err != nil {
			failed++
			if first == nil {
				first = err
			}
		}
	}
	return fmt.Sprintf("exactly: %d of %d messages failed, first: %v", failed, len(e.Errs), first)
}

// Unwrap exposes the per-message errors to errors.Is and errors.As.
func (e *BatchError) Unwrap() []error {
	out := make([]error, 0, len(e.Errs))
	for _, err := range e.Errs {
		if err != nil {
			out = append(out, err)
		}
	}
	return out
}

// NewBatchError returns nil when every entry of errs is nil, and a
// *BatchError otherwise. Publishers use it to build their result.
func NewBatchError(errs []error) error {
	for _, err := range errs {
		if err != nil {
			return &BatchError{Errs: errs}
		}
	}
	return nil
}

// PerMessage expands the result of Publish into one error per message: nil
// for the confirmed ones. An error that is not a *BatchError applies to all.
func PerMessage(err error, n int) []error {
	out := make([]error, n)
	if err == nil {
		return out
	}
	var be *BatchError
	if errors.As(err, &be) && len(be.Errs) == n {
		copy(out, be.Errs)
		return out
	}
	for i := range out {
		out[i] = err
	}
	return out
}

// Verdicts reads the result of Publish on a batch of n messages by the
// Publisher contract: is err a verdict per message, or an outage? errs has
// one entry per message, as PerMessage. outage is err when err says nothing
// about single messages (neither a *BatchError nor the ErrUnpublishable
// refusal of a lone message): the broker or the way to it failed, none of
// the messages may be assumed confirmed, and none of them is to blame, so a
// relay backs off as a whole instead of counting an attempt against each.
func Verdicts(err error, n int) (errs []error, outage error) {
	errs = PerMessage(err, n)
	var be *BatchError
	if err != nil && !errors.As(err, &be) && !(n == 1 && errors.Is(err, ErrUnpublishable)) {
		return errs, err
	}
	return errs, nil
}

// ErrUnpublishable marks an error that no retry can fix: the broker refused
// the message itself (too large, invalid destination). The relay parks such
// a message as dead at once, with the reason, instead of retrying it.
var ErrUnpublishable = errors.New("unpublishable message")

// Unpublishable wraps err so that errors.Is(err, ErrUnpublishable) holds.
func Unpublishable(err error) error {
	if err == nil {
		return nil
	}
	return &unpublishableError{err: err}
}

type unpublishableError struct{ err error }

func (e *unpublishableError) Error() string { return "unpublishable: " + e.err.Error() }
func (e *unpublishableError) Unwrap() []error {
	return []error{ErrUnpublishable, e.err}
}
