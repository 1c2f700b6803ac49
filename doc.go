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
// The exactly command (cmd/exactly) runs the relay as a daemon, applies the
// migrations, shows and re-drives dead messages, and runs the demo.
package exactly
