// Package inboxstore holds every SQL statement that touches the inbox table,
// for every dialect. The inbox package (Handle, HandleBatch, GC, Migrate) and
// the CLI go through it.
//
// The table has one row per (consumer, message id) that was processed, with
// the database clock at the time of the claim (Unix ms) for retention. A row
// is inserted by the claim, inside the transaction that applies the
// message's effect, so the row exists if and only if the effect committed.
package inboxstore

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/exactlyonce/exactly/internal/migrate"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// DefaultTable is the table used when none is configured.
const DefaultTable = "exactly_inbox"

// MaxConsumerLen bounds the consumer name, stored in an indexed column.
const MaxConsumerLen = 128

// Store knows the name and the SQL of one inbox table.
type Store struct {
	D     sqldb.Dialect
	Table sqldb.Ident
	t     string // quoted table
}

// New validates the dialect and table name.
func New(dialect, table string) (*Store, error) {
	d, err := sqldb.ParseDialect(dialect)
	if err != nil {
		return nil, fmt.Errorf("inbox: %w", err)
	}
	if table == "" {
		table = DefaultTable
	}
	id, err := sqldb.ParseIdent(table)
	if err != nil {
		return nil, fmt.Errorf("inbox: %w", err)
	}
	if d == sqldb.SQLite && id.Schema != "" {
		return nil, fmt.Errorf("inbox: table name %q: SQLite tables take no schema", table)
	}
	return &Store{D: d, Table: id, t: id.Quoted(d)}, nil
}

//go:embed migrations
var migrations embed.FS

// Scope is the name under which the migrations of this table are recorded.
func (s *Store) Scope() string { return "inbox:" + s.Table.String() }

// Migrator returns the migrator of this table.
func (s *Store) Migrator(db *sql.DB) (*migrate.Migrator, error) {
	data := map[string]string{
		"Table":        s.t,
		"IdxProcessed": s.D.Quote(s.Table.Name + "_processed_idx"),
	}
	steps, err := migrate.Load(migrations, "migrations", s.D, data)
	if err != nil {
		return nil, err
	}
	return &migrate.Migrator{DB: db, Dialect: s.D, Schema: s.Table.Schema, Scope: s.Scope(), Steps: steps, Check: s.CheckSchema}, nil
}

// columns are the inbox's columns: every statement of this package uses all
// of them, and the claim inserts all of them.
var columns = []sqldb.Want{{Name: "consumer", Kind: sqldb.Text}, {Name: "id", Kind: sqldb.Text}, {Name: "processed_at", Kind: sqldb.Int}}

// CheckSchema returns a *sqldb.SchemaError when the inbox table is missing
// or lacks a column the claim needs.
func (s *Store) CheckSchema(ctx context.Context, q sqldb.Querier) error {
	return sqldb.CheckColumns(ctx, q, s.D, s.Table, columns, []string{"consumer", "id", "processed_at"})
}

// Verify checks that the inbox table can be used, and says what to do when
// it cannot (see migrate.Migrator.Verify).
func (s *Store) Verify(ctx context.Context, db *sql.DB) error {
	m, err := s.Migrator(db)
	if err != nil {
		return err
	}
	if err := m.Verify(ctx, "inbox.SQL.Migrate, or `exactly migrate --only inbox --inbox-table "+s.Table.String()+"`"); err != nil {
		return fmt.Errorf("inbox %s is not usable: %w", s.Table, err)
	}
	return nil
}

// Tx is the part of a transaction the store needs, for *sql.Tx and pgx.Tx
// alike.
type Tx = sqldb.Tx

