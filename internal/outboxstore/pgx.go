package outboxstore

import (
	"context"
	"encoding/binary"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// PgxConn is what the relay's PostgreSQL path needs of pgx: a *pgxpool.Pool
// or a *pgx.Conn. The statements are the same as the database/sql ones
// (rendered by the same functions); only the driver path differs, which
// saves database/sql's per-column conversions.
type PgxConn interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
}

// FetchPgx is Fetch through pgx (PostgreSQL only). Rows that cannot be
// published as stored are parked, as Fetch parks them, unless q.KeepBad.
func (s *Store) FetchPgx(ctx context.Context, db PgxConn, q FetchQuery) ([]Row, error) {
	for {
		out, err := s.fetchPgx(ctx, db, q)
		if err != nil || q.KeepBad {
			return out, err
		}
		out, badRows, bad := splitBad(out)
		if len(bad) == 0 {
			return out, nil
		}
		if err := s.RecordFailuresPgx(ctx, db, bad, time.Now().UnixMilli()); err != nil {
			return nil, err
		}
		if q.Parked != nil {
			q.Parked(badRows)
		}
	}
}

func (s *Store) fetchPgx(ctx context.Context, db PgxConn, q FetchQuery) ([]Row, error) {
	query, args := s.fetchSQL(q)
	rows, err := db.Query(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := make([]Row, 0, min(q.Limit, 1024))
	fast := binaryRow(rows.FieldDescriptions())
	for rows.Next() {
		var r Row
		if fast {
			decodeBinaryRow(&r, rows.RawValues())
		} else {
			var headers []byte
			var created int64
			if err := rows.Scan(&r.Seq, &r.Msg.ID, &r.Msg.Topic, &r.Msg.Key, &r.KeyHash, &r.Msg.Payload, &headers,
				&created, &r.Attempts, &r.NextAttemptAt); err != nil {
				return nil, err
			}
			r.Msg.CreatedAt = time.UnixMicro(created)
			r.Msg.Headers, r.Bad = ParseHeaders(headers)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// The column types of s.cols, in order, as PostgreSQL reports them.
var fetchOIDs = [...]uint32{20, 1043, 1043, 1043, 23, 17, 25, 20, 23, 20}

// binaryRow reports whether the result has the expected columns in binary
// format (pgx's default for these types), so that decodeBinaryRow applies.
func binaryRow(fds []pgconn.FieldDescription) bool {
	if len(fds) != len(fetchOIDs) {
		return false
	}
	for i, fd := range fds {
		if fd.DataTypeOID != fetchOIDs[i] {
			return false
		}
		// Text-like columns are the same bytes in both formats.
		switch fd.DataTypeOID {
		case 1043, 25:
		default:
			if fd.Format != pgx.BinaryFormatCode {
				return false
			}
		}
	}
	return true
}

// decodeBinaryRow fills r from the raw values of one row (see binaryRow).
// Every value is copied: raw values live only until the next row.
func decodeBinaryRow(r *Row, v [][]byte) {
	r.Seq = int64(binary.BigEndian.Uint64(v[0]))
	// One allocation for the three short strings.
	all := string(v[1]) + string(v[2]) + string(v[3])
	r.Msg.ID = all[:len(v[1])]
	r.Msg.Topic = all[len(v[1]) : len(v[1])+len(v[2])]
	r.Msg.Key = all[len(v[1])+len(v[2]):]
	r.KeyHash = int32(binary.BigEndian.Uint32(v[4]))
	r.Msg.Payload = append(make([]byte, 0, len(v[5])), v[5]...)
	r.Msg.Headers, r.Bad = ParseHeaders(v[6]) // nil for NULL and ''
	r.Msg.CreatedAt = time.UnixMicro(int64(binary.BigEndian.Uint64(v[7])))
	r.Attempts = int(int32(binary.BigEndian.Uint32(v[8])))
	r.NextAttemptAt = int64(binary.BigEndian.Uint64(v[9]))
}

// MarkSentPgx is MarkSent through pgx, in one round trip. With async the
// transaction commits with synchronous_commit off: it does not wait for the
// WAL flush, so a crash of the database can lose the mark (never the row),
// and the message is then published again with the same id.
func (s *Store) MarkSentPgx(ctx context.Context, db PgxConn, seqs []int64, retain bool, nowMillis int64, async bool) error {
	if len(seqs) == 0 {
		return nil
	}
	q, args := s.markSQL(seqs, retain, nowMillis)
	if !async {
		_, err := db.Exec(ctx, q, args...)
		return err
	}
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	b.Queue("SET LOCAL synchronous_commit TO OFF")
	b.Queue(q, args...)
	b.Queue("COMMIT")
	return db.SendBatch(ctx, b).Close()
}

// RecordFailuresPgx is RecordFailures through pgx, in one round trip.
func (s *Store) RecordFailuresPgx(ctx context.Context, db PgxConn, fs []Failure, nowMillis int64) error {
	if len(fs) == 0 {
		return nil
	}
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	for _, f := range fs {
		q, args := s.failureSQL(f, nowMillis)
		b.Queue(q, args...)
	}
	b.Queue("COMMIT")
	return db.SendBatch(ctx, b).Close()
}
