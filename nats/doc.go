// Package nats is the NATS JetStream adapter of exactly, built on
// github.com/nats-io/nats.go/jetstream.
//
// # Publisher
//
// [Publisher] implements exactly.Publisher. Each message is published to the
// subject Message.Topic (or what the SubjectFunc option makes of it) with
// these headers:
//
//   - Nats-Msg-Id: Message.ID, so the stream drops a re-publish of a message
//     it stored within its duplicate window (StreamConfig.Duplicates,
//     2 minutes by default);
//   - exactly-id: Message.ID again, which outlives the window and is what
//     the inbox deduplicates on;
//   - exactly-key: Message.Key, as NATS messages have no key of their own;
//   - exactly-created-at: Message.CreatedAt;
//   - the message's own headers.
//
// Publish sends the batch with PublishMsgAsync, keeping at most MaxInFlight
// messages awaiting their PubAck, and returns when every message is stored,
// or with a *exactly.BatchError naming the failed messages by index. The
// relay uses Send instead (exactly.PipelinedPublisher): it hands the next
// batch over while the last one's acks are on their way, up to 16 batches,
// and after a message fails Send sends none of its key's later messages
// until the relay resumes the key with its retry.
//
//	js, _ := jetstream.New(nc)
//	pub, err := nats.NewPublisher(js)
//	if err != nil { ... }
//	err = pub.Publish(ctx, msgs)
//
// # Guarantees
//
// A PubAck means the stream stored the message (with the stream's
// replication, on a quorum of its replicas). Messages of one call are sent in
// slice order on one connection and a stream stores them in that order, so a
// key keeps its order when nothing fails. When something fails, the error
// says which messages; by default the batch is pipelined and a later
// message of the same key may be stored before the relay's retry of the
// failed one. The StrictKeyOrder option closes that gap at the cost of a
// round trip per message of a key.
//
// A re-publish after an ambiguous outcome (a lost PubAck, AckWait passed,
// the context ended, the relay crashed before it marked the rows sent) is
// dropped by the stream when it comes within the duplicate window; after it,
// the stream stores a second copy carrying the same exactly-id and the inbox
// drops it. The publisher conformance suite runs with NativeDedup on.
//
// # Failures
//
// A message the server or the stream can never take fails matching
// exactly.ErrUnpublishable, and the relay parks it: an invalid message or
// subject (empty tokens, wildcards, whitespace), a header name NATS does not
// allow, a message larger than the server's max_payload (nats.ErrMaxPayload,
// checked by the client before sending) or than the stream's max_msg_size.
//
// A subject no stream captures fails with jetstream.ErrNoStreamResponse
// ("no responders"). That is not unpublishable: the stream may be created,
// or its leader elected, before the next attempt. Publish does not re-send
// by itself on no responders (the library's default would, from a timer,
// which can reorder a key); the relay retries the failed messages in order.
//
// Header values travel as NATS header lines: NATS trims their leading and
// trailing whitespace and turns CR and LF into spaces. That applies to
// exactly-key too, so keys with such characters arrive altered.
//
// # Consumer
//
// [Consumer] reads a stream through a durable pull consumer and runs an
// exactly.Handler for each message:
//
//	c, err := nats.NewConsumer(js, nats.ConsumerConfig{
//		ConsumerConfig: exactly.ConsumerConfig{Handler: handle}, // usually wrapped by the inbox
//		Stream: "ORDERS", Durable: "billing", FilterSubjects: []string{"orders.events"},
//	})
//	if err != nil { ... }
//	err = c.Run(ctx) // until ctx ends
//
// That is the shape of every consumer of this module: the settings they
// share (Handler, Retry, DeadLetter, DeadLetterTopic, Workers, Hooks, Logger,
// Tracer) are exactly.ConsumerConfig, embedded in [ConsumerConfig] beside
// JetStream's own (Stream, Durable, AckWait, Batch...).
//
// Run creates the durable consumer (or updates it to the configuration),
// fetches up to Batch messages at a time, and turns each into an
// exactly.Message: ID from the exactly-id header, else Nats-Msg-Id; Key from
// exactly-key; CreatedAt from exactly-created-at, else the time the stream
// stored the message; Topic is the subject; Headers are the others, without
// the server's Nats-* headers. The handler runs under the policy every
// consumer of exactly shares: a panic is a failure, failures are retried
// with backoff, and after Retry.MaxAttempts the message is
// dead-lettered. Attempts are counted from the server's delivery count, so
// they add up over redeliveries.
//
// # Consumer guarantees
//
// At least once, never silently dropped. A message is acknowledged only
// after its handler returned nil or its dead letter was confirmed, and the
// acknowledgement waits for the server's confirmation (AckSync), so a lost
// one is seen, logged and counted (Stats().AckFailures, Hooks.AckFailed).
// Every path that does not end in a confirmed acknowledgement leaves the
// message with the server, which delivers it again: a crash or a lost
// connection after the effect and before the ack (after AckWait), a
// shutdown (handed back with a Nak, at once), a lost ack
// (after AckWait). The redelivered copy carries the same ID; wrap the
// handler with the inbox so its effect applies once. The server's consumer
// never gives up on a message by itself (MaxDeliver is unlimited, and
// NewConsumer refuses a Configure that sets it): giving up is the
// dead-letter destination's job.
//
// A message with neither exactly-id nor Nats-Msg-Id is never handled: by
// the rule of exactly.ErrNoID it is dead-lettered at once with a reason
// matching it and a stand-in id made of the stream name and sequence
// ("nats:<stream>:<sequence>", the same on every redelivery).
//
// Dead letters go by default to the message's subject plus ".dlq", through
// this package's Publisher, with exactly-dead-reason, -attempts, -topic and
// -at headers. A stream must capture that subject, and the consumer must
// not consume it again; Run checks both before it starts. With the usual
// layout, a stream "ORDERS" on "orders.>" and a consumer filtered on
// "orders.events", the dead letters land in the same stream on
// "orders.events.dlq", which the consumer does not see. They carry their own
// Nats-Msg-Id ("dlq:<durable>:<id>"), since the stream would otherwise drop
// them as duplicates of the original.
//
// Order. With Workers = 1 (the default) messages are handled one at a time
// in stream order. With more, they are spread over the workers by Key (by
// subject for messages without one): a key's messages are handled in
// stream order, different keys in parallel. A redelivery breaks that order
// where the broker does: a message whose ack was lost is handled again
// after later messages of its key (the inbox drops the copy), and a
// dead-lettered message leaves its key's sequence. Several processes running
// the same Durable share its messages and keep no order between them.
//
// # Consumer limits
//
// AckWait against handler time: AckWait (default 30s) is how long the server
// waits for an ack before it redelivers. The consumer tells the server that
// every message it holds (handled, retrying, or queued behind another) is
// still in progress about every AckWait/3, so a handler may run, and retry,
// longer than AckWait. That works while the connection does: if the
// consumer cannot reach the server for longer than AckWait, the server
// redelivers what it held, possibly to another process while this one is
// still handling it; the inbox makes the second run a no-op. A handler that
// never returns holds its message, and its worker, for ever: give handlers
// deadlines.
//
// Dedup window: the stream's duplicate window (StreamConfig.Duplicates,
// 2 minutes by default) drops a re-published copy with the same
// Nats-Msg-Id, and only within that window. The consumer does not
// deduplicate at all: redeliveries, and copies stored apart (outside the
// window, or under other Nats-Msg-Ids), all reach the handler with their
// exactly-id. Deduplication by ID is the inbox's job, and its retention
// must outlive every redelivery and re-publish that can still happen.
//
// Batch: up to Batch messages are held at a time. If the process dies, the
// ones it held return to other processes only after AckWait; on a graceful
// stop (Run's context ends) they are handed back at once, which takes Run
// up to 2 seconds beyond the handlers.
//
// Server restarts and lost connections are retried for ever (with logs);
// Run returns an error only for what needs an operator or a new
// connection: the stream or consumer deleted, the connection closed, or a
// dead-letter route that cannot work.
package nats
