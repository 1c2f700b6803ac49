// Package outbox is the transactional outbox: messages are written into an
// outbox table inside the application's own business transaction, so they
// exist if and only if that transaction commits. The relay package then
// publishes them to a broker, at least once, with their ids.
//
//	tx, _ := pool.Begin(ctx)
//	// ... business writes ...
//	ob.Enqueue(ctx, tx, &exactly.Message{Topic: "order.created", Key: orderID, Payload: body})
//	tx.Commit(ctx) // or Rollback: then no trace of the message is left
//
// The guarantees, in plain words:
//
//   - Atomic: the message commits or rolls back with the business rows.
//   - Identified: each message gets its ID here (a UUIDv7 unless the caller
//     set one) and keeps it through every retry and redelivery.
//   - Ordered per key: rows get an increasing sequence number; the relay
//     publishes messages with the same Key in that order, provided the
//     application does not write the same key from two concurrent
//     transactions (serialize per aggregate, as any aggregate store does).
//
// Dialects: PostgreSQL (pgx.Tx or *sql.Tx from pgx's stdlib driver),
// MySQL 8 / MariaDB 10.6+ (go-sql-driver/mysql) and SQLite (modernc.org/sqlite,
// no cgo). The schema comes from versioned migrations embedded in the module,
// applied by Migrate or `exactly migrate`, which record what they applied in
// exactly_migrations.
package outbox
