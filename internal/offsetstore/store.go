// Package offsetstore keeps Kafka consumer positions in the database, so an
// effect and the position after it commit in one transaction. Every SQL
// statement about the offsets table lives here.
package offsetstore

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"time"

	"github.com/exactlyonce/exactly/internal/migrate"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// DefaultTable is the offsets table used when none is configured.
const DefaultTable = "exactly_kafka_offsets"

// Store knows the SQL of one offsets table.
type Store struct {
	D     sqldb.Dialect
	Table sqldb.Ident
	t     string
}

// New validates the dialect and the table name.
func New(dialect, table string) (*Store, error) {
	d, err := sqldb.ParseDialect(dialect)
	if err != nil {
		return nil, err
	}
	if table == "" {
		table = DefaultTable
	}
	id, err := sqldb.ParseIdent(table)
	if err != nil {
		return nil, err
	}
	if d == sqldb.SQLite && id.Schema != "" {
		return nil, fmt.Errorf("table name %q: SQLite tables take no schema", table)
	}
	return &Store{D: d, Table: id, t: id.Quoted(d)}, nil
}

//go:embed migrations
var migrations embed.FS

// Migrator returns the migrator of this table.
func (s *Store) Migrator(db *sql.DB) (*migrate.Migrator, error) {
	steps, err := migrate.Load(migrations, "migrations", s.D, map[string]string{"Table": s.t})
	if err != nil {
		return nil, err
	}
	return &migrate.Migrator{DB: db, Dialect: s.D, Schema: s.Table.Schema, Scope: "kafka_offsets:" + s.Table.String(), Steps: steps,
		Check: s.CheckSchema}, nil
}

// columns are the offsets table's columns: Load and Advance use them all.
var columns = []sqldb.Want{
	{Name: "consumer_group", Kind: sqldb.Text}, {Name: "topic", Kind: sqldb.Text}, {Name: "part", Kind: sqldb.Int},
	{Name: "next_offset", Kind: sqldb.Int}, {Name: "updated_at", Kind: sqldb.Int},
}

// CheckSchema returns a *sqldb.SchemaError when the offsets table is missing
// or lacks a column the consumer needs.
func (s *Store) CheckSchema(ctx context.Context, q sqldb.Querier) error {
	return sqldb.CheckColumns(ctx, q, s.D, s.Table, columns, []string{"consumer_group", "topic", "part", "next_offset", "updated_at"})
}

// Verify checks that the offsets table can be used, and says what to do
// when it cannot (see migrate.Migrator.Verify).
func (s *Store) Verify(ctx context.Context, db *sql.DB) error {
	m, err := s.Migrator(db)
	if err != nil {
		return err
	}
	if err := m.Verify(ctx, "kafka.MigrateOffsets, or `exactly migrate --only offsets --offsets-table "+s.Table.String()+"`"); err != nil {
		return fmt.Errorf("Kafka offsets table %s is not usable: %w", s.Table, err)
	}
	return nil
}

// Load returns the stored next offset of a partition, or -1 when none is
// stored yet.
func (s *Store) Load(ctx context.Context, db *sql.DB, group, topic string, part int32) (int64, error) {
	a := sqldb.NewArgs(s.D)
	var next int64
	err := db.QueryRowContext(ctx, "SELECT next_offset FROM "+s.t+" WHERE consumer_group = "+a.Add(group)+
		" AND topic = "+a.Add(topic)+" AND part = "+a.Add(part), a.Vals...).Scan(&next)
	if errors.Is(err, sql.ErrNoRows) {
		return -1, nil
	}
	return next, err
}

// ErrFenced means another consumer advanced the partition first: the caller
// no longer owns it (or owns a stale view of it) and must roll back.
var ErrFenced = errors.New("offset fenced: another consumer advanced this partition")

// Advance moves the partition from expected to next inside tx, by
// compare-and-set; expected -1 means no row is stored yet. It returns
// ErrFenced when the stored offset is not expected.
func (s *Store) Advance(ctx context.Context, tx *sql.Tx, group, topic string, part int32, expected, next int64) error {
	a := sqldb.NewArgs(s.D)
	now := time.Now().UnixMilli()
	var q string
	if expected < 0 {
		vals := "(" + a.Add(group) + ", " + a.Add(topic) + ", " + a.Add(part) + ", " + a.Add(next) + ", " + a.Add(now) + ")"
		if s.D == sqldb.MySQL {
			q = "INSERT IGNORE INTO " + s.t + " (consumer_group, topic, part, next_offset, updated_at) VALUES " + vals
		} else {
			q = "INSERT INTO " + s.t + " (consumer_group, topic, part, next_offset, updated_at) VALUES " + vals + " ON CONFLICT DO NOTHING"
		}
	} else {
		q = "UPDATE " + s.t + " SET next_offset = " + a.Add(next) + ", updated_at = " + a.Add(now) +
			" WHERE consumer_group = " + a.Add(group) + " AND topic = " + a.Add(topic) + " AND part = " + a.Add(part) +
			" AND next_offset = " + a.Add(expected)
	}
	res, err := tx.ExecContext(ctx, q, a.Vals...)
	if err != nil {
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n != 1 {
		return fmt.Errorf("%w (%s/%d: expected next offset %d)", ErrFenced, topic, part, expected)
	}
	return nil
}
