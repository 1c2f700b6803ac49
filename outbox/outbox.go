package outbox

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/migrate"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// The dialects an outbox can live in.
const (
	Postgres = "postgres"
	MySQL    = "mysql" // MySQL 8 and MariaDB 10.6+
	SQLite   = "sqlite"
)

// DefaultTable is the table name used when Config.Table is empty.
const DefaultTable = "exactly_outbox"

// Config names the outbox table and the database it lives in.
type Config struct {
	// Dialect is "postgres", "mysql" (also MariaDB) or "sqlite". Required.
	Dialect string
	// Table is the outbox table, optionally schema-qualified ("app.outbox").
	// Default "exactly_outbox". Only letters, digits and underscores are
	// accepted; the relay's tables are named after it (<table>_leases,
	// <table>_relays).
	Table string
	// Tracer, when set, stores the trace context of Enqueue's ctx in each
	// message's headers (W3C traceparent with exactlyotel.New), so the
	// consumer's span joins the trace of the transaction that wrote the
	// message. Default nil: no tracing, no header added.
	Tracer exactly.Tracer
}

// Outbox writes messages into the outbox table inside the caller's
// transaction, and applies the table's migrations.
type Outbox struct {
	store  *outboxstore.Store
	tracer exactly.Tracer
}

// New validates cfg. An unknown dialect or an unsafe table name is an error
// naming the problem; nothing is ever interpolated unchecked.
func New(cfg Config) (*Outbox, error) {
	s, err := outboxstore.New(cfg.Dialect, cfg.Table)
	if err != nil {
		return nil, err
	}
	return &Outbox{store: s, tracer: cfg.Tracer}, nil
}

// Dialect returns the configured dialect.
func (o *Outbox) Dialect() string { return string(o.store.D) }

// Table returns the table name as configured.
func (o *Outbox) Table() string { return o.store.Table.String() }

// Enqueue writes msgs into the outbox within tx, the caller's own
// transaction: they are published if and only if tx commits. tx is a pgx.Tx
// (including *pgxpool.Tx) or a *sql.Tx.
//
// Enqueue assigns each message without an ID a fresh UUIDv7 and sets
// CreatedAt when zero, in place, so the caller can log or return the ids.
// With Config.Tracer set it also adds the trace context of ctx to the
// message's headers.
//
// A message that cannot be stored or routed as given is refused before
// anything is written, and the error names the message (by its index in
// msgs) and the field or header: an empty or oversized Topic, an oversized
// Key or ID, a Topic, Key or ID that is not valid UTF-8 or holds a NUL byte,
// a header value that is not valid UTF-8, a header name that is empty, holds
// a space or a control character or starts with the reserved "exactly-", and
// the same ID twice in one call. Then nothing of msgs is written, and tx is
// left as it was: the caller may go on with it, or roll it back.
//
// An ID is the message's identity: set one yourself only to make a retried
// enqueue of the same message idempotent. Enqueue does not look for the ID in
// the table, so enqueuing it again in another call stores a second row, which
// the relay publishes too; brokers with deduplication (JetStream's duplicate
// window, SQS FIFO) and consumers with an inbox then drop it as a copy of the
// first, whatever its content. Two different messages must never share an ID.
func (o *Outbox) Enqueue(ctx context.Context, tx any, msgs ...*exactly.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	if err := outboxstore.Prepare(msgs, time.Now()); err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	if o.tracer != nil {
		for _, m := range msgs {
			o.tracer.Inject(ctx, m)
		}
	}
	qs, args, err := o.store.InsertBatches(msgs)
	if err != nil {
		return err
	}
	t, err := sqldb.CallerTx(tx)
	var nilTx *sqldb.NilTxError
	switch {
	case errors.As(err, &nilTx):
		return errNilTx
	case err != nil:
		return fmt.Errorf("outbox: %w", err)
	case t.Pgx() && o.store.D != sqldb.Postgres:
		return fmt.Errorf("outbox: a pgx.Tx was given but the outbox dialect is %s", o.store.D)
	}
	for i, q := range qs {
		if _, err := t.Exec(ctx, q, args[i]...); err != nil {
			return fmt.Errorf("outbox: enqueue into %s: %w", o.store.Table, err)
		}
	}
	return nil
}

var errNilTx = errors.New("outbox: nil transaction: Enqueue must run inside the caller's transaction")

// Migrate creates or upgrades the outbox tables. It is idempotent and safe to
// run from several processes at once. db is a *sql.DB or a *pgxpool.Pool.
func (o *Outbox) Migrate(ctx context.Context, db any) error {
	_, err := o.ApplyMigrations(ctx, db)
	return err
}

// ApplyMigrations is Migrate, and also returns the versions this call
// applied, in order: none when the tables were up to date (or another
// process applied the same versions first).
func (o *Outbox) ApplyMigrations(ctx context.Context, db any) ([]int, error) {
	return migrate.ApplyOn(ctx, db, "outbox", o.store.Migrator)
}

// MigrationSQL returns the SQL that Migrate would run now on db, without
// running it (a dry run). With db nil it returns every migration.
func (o *Outbox) MigrationSQL(ctx context.Context, db any) (string, error) {
	return migrate.ScriptOn(ctx, db, "outbox", o.store.Migrator)
}
