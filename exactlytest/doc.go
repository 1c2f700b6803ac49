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
//     reordering a key.
//
// Feature flags in the harness (NativeDedup) state what the broker adds on
// top of that baseline; the suite then checks it too.
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
