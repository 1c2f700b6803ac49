// Package pgcdc is the change-data-capture source of the outbox: it reads
// outbox messages from a PostgreSQL logical replication slot with the
// built-in pgoutput plugin and publishes them, instead of polling the table.
// It does what Debezium's PostgreSQL connector and its outbox event router
// do, in the relay process: no JVM, no Kafka Connect.
//
//	r, err := pgcdc.New(pgcdc.Config{
//		DSN:       "postgres://app@db/app", // the role needs REPLICATION
//		Publisher: pub,                      // any exactly.Publisher
//	})
//	if err != nil { ... }
//	err = r.Run(ctx) // until ctx is cancelled, or a fatal error
//
// Applications keep writing with outbox.Enqueue in their own transaction;
// nothing changes on the write side. The server needs wal_level=logical
// and a free replication slot and WAL sender.
//
// # Sources
//
// Three kinds of writes are decoded from the same slot, in commit order:
//
//   - Rows of the exactly outbox table (Config.Table, default
//     exactly_outbox, created by outbox.Migrate): inserts with status
//     pending. This source is always on; the table also holds parked
//     messages.
//   - Rows of a Debezium-layout outbox table (Config.Debezium): columns id,
//     aggregatetype, aggregateid, type, payload, routed the way Debezium's
//     outbox event router routes them: topic "outbox.event.<aggregatetype>"
//     (configurable), key aggregateid, header "id" with the event id, which
//     is also Message.ID. Consumers written for Debezium keep working.
//     DebeziumTableSQL / MigrateDebezium create such a table and
//     EnqueueDebezium writes into it.
//   - Logical decoding messages (Config.Messages): Emit writes messages with
//     pg_logical_emit_message inside the caller's transaction, so nothing is
//     stored in a table and nothing needs vacuuming. Message.ID travels in
//     the message.
//
// Updates, deletes and truncates are ignored, with one exception: an update
// that makes a parked row of the exactly outbox table pending again
// (outbox.RetryDead, `exactly outbox dead retry`) re-drives it.
//
// # Guarantees
//
// At least once, never lost. A message is published if and only if its
// transaction committed: a rolled-back transaction never reaches the WAL
// stream. The relay confirms a position to PostgreSQL (the standby status
// update, which lets the server recycle WAL) only once every message at or
// below it was confirmed by the broker or durably parked; never the
// position it merely received. A restart of the relay, of PostgreSQL or of
// the broker resumes from the confirmed position: messages after it are
// decoded and published again, with the same Message.ID, and the consumer's
// inbox absorbs the copies.
//
// Per-key order: messages with the same Key reach the broker in commit
// order (and, within a transaction, in write order), with parallelism
// across keys. A failing message holds back only its own key: it backs off
// exponentially with jitter, and the messages of its key behind it wait
// (any the broker had already taken are published again after it). After
// MaxAttempts failures, or at once for an error wrapping
// exactly.ErrUnpublishable, the message is parked: its row in the exactly
// outbox table is marked dead with the last error, or, for messages that
// have no such row (Debezium layout, logical messages, rows the
// application already deleted), a dead row is inserted. The position is
// confirmed only after the park is committed. Parked messages are listed
// and re-driven like the polling relay's (outbox.ListDead, RetryDead, the
// CLI). Attempt counts live in memory: a restart gives a failing message a
// fresh count.
//
// Rows: after the broker confirmed a message from the exactly outbox table
// the relay deletes its row (in batches, asynchronously committed), so the
// table does not grow; the insert stays in the WAL until the position is
// confirmed, which happens after the delete. A transaction reaches the
// stream as soon as its commit is flushed, which can be before other
// sessions see it (a synchronous standby still to answer): a row is deleted
// or parked only once its transaction is visible, so none is left pending
// behind a confirmed position. With KeepRows the rows are left
// alone: delete them in the writing transaction (the insert is in the WAL
// all the same) or on your own schedule. Rows of a Debezium table are never
// deleted by the relay; Debezium users usually delete them in the same
// transaction, which works unchanged.
//
// First start: the relay creates the publication (or adds its tables to an
// existing one) and the slot. Rows that were already pending in the outbox
// table when the slot was created (an application moving from the polling
// relay) are read from the slot's exported snapshot and published before
// streaming starts, so nothing falls between the two.
//
// Undecodable input (a row whose values do not decode, a logical
// message that is not Emit's JSON) is parked at once with
// the reason, never skipped silently.
//
// Heartbeats: every HeartbeatInterval the relay writes a non-transactional
// logical message (prefix "exactly-heartbeat", ignored by the decoder).
// Its position is confirmed once nothing below it is pending, so an idle
// outbox does not pin WAL while other tables of the database are busy.
// PostgreSQL's keepalives are confirmed the same way.
//
// Slot lag: Stats and Hooks.Lag report the bytes of WAL the slot retains
// (pg_current_wal_lsn() - confirmed_flush_lsn) and the age in seconds of the
// oldest committed transaction received and not yet confirmed.
//
// A slot that disappears fails loudly and is never replaced silently. The
// relay records the slots it created in <schema>.exactly_cdc_slots; if a
// recorded slot is missing at start-up (dropped while the relay was down),
// Run returns ErrSlotLost; if it is dropped or invalidated (wal_status
// lost, max_slot_wal_keep_size) while running, Run returns ErrSlotLost or
// ErrSlotInvalidated. Changes the slot no longer holds may be gone; rows
// still pending in the outbox table show what is left (`exactly outbox
// status`). Removing a slot is a deliberate operator action: DropSlot drops
// it and forgets it, and the next Run starts afresh.
//
// # Exactly-once to Kafka
//
// With Config.ExactlyOnce set to a kafka.CDCExactlyOnce instead of a
// Publisher, each batch is one Kafka transaction holding the batch's
// records and a checkpoint record (key: the slot name, value: the position
// of the batch's last message) on a compacted checkpoint topic, the way
// Kafka Connect's exactly-once source connectors keep their offsets. The
// Kafka code lives in package kafka, behind the ExactlyOnceSink interface,
// so this package does not depend on franz-go. On start the relay fences any previous
// producer with the same transactional ID (aborting its open transaction),
// reads the last committed checkpoint (read_committed), skips every message
// at or below it, and only then confirms positions to PostgreSQL. A relay
// killed at any point, including between the Kafka commit and the
// PostgreSQL confirmation, leaves no duplicate in read_committed output.
// Batches are published in commit order as a whole (a transaction is
// all-or-nothing), so in this mode a failing message holds back every key
// until it succeeds or is parked. Two things stay at least once: the
// first start's backlog (rows pending before the slot existed, which have
// no WAL position to checkpoint) and re-driven parked rows.
//
// # Shutdown
//
// When the context is cancelled the relay stops reading, lets the batch
// being published finish for up to ShutdownTimeout, confirms what is done
// and closes the replication connection. Run returns nil then. It returns
// an error when it cannot start (bad configuration, missing privileges,
// wal_level not logical, ErrSlotLost) or when the slot is lost while
// running; connection failures (PostgreSQL restarting, the network), at
// start as well as later, are retried with backoff and do not end Run.
//
// # Limits
//
// While the relay cannot write to the database (deleting published rows,
// parking) it disconnects the stream and retries: nothing behind those
// writes is confirmed, and a server that is shutting down waits for its WAL
// senders to see their positions confirmed, so holding the stream open
// would hold the shutdown.
//
// One relay per slot: PostgreSQL lets one connection stream a slot at a
// time; a second relay waits and retries until the first one stops, which
// makes a simple standby. Do not run the polling relay on the same table as
// well, or messages go out twice (same ids). Order across keys is not kept.
// Attempt counts and backoff are not persisted. Messages received and not
// yet published are held in memory, up to MaxPending; above it the relay
// stops reading the stream until the broker catches up.
package pgcdc
