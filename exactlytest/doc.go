// Package exactlytest holds the conformance suites every adapter must pass
// and helpers for users' own tests.
//
// # Publisher suite
//
// [RunPublisherSuite] checks an [exactly.Publisher] against a real broker (or
// an in-process one) through a [PublisherHarness]: a way to build a publisher
// with a fresh topic, and a way to read back what the broker holds. Every
// broker adapter runs it, so the relay can rely on the same behaviour
// whatever broker sits behind the interface:
//
//   - every message arrives with its ID in the exactly-id header, its Key,
//     Payload and headers intact;
//   - messages with the same Key are stored in slice order, within one
//     Publish call and across consecutive calls;
//   - an empty batch is a no-op;
//   - a message the broker can never take (too large, no topic, no ID) fails
//     alone, by index, with an error matching [exactly.ErrUnpublishable],
//     while the rest of the batch is confirmed;
//   - re-publishing the same messages, as the relay does after an ambiguous
//     outcome, stores copies that carry the same ID (or, where the broker
//     deduplicates natively, no second copy);
//   - a cancelled context ends Publish promptly, every message reported as
//     confirmed is on the broker, and a re-publish delivers the rest without
//     reordering a key;
//   - an [exactly.PipelinedPublisher] takes batches that share keys before
//     the earlier ones have their outcome, and stores each key in the order
//     of the calls (the case is skipped, saying so, for other publishers).
//
// [SendCounter] counts a PipelinedPublisher's outstanding Send calls, to
// show that a relay overlaps its batches. [EnqueueAll], [StartRelay] and
// [WaitDrained] write messages through an outbox, run a relay for the
// test, and wait until the outbox is empty.
//
// Feature flags in the harness (NativeDedup) state what the broker adds on
// top of that baseline; the suite then checks it too.
//
// # Consumer suite
//
// [RunConsumerSuite] checks a consumer against a real broker through a
// [ConsumerHarness]: a PostgreSQL database, and per case a fresh source (a
// queue, topic or stream, with the adapter's publisher) and a way to build
// consumers of it from the shared exactly.ConsumerConfig. Each consumer
// runs its Handler through the SQL inbox, and the suite counts the effects
// per message id: after a crash between the effect and the ack, a lost ack,
// a second consumer taking over, a crash before the effect while the
// message is being retried, an error and a panic retried with backoff, a
// message dead-lettered after MaxAttempts (with the reason headers, and
// acknowledged only once the dead letter is confirmed), a handler slower
// than the broker's ack deadline, a message without an id, per-key order,
// concurrency across keys and a graceful shutdown with a handler in
// flight, every message is applied exactly once, and the consumer's
// ConsumerStats and ConsumerHooks agree with what happened. A case whose
// fault did not cause the redelivery it must cause fails too.
//
// Feature flags state what the broker does not promise or does its own
// way: Ordering (no order, order with one worker, per-key order with any
// Workers), NoID (id-less messages dead-lettered, or given an id derived
// from a stable position), AckDeadline (how long the broker waits before it
// takes an unacknowledged message back), and TestConsumer.LoseAcks, left
// nil where acknowledgements cannot be made to vanish. To run it against
// your own adapter, return from ConsumerSource.New a TestConsumer whose
// Crash cuts the consumer's connections (a net.Conn wrapper in the dialer
// does it) and whose Stats returns its exactly.ConsumerStats.
//
// # Outbox suite
//
// [RunOutboxSuite] checks an outbox dialect and driver together with the
// relay, through an [OutboxHarness] (a database handle and a way to begin a
// transaction): commit publishes exactly the committed messages with their
// ids and rollback leaves no trace; migrations are idempotent; bad input
// (nil transaction, empty topic, unsafe table name, unknown dialect) is
// refused with a clear error; two relays share 10,000 messages over 100 keys
// with per-key order and no duplicates; a relay stalled past its lease loses
// its partitions; a late commit with a lower sequence is not skipped;
// retries keep key order; messages are parked after MaxAttempts and
// re-driven; a broker outage parks nothing; retention keeps and then deletes
// sent rows; shutdown and restart lose nothing.
//
// # Inbox suite
//
// [RunInboxSuite] checks an inbox store by counting real effects per
// message id: five deliveries (in a row and concurrent) give one effect; a
// failing or panicking handler is retried and never marked done; 1,000
// messages redelivered at random from 8 goroutines give exactly one effect
// each; two consumers of one message each apply it once; an empty id is
// refused; retention removes old records and keeps recent ones.
//
// # Checks
//
// [CheckExactlyOnce], [CheckExactlyOnceDedup], [CheckKeyOrder] and
// [CheckLastDeliveryOrder] judge what a broker or a Recorder received.
//
// # Recorder
//
// [Recorder] is an in-memory [exactly.Publisher] that records every message
// it confirms, counts deliveries per ID and injects faults: a failing index,
// a failing predicate, a failing call, a lost acknowledgement (the message is
// delivered but the call fails, the classic source of duplicates) and a
// delay. Use it to test code that publishes, such as the relay or your own
// handlers, without a broker. It passes the publisher suite itself.
package exactlytest
