package outboxstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"time"

	"github.com/exactlyonce/exactly/internal/sqldb"
)

// The statements below serve the operators' views (the console): the
// leases and heartbeats of the relays, a message found by id whatever its
// status, and the rows sent recently.

// Lease is one partition of the lease table.
type Lease struct {
	Part      int64
	Owner     string // "" when free
	ExpiresAt time.Time
}

// Leases returns the lease table's rows in partition order; none when the
// table has no partitioned relay yet.
func (s *Store) Leases(ctx context.Context, db *sql.DB) ([]Lease, error) {
	rows, err := db.QueryContext(ctx, "SELECT part, owner, expires_at FROM "+s.leases+" ORDER BY part")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Lease
	for rows.Next() {
		var l Lease
		var owner sql.NullString
		var expires int64
		if err := rows.Scan(&l.Part, &owner, &expires); err != nil {
			return nil, err
		}
		l.Owner = owner.String
		if expires > 0 {
			l.ExpiresAt = time.UnixMilli(expires)
		}
		out = append(out, l)
	}
	return out, rows.Err()
}

// RelayBeat is a relay's last heartbeat.
type RelayBeat struct {
	Owner       string
	HeartbeatAt time.Time
}

// Heartbeats returns the relays that sent a heartbeat recently enough to be
// kept (Heartbeat deletes those silent for ten lease periods), by owner.
func (s *Store) Heartbeats(ctx context.Context, db *sql.DB) ([]RelayBeat, error) {
	rows, err := db.QueryContext(ctx, "SELECT owner, heartbeat_at FROM "+s.relays+" ORDER BY owner")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []RelayBeat
	for rows.Next() {
		var b RelayBeat
		var at int64
		if err := rows.Scan(&b.Owner, &at); err != nil {
			return nil, err
		}
		b.HeartbeatAt = time.UnixMilli(at)
		out = append(out, b)
	}
	return out, rows.Err()
}

// Found is a row found by id, in any status.
type Found struct {
	Row
	Status int // StatusPending, StatusSent or StatusDead
	// RawHeaders is the stored headers column as it is ("" for NULL);
	// Msg.Headers holds it parsed when it is a JSON object of strings.
	RawHeaders string
	LastError  string
	DoneAt     time.Time // sent or parked at; zero while pending
}

// FindByID returns the rows with this id, in sequence order: usually one, more
// when a producer enqueued the same id twice. It reads the whole table (the
// id has no index of its own): an operator's lookup, not a hot path.
func (s *Store) FindByID(ctx context.Context, db *sql.DB, id string) ([]Found, error) {
	a := sqldb.NewArgs(s.D)
	rows, err := db.QueryContext(ctx, "SELECT "+s.cols+", status, last_error, done_at FROM "+s.t+" WHERE id = "+a.Add(id)+" ORDER BY seq", a.Vals...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Found
	for rows.Next() {
		var f Found
		var headers, lastErr sql.NullString
		var created int64
		var doneAt sql.NullInt64
		if err := rows.Scan(&f.Seq, &f.Msg.ID, &f.Msg.Topic, &f.Msg.Key, &f.KeyHash, &f.Msg.Payload, &headers,
			&created, &f.Attempts, &f.NextAttemptAt, &f.Status, &lastErr, &doneAt); err != nil {
			return nil, err
		}
		f.Msg.CreatedAt = time.UnixMicro(created)
		if headers.Valid && headers.String != "" {
			f.RawHeaders = headers.String
			_ = json.Unmarshal([]byte(headers.String), &f.Msg.Headers) // shown raw when not a flat object
		}
		f.LastError = lastErr.String
		if doneAt.Valid {
			f.DoneAt = time.UnixMilli(doneAt.Int64)
		}
		out = append(out, f)
	}
	return out, rows.Err()
}

// HighWater is the greatest seq in the table, 0 when it is empty: what was
// enqueued so far, up to the gaps that rolled-back inserts leave.
func (s *Store) HighWater(ctx context.Context, db *sql.DB) (int64, error) {
	var hw sql.NullInt64
	err := db.QueryRowContext(ctx, "SELECT max(seq) FROM "+s.t).Scan(&hw)
	return hw.Int64, err
}

// SentSince counts per topic the rows marked sent at or after sinceMillis.
// Only a relay that keeps sent rows (a retention) leaves any: one that
// deletes them on publish leaves none to count.
func (s *Store) SentSince(ctx context.Context, db *sql.DB, sinceMillis int64) (map[string]int64, error) {
	a := sqldb.NewArgs(s.D)
	rows, err := db.QueryContext(ctx, "SELECT topic, count(*) FROM "+s.t+" WHERE status = 1 AND done_at >= "+a.Add(sinceMillis)+" GROUP BY topic", a.Vals...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var topic string
		var n int64
		if err := rows.Scan(&topic, &n); err != nil {
			return nil, err
		}
		out[topic] = n
	}
	return out, rows.Err()
}
