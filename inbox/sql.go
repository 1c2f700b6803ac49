package inbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/inboxstore"
	"github.com/exactlyonce/exactly/internal/migrate"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// The dialects an SQL inbox can live in.
const (
	Postgres = "postgres"
	MySQL    = "mysql" // MySQL 8 and MariaDB 10.6+
	SQLite   = "sqlite"
)

// DefaultTable is the table name used when Config.Table is empty.
const DefaultTable = "exactly_inbox"

// DefaultGCBatch is the number of records GC deletes per statement when its
// batchSize is 0.
const DefaultGCBatch = 1000

// Config configures an SQL inbox.
type Config struct {
	// Dialect is "postgres", "mysql" (also MariaDB) or "sqlite". Required.
	// It must match the database the handlers run against.
	Dialect string
	// Table holds the dedup records, optionally schema-qualified
	// ("app.inbox"). Default "exactly_inbox". Only letters, digits and
	// underscores are accepted. Several consumers may share one table.
	Table string
	// Consumer names the consumer whose deliveries this inbox deduplicates,
	// usually its consumer group or durable name, at most 128 bytes.
	// Required. Records are kept per consumer, so two consumers of the same
	// message in one database each apply it once. Two consumers that share
	// a name suppress each other's deliveries: only one of them would ever
	// apply a given message. Renaming a consumer forgets what it processed.
	// (Migrate and MigrationSQL do not use it: the table is shared.)
	Consumer string
	// Hooks report outcomes for metrics. All optional.
	Hooks Hooks
}

// SQL is the exact inbox: the dedup record and the handler's effect commit
// in one database transaction, so a message's effect is applied once per
// ID and consumer, however often it is delivered.
type SQL struct {
	observer
	store    *inboxstore.Store
	consumer string
	checked  atomic.Bool // the table passed Check
}

// NewSQL validates cfg. An unknown dialect, an unsafe table name or a
// missing consumer name is an error naming the problem.
func NewSQL(cfg Config) (*SQL, error) {
	st, err := inboxstore.New(cfg.Dialect, cfg.Table)
	if err != nil {
		return nil, err
	}
	if err := checkConsumer(cfg.Consumer); err != nil {
		return nil, err
	}
	return &SQL{observer: observer{hooks: cfg.Hooks}, store: st, consumer: cfg.Consumer}, nil
}

// Dialect returns the configured dialect.
func (s *SQL) Dialect() string { return string(s.store.D) }

// Table returns the table name as configured.
func (s *SQL) Table() string { return s.store.Table.String() }

// Consumer returns the consumer name.
func (s *SQL) Consumer() string { return s.consumer }

// Stats returns the running totals since the inbox was created.
func (s *SQL) Stats() Stats { return s.stats.snapshot() }

// PgxBeginner starts pgx transactions: *pgxpool.Pool and *pgx.Conn are
// PgxBeginners.
type PgxBeginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// Handle applies msg's effect once. It begins a transaction on db, claims
// msg.ID for the consumer in the inbox table, runs fn with that transaction
// and commits: the claim and fn's writes commit together or not at all. fn
// must do its writes through tx and must not commit or roll it back.
//
//   - A message already processed is a Duplicate: fn does not run, nothing
//     is committed, and the error is nil, so the caller acknowledges it.
//   - When fn returns an error (or panics) the transaction rolls back, claim
//     included: the message is not marked done and its redelivery runs fn
//     again. The error is fn's own, unwrapped; a panic is re-raised after
//     the rollback.
//   - While one transaction holds a claim, a concurrent delivery of the same
//     message waits on its row lock: it becomes a Duplicate when the first
//     commits, and runs fn when the first rolls back.
//   - A failed commit is an ambiguous outcome, reported as an error: the
//     redelivery it causes finds the message done, or processes it.
//   - A message with an empty ID is refused with ErrNoID; fn never runs.
func (s *SQL) Handle(ctx context.Context, db *sql.DB, msg *exactly.Message, fn func(ctx context.Context, tx *sql.Tx) error) (Outcome, error) {
	begin, err := s.beginSQL(db)
	if err != nil {
		return Retry, err
	}
	return handle(ctx, s, msg, begin, fn)
}

