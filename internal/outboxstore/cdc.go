package outboxstore

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

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
// the row is gone or not pending. A row that cannot be published as stored
// is returned with Row.Bad set, for the caller to park.
func (s *Store) PendingRowPgx(ctx context.Context, db PgxConn, seq int64) (Row, bool, error) {
	rows, err := s.FetchPgx(ctx, db, FetchQuery{Limit: 1, After: seq - 1, NowMillis: 1 << 62, KeepBad: true})
	if err != nil {
		return Row{}, false, err
	}
	if len(rows) == 0 || rows[0].Seq != seq {
		return Row{}, false, nil
	}
	return rows[0], true, nil
}

// PendingSnapshotPgx reads every pending row in seq order, through tx (the
// CDC relay reads it in the snapshot its replication slot exported). Rows
// that cannot be published as stored come with Row.Bad set: tx may be
// read-only, and the caller parks them.
func (s *Store) PendingSnapshotPgx(ctx context.Context, tx PgxConn, fn func(Row) error) error {
	after := int64(0)
	for {
		rows, err := s.FetchPgx(ctx, tx, FetchQuery{Limit: 5000, After: after, NowMillis: 1 << 62, KeepBad: true})
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
// waiting for the WAL flush (see MarkSentPgx), and reports how many rows it
// deleted. A row whose inserting transaction is not visible yet is not
// deleted: logical decoding hands out a commit once its WAL is flushed,
// before other sessions see it (see RunningXidsPgx).
func (s *Store) DeleteRowsPgx(ctx context.Context, db PgxConn, seqs []int64) (int64, error) {
	if len(seqs) == 0 {
		return 0, nil
	}
	if s.D != sqldb.Postgres {
		return 0, fmt.Errorf("outbox: DeleteRowsPgx needs PostgreSQL, not %s", s.D)
	}
	q, args := s.markSQL(seqs, false, 0)
	var n int64
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	b.Queue("SET LOCAL synchronous_commit TO OFF")
	b.Queue(q, args...).Exec(func(ct pgconn.CommandTag) error {
		n = ct.RowsAffected()
		return nil
	})
	b.Queue("COMMIT")
	if err := db.SendBatch(ctx, b).Close(); err != nil {
		return 0, err
	}
	return n, nil
}

// RunningXidsPgx returns those of xids (32-bit transaction ids, as
// pgoutput's Begin message carries them; 0 for none) whose transactions
// other sessions do not see as ended yet, in one query. A decoded
// transaction is committed in the WAL, but its rows become visible only once
// the server marks it ended, which with synchronous replication waits for
// the standby: a statement run before that does not see them.
func RunningXidsPgx(ctx context.Context, db PgxConn, xids []uint32) ([]uint32, error) {
	if len(xids) == 0 {
		return nil, nil
	}
	rows, err := db.Query(ctx, "SELECT pg_current_snapshot()::text")
	if err != nil {
		return nil, err
	}
	snap, err := pgx.CollectExactlyOneRow(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	return runningIn(snap, xids)
}

// runningIn returns those of xids that snap (pg_snapshot's text form,
// xmin:xmax:xip,...) does not see as ended. A 32-bit xid is widened to the
// 64-bit one nearest to the snapshot's xmax (transaction ids wrap around;
// a decoded one is never 2^31 transactions away from the current ones).
func runningIn(snap string, xids []uint32) ([]uint32, error) {
	bad := func() ([]uint32, error) { return nil, fmt.Errorf("outbox: unexpected snapshot %q", snap) }
	xminS, rest, ok1 := strings.Cut(snap, ":")
	xmaxS, xipS, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 {
		return bad()
	}
	xmin, err1 := strconv.ParseUint(xminS, 10, 64)
	xmax, err2 := strconv.ParseUint(xmaxS, 10, 64)
	if err1 != nil || err2 != nil {
		return bad()
	}
	var xip map[uint64]bool
	if xipS != "" {
		xip = map[uint64]bool{}
		for f := range strings.SplitSeq(xipS, ",") {
			x, err := strconv.ParseUint(f, 10, 64)
			if err != nil {
				return bad()
			}
			xip[x] = true
		}
	}
	var running []uint32
	for _, x := range xids {
		if x < 3 { // none, or a special (bootstrap, frozen) id
			continue
		}
		full := int64(xmax) - int64(int32(uint32(xmax)-x))
		switch {
		case full < int64(xmin):
			// ended before every running transaction began
		case full >= int64(xmax) || xip[uint64(full)]:
			running = append(running, x)
		}
	}
	return running, nil
}
