// Package exactly holds the contract shared by every part of the toolkit:
// the Message that travels from the outbox to the consumer's effect, and the
// Publisher that hands messages to a broker.
//
// Brokers deliver at least once. exactly does not pretend duplicates away; it
// makes them invisible:
//
//   - every message gets a stable ID when it is written (outbox.Enqueue, in
//     the business transaction);
//   - every hop after that is at-least-once and re-sends with the same ID
//     (relay, broker adapters);
//   - every effect is applied under a dedup or offset check that commits
//     atomically with it (inbox, Kafka offsets in the database).
//
// Where each part lives:
//
//   - outbox: Enqueue in the business transaction, migrations, dead-message admin;
//   - relay: the polling relay that publishes the outbox (per-key order, leases,
//     retries, parking);
//   - pgcdc: the outbox read from PostgreSQL logical replication instead;
//   - inbox: the idempotent consumer, with an exact SQL store and a Redis store;
//   - kafka, nats, amqp: publishers and consumers per broker; kafka also has the
//     transactional Processor and consumers with offsets stored in the database;
//   - exactlytest: conformance suites and the fault-injecting Recorder;
//   - exactlyprom, exactlyotel: Prometheus collectors and OpenTelemetry tracing.
//
// # Consumers
//
// Every consumer has one shape, NewConsumer(conn, Config) then Run(ctx): the
// broker's client or URL, and a Config that embeds [ConsumerConfig] (the
// Handler, its [RetryPolicy], the dead-letter destination, Workers,
// [ConsumerHooks], the logger and the tracer, under the same names on every
// broker) beside the broker's own settings. Every consumer keeps one
// contract: the effect commits before the acknowledgement (ack, delete,
// offset commit); a failing or panicking handler is retried with backoff
// and, after MaxAttempts, dead-lettered with the reason headers
// ([HeaderDeadReason] and the others), and acknowledged only once the dead
// letter is confirmed; a handler that outlives the broker's deadline keeps
// its message; a message without an id follows the one rule of [ErrNoID].
// exactlytest.RunConsumerSuite holds each consumer to it. [ConsumerStats]
// are the totals every consumer reports.
//
// The exactly command (cmd/exactly) runs the relay as a daemon, applies the
// migrations, shows and re-drives dead messages, and runs the demo.
package exactly