// HandlePgx is Handle for pgx: db is a *pgxpool.Pool or a *pgx.Conn, and fn
// gets the pgx.Tx. The inbox must be configured for PostgreSQL.
func (s *SQL) HandlePgx(ctx context.Context, db PgxBeginner, msg *exactly.Message, fn func(ctx context.Context, tx pgx.Tx) error) (Outcome, error) {
	begin, err := s.beginPgx(db)
	if err != nil {
		return Retry, err
	}
	return handle(ctx, s, msg, begin, fn)
}

// Claim claims msg.ID inside the caller's transaction tx (a *sql.Tx, or a
// pgx.Tx on PostgreSQL) and reports whether the message is fresh. Use it
// where the transaction is not the inbox's to open, for example in
// kafka.DBConfig.TxHandler: the stored offsets absorb redeliveries of
// a record, and Claim absorbs a message the relay sent twice (a new record
// at a new offset, with the same id). When it returns false, commit without
// applying the effect; the claim and the effect commit or roll back
// together, exactly as in Handle.
func (s *SQL) Claim(ctx context.Context, tx any, msg *exactly.Message) (fresh bool, err error) {
	if err := checkMessage(msg, exactly.MaxIDLen); err != nil {
		return false, err
	}
	q, err := sqldb.CallerTx(tx)
	var nilTx *sqldb.NilTxError
	switch {
	case errors.As(err, &nilTx) && nilTx.Type != "":
		return false, errors.New("inbox: Claim needs a transaction, got a " + nilTx.Error())
	case err != nil:
		return false, fmt.Errorf("inbox: Claim needs a *sql.Tx or a pgx.Tx, got %T", tx)
	case q.Pgx() && s.store.D != sqldb.Postgres:
		return false, fmt.Errorf("inbox: a pgx.Tx is PostgreSQL, but this inbox is configured for %s", s.store.D)
	}
	claimed, err := s.store.Claim(ctx, q, s.consumer, msg.ID)
	if err != nil {
		err = fmt.Errorf("inbox: claim message %s in %s: %w", msg.ID, s.store.Table, err)
		s.failed(msg, err)
		return false, err
	}
	if !claimed {
		s.duplicate(msg)
	}
	return claimed, nil
}

// Handler wraps fn into an exactly.Handler for a consumer: each delivery
// goes through Handle with msg's effect applied in tx. A duplicate returns
// nil, so the consumer acknowledges it; an error means retry.
func (s *SQL) Handler(db *sql.DB, fn func(ctx context.Context, tx *sql.Tx, msg *exactly.Message) error) exactly.Handler {
	return func(ctx context.Context, msg *exactly.Message) error {
		if fn == nil {
			return errNilFn
		}
		_, err := s.Handle(ctx, db, msg, func(ctx context.Context, tx *sql.Tx) error { return fn(ctx, tx, msg) })
		return err
	}
}

// PgxHandler is Handler for pgx.
func (s *SQL) PgxHandler(db PgxBeginner, fn func(ctx context.Context, tx pgx.Tx, msg *exactly.Message) error) exactly.Handler {
	return func(ctx context.Context, msg *exactly.Message) error {
		if fn == nil {
			return errNilFn
		}
		_, err := s.HandlePgx(ctx, db, msg, func(ctx context.Context, tx pgx.Tx) error { return fn(ctx, tx, msg) })
		return err
	}
}

// HandleBatch applies the effects of many messages in one transaction: it
// claims all their IDs in one statement (per 1000), runs fn once with the
// fresh ones (those not processed before, each ID once, in input order)
// and commits. It is the throughput path: one round trip and one commit
// for the whole batch instead of per message.
//
// The trade-off is that the batch succeeds or fails as a whole: when fn
// returns an error, panics, or the commit fails, everything rolls back and
// every fresh message of the batch must be redelivered, including the ones
// fn would have handled fine. A poison message thus holds back its batch;
// fall back to Handle per message to isolate it.
//
// The result has one Outcome per message: Processed for the fresh ones
// (Retry when the batch failed), Duplicate for the ones processed earlier
// and for repeats of an ID within msgs. Acknowledge exactly the messages
// whose Outcome.Ack() is true. fn is not called when no message is fresh.
// Any message without an ID fails the whole call before anything runs.
func (s *SQL) HandleBatch(ctx context.Context, db *sql.DB, msgs []*exactly.Message, fn func(ctx context.Context, tx *sql.Tx, fresh []*exactly.Message) error) ([]Outcome, error) {
	begin, err := s.beginSQL(db)
	if err != nil {
		return make([]Outcome, len(msgs)), err
	}
	return handleBatch(ctx, s, msgs, begin, fn)
}