// Claim inserts the (consumer, id) row unless it exists, and reports whether
// it inserted it. A concurrent transaction that inserted the same row first
// makes this one wait for its outcome: a commit makes this claim a
// duplicate, a rollback lets it through. MySQL's INSERT IGNORE is safe here
// because ids and consumer names are validated to fit their columns before
// (it would otherwise truncate them silently).
func (s *Store) Claim(ctx context.Context, tx Tx, consumer, id string) (bool, error) {
	a := sqldb.NewArgs(s.D)
	n, err := tx.Exec(ctx, s.insert(a, consumer, []string{id}), a.Vals...)
	if err != nil {
		return false, err
	}
	return n == 1, nil
}

// maxRowsPerInsert keeps a multi-row claim under every dialect's placeholder
// limit (2 per row).
const maxRowsPerInsert = 1000

// ClaimBatch claims many ids in as few statements as possible and returns
// the ones it inserted. Duplicates in ids are claimed once. Rows are
// inserted in sorted order, so two batches that overlap lock their rows in
// the same order and cannot deadlock on each other.
func (s *Store) ClaimBatch(ctx context.Context, tx Tx, consumer string, ids []string) (map[string]bool, error) {
	ids = SortedIDs(ids)
	fresh := make(map[string]bool, len(ids))
	if tx.Pgx() {
		// One statement whatever the size, its text the same for every batch
		// (one prepared statement), the clock read once.
		got, err := tx.QueryStrings(ctx, s.insertPgx()+" ON CONFLICT (consumer, id) DO NOTHING RETURNING id", consumer, ids)
		if err != nil {
			return nil, err
		}
		for _, id := range got {
			fresh[id] = true
		}
		return fresh, nil
	}
	for start := 0; start < len(ids); start += maxRowsPerInsert {
		chunk := ids[start:min(start+maxRowsPerInsert, len(ids))]
		if s.D == sqldb.MySQL {
			if err := s.claimChunkMySQL(ctx, tx, consumer, chunk, fresh); err != nil {
				return nil, err
			}
			continue
		}
		a := sqldb.NewArgs(s.D)
		got, err := tx.QueryStrings(ctx, s.insert(a, consumer, chunk)+" RETURNING id", a.Vals...)
		if err != nil {
			return nil, err
		}
		for _, id := range got {
			fresh[id] = true
		}
	}
	return fresh, nil
}

// SortedIDs returns a sorted copy of ids without repeats: the order in
// which ClaimBatch and ClaimAllPgx insert them.
func SortedIDs(ids []string) []string {
	ids = slices.Clone(ids)
	slices.Sort(ids)
	return slices.Compact(ids)
}

// ClaimAllPgx is the claim of a batch of fresh messages on a pgx
// transaction that holds nothing else yet: one plain multi-row INSERT of
// ids (sorted, without repeats: SortedIDs), with no ON CONFLICT and no
// RETURNING, the least a claim costs. It returns true when it inserted
// every id. When one of them is claimed already (a unique violation, after
// waiting for a concurrent claim of it to commit), it returns false and a
// nil error: the statement failed and the transaction is aborted, so the
// caller rolls it back and claims with ClaimBatch in a new transaction,
// which tells the fresh ids from the others. Any other error is returned as
// is.
func (s *Store) ClaimAllPgx(ctx context.Context, tx Tx, consumer string, ids []string) (bool, error) {
	n, err := tx.Exec(ctx, s.insertPgx(), consumer, ids)
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "23505" && pgErr.TableName == s.Table.Name: // unique_violation
		return false, nil
	case err != nil:
		return false, err
	case n != int64(len(ids)):
		return false, fmt.Errorf("the claim inserted %d rows for %d ids", n, len(ids))
	}
	return true, nil
}

// insertPgx is the claim of the ids in $2 (a text array) for the consumer
// $1 on PostgreSQL, stamped with one reading of the database clock.
func (s *Store) insertPgx() string {
	return "INSERT INTO " + s.t + " (consumer, id, processed_at) SELECT $1, u.id, (SELECT " + s.D.NowMillis() +
		") FROM unnest($2::text[]) AS u(id)"
}

