// Package relay moves committed outbox rows to a broker: the second half of
// the transactional outbox.
//
//	r, err := relay.New(relay.Config{Outbox: ob, DB: pool, Publisher: pub})
//	if err != nil { ... }
//	err = r.Run(ctx) // until ctx is cancelled
//
// # Guarantees
//
// At least once, never lost: a row is deleted (or marked sent, with
// Retention) only after the Publisher reported the broker's confirmation. A
// relay that dies between the confirmation and the mark publishes the rows
// again after restart, with the same ids; the consumer's inbox absorbs the
// copy.
//
// No skipped rows: reads take the pending rows in sequence order, leaving
// out only the rows in flight, so a transaction that took a low sequence
// number and committed late is picked up by the next read. While working
// through a backlog (the last read was a full batch) the relay reads the
// rows above the highest sequence it has seen, which is cheaper than
// excluding thousands of rows in flight; a full read still comes whenever it
// is caught up or nothing is in flight, after any failure or held-back row,
// and at least every 500ms, so a late commit waits at most that long during
// a backlog and not at all otherwise.
//
// Marking: the outcomes of the batches confirmed since the last mark are
// recorded together, one statement for all their confirmed rows, in batch
// order. On PostgreSQL that transaction commits with synchronous_commit off:
// it does not wait for the WAL flush, which takes the flush off the relay's
// path at low rates. A database crash can then lose the last marks (never a
// row: the rows were committed by the application with its own settings);
// those messages are published again with the same ids, which is the
// at-least-once contract, and the consumer's inbox absorbs the copies.
//
// Pipelining: the next batches are read while one is published, and the
// outcome of a batch is recorded while the next one is published; Publish
// is called for one batch at a time. A Publisher that is an
// exactly.PipelinedPublisher (nats, pubsub) is handed up to PipelineDepth
// (16) batches at once, messages of one key in several of them, in order: after a message
// fails it sends none of the key's later messages, and the relay resumes
// the key with the failed message's retry once none of the key's messages
// is in flight. Messages of the key the broker had already taken are dealt
// with as below.
//
// Per-key order: rows of one Key are handed to the broker in sequence order,
// and a row whose predecessor of the same key failed waits for it (it is
// published again after it if the broker had already taken it). Keys are
// independent: a failing message holds back only its own key. StrictOrder
// keeps a single message per key in flight, for consumers that must never
// see a later message before an earlier one, even once.
//
// Several relays: rows belong to partition hash(Key) mod Partitions, and
// each partition is leased to one relay at a time (the <table>_leases
// table, compare-and-set on the database clock). Relays heartbeat in
// <table>_relays, take a fair share of the partitions, hand back the excess
// when another relay joins (only once nothing of theirs is in flight), and
// take over the partitions of a relay that stops renewing. A relay that
// stalls past its lease publishes nothing more (at most the batch it was in
// the middle of, or the batches a PipelinedPublisher held, which are then
// same-id copies): the batches it had read are
// handed back, and it reads again from the lowest pending row once it has
// its leases back. A relay that takes over partitions reads in full (from
// the lowest pending row) until it has caught up with their backlog, whose
// rows lie below what it has read so far, so their keys stay in order.
//
// Retries and parking: a failed message backs off exponentially with
// jitter; after MaxAttempts it is parked as dead with its last error. A
// message the broker refuses outright (exactly.ErrUnpublishable) is parked
// at once. A publisher error that is not per message (the broker is down)
// retries the batch without spending attempts. Parked messages stay in the
// table until an operator re-drives (outbox.RetryDead) or purges them.
//
// Failures are visible while they are retried: the first failure of a topic
// is logged at warn level with the broker's reason, then at most one line a
// minute per topic (with the count of failures left out); Stats.BlockedKeys
// counts the keys held back behind a failing message; outbox.Status (and
// `exactly outbox status`) lists the failing messages with their attempts,
// last error and next attempt, from the table, for every relay.
//
// Wake-up: on PostgreSQL an insert trigger NOTIFYs at commit and the relay
// LISTENs, so latency is a round trip; polling every PollInterval is the
// fallback, and the mechanism on MySQL and SQLite (or call Relay.Wake).
//
// Shutdown: when the context is cancelled the relay starts no new batch,
// lets the one being published finish for up to ShutdownTimeout, leaves
// everything else pending and releases its partitions.
//
// # Limits
//
// Order across keys is not kept (it is not meant to be). Order within a key
// assumes the application does not write one key from two concurrent
// transactions. A relay that stalls inside Publish for longer than its lease
// may publish that one batch (up to PipelineDepth batches handed to a
// PipelinedPublisher) after another relay already did: copies, same ids,
// possibly after later messages of their keys.
package relay
