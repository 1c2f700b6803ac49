package outboxstore

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// This file holds the statements the CDC relay (pgcdc) needs beyond the
// polling relay's: parking a message that may have no row, and reading one
// row back when an operator re-drives it. PostgreSQL only.

// QuotedTable is the outbox table, quoted, schema included.
func (s *Store) QuotedTable() string { return s.t }

// Park is a message to park as dead. Seq names its row in the outbox table,
// or is 0 when it has none (a Debezium-layout row, a logical message, a row
// the application deleted).
type Park struct {
	Seq      int64
	Msg      *exactly.Message
	Attempts int
	Err      string
}

// ParkPgx parks messages in one transaction: the row is marked dead with its
// last error when it exists, and a dead row is inserted otherwise (unless a
// dead row with the same id is already there), so that every parked message
// is listed by ListDead and can be re-driven.
func (s *Store) ParkPgx(ctx context.Context, db PgxConn, parks []Park, nowMillis int64) error {
	if len(parks) == 0 {
		return nil
	}
	if s.D != sqldb.Postgres {
		return fmt.Errorf("outbox: ParkPgx needs PostgreSQL, not %s", s.D)
	}
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	for _, p := range parks {
		msg := p.Err
		if len(msg) > maxErrorLen {
			msg = msg[:maxErrorLen]
		}
		var headers any
		if len(p.Msg.Headers) > 0 {
			raw, err := json.Marshal(p.Msg.Headers)
			if err != nil {
				return fmt.Errorf("outbox: message %s: headers: %w", p.Msg.ID, err)
			}
			headers = string(raw)
		}
		payload := p.Msg.Payload
		if payload == nil {
			payload = []byte{}
		}
		created := p.Msg.CreatedAt
		if created.IsZero() {
			created = time.UnixMilli(nowMillis)
		}
		// One statement either way: the update when the row exists, the
		// insert when it does not.
		b.Queue(`WITH upd AS (
    UPDATE `+s.t+` SET status = 2, attempts = $1::integer, last_error = $2::text, done_at = $3::bigint
    WHERE seq = $4::bigint AND status <> 1 RETURNING 1)
INSERT INTO `+s.t+` (id, topic, msg_key, key_hash, payload, headers, created_at, status, attempts, last_error, done_at)
SELECT $5::varchar, $6::varchar, $7::varchar, $8::integer, $9::bytea, $10::text, $11::bigint, 2, $1::integer, $2::text, $3::bigint
WHERE NOT EXISTS (SELECT 1 FROM upd)
  AND NOT EXISTS (SELECT 1 FROM `+s.t+` WHERE status = 2 AND id = $5::varchar)`,
			p.Attempts, msg, nowMillis, p.Seq,
			p.Msg.ID, p.Msg.Topic, p.Msg.Key, KeyHash(p.Msg), payload, headers, created.UnixMicro())
	}
	b.Queue("COMMIT")
	return db.SendBatch(ctx, b).Close()
}

// PendingRowPgx reads the row seq if it is pending. It reports false when
// the row is gone or not pending.
func (s *Store) PendingRowPgx(ctx context.Context, db PgxConn, seq int64) (Row, bool, error) {
	rows, err := s.FetchPgx(ctx, db, FetchQuery{Limit: 1, After: seq - 1, NowMillis: 1 << 62})
	if err != nil {
		return Row{}, false, err
	}
	if len(rows) == 0 || rows[0].Seq != seq {
		return Row{}, false, nil
	}
	return rows[0], true, nil
}

// PendingSnapshotPgx reads every pending row in seq order, through tx (the
// CDC relay reads it in the snapshot its replication slot exported).
func (s *Store) PendingSnapshotPgx(ctx context.Context, tx PgxConn, fn func(Row) error) error {
	after := int64(0)
	for {
		rows, err := s.FetchPgx(ctx, tx, FetchQuery{Limit: 5000, After: after, NowMillis: 1 << 62})
		if err != nil {
			return err
		}
		for _, r := range rows {
			if err := fn(r); err != nil {
				return err
			}
			after = r.Seq
		}
		if len(rows) < 5000 {
			return nil
		}
	}
}

// DeleteRowsPgx deletes rows by seq in a transaction committed without
// waiting for the WAL flush (see MarkSentPgx).
func (s *Store) DeleteRowsPgx(ctx context.Context, db PgxConn, seqs []int64) error {
	return s.MarkSentPgx(ctx, db, seqs, false, 0, true)
}
