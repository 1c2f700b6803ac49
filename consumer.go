package exactly

import (
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// ConsumerConfig is the part of a consumer's configuration that means the
// same thing on every broker: the handler, its retry and dead-letter policy,
// how many messages are handled at once, the hooks, the logger and the
// tracer.
//
// Every consumer in this module has one shape:
//
//	c, err := broker.NewConsumer(conn, broker.ConsumerConfig{
//		ConsumerConfig: exactly.ConsumerConfig{Handler: h, Retry: ..., DeadLetter: ...},
//		// the broker's own settings: Queue, Durable, Group, Topics...
//	})
//	err = c.Run(ctx)
//
// conn is what the broker's client is built from: a jetstream.JetStream for
// NATS, the broker URL for AMQP (whose consumer dials, and redials after a
// lost connection, by itself), the seed brokers for Kafka. Each package's
// ConsumerConfig embeds this struct, so the shared settings have literally
// the same names everywhere, and adds what only that broker has. NewConsumer
// checks the whole configuration before any I/O and returns one error naming
// the first bad field (a *ConfigError for the fields of this struct); Run
// consumes until its context ends.
//
// The zero value of every field but Handler takes the documented default.
type ConsumerConfig struct {
	// Handler applies one message. Required. The consumer acknowledges a
	// message (ack, delete, offset commit) only after Handler returned nil or
	// the message was dead-lettered, so Handler runs at least once per
	// message and again after a crash, a lost acknowledgement or a
	// redelivery: wrap it with the inbox to apply each effect once per
	// Message.ID. Its context ends when Run's does, and when the consumer
	// lost the right to acknowledge the message (its connection dropped, its
	// partition was revoked): return promptly then, the message is
	// redelivered.
	Handler Handler

	// Retry says how often, and how far apart, a failing Handler is retried
	// before its message is dead-lettered. A panic counts as a failure. The
	// zero value takes RetryPolicy's defaults (5 attempts, 100ms doubling to
	// 10s). The message stays unacknowledged, and owned by this consumer,
	// while it is retried: keep MaxAttempts times MaxBackoff below what the
	// broker allows an unacknowledged message (see each package).
	Retry RetryPolicy

	// DeadLetter receives a copy of each message whose Handler failed
	// Retry.MaxAttempts times (and of each message without an id; see
	// ErrNoID), with the HeaderDeadReason, HeaderDeadAttempts,
	// HeaderDeadTopic and HeaderDeadAt headers. The original is acknowledged
	// only once DeadLetter confirmed the copy; while it fails the consumer
	// retries it and holds the message, so a destination that never accepts
	// stalls the consumer instead of losing the message. Default: the
	// broker's own destination (a Kafka topic, a NATS subject, an AMQP
	// queue), named by DeadLetterTopic.
	DeadLetter Publisher

	// DeadLetterTopic names the topic of a message's dead letter. Default:
	// the message's Topic plus ".dlq". It runs on a worker's goroutine and
	// must not block.
	DeadLetterTopic func(msg *Message) string

	// Workers is how many messages are handled at a time. Default 1: one
	// after the other, in the order the broker delivers them. With more,
	// messages are spread over the workers by Message.Key, so the messages
	// of one key are still handled one at a time, in order (per-key workers
	// on NATS and AMQP; Kafka keeps order per partition): see each package.
	Workers int

	// Hooks report what the consumer does, for metrics. All optional.
	Hooks ConsumerHooks

	// Logger receives the consumer's logs. Default slog.Default().
	Logger *slog.Logger

	// Tracer, when set, runs each message's handling in a span that
	// continues the trace the message carries (its traceparent header,
	// written by outbox.Enqueue with a Tracer); the Handler's context holds
	// that span. See exactlyotel.New. Default nil: no tracing, no cost.
	Tracer Tracer
}

// WithDefaults checks c and returns it with the defaults filled in. A bad
// field is a *ConfigError naming it. DeadLetter stays nil when it is: the
// adapter supplies its broker's destination.
func (c ConsumerConfig) WithDefaults() (ConsumerConfig, error) {
	if c.Handler == nil {
		return c, &ConfigError{Field: "Handler", Err: errors.New("is nil: the consumer has nothing to run for a message")}
	}
	retry, err := c.Retry.WithDefaults()
	if err != nil {
		return c, &ConfigError{Field: "Retry", Err: err}
	}
	c.Retry = retry
	switch {
	case c.Workers < 0:
		return c, &ConfigError{Field: "Workers", Err: fmt.Errorf("is %d; it must not be negative (0 takes the default, 1)", c.Workers)}
	case c.Workers == 0:
		c.Workers = 1
	}
	if c.DeadLetterTopic == nil {
		c.DeadLetterTopic = func(m *Message) string { return m.Topic + ".dlq" }
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c, nil
}

// ConfigError names the configuration field a constructor refused, and why.
type ConfigError struct {
	// Field is the field's name as the caller writes it ("Handler",
	// "Retry", "Queue").
	Field string
	Err   error
}

func (e *ConfigError) Error() string { return e.Field + " " + e.Err.Error() }
func (e *ConfigError) Unwrap() error { return e.Err }

// ConsumerHooks report what a consumer does, for metrics. Every hook is
// optional and runs synchronously on the goroutine handling the message;
// with Workers > 1 hooks run concurrently and must be safe for that. A hook
// that blocks stalls its worker, and with it the acknowledgement of its
// message.
type ConsumerHooks struct {
	// Handled runs after the Handler returned nil, with its duration.
	Handled func(msg *Message, took time.Duration)
	// Failed runs after each failed attempt (attempt 1 is the first), and
	// once for a message without an id (with an error matching ErrNoID).
	Failed func(msg *Message, attempt int, err error)
	// DeadLettered runs once the dead-letter destination confirmed the
	// copy, with the last failure.
	DeadLettered func(msg *Message, err error)
	// AckFailed runs when the acknowledgement (ack, delete, offset commit)
	// of a handled or dead-lettered message failed, or its outcome is not
	// known: the broker will deliver it again.
	AckFailed func(msg *Message, err error)
}

// ConsumerStats are a consumer's running totals since it was created. Each
// adapter's Stats embeds them beside its own counters.
type ConsumerStats struct {
	// Received counts messages taken from the broker, redeliveries
	// included.
	Received int64
	// Handled counts Handler runs that returned nil.
	Handled int64
	// Failed counts failed Handler runs (every attempt counts), plus
	// messages without an id.
	Failed int64
	// DeadLettered counts messages the dead-letter destination confirmed.
	DeadLettered int64
	// AckFailures counts acknowledgements that failed or whose outcome is
	// not known; each such message is delivered again.
	AckFailures int64
	// Redeliveries counts deliveries the broker marked as delivered before
	// (0 on brokers that do not say).
	Redeliveries int64
}

// ErrNoID is the reason a consumer refuses a message that carries no id:
// neither the exactly-id header (HeaderID) nor the broker's own message id
// field (AMQP message-id, Nats-Msg-Id). Such a message comes from a
// producer that is not exactly's, and no inbox can deduplicate it.
//
// The rule, the same for every consumer:
//
//   - where the broker gives each message a position that stays the same
//     across redeliveries (Kafka's topic, partition and offset), the
//     consumer derives the id from it and handles the message as any other;
//   - otherwise (AMQP, NATS) the Handler never sees the message: it is
//     dead-lettered at once, with ErrNoID as its reason (the Failed and
//     DeadLettered hooks get an error matching it), under a stand-in id
//     its redelivered copies carry too (AMQP: derived from its content;
//     NATS: nats:<stream>:<stream sequence>), and acknowledged once the
//     dead letter is confirmed.
//
// The inbox also returns it for a message with an empty ID.
var ErrNoID = errors.New("no message id: the message cannot be deduplicated, so it is not handled")

// ErrOutcomeUnknown marks a publish whose outcome is not known: the message
// was sent, but the broker's confirmation did not come (the context ended,
// the connection dropped, a timeout passed), so the broker may or may not
// hold it. It is retryable: publishing the same message again is safe,
// since it carries the same ID and the inbox (or the broker's dedup)
// absorbs the second copy. It is never ErrUnpublishable.
var ErrOutcomeUnknown = errors.New("outcome unknown: the broker may or may not have the message")