// claimChunkMySQL: MySQL has no INSERT ... RETURNING, so the affected-row
// count must tell which ids were new. All or none is the common case (a
// fresh batch, or a whole batch redelivered); a mix is claimed again one id
// at a time after rolling back to a savepoint.
func (s *Store) claimChunkMySQL(ctx context.Context, tx Tx, consumer string, ids []string, fresh map[string]bool) error {
	const savepoint = "exactly_inbox_claim"
	if _, err := tx.Exec(ctx, "SAVEPOINT "+savepoint); err != nil {
		return err
	}
	a := sqldb.NewArgs(s.D)
	n, err := tx.Exec(ctx, s.insert(a, consumer, ids), a.Vals...)
	if err != nil {
		return err
	}
	switch {
	case n == int64(len(ids)):
		for _, id := range ids {
			fresh[id] = true
		}
		return nil
	case n == 0:
		return nil
	}
	if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT "+savepoint); err != nil {
		return err
	}
	for _, id := range ids {
		ok, err := s.Claim(ctx, tx, consumer, id)
		if err != nil {
			return err
		}
		if ok {
			fresh[id] = true
		}
	}
	return nil
}

// insert renders the claim of ids, stamped with the database clock.
func (s *Store) insert(a *sqldb.Args, consumer string, ids []string) string {
	var b strings.Builder
	if s.D == sqldb.MySQL {
		b.WriteString("INSERT IGNORE INTO ")
	} else {
		b.WriteString("INSERT INTO ")
	}
	b.WriteString(s.t + " (consumer, id, processed_at) VALUES ")
	now := s.D.NowMillis()
	for i, id := range ids {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString("(" + a.Add(consumer) + "," + a.Add(id) + "," + now + ")")
	}
	if s.D != sqldb.MySQL {
		b.WriteString(" ON CONFLICT (consumer, id) DO NOTHING")
	}
	return b.String()
}

// NowMillis reads the database clock in Unix milliseconds, the clock the
// claims are stamped with.
func (s *Store) NowMillis(ctx context.Context, db *sql.DB) (int64, error) {
	var now int64
	err := db.QueryRowContext(ctx, "SELECT "+s.D.NowMillis()).Scan(&now)
	return now, err
}

// DeleteBefore removes up to limit of consumer's rows claimed before
// cutoff (Unix ms, database clock) and returns how many it removed. The
// cutoff is a parameter, never a clock expression, so that the planner can
// walk the (consumer, processed_at) index: each call is cheap whatever the
// size of the table, and keeps its locks short.
func (s *Store) DeleteBefore(ctx context.Context, db *sql.DB, consumer string, cutoff int64, limit int) (int64, error) {
	a := sqldb.NewArgs(s.D)
	var q string
	switch s.D {
	case sqldb.MySQL:
		// ORDER BY the whole index, so the range scan stops after limit rows
		// instead of sorting every expired row.
		q = "DELETE FROM " + s.t + " WHERE consumer = " + a.Add(consumer) + " AND processed_at < " + a.Add(cutoff) +
			" ORDER BY consumer, processed_at LIMIT " + a.Add(limit)
	case sqldb.Postgres:
		// A TID scan: "id IN (subquery)" makes the planner hash-join every
		// row of the consumer.
		q = "DELETE FROM " + s.t + " WHERE ctid = ANY(ARRAY(SELECT ctid FROM " + s.t +
			" WHERE consumer = " + a.Add(consumer) + " AND processed_at < " + a.Add(cutoff) +
			" ORDER BY processed_at LIMIT " + a.Add(limit) + "))"
	default:
		q = "DELETE FROM " + s.t + " WHERE consumer = " + a.Add(consumer) + " AND id IN (SELECT id FROM " + s.t +
			" WHERE consumer = " + a.Add(consumer) + " AND processed_at < " + a.Add(cutoff) +
			" ORDER BY processed_at LIMIT " + a.Add(limit) + ")"
	}
	res, err := db.ExecContext(ctx, q, a.Vals...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}