// HandleBatchPgx is HandleBatch for pgx.
func (s *SQL) HandleBatchPgx(ctx context.Context, db PgxBeginner, msgs []*exactly.Message, fn func(ctx context.Context, tx pgx.Tx, fresh []*exactly.Message) error) ([]Outcome, error) {
	begin, err := s.beginPgx(db)
	if err != nil {
		return make([]Outcome, len(msgs)), err
	}
	return handleBatch(ctx, s, msgs, begin, fn)
}

// GC deletes this consumer's dedup records processed more than olderThan
// ago (by the database clock), batchSize rows per statement (0 means
// DefaultGCBatch), until a statement deletes fewer than batchSize. Each
// statement walks the (consumer, processed_at) index, so GC stays cheap on
// a large table and never holds locks for long; it is safe to run while
// handlers are running. It returns how many records it deleted, including
// when it stops early on an error. db is a *sql.DB or a *pgxpool.Pool.
//
// A record is what makes a redelivery a duplicate: once it is gone, a
// redelivery of that message applies its effect again. Keep records longer
// than the broker can redeliver a message: its retention, the longest a
// consumer can be down before its position is reset, replays by an
// operator. Records of other consumers in the table are not touched.
func (s *SQL) GC(ctx context.Context, db any, olderThan time.Duration, batchSize int) (int64, error) {
	if olderThan <= 0 {
		return 0, fmt.Errorf("inbox: GC olderThan must be positive, got %s", olderThan)
	}
	if batchSize < 0 {
		return 0, fmt.Errorf("inbox: GC batchSize must not be negative, got %d", batchSize)
	}
	if batchSize == 0 {
		batchSize = DefaultGCBatch
	}
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		return 0, fmt.Errorf("inbox: %w", err)
	}
	defer done()
	now, err := s.store.NowMillis(ctx, sdb)
	if err != nil {
		return 0, fmt.Errorf("inbox: GC of %s: read the database clock: %w", s.store.Table, err)
	}
	cutoff := now - olderThan.Milliseconds()
	var total int64
	for {
		n, err := s.store.DeleteBefore(ctx, sdb, s.consumer, cutoff, batchSize)
		total += n
		if err != nil {
			return total, fmt.Errorf("inbox: GC of %s for consumer %q: %w", s.store.Table, s.consumer, err)
		}
		if n < int64(batchSize) {
			return total, nil
		}
	}
}

// Migrate creates or upgrades the inbox table. It is idempotent and safe to
// run from several processes at once; the applied versions are recorded in
// exactly_migrations under the scope "inbox:<table>". db is a *sql.DB or a
// *pgxpool.Pool.
func (s *SQL) Migrate(ctx context.Context, db any) error {
	_, err := s.ApplyMigrations(ctx, db)
	return err
}

// ApplyMigrations is Migrate, and also returns the versions this call
// applied, in order: none when the table was up to date (or another
// process applied the same versions first).
func (s *SQL) ApplyMigrations(ctx context.Context, db any) ([]int, error) {
	return migrate.ApplyOn(ctx, db, "inbox", s.store.Migrator)
}

// MigrationSQL returns the SQL that Migrate would run now on db, without
// running it (a dry run). With db nil it returns every migration.
func (s *SQL) MigrationSQL(ctx context.Context, db any) (string, error) {
	return migrate.ScriptOn(ctx, db, "inbox", s.store.Migrator)
}

var errNilFn = errors.New("inbox: nil handler function")

// Check reports whether the inbox table can be used: it must exist and have
// the columns the claim writes. The error names the table and what is
// wrong, and says what to do: apply the migrations, or, for a table
// dropped by hand while its migrations are recorded, how to reset them. A
// database that cannot be reached is reported as it is.
//
// Handle, HandleBatch and their pgx forms (with a *pgxpool.Pool) run it once
// before their first transaction; call it when a consumer starts to refuse
// a broken table before anything is consumed. db is a *sql.DB or a
// *pgxpool.Pool.
func (s *SQL) Check(ctx context.Context, db any) error {
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		return fmt.Errorf("inbox: %w", err)
	}
	defer done()
	if err := s.store.Verify(ctx, sdb); err != nil {
		return fmt.Errorf("inbox: %w", err)
	}
	s.checked.Store(true)
	return nil
}

