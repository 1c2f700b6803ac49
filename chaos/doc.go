// Package chaos is the fault-injection suite: it runs the whole pipeline as
// separate OS processes against real servers, injects faults at random but
// reproducible times, and checks that no message was lost, none applied
// twice and no promised per-key order broken.
//
// # What runs
//
// Every run owns its servers, so nothing shared is ever bounced: a private
// PostgreSQL (internal/pginstance, wal_level=logical), nats-server with
// JetStream, redis-server and kfake (franz-go's Kafka-protocol broker, run
// by chaos/cmd/worker -role kfaked with a data directory and an fsync per
// write, so that it can be killed and restarted); with the SQS pipeline,
// fauxqs (the SQS emulator of scripts/aws-emulator, under Node.js, installed
// by that script into .cache/fauxqs when missing); with the Pub/Sub pipeline,
// pstest (the Go client library's Pub/Sub fake) run by chaos/cmd/pstest.
// fauxqs and pstest keep their state in memory only: a restart would lose
// every queue, topic and message, so neither is ever restarted (they meet
// kill and pause of their clients and the network faults, not restarts).
// The workers are one binary, chaos/cmd/worker, built once per run with
// chaos/cmd/pstest (without the race detector unless Options.WorkerRace;
// the orchestrator itself runs under the test's flags):
//
//   - producer: per key (16 by default) orders with sequence 1, 2, 3, ...
//     each in one transaction with a chaos_orders row, one outbox message
//     per outbox table and a chaos_written row per message. A commit with an
//     unknown outcome is resolved by reading the row back.
//   - relay-nats, relay-kafka and relay-kafka-2: the polling relay
//     (StrictOrder) on chaos_outbox_nats, and two of them sharing the
//     partitions of chaos_outbox_kafka; relay-cdc: pgcdc reading
//     chaos_outbox_cdc from a replication slot, publishing to NATS;
//     relay-sqs: the polling relay (StrictOrder) on chaos_outbox_sqs,
//     publishing through the sqs Publisher to the FIFO queue
//     chaos-orders.fifo (MessageGroupId the key, MessageDeduplicationId the
//     id); relay-pubsub: the same on chaos_outbox_pubsub through the pubsub
//     Publisher (ordering key the key).
//   - consumers, one process per pipeline:
//     nats-sql (JetStream durable consumer, SQL inbox in the effect's
//     transaction), nats-cdc (the same on the CDC relay's subject),
//     kafka-db (consumer group with offsets stored in PostgreSQL by
//     compare-and-set, plus a claim of the message id in the same
//     transaction), kafka-redis (consumer group committing offsets after the
//     effect, Redis inbox, effect in PostgreSQL outside any shared
//     transaction), sqs-sql (the sqs Consumer on the FIFO queue, visibility
//     timeout 3s, SQL inbox in the effect's transaction), pubsub-sql (the
//     pubsub Consumer on a subscription with message ordering, SQL inbox).
//
// Workers reach PostgreSQL, NATS, Redis, kfake, fauxqs and pstest through TCP fault proxies
// (Shopify's toxiproxy, in process); Kafka clients dial the proxy through a
// custom dialer, since kfake advertises its own address. The checker
// connects directly.
//
// # Faults
//
// Two lanes run side by side, each a seeded shuffle holding every kind at
// least Options.PerKind times: processes (kill -9 of the producer, a relay
// or a consumer, then restart; a kill burst: one Kafka pipeline's consumer
// killed 3-4 times inside its session timeout, restarted 0-300ms after
// each kill; SIGSTOP for 4-8s, longer than the Kafka session (3s), the
// NATS AckWait (3s), the Redis lease (5s) and the relay lease (2s), then
// SIGCONT, so the process wakes as a zombie (on Pub/Sub the ack deadline
// is at least 10s, the library's least extension, so a pause there is a stall
// more often than a zombie); an extra member joining a
// Kafka group, pulling from a NATS durable, receiving from the SQS queue or
// the Pub/Sub subscription for 4-9s and leaving) and infrastructure (latency 100-300ms,
// all connections dropped with the port closed for up to 2s, a black hole
// of 2-6s, on one of the proxies; PostgreSQL restart, fast or
// immediate; nats-server restart; kfake restart by SIGTERM or SIGKILL).
// The pipelines marked Cover (sqs-sql, pubsub-sql) meet every kind of
// CoverFaults at least once per run: kill and pause of their relay or
// consumer, churn of their consumer group and each network fault on their
// broker's proxy; where the seeded
// draw missed one, a fault is added at a random place of its lane. The
// report counts, per pipeline, the faults that hit it.
//
// # What the checker counts, per pipeline
//
//   - written: chaos_written rows of its outbox (committed messages).
//   - published: written messages found on the broker (the whole stream
//     subject or topic is read); copies: the records carrying them. On
//     Pub/Sub, an audit subscription made before the first publish holds
//     every copy pstest stored, in the order of its message ids. An SQS
//     queue cannot be read afterwards (its consumers deleted what they
//     applied): there published is the written messages delivered at
//     least once, one copy each, and the broker order is the order of the
//     first deliveries per key, which a FIFO queue hands out one at a time
//     per group; copies SQS dropped within its 5-minute deduplication window
//     are not visible, and one stored after it would be a dup delivery.
//   - delivered: deliveries handed to the consumer's handler (a retry of
//     one delivery is not another); dup delivered: those of a message
//     delivered before.
//   - applied: written messages with at least one chaos_effects row. The
//     effect is a new row per application (serial id), never an upsert, so
//     a second application is a second row.
//   - lost: written and never applied. Fails the run.
//   - applied twice: messages with two or more effect rows. Fails the run on
//     an exact pipeline (SQL inbox, DB offsets). The Redis inbox is not exact
//     by its own documentation; there a double is "explained", and allowed,
//     only when a documented window accounts for it: the worker that applied
//     it first was killed (effect done, marker not written), or a worker
//     reported for that id a lease that expired while another runner took
//     it, a done marker it could not write, or an effect insert that failed
//     with an unknown outcome. Any other double fails the run.
//   - broker order: per key, in broker order (stream sequence; per
//     partition for Kafka), the first copy of each message whose sequence
//     is below one seen before. Promised by the polling relay with
//     StrictOrder (and kept by a FIFO queue's group and a Pub/Sub ordering
//     key); fails the run there. Reported only for the CDC relay,
//     which has no strict mode: a retried message goes out again after the
//     ones of its key the broker took, and NATS drops those re-sends within
//     its duplicate window.
//   - effect order: per key, in effect-row order, the first application of
//     each message whose sequence is below one applied before. Promised by
//     the Kafka consumers (a partition is handled in order and resumes from
//     the committed or stored offset), by the SQS consumer on a FIFO queue
//     (a group's next message is not handed out before the one in flight is
//     deleted or its visibility ran out) and by the Pub/Sub consumer on an
//     ordered subscription (a key's next message waits for the ack of the
//     one before); fails the run there. Reported only
//     for NATS, whose redeliveries after a crash come after later messages
//     (see the nats package documentation).
//   - dead: messages parked by a relay or dead-lettered by a consumer.
//     Fails the run (retries are unbounded here, nothing should die).
//
// A run also fails when a worker exits by itself, a fault cannot be healed,
// a Kafka group has not applied every message written before a kill burst
// ended 60 s after it (its
// consumer killed 3-4 times inside one session timeout; the consumers run
// as static members, their role as InstanceID), or a written message is
// still not applied Options.Drain after the faults.
//
// The suite is a module of its own (chaos/go.mod, the library replaced by
// the source tree above it): run it with go -C chaos test ./... and
// go -C chaos run ./cmd/soak.
//
// The kafka-broken pipeline (not a default one) is the Kafka consumer with
// the inbox left out; TestChaosSeesBrokenConsumer kills it and requires the
// checker to report double applications, proof that the checker sees them.
package chaos
