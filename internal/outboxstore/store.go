// Package outboxstore holds every SQL statement that touches the outbox
// tables, for every dialect. The outbox package (Enqueue, Migrate, admin) and
// the relay both go through it.
package outboxstore

import (
	"context"
	"database/sql"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/migrate"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// Row status values.
const (
	StatusPending = 0
	StatusSent    = 1
	StatusDead    = 2
)

// Store knows the names and the SQL of one outbox table.
type Store struct {
	D      sqldb.Dialect
	Table  sqldb.Ident
	t      string // quoted table
	leases string
	relays string
	cols   string
}

// New validates the dialect and table name.
func New(dialect, table string) (*Store, error) {
	d, err := sqldb.ParseDialect(dialect)
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	if table == "" {
		table = "exactly_outbox"
	}
	id, err := sqldb.ParseIdent(table)
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	if d == sqldb.SQLite && id.Schema != "" {
		return nil, fmt.Errorf("outbox: table name %q: SQLite tables take no schema", table)
	}
	return &Store{
		D: d, Table: id,
		t:      id.Quoted(d),
		leases: id.Derived("_leases").Quoted(d),
		relays: id.Derived("_relays").Quoted(d),
		cols:   "seq, id, topic, msg_key, key_hash, payload, headers, created_at, attempts, next_attempt_at",
	}, nil
}

//go:embed migrations
var migrations embed.FS

// Migrator returns the migrator of this table.
func (s *Store) Migrator(db *sql.DB) (*migrate.Migrator, error) {
	d := s.D
	unq := func(suffix string) string { return d.Quote(s.Table.Name + suffix) }
	data := map[string]string{
		"Table":      s.t,
		"Leases":     s.leases,
		"Relays":     s.relays,
		"IdxPending": unq("_pending_idx"),
		"IdxSent":    unq("_sent_idx"),
		"IdxDead":    unq("_dead_idx"),
		"Trigger":    unq("_notify"),
		"NotifyFunc": s.Table.Derived("_notify").Quoted(d),
		"Channel":    "'" + s.Channel() + "'",
		// Migration 2 (plain INSERTs).
		"KeyHashFunc": s.Table.Derived("_key_hash").Quoted(d),
		"UUIDFunc":    s.Table.Derived("_uuidv7").Quoted(d),
		"FillFunc":    s.Table.Derived("_fill").Quoted(d),
		"FillTrigger": unq("_fill"),
		"IdxNoHash":   unq("_nohash_idx"),
		"Rebuilt":     unq("_rebuild"),
		"Guard":       unq("_migration_guard"),
		"TableLit":    literal(s.Table.Name),
		"RebuiltLit":  literal(s.Table.Name + "_rebuild"),
	}
	if d == sqldb.MySQL {
		data["FillTrigger"] = s.Table.Derived("_fill").Quoted(d) // a trigger lives in its table's schema
	}
	steps, err := migrate.Load(migrations, "migrations", d, data)
	if err != nil {
		return nil, err
	}
	return &migrate.Migrator{DB: db, Dialect: d, Schema: s.Table.Schema, Scope: "outbox:" + s.Table.String(), Steps: steps,
		Check: s.CheckSchema}, nil
}

// literal is s as an SQL string literal.
func literal(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// Channel is the PostgreSQL NOTIFY channel that wakes relays of this table.
func (s *Store) Channel() string { return "exactly_outbox:" + s.Table.String() }

// KeyHash spreads keys over relay partitions: FNV-1a of the key, or of the
// id for unkeyed messages, as a non-negative int32.
func KeyHash(m *exactly.Message) int32 {
	h := fnv.New32a()
	if m.Key != "" {
		h.Write([]byte(m.Key))
	} else {
		h.Write([]byte(m.ID))
	}
	return int32(h.Sum32() & 0x7fffffff)
}

// maxRowsPerInsert keeps a multi-row INSERT under every dialect's
// placeholder limit (7 per row).
const maxRowsPerInsert = 1000

// InsertBatches renders the INSERT statements that store msgs. The messages
// must be valid and carry their ID and CreatedAt.
func (s *Store) InsertBatches(msgs []*exactly.Message) ([]string, [][]any, error) {
	var qs []string
	var args [][]any
	for start := 0; start < len(msgs); start += maxRowsPerInsert {
		end := min(start+maxRowsPerInsert, len(msgs))
		a := sqldb.NewArgs(s.D)
		var b strings.Builder
		b.WriteString("INSERT INTO " + s.t + " (id, topic, msg_key, key_hash, payload, headers, created_at) VALUES ")
		for i, m := range msgs[start:end] {
			if i > 0 {
				b.WriteByte(',')
			}
			var headers any
			if len(m.Headers) > 0 {
				raw, err := json.Marshal(m.Headers)
				if err != nil {
					return nil, nil, fmt.Errorf("outbox: message %s: headers: %w", m.ID, err)
				}
				headers = string(raw)
			}
			payload := m.Payload
			if payload == nil {
				payload = []byte{}
			}
			b.WriteString("(" + a.Add(m.ID) + "," + a.Add(m.Topic) + "," + a.Add(m.Key) + "," + a.Add(KeyHash(m)) + "," +
				a.Add(payload) + "," + a.Add(headers) + "," + a.Add(m.CreatedAt.UnixMicro()) + ")")
		}
		qs = append(qs, b.String())
		args = append(args, a.Vals)
	}
	return qs, args, nil
}

// Row is an outbox row as the relay sees it.
type Row struct {
	Seq           int64
	Msg           exactly.Message
	KeyHash       int32
	Attempts      int
	NextAttemptAt int64 // Unix ms
	// Bad says why the row cannot be published as it is stored (headers
	// that are not a JSON object of strings, written by a service with
	// plain SQL). Fetch parks such rows itself and never returns them,
	// unless FetchQuery.KeepBad asks for them.
	Bad error
}

// FetchQuery selects the next pending rows in sequence order.
type FetchQuery struct {
	Limit      int
	Partitions int     // total partitions; 0 or 1 means no partition filter
	Owned      []int64 // partitions this relay holds; ignored when it holds all
	AllOwned   bool
	After      int64    // when positive, only rows with a greater seq
	Exclude    []int64  // seqs in flight
	Blocked    []string // keys waiting for an earlier message's retry
	NowMillis  int64
	// KeepBad returns the rows that cannot be published with Row.Bad set,
	// instead of parking them (for a read-only transaction: the CDC
	// relay's snapshot read parks them itself).
	KeepBad bool
	// Parked, when set, is called with the rows Fetch parked (each with
	// its Bad reason) once they are recorded as dead, so that the relay
	// logs them and runs its hooks as for any parked message.
	Parked func(rows []Row)
}

// Fetch returns pending rows in seq order. Unkeyed rows still in backoff are
// left out; keyed rows are returned even in backoff so that the caller sees
// the key is blocked (a later row of the same key must wait for it).
//
// A row that cannot be published as it is stored (see Row.Bad) is parked
// with the reason as its last error, and the rows after it are fetched in
// its place: such a row never reaches a broker and never holds the relay
// up. On SQLite, which has no stored functions, Fetch first fills the
// key_hash of rows written without one (see FillKeyHashes).
func (s *Store) Fetch(ctx context.Context, db *sql.DB, q FetchQuery) ([]Row, error) {
	if s.D == sqldb.SQLite {
		if err := s.FillKeyHashes(ctx, db); err != nil {
			return nil, err
		}
	}
	for {
		query, args := s.fetchSQL(q)
		rows, err := db.QueryContext(ctx, query, args...)
		if err != nil {
			return nil, err
		}
		out, err := scanRows(rows)
		if err != nil || q.KeepBad {
			return out, err
		}
		out, badRows, bad := splitBad(out)
		if len(bad) == 0 {
			return out, nil
		}
		if err := s.RecordFailures(ctx, db, bad, time.Now().UnixMilli()); err != nil {
			return nil, err
		}
		if q.Parked != nil {
			q.Parked(badRows)
		}
	}
}

// splitBad takes the rows that cannot be published out of rows, and
// returns them and the failures that park them.
func splitBad(rows []Row) (good, badRows []Row, bad []Failure) {
	good = rows[:0]
	for _, r := range rows {
		if r.Bad != nil {
			badRows = append(badRows, r)
			bad = append(bad, Failure{Seq: r.Seq, Attempts: r.Attempts, Err: ParkedReason(r.Bad), Dead: true})
			continue
		}
		good = append(good, r)
	}
	return good, badRows, bad
}

// ParkedReason is the last error of a row parked because it cannot be
// published as it is stored (Row.Bad).
func ParkedReason(bad error) string { return "not publishable as stored: " + bad.Error() }

// FillKeyHashes stores the key_hash of rows written without one (SQLite
// only: a plain INSERT there leaves it NULL, having no stored function to
// compute it). The value is KeyHash's, the one a Go writer stores, so the
// partition of a row never depends on who wrote it; every relay computes
// the same value, so it does not matter which one fills it. Rows without
// their key_hash, and the rows after them, are never fetched.
func (s *Store) FillKeyHashes(ctx context.Context, db *sql.DB) error {
	for {
		a := sqldb.NewArgs(s.D)
		rows, err := db.QueryContext(ctx, "SELECT seq, id, msg_key FROM "+s.t+" WHERE key_hash IS NULL ORDER BY seq LIMIT "+a.Add(fillBatch), a.Vals...)
		if err != nil {
			return err
		}
		type fill struct {
			seq  int64
			hash int32
		}
		var fills []fill
		for rows.Next() {
			var f fill
			var m exactly.Message
			if err := rows.Scan(&f.seq, &m.ID, &m.Key); err != nil {
				rows.Close()
				return err
			}
			f.hash = KeyHash(&m)
			fills = append(fills, f)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return err
		}
		if len(fills) == 0 {
			return nil
		}
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		for _, f := range fills {
			a := sqldb.NewArgs(s.D)
			if _, err := tx.ExecContext(ctx, "UPDATE "+s.t+" SET key_hash = "+a.Add(f.hash)+" WHERE seq = "+a.Add(f.seq)+" AND key_hash IS NULL", a.Vals...); err != nil {
				tx.Rollback()
				return err
			}
		}
		if err := tx.Commit(); err != nil {
			return err
		}
		if len(fills) < fillBatch {
			return nil
		}
	}
}

// fillBatch is how many rows one transaction of FillKeyHashes fills.
const fillBatch = 1000

// fetchSQL renders the statement of Fetch (and of FetchPgx).
func (s *Store) fetchSQL(q FetchQuery) (string, []any) {
	a := sqldb.NewArgs(s.D)
	var b strings.Builder
	b.WriteString("SELECT " + s.cols + " FROM " + s.t + " WHERE status = 0")
	if s.D == sqldb.SQLite {
		// A row a plain INSERT wrote since FillKeyHashes ran has no
		// key_hash yet: it is filled before the next read. Nothing after
		// it is read either, in this one snapshot, or a later row of its
		// key (a Go writer's, with its key_hash) would be published first
		// and the cursor would pass it by. The partial index on seq WHERE
		// key_hash IS NULL makes the bound one index probe.
		b.WriteString(" AND seq < coalesce((SELECT min(seq) FROM " + s.t + " WHERE key_hash IS NULL), 9223372036854775807)")
	}
	if q.After > 0 {
		b.WriteString(" AND seq > " + a.Add(q.After))
	}
	b.WriteString(" AND (msg_key <> '' OR next_attempt_at <= " + a.Add(q.NowMillis) + ")")
	if !q.AllOwned && q.Partitions > 1 {
		b.WriteString(" AND " + sqldb.In(a, "key_hash % "+a.Add(q.Partitions), q.Owned, false))
	}
	switch {
	case len(q.Exclude) > 0 && s.D == sqldb.Postgres:
		// A hashed subplan: one probe per row scanned. "seq <> ALL($n)"
		// compares each row with every seq in flight, and the rows in
		// flight are the ones the index scan walks first, so its cost grows
		// with the square of what is in flight (35 ms at 4,000).
		b.WriteString(" AND seq NOT IN (SELECT unnest(" + a.Add(q.Exclude) + "::bigint[]))")
	case len(q.Exclude) > 0:
		b.WriteString(" AND " + sqldb.In(a, "seq", q.Exclude, true))
	}
	if len(q.Blocked) > 0 {
		b.WriteString(" AND " + sqldb.In(a, "msg_key", q.Blocked, true))
	}
	b.WriteString(" ORDER BY seq LIMIT " + a.Add(q.Limit))
	return b.String(), a.Vals
}

func scanRows(rows *sql.Rows) ([]Row, error) {
	defer rows.Close()
	var out []Row
	for rows.Next() {
		var r Row
		var headers sql.NullString
		var created int64
		if err := rows.Scan(&r.Seq, &r.Msg.ID, &r.Msg.Topic, &r.Msg.Key, &r.KeyHash, &r.Msg.Payload, &headers,
			&created, &r.Attempts, &r.NextAttemptAt); err != nil {
			return nil, err
		}
		r.Msg.CreatedAt = time.UnixMicro(created)
		if headers.Valid {
			r.Msg.Headers, r.Bad = ParseHeaders([]byte(headers.String))
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// MarkSent deletes the rows (retain=false) or marks them sent at nowMillis.
func (s *Store) MarkSent(ctx context.Context, db *sql.DB, seqs []int64, retain bool, nowMillis int64) error {
	if len(seqs) == 0 {
		return nil
	}
	q, args := s.markSQL(seqs, retain, nowMillis)
	_, err := db.ExecContext(ctx, q, args...)
	return err
}

func (s *Store) markSQL(seqs []int64, retain bool, nowMillis int64) (string, []any) {
	a := sqldb.NewArgs(s.D)
	var q string
	if retain {
		q = "UPDATE " + s.t + " SET status = 1, done_at = " + a.Add(nowMillis) + " WHERE " + sqldb.In(a, "seq", seqs, false)
	} else {
		q = "DELETE FROM " + s.t + " WHERE " + sqldb.In(a, "seq", seqs, false)
	}
	return q, a.Vals
}

// Failure is the outcome of a failed publish of one row.
type Failure struct {
	Seq           int64
	Attempts      int
	NextAttemptAt int64
	Err           string
	Dead          bool
}

// maxErrorLen bounds the stored error text.
const maxErrorLen = 2000

// RecordFailures stores attempts, backoff and last error, parking the dead.
func (s *Store) RecordFailures(ctx context.Context, db *sql.DB, fs []Failure, nowMillis int64) error {
	if len(fs) == 0 {
		return nil
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, f := range fs {
		q, args := s.failureSQL(f, nowMillis)
		if _, err := tx.ExecContext(ctx, q, args...); err != nil {
			return err
		}
	}
	return tx.Commit()
}

func (s *Store) failureSQL(f Failure, nowMillis int64) (string, []any) {
	msg := f.Err
	if len(msg) > maxErrorLen {
		msg = msg[:maxErrorLen]
	}
	a := sqldb.NewArgs(s.D)
	var q string
	if f.Dead {
		q = "UPDATE " + s.t + " SET status = 2, attempts = " + a.Add(f.Attempts) + ", last_error = " + a.Add(msg) +
			", done_at = " + a.Add(nowMillis) + " WHERE seq = " + a.Add(f.Seq) + " AND status = 0"
	} else {
		q = "UPDATE " + s.t + " SET attempts = " + a.Add(f.Attempts) + ", last_error = " + a.Add(msg) +
			", next_attempt_at = " + a.Add(f.NextAttemptAt) + " WHERE seq = " + a.Add(f.Seq) + " AND status = 0"
	}
	return q, a.Vals
}

// DeleteSentBefore removes up to limit rows sent before cutoffMillis and
// returns how many it removed. Small batches keep locks short and let
// autovacuum keep up.
func (s *Store) DeleteSentBefore(ctx context.Context, db *sql.DB, cutoffMillis int64, limit int) (int64, error) {
	a := sqldb.NewArgs(s.D)
	var q string
	switch s.D {
	case sqldb.MySQL:
		q = "DELETE FROM " + s.t + " WHERE status = 1 AND done_at < " + a.Add(cutoffMillis) + " ORDER BY done_at LIMIT " + a.Add(limit)
	default:
		q = "DELETE FROM " + s.t + " WHERE seq IN (SELECT seq FROM " + s.t + " WHERE status = 1 AND done_at < " +
			a.Add(cutoffMillis) + " ORDER BY done_at LIMIT " + a.Add(limit) + ")"
	}
	res, err := db.ExecContext(ctx, q, a.Vals...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// CheckTables fails with a clear error when the outbox's tables are missing
// or lack columns the relay needs: it names the table and the columns, and
// says whether to apply the migrations or how to reset them (a table
// dropped by hand). A database that cannot be reached is reported as is, so
// that callers can tell it from a missing table with sqldb.Transient.
func (s *Store) CheckTables(ctx context.Context, db *sql.DB) error {
	if err := s.Verify(ctx, db); err != nil {
		return fmt.Errorf("outbox %s is not usable: %w", s.Table, err)
	}
	return nil
}

// LeaseTable is the quoted name of the lease table.
func (s *Store) LeaseTable() string { return s.leases }

// GrowOwner holds the partitions a relay added to a table, for one lease
// period, so that they are not taken while relays with the old count run.
const GrowOwner = "exactly:grown"

// ErrPartitionMismatch means relays disagree on the partition count.
var ErrPartitionMismatch = errors.New("partition count mismatch")

// EnsurePartitions creates the lease rows for n partitions, and refuses to go
// on when the table was set up for another count (relays would then disagree
// on which rows belong to whom).
//
// Growing a table that had fewer partitions creates the new rows leased to
// GrowOwner for ttl: relays still running with the old count see the change
// at their next renewal and stop, and until then nobody can take a new
// partition whose keys an old relay still publishes.
func (s *Store) EnsurePartitions(ctx context.Context, db *sql.DB, n int, ttl time.Duration) error {
	var have int
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM "+s.leases).Scan(&have); err != nil {
		return err
	}
	if have == n {
		return nil
	}
	if have > n {
		return fmt.Errorf("%w: %s has %d partitions, this relay is configured with %d; run every relay with the same Partitions",
			ErrPartitionMismatch, s.leases, have, n)
	}
	// One statement for all the rows: a relay starting at the same moment
	// sees none of them or all of them, never a half-made set-up it would
	// take for a smaller partition count.
	owner, expires := "NULL", "0"
	if have > 0 {
		owner, expires = "'"+GrowOwner+"'", fmt.Sprintf("%s + %d", s.D.NowMillis(), ttl.Milliseconds())
	}
	var rows strings.Builder
	for p := have; p < n; p++ {
		if rows.Len() > 0 {
			rows.WriteString(", ")
		}
		fmt.Fprintf(&rows, "(%d, %s, %s)", p, owner, expires)
	}
	var q string
	switch s.D {
	case sqldb.MySQL:
		q = "INSERT IGNORE INTO " + s.leases + " (part, owner, expires_at) VALUES " + rows.String()
	default:
		q = "INSERT INTO " + s.leases + " (part, owner, expires_at) VALUES " + rows.String() + " ON CONFLICT (part) DO NOTHING"
	}
	if _, err := db.ExecContext(ctx, q); err != nil {
		return err
	}
	if have > 0 {
		return fmt.Errorf("%w: %s had %d partitions, grown to %d; stop relays configured with %d", ErrPartitionMismatch, s.leases, have, n, have)
	}
	return nil
}

// Heartbeat records that owner is alive and returns the number of live
// relays (heartbeat within ttl), itself included, and the number of
// partitions the lease table holds now (another relay may have grown it).
func (s *Store) Heartbeat(ctx context.Context, db *sql.DB, owner string, ttl time.Duration) (live, partitions int, err error) {
	now := s.D.NowMillis()
	a := sqldb.NewArgs(s.D)
	var q string
	switch s.D {
	case sqldb.MySQL:
		q = "INSERT INTO " + s.relays + " (owner, heartbeat_at) VALUES (" + a.Add(owner) + ", " + now + ") ON DUPLICATE KEY UPDATE heartbeat_at = VALUES(heartbeat_at)"
	default:
		q = "INSERT INTO " + s.relays + " (owner, heartbeat_at) VALUES (" + a.Add(owner) + ", " + now + ") ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
	}
	if _, err := db.ExecContext(ctx, q, a.Vals...); err != nil {
		return 0, 0, err
	}
	a = sqldb.NewArgs(s.D)
	if _, err := db.ExecContext(ctx, "DELETE FROM "+s.relays+" WHERE heartbeat_at < "+now+" - "+a.Add(10*ttl.Milliseconds()), a.Vals...); err != nil {
		return 0, 0, err
	}
	a = sqldb.NewArgs(s.D)
	err = db.QueryRowContext(ctx, "SELECT (SELECT count(*) FROM "+s.relays+" WHERE heartbeat_at > "+now+" - "+a.Add(ttl.Milliseconds())+
		"), (SELECT count(*) FROM "+s.leases+")", a.Vals...).Scan(&live, &partitions)
	return live, partitions, err
}

// Leave removes owner's heartbeat and releases its leases, so the others
// take over at once instead of waiting for the leases to expire.
func (s *Store) Leave(ctx context.Context, db *sql.DB, owner string) error {
	a := sqldb.NewArgs(s.D)
	if _, err := db.ExecContext(ctx, "UPDATE "+s.leases+" SET owner = NULL, expires_at = 0 WHERE owner = "+a.Add(owner), a.Vals...); err != nil {
		return err
	}
	a = sqldb.NewArgs(s.D)
	_, err := db.ExecContext(ctx, "DELETE FROM "+s.relays+" WHERE owner = "+a.Add(owner), a.Vals...)
	return err
}

// Renew extends owner's live leases and returns the partitions it holds.
func (s *Store) Renew(ctx context.Context, db *sql.DB, owner string, ttl time.Duration) ([]int64, error) {
	now := s.D.NowMillis()
	a := sqldb.NewArgs(s.D)
	if _, err := db.ExecContext(ctx, "UPDATE "+s.leases+" SET expires_at = "+now+" + "+a.Add(ttl.Milliseconds())+
		" WHERE owner = "+a.Add(owner), a.Vals...); err != nil {
		return nil, err
	}
	a = sqldb.NewArgs(s.D)
	return queryInts(ctx, db, "SELECT part FROM "+s.leases+" WHERE owner = "+a.Add(owner)+" ORDER BY part", a.Vals...)
}

// Acquire takes up to want free or expired partitions for owner and returns
// the ones it got. Each is a compare-and-set, so two relays never both win.
func (s *Store) Acquire(ctx context.Context, db *sql.DB, owner string, want int, ttl time.Duration) ([]int64, error) {
	if want <= 0 {
		return nil, nil
	}
	now := s.D.NowMillis()
	free, err := queryInts(ctx, db, "SELECT part FROM "+s.leases+" WHERE owner IS NULL OR expires_at < "+now+" ORDER BY part")
	if err != nil {
		return nil, err
	}
	var got []int64
	for _, p := range free {
		if len(got) == want {
			break
		}
		a := sqldb.NewArgs(s.D)
		res, err := db.ExecContext(ctx, "UPDATE "+s.leases+" SET owner = "+a.Add(owner)+", expires_at = "+now+" + "+a.Add(ttl.Milliseconds())+
			" WHERE part = "+a.Add(p)+" AND (owner IS NULL OR expires_at < "+now+")", a.Vals...)
		if err != nil {
			return got, err
		}
		if n, _ := res.RowsAffected(); n == 1 {
			got = append(got, p)
		}
	}
	return got, nil
}

// Release gives partitions back.
func (s *Store) Release(ctx context.Context, db *sql.DB, owner string, parts []int64) error {
	if len(parts) == 0 {
		return nil
	}
	a := sqldb.NewArgs(s.D)
	_, err := db.ExecContext(ctx, "UPDATE "+s.leases+" SET owner = NULL, expires_at = 0 WHERE owner = "+a.Add(owner)+
		" AND "+sqldb.In(a, "part", parts, false), a.Vals...)
	return err
}

func queryInts(ctx context.Context, db *sql.DB, q string, args ...any) ([]int64, error) {
	rows, err := db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []int64
	for rows.Next() {
		var v int64
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// Backlog is the size and age of the pending part of the outbox.
type Backlog struct {
	Pending   int64
	Dead      int64
	OldestAge time.Duration // age of the oldest pending message; 0 when none
	Failing   Failing
}

// Failing summarises the pending rows whose last publish failed: attempts
// above 0, a last error and a next attempt are stored in them. (A whole
// publisher outage spends no attempt, so its rows are not among them.)
type Failing struct {
	// Messages is how many pending messages failed at least once.
	Messages int64
	// BlockedKeys is how many keys have such a message at their head: the
	// messages of the key behind it wait until it is published or parked.
	BlockedKeys int64
	// OldestAge is the age (since it was enqueued) of the oldest of those
	// messages; 0 when none is failing.
	OldestAge time.Duration
}

// Backlog counts pending rows and the age of the oldest, and the failing
// ones among them, in one scan of the pending rows.
func (s *Store) Backlog(ctx context.Context, db *sql.DB) (Backlog, error) {
	var b Backlog
	var oldest, failing, blocked, oldestFailing sql.NullInt64
	if err := db.QueryRowContext(ctx, "SELECT count(*), min(created_at), "+
		"SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END), "+
		"COUNT(DISTINCT CASE WHEN attempts > 0 AND msg_key <> '' THEN "+s.exactKey()+" END), "+
		"MIN(CASE WHEN attempts > 0 THEN created_at END) "+
		"FROM "+s.t+" WHERE status = 0").Scan(&b.Pending, &oldest, &failing, &blocked, &oldestFailing); err != nil {
		return b, err
	}
	if oldest.Valid {
		b.OldestAge = max(time.Since(time.UnixMicro(oldest.Int64)), 0)
	}
	b.Failing.Messages, b.Failing.BlockedKeys = failing.Int64, blocked.Int64
	if oldestFailing.Valid {
		b.Failing.OldestAge = max(time.Since(time.UnixMicro(oldestFailing.Int64)), 0)
	}
	err := db.QueryRowContext(ctx, "SELECT count(*) FROM "+s.t+" WHERE status = 2").Scan(&b.Dead)
	return b, err
}

// exactKey is msg_key compared byte for byte: MySQL's default collations
// take "K" and "k" for one key.
func (s *Store) exactKey() string {
	if s.D == sqldb.MySQL {
		return "CAST(msg_key AS BINARY)"
	}
	return "msg_key"
}

// Blocked is a pending message whose last publish failed. It is the head of
// its key: the key's later messages wait for it.
type Blocked struct {
	ID            string
	Topic         string
	Key           string // "" for an unkeyed message, which holds back only itself
	Attempts      int
	LastError     string
	NextAttemptAt time.Time
	Age           time.Duration // since it was enqueued
	// Waiting is how many pending messages the key has, this one included.
	Waiting int64
}

// ListBlocked returns up to limit failing pending messages, oldest first.
func (s *Store) ListBlocked(ctx context.Context, db *sql.DB, limit int) ([]Blocked, error) {
	a := sqldb.NewArgs(s.D)
	rows, err := db.QueryContext(ctx, "SELECT id, topic, msg_key, attempts, last_error, next_attempt_at, created_at FROM "+s.t+
		" WHERE status = 0 AND attempts > 0 ORDER BY seq LIMIT "+a.Add(limit), a.Vals...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Blocked
	var keys []string
	for rows.Next() {
		var b Blocked
		var lastErr sql.NullString
		var next, created int64
		if err := rows.Scan(&b.ID, &b.Topic, &b.Key, &b.Attempts, &lastErr, &next, &created); err != nil {
			return nil, err
		}
		b.LastError = lastErr.String
		b.NextAttemptAt = time.UnixMilli(next)
		b.Age = max(time.Since(time.UnixMicro(created)), 0)
		b.Waiting = 1
		if b.Key != "" {
			keys = append(keys, b.Key)
		}
		out = append(out, b)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return out, nil
	}
	a = sqldb.NewArgs(s.D)
	k := s.exactKey()
	counts, err := db.QueryContext(ctx, "SELECT "+k+", count(*) FROM "+s.t+" WHERE status = 0 AND "+
		sqldb.In(a, k, keys, false)+" GROUP BY "+k, a.Vals...)
	if err != nil {
		return nil, err
	}
	defer counts.Close()
	waiting := map[string]int64{}
	for counts.Next() {
		var k string
		var n int64
		if err := counts.Scan(&k, &n); err != nil {
			return nil, err
		}
		waiting[k] = n
	}
	for i := range out {
		if n, ok := waiting[out[i].Key]; ok && out[i].Key != "" {
			out[i].Waiting = n
		}
	}
	return out, counts.Err()
}

// DeadFilter selects dead rows. Zero fields match everything.
type DeadFilter struct {
	IDs   []string
	Topic string
	Key   string
	Limit int
}

func (s *Store) deadWhere(a *sqldb.Args, f DeadFilter) string {
	w := "status = 2"
	if len(f.IDs) > 0 {
		w += " AND " + sqldb.In(a, "id", f.IDs, false)
	}
	if f.Topic != "" {
		w += " AND topic = " + a.Add(f.Topic)
	}
	if f.Key != "" {
		w += " AND msg_key = " + a.Add(f.Key)
	}
	return w
}

// DeadRow is a parked message.
type DeadRow struct {
	Row
	LastError string
	DeadAt    time.Time
}

// ListDead returns parked messages, oldest first.
func (s *Store) ListDead(ctx context.Context, db *sql.DB, f DeadFilter) ([]DeadRow, error) {
	a := sqldb.NewArgs(s.D)
	q := "SELECT " + s.cols + ", last_error, done_at FROM " + s.t + " WHERE " + s.deadWhere(a, f) + " ORDER BY seq"
	if f.Limit > 0 {
		q += " LIMIT " + a.Add(f.Limit)
	}
	rows, err := db.QueryContext(ctx, q, a.Vals...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []DeadRow
	for rows.Next() {
		var d DeadRow
		var headers, lastErr sql.NullString
		var created int64
		var doneAt sql.NullInt64
		if err := rows.Scan(&d.Seq, &d.Msg.ID, &d.Msg.Topic, &d.Msg.Key, &d.KeyHash, &d.Msg.Payload, &headers,
			&created, &d.Attempts, &d.NextAttemptAt, &lastErr, &doneAt); err != nil {
			return nil, err
		}
		d.Msg.CreatedAt = time.UnixMicro(created)
		if headers.Valid && headers.String != "" {
			_ = json.Unmarshal([]byte(headers.String), &d.Msg.Headers)
		}
		d.LastError = lastErr.String
		if doneAt.Valid {
			d.DeadAt = time.UnixMilli(doneAt.Int64)
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// RetryDead makes parked messages pending again with a fresh attempt count.
// They keep their id and their place in the sequence.
func (s *Store) RetryDead(ctx context.Context, db *sql.DB, f DeadFilter) (int64, error) {
	a := sqldb.NewArgs(s.D)
	q := "UPDATE " + s.t + " SET status = 0, attempts = 0, next_attempt_at = 0, done_at = NULL WHERE " + s.deadWhere(a, f)
	res, err := db.ExecContext(ctx, q, a.Vals...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// PurgeDead deletes parked messages. It is the only way a message leaves the
// outbox unpublished, and only by an operator's decision.
func (s *Store) PurgeDead(ctx context.Context, db *sql.DB, f DeadFilter) (int64, error) {
	a := sqldb.NewArgs(s.D)
	res, err := db.ExecContext(ctx, "DELETE FROM "+s.t+" WHERE "+s.deadWhere(a, f), a.Vals...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// TopicStatus is the backlog of one topic.
type TopicStatus struct {
	Topic     string
	Pending   int64
	Dead      int64
	OldestAge time.Duration
}

// StatusByTopic summarises pending and dead rows per topic.
func (s *Store) StatusByTopic(ctx context.Context, db *sql.DB) ([]TopicStatus, error) {
	rows, err := db.QueryContext(ctx, "SELECT topic, "+
		"SUM(CASE WHEN status = 0 THEN 1 ELSE 0 END), SUM(CASE WHEN status = 2 THEN 1 ELSE 0 END), "+
		"MIN(CASE WHEN status = 0 THEN created_at END) FROM "+s.t+" WHERE status IN (0, 2) GROUP BY topic ORDER BY topic")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []TopicStatus
	for rows.Next() {
		var ts TopicStatus
		var oldest sql.NullInt64
		if err := rows.Scan(&ts.Topic, &ts.Pending, &ts.Dead, &oldest); err != nil {
			return nil, err
		}
		if oldest.Valid {
			ts.OldestAge = max(time.Since(time.UnixMicro(oldest.Int64)), 0)
		}
		out = append(out, ts)
	}
	return out, rows.Err()
}