// checkOnce runs Check until it passes once.
func (s *SQL) checkOnce(ctx context.Context, db any) error {
	if s.checked.Load() {
		return nil
	}
	return s.Check(ctx, db)
}

// txn is a transaction of either driver.
type txn[T any] struct {
	raw      T
	q        inboxstore.Tx
	commit   func(context.Context) error
	rollback func(context.Context) error
}

func (s *SQL) beginSQL(db *sql.DB) (func(context.Context) (txn[*sql.Tx], error), error) {
	if db == nil {
		return nil, errors.New("inbox: nil *sql.DB")
	}
	return func(ctx context.Context) (txn[*sql.Tx], error) {
		if err := s.checkOnce(ctx, db); err != nil {
			return txn[*sql.Tx]{}, err
		}
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return txn[*sql.Tx]{}, err
		}
		return txn[*sql.Tx]{
			raw: tx, q: sqldb.SQLTx(tx),
			commit:   func(context.Context) error { return tx.Commit() },
			rollback: func(context.Context) error { return tx.Rollback() },
		}, nil
	}, nil
}

func (s *SQL) beginPgx(db PgxBeginner) (func(context.Context) (txn[pgx.Tx], error), error) {
	if isNil(db) {
		return nil, errors.New("inbox: nil pgx database (want a *pgxpool.Pool or *pgx.Conn)")
	}
	if s.store.D != sqldb.Postgres {
		return nil, fmt.Errorf("inbox: a pgx database was given but the inbox dialect is %s", s.store.D)
	}
	return func(ctx context.Context) (txn[pgx.Tx], error) {
		if pool, ok := db.(*pgxpool.Pool); ok {
			if err := s.checkOnce(ctx, pool); err != nil {
				return txn[pgx.Tx]{}, err
			}
		}
		tx, err := db.Begin(ctx)
		if err != nil {
			return txn[pgx.Tx]{}, err
		}
		return txn[pgx.Tx]{raw: tx, q: sqldb.PgxTx(tx), commit: tx.Commit, rollback: tx.Rollback}, nil
	}, nil
}

func handle[T any](ctx context.Context, s *SQL, msg *exactly.Message, begin func(context.Context) (txn[T], error), fn func(context.Context, T) error) (Outcome, error) {
	if err := checkMessage(msg, exactly.MaxIDLen); err != nil {
		return Retry, err
	}
	if fn == nil {
		return Retry, errNilFn
	}
	start := time.Now()
	tx, err := begin(ctx)
	if err != nil {
		if !errors.As(err, new(*sqldb.SchemaError)) {
			err = fmt.Errorf("inbox: begin a transaction for message %s: %w", msg.ID, err)
		}
		s.failed(msg, err)
		return Retry, err
	}
	finished, running := false, false
	defer func() {
		if !finished {
			_ = tx.rollback(context.WithoutCancel(ctx))
		}
		if running { // fn panicked (or called runtime.Goexit): rolled back above
			v := recover()
			s.failed(msg, panicError(v))
			if v != nil {
				panic(v)
			}
		}
	}()
	claimed, err := s.store.Claim(ctx, tx.q, s.consumer, msg.ID)
	if err != nil {
		err = fmt.Errorf("inbox: claim message %s in %s: %w", msg.ID, s.store.Table, err)
		s.failed(msg, err)
		return Retry, err
	}
	if !claimed {
		s.duplicate(msg)
		return Duplicate, nil
	}
	running = true
	err = fn(ctx, tx.raw)
	running = false
	if err != nil {
		s.failed(msg, err)
		return Retry, err
	}
	finished = true
	if err := tx.commit(ctx); err != nil {
		err = fmt.Errorf("inbox: commit message %s (outcome unknown: a redelivery finds it done or processes it): %w", msg.ID, err)
		s.failed(msg, err)
		return Retry, err
	}
	s.processed(msg, time.Since(start))
	return Processed, nil
}

