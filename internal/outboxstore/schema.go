package outboxstore

import (
	"context"
	"database/sql"

	"github.com/exactlyonce/exactly/internal/sqldb"
)

// The columns the outbox's statements read and write, per table. The SQL of
// this package and of pgcdc needs every one of them. The lease and relay
// tables must not have other NOT NULL columns without a default (the relay
// inserts their rows); the outbox itself may: services that write it with
// plain INSERTs may fill them, and the relays only read and update it.
var (
	outboxColumns = []sqldb.Want{
		{Name: "seq", Kind: sqldb.Int}, {Name: "id", Kind: sqldb.Text}, {Name: "topic", Kind: sqldb.Text},
		{Name: "msg_key", Kind: sqldb.Text}, {Name: "key_hash", Kind: sqldb.Int}, {Name: "payload", Kind: sqldb.Bytes},
		{Name: "headers", Kind: sqldb.Text}, {Name: "created_at", Kind: sqldb.Int}, {Name: "status", Kind: sqldb.Int},
		{Name: "attempts", Kind: sqldb.Int}, {Name: "next_attempt_at", Kind: sqldb.Int},
		{Name: "last_error", Kind: sqldb.Text}, {Name: "done_at", Kind: sqldb.Int},
	}

	leaseColumns  = []sqldb.Want{{Name: "part", Kind: sqldb.Int}, {Name: "owner", Kind: sqldb.Text}, {Name: "expires_at", Kind: sqldb.Int}}
	leaseInserted = []string{"part", "owner", "expires_at"}

	relayColumns  = []sqldb.Want{{Name: "owner", Kind: sqldb.Text}, {Name: "heartbeat_at", Kind: sqldb.Int}}
	relayInserted = []string{"owner", "heartbeat_at"}
)

// CheckSchema returns a *sqldb.SchemaError naming the first of the outbox's
// tables (the outbox, its leases, its relays) that is missing or lacks
// columns the code needs.
func (s *Store) CheckSchema(ctx context.Context, q sqldb.Querier) error {
	for _, t := range []struct {
		id       sqldb.Ident
		want     []sqldb.Want
		inserted []string
	}{
		{s.Table, outboxColumns, nil},
		{s.Table.Derived("_leases"), leaseColumns, leaseInserted},
		{s.Table.Derived("_relays"), relayColumns, relayInserted},
	} {
		if err := sqldb.CheckColumns(ctx, q, s.D, t.id, t.want, t.inserted); err != nil {
			return err
		}
	}
	return nil
}

// MigrateHint says how to apply the outbox's migrations.
func (s *Store) MigrateHint() string {
	return "outbox.Migrate, or `exactly migrate --only outbox --table " + s.Table.String() + "`"
}

// Verify checks that the outbox's tables can be used, and says what to do
// when they cannot (see migrate.Migrator.Verify).
func (s *Store) Verify(ctx context.Context, db *sql.DB) error {
	m, err := s.Migrator(db)
	if err != nil {
		return err
	}
	return m.Verify(ctx, s.MigrateHint())
}
