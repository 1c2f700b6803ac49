// Package inbox is the idempotent consumer: it wraps a message handler so
// that its effect is applied once per message ID, however often the broker
// delivers the message. Brokers deliver at least once: a consumer that
// crashes after its effect and before its ack, a lost ack, a rebalance that
// hands a partition to another member mid-batch, a re-publish after a
// timeout all bring a message back. Every message carries a stable ID from
// the outbox on (exactly.Message.ID); the inbox remembers which IDs a
// consumer has processed and turns the copies into no-ops.
//
// Two stores are provided.
//
// # SQL: exact
//
// [SQL] keeps one row per (consumer, message ID) in a table of the
// database the handler writes to. [SQL.Handle] begins a transaction,
// inserts the row (INSERT ... ON CONFLICT DO NOTHING on PostgreSQL and
// SQLite, INSERT IGNORE on MySQL/MariaDB), runs the handler with that same
// transaction and commits:
//
//	ib, err := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Consumer: "billing"})
//	...
//	h := ib.PgxHandler(pool, func(ctx context.Context, tx pgx.Tx, msg *exactly.Message) error {
//		_, err := tx.Exec(ctx, "INSERT INTO invoices (order_id, body) VALUES ($1, $2)", msg.Key, msg.Payload)
//		return err
//	})
//	// h is an exactly.Handler: give it to a Kafka, NATS or AMQP consumer.
//
// The guarantees, in plain words:
//
//   - Once: the dedup row and the handler's writes commit together, so the
//     effect is applied exactly once per ID and consumer, whatever crashes
//     or redeliveries happen around it. A redelivery after the commit is a
//     [Duplicate]: the handler does not run and the delivery is
//     acknowledged.
//   - Never lost: a handler that fails or panics rolls back the row with
//     its writes, so the message is retried, never marked done. A crash
//     before the commit leaves nothing behind either.
//   - Concurrent copies wait: a second delivery of a message being handled
//     blocks on the row lock until the first commits (it is then a
//     duplicate) or rolls back (it then runs).
//   - Per consumer: Config.Consumer is part of the key, so several
//     consumers of one message sharing a database each apply it once.
//
// The one limit is retention: [SQL.GC] deletes old rows (or the CLI's
// `exactly inbox gc`), and a message redelivered after its row was deleted
// is applied again. Keep the rows longer than the broker can redeliver: its
// retention, the longest a consumer may be down before its position is
// reset, any replay an operator may start.
//
// [SQL.HandleBatch] claims a whole batch in one statement and runs the
// handler once for the fresh messages, in one transaction: much higher
// throughput, at the price of all-or-nothing batches (one failure rolls
// back and retries the whole batch).
//
// The table comes from versioned migrations embedded in the module, applied
// by [SQL.Migrate] or `exactly migrate` and recorded in exactly_migrations.
// Dialects: PostgreSQL (pgx, or database/sql with any driver), MySQL 8 /
// MariaDB 10.6+ (go-sql-driver/mysql) and SQLite (modernc.org/sqlite; set a
// busy_timeout, since SQLite has one writer at a time and a delivery that
// finds the database locked otherwise fails at once, to be retried).
//
// # Redis: at most one runner at a time, not exact
//
// [Redis] is for handlers whose effect is not in a database the inbox can
// share a transaction with: a call to another service, an e-mail, a
// message published elsewhere, or an effect that is idempotent anyway. For
// each delivery it takes a lease on the message key, runs the handler, then
// replaces the lease with a done marker that lives for a TTL. A copy that
// arrives while the lease is held is refused with [ErrInProgress] and
// retried later; a copy that finds the done marker is a duplicate. A
// handler that fails or panics releases its lease (only if it still holds
// it) so the retry runs at once; it is never marked done. Unlike a
// deduplicator that marks a message before handling it, a failed handler
// never loses the message.
//
// It costs two plain commands per message: SET key token NX PX lease GET to
// take the lease (the reply says whether the key was free, done or leased
// by another runner) and SET key done PX ttl GET to write the marker (the
// reply says whether the lease was still this runner's). [Redis.HandleBatch]
// pipelines each step for the whole batch. Only the release after a failure
// is a Lua script (compare the token, then delete). SET with both NX and GET
// needs Redis 7.0 or later; on an older server the inbox notices the first
// refused SET and from then on takes leases and writes markers with Lua
// scripts, with the same outcomes and more Redis CPU per message.
//
// Its limits, stated plainly:
//
//   - The effect and the marker are not atomic. A crash after the effect
//     and before the done marker is written leaves only the lease, which
//     expires; the redelivery then applies the effect again. This is the
//     window that the SQL inbox closes and this one cannot.
//   - A handler that outlives its lease can overlap with a redelivery: once
//     the lease expires another runner may claim the message and run its
//     own copy. The handler's context ends with its lease to make this
//     unlikely for handlers that honour it. When the first runner finishes
//     it still writes the done marker (its effect is applied) and reports
//     the lost lease through Hooks.LeaseExpired and Stats.Overlapped: the
//     effect may have been applied twice. Set RedisConfig.Lease well above
//     the handler's worst case.
//   - The done marker expires after RedisConfig.TTL; a redelivery after that
//     applies the effect again. The TTL must be longer than the broker's
//     redelivery horizon.
//   - Redis replicates asynchronously: a failover can lose recent markers
//     and leases (and so can a restart without persistence), and a lost
//     marker means a redelivery is applied again.
//   - A handler that reports failure for an effect that did take place
//     makes the inbox release the lease, and the retry applies the effect
//     again. A database commit cut short by the handler's context can end
//     that way: the consumer stops or the lease ends while the COMMIT is at
//     the server, the server commits, and the client gives up on the reply
//     (pgx returns the context's error). Commit with a context the consumer's
//     shutdown does not cancel (context.WithoutCancel, bounded by the
//     deadline of the context h was given), as exactly demo does.
//
// # Both
//
// A message without an ID is refused with [ErrNoID] and its handler never
// runs: it could not be deduplicated. Through a consumer it is retried and
// then dead-lettered with that reason, never silently processed.
//
// [Outcome] says what a delivery came to: [Processed] and [Duplicate] may
// be acknowledged, [Retry] may not. The Handler methods turn both of the
// first two into a nil error, so any consumer taking an exactly.Handler
// acknowledges them. [Hooks] and Stats report processed messages,
// suppressed duplicates and failures for metrics.
package inbox