func handleBatch[T any](ctx context.Context, s *SQL, msgs []*exactly.Message, begin func(context.Context) (txn[T], error), fn func(context.Context, T, []*exactly.Message) error) ([]Outcome, error) {
	out := make([]Outcome, len(msgs))
	if fn == nil {
		return out, errNilFn
	}
	ids := make([]string, len(msgs))
	for i, m := range msgs {
		if err := checkMessage(m, exactly.MaxIDLen); err != nil {
			return out, fmt.Errorf("inbox: message %d of the batch: %w", i, err)
		}
		ids[i] = m.ID
	}
	if len(msgs) == 0 {
		return out, nil
	}
	start := time.Now()
	tx, err := begin(ctx)
	if err != nil {
		if !errors.As(err, new(*sqldb.SchemaError)) {
			err = fmt.Errorf("inbox: begin a transaction for a batch of %d: %w", len(msgs), err)
		}
		s.failedAll(msgs, err)
		return out, err
	}
	finished, running := false, false
	var fresh []*exactly.Message
	defer func() {
		if !finished {
			_ = tx.rollback(context.WithoutCancel(ctx))
		}
		if running {
			v := recover()
			s.failedAll(fresh, panicError(v))
			if v != nil {
				panic(v)
			}
		}
	}()
	var claimed map[string]bool // nil: every id of the batch
	if tx.q.Pgx() {
		// The common case first: a batch of fresh messages, claimed by one
		// plain INSERT. When one of them is done already the statement
		// fails and the transaction holds nothing else yet: roll it back
		// and claim in a new one with ClaimBatch, which tells them apart.
		var all bool
		all, err = s.store.ClaimAllPgx(ctx, tx.q, s.consumer, inboxstore.SortedIDs(ids))
		if err == nil && !all {
			_ = tx.rollback(ctx)
			if tx, err = begin(ctx); err != nil {
				finished = true // nothing left to roll back
				err = fmt.Errorf("inbox: begin a transaction for a batch of %d: %w", len(msgs), err)
				s.failedAll(msgs, err)
				return out, err
			}
			claimed, err = s.store.ClaimBatch(ctx, tx.q, s.consumer, ids)
		}
	} else {
		claimed, err = s.store.ClaimBatch(ctx, tx.q, s.consumer, ids)
	}
	if err != nil {
		err = fmt.Errorf("inbox: claim a batch of %d in %s: %w", len(msgs), s.store.Table, err)
		s.failedAll(msgs, err)
		return out, err
	}
	// The first copy of a claimed ID is fresh; later copies follow its fate.
	seen := make(map[string]bool, len(msgs))
	var freshIdx, copies []int
	for i, m := range msgs {
		switch {
		case claimed != nil && !claimed[m.ID]:
			out[i] = Duplicate
		case seen[m.ID]:
			copies = append(copies, i)
		default:
			seen[m.ID] = true
			freshIdx = append(freshIdx, i)
			fresh = append(fresh, m)
		}
	}
	if len(fresh) > 0 {
		running = true
		err = fn(ctx, tx.raw, fresh)
		running = false
		if err != nil {
			s.failedAll(fresh, err)
			return s.duplicates(msgs, out), err
		}
		finished = true
		if err := tx.commit(ctx); err != nil {
			err = fmt.Errorf("inbox: commit a batch of %d (outcome unknown: a redelivery finds them done or processes them): %w", len(fresh), err)
			s.failedAll(fresh, err)
			return s.duplicates(msgs, out), err
		}
		took := time.Since(start)
		for _, i := range freshIdx {
			out[i] = Processed
			s.processed(msgs[i], took)
		}
		for _, i := range copies {
			out[i] = Duplicate
		}
	}
	return s.duplicates(msgs, out), nil
}

// duplicates reports the Duplicate outcomes to the hooks and returns out.
func (s *SQL) duplicates(msgs []*exactly.Message, out []Outcome) []Outcome {
	for i, o := range out {
		if o == Duplicate {
			s.duplicate(msgs[i])
		}
	}
	return out
}

func (o *observer) failedAll(msgs []*exactly.Message, err error) {
	for _, m := range msgs {
		o.failed(m, err)
	}
}
