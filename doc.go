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
// See the outbox, relay and exactlytest packages, and the broker adapters in
// kafka and nats.
package exactly
