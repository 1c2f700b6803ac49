package inbox_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/testenv"
)

func TestSQLite(t *testing.T) {
	t.Parallel()
	exactlytest.RunInboxSuite(t, sqlHarness(inbox.SQLite, func(t *testing.T) *sql.DB {
		// One database file per test: SQLite has one writer at a time.
		return openSQLite(t)
	}, nil))
}

func TestPostgresPgx(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.Postgres)
	pool, err := pgxpool.New(context.Background(), testenv.PostgresDSN()+"&pool_max_conns=12")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	exactlytest.RunInboxSuite(t, sqlHarness(inbox.Postgres, nil, pool))
}

func TestPostgresDatabaseSQL(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.Postgres)
	db := openSQL(t, "pgx", testenv.PostgresDSN())
	exactlytest.RunInboxSuite(t, sqlHarness(inbox.Postgres, func(*testing.T) *sql.DB { return db }, nil))
}

func TestMariaDB(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.MariaDB)
	db := openSQL(t, "mysql", testenv.MySQLDSN())
	exactlytest.RunInboxSuite(t, sqlHarness(inbox.MySQL, func(*testing.T) *sql.DB { return db }, nil))
}

func openSQLite(t *testing.T) *sql.DB {
	db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "inbox.db")+
		"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(20000)&_pragma=synchronous(NORMAL)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func openSQL(t *testing.T, driver, dsn string) *sql.DB {
	db, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(12)
	t.Cleanup(func() { db.Close() })
	return db
}

var tableSeq atomic.Int64

func uniqueTable() string {
	return fmt.Sprintf("xi_%d_%d", time.Now().UnixNano()%1e9, tableSeq.Add(1))
}

// sqlFixture is one test's inbox table, with an effects table beside it
// where the handlers record each application, in the inbox's transaction.
type sqlFixture struct {
	dialect string
	db      *sql.DB       // database/sql harness (and queries for both)
	pool    *pgxpool.Pool // pgx harness
	table   string        // inbox table
	effects string        // effects table
	mu      sync.Mutex
	inboxes map[string]*inbox.SQL
}

// ph returns the n-th placeholder of the dialect.
func (f *sqlFixture) ph(n int) string {
	if f.dialect == inbox.Postgres {
		return fmt.Sprintf("$%d", n)
	}
	return "?"
}

func (f *sqlFixture) handle() any {
	if f.pool != nil {
		return f.pool
	}
	return f.db
}

func (f *sqlFixture) inbox(t testing.TB, consumer string) *inbox.SQL {
	f.mu.Lock()
	defer f.mu.Unlock()
	if ib, ok := f.inboxes[consumer]; ok {
		return ib
	}
	ib, err := inbox.NewSQL(inbox.Config{Dialect: f.dialect, Table: f.table, Consumer: consumer})
	if err != nil {
		t.Fatal(err)
	}
	f.inboxes[consumer] = ib
	return ib
}

func (f *sqlFixture) exec(ctx context.Context, q string, args ...any) error {
	if f.pool != nil {
		_, err := f.pool.Exec(ctx, q, args...)
		return err
	}
	_, err := f.db.ExecContext(ctx, q, args...)
	return err
}

// newSQLFixture migrates a fresh inbox table and creates its effects table;
// both are dropped when t ends.
func newSQLFixture(t *testing.T, dialect string, db *sql.DB, pool *pgxpool.Pool) *sqlFixture {
	t.Helper()
	f := &sqlFixture{dialect: dialect, db: db, pool: pool, table: uniqueTable(), inboxes: map[string]*inbox.SQL{}}
	f.effects = f.table + "_effects"
	ctx := context.Background()
	if err := f.inbox(t, "setup").Migrate(ctx, f.handle()); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	if err := f.exec(ctx, "CREATE TABLE "+f.effects+" (consumer VARCHAR(200) NOT NULL, id VARCHAR(200) NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		for _, tbl := range []string{f.table, f.effects} {
			if err := f.exec(ctx, "DROP TABLE IF EXISTS "+tbl); err != nil {
				t.Errorf("drop %s: %v", tbl, err)
			}
		}
		f.exec(ctx, "DELETE FROM exactly_migrations WHERE scope = "+f.ph(1), "inbox:"+f.table)
	})
	return f
}

func (f *sqlFixture) insertEffect() string {
	return "INSERT INTO " + f.effects + " (consumer, id) VALUES (" + f.ph(1) + ", " + f.ph(2) + ")"
}

// applySQL is the harness's handler body for database/sql.
func (f *sqlFixture) applySQL(ctx context.Context, tx *sql.Tx, consumer string, msgs []*exactly.Message, work exactlytest.InboxWork) error {
	if err := work(ctx, exactlytest.BeforeEffect); err != nil {
		return err
	}
	for _, m := range msgs {
		if _, err := tx.ExecContext(ctx, f.insertEffect(), consumer, m.ID); err != nil {
			return err
		}
	}
	return work(ctx, exactlytest.AfterEffect)
}

// applyPgx is the harness's handler body for pgx.
func (f *sqlFixture) applyPgx(ctx context.Context, tx pgx.Tx, consumer string, msgs []*exactly.Message, work exactlytest.InboxWork) error {
	if err := work(ctx, exactlytest.BeforeEffect); err != nil {
		return err
	}
	for _, m := range msgs {
		if _, err := tx.Exec(ctx, f.insertEffect(), consumer, m.ID); err != nil {
			return err
		}
	}
	return work(ctx, exactlytest.AfterEffect)
}

func (f *sqlFixture) effectCounts(t *testing.T, consumer string) map[string]int {
	q := "SELECT id, count(*) FROM " + f.effects + " WHERE consumer = " + f.ph(1) + " GROUP BY id"
	out := map[string]int{}
	if f.pool != nil {
		rows, err := f.pool.Query(context.Background(), q, consumer)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var id string
			var n int
			if err := rows.Scan(&id, &n); err != nil {
				t.Fatal(err)
			}
			out[id] = n
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		return out
	}
	rows, err := f.db.Query(q, consumer)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			t.Fatal(err)
		}
		out[id] = n
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// sqlHarness runs the suite through Handle/HandleBatch (open set) or
// HandlePgx/HandleBatchPgx (pool set).
func sqlHarness(dialect string, open func(t *testing.T) *sql.DB, pool *pgxpool.Pool) exactlytest.InboxHarness {
	return exactlytest.InboxHarness{
		Transactional: true,
		Setup: func(t *testing.T, _ exactlytest.InboxOptions) *exactlytest.InboxFixture {
			var db *sql.DB
			if open != nil {
				db = open(t)
			}
			f := newSQLFixture(t, dialect, db, pool)
			fx := &exactlytest.InboxFixture{
				Effects: f.effectCounts,
				GC: func(ctx context.Context, consumer string, olderThan time.Duration, batchSize int) (int64, error) {
					return f.inbox(t, consumer).GC(ctx, f.handle(), olderThan, batchSize)
				},
			}
			if pool != nil {
				fx.Deliver = func(ctx context.Context, consumer string, msg *exactly.Message, work exactlytest.InboxWork) (inbox.Outcome, error) {
					return f.inbox(t, consumer).HandlePgx(ctx, pool, msg, func(ctx context.Context, tx pgx.Tx) error {
						return f.applyPgx(ctx, tx, consumer, []*exactly.Message{msg}, work)
					})
				}
				fx.DeliverBatch = func(ctx context.Context, consumer string, msgs []*exactly.Message, work exactlytest.InboxWork) ([]inbox.Outcome, error) {
					return f.inbox(t, consumer).HandleBatchPgx(ctx, pool, msgs, func(ctx context.Context, tx pgx.Tx, fresh []*exactly.Message) error {
						return f.applyPgx(ctx, tx, consumer, fresh, work)
					})
				}
				return fx
			}
			fx.Deliver = func(ctx context.Context, consumer string, msg *exactly.Message, work exactlytest.InboxWork) (inbox.Outcome, error) {
				return f.inbox(t, consumer).Handle(ctx, db, msg, func(ctx context.Context, tx *sql.Tx) error {
					return f.applySQL(ctx, tx, consumer, []*exactly.Message{msg}, work)
				})
			}
			fx.DeliverBatch = func(ctx context.Context, consumer string, msgs []*exactly.Message, work exactlytest.InboxWork) ([]inbox.Outcome, error) {
				return f.inbox(t, consumer).HandleBatch(ctx, db, msgs, func(ctx context.Context, tx *sql.Tx, fresh []*exactly.Message) error {
					return f.applySQL(ctx, tx, consumer, fresh, work)
				})
			}
			return fx
		},
	}
}

func TestNewSQLBadInput(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		cfg  inbox.Config
		want string
	}{
		{inbox.Config{Dialect: "oracle", Consumer: "c"}, `unknown dialect "oracle"`},
		{inbox.Config{Consumer: "c"}, "no dialect"},
		{inbox.Config{Dialect: "sqlite", Table: "inbox; DROP TABLE x", Consumer: "c"}, "unsafe table name"},
		{inbox.Config{Dialect: "postgres", Table: `a"b`, Consumer: "c"}, "unsafe table name"},
		{inbox.Config{Dialect: "postgres", Table: "a.b.c", Consumer: "c"}, "unsafe table name"},
		{inbox.Config{Dialect: "sqlite", Table: "app.inbox", Consumer: "c"}, "SQLite tables take no schema"},
		{inbox.Config{Dialect: "postgres"}, "Consumer is required"},
		{inbox.Config{Dialect: "postgres", Consumer: "  "}, "Consumer is required"},
		{inbox.Config{Dialect: "postgres", Consumer: strings.Repeat("c", 129)}, "limit is 128"},
	} {
		if _, err := inbox.NewSQL(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: got %v, want an error containing %q", tc.cfg, err, tc.want)
		}
	}
	ib, err := inbox.NewSQL(inbox.Config{Dialect: "mariadb", Table: "app.inbox", Consumer: "billing"})
	if err != nil {
		t.Fatal(err)
	}
	if ib.Dialect() != inbox.MySQL || ib.Table() != "app.inbox" || ib.Consumer() != "billing" {
		t.Errorf("accessors: %s %s %s", ib.Dialect(), ib.Table(), ib.Consumer())
	}
	def, _ := inbox.NewSQL(inbox.Config{Dialect: "sqlite", Consumer: "c"})
	if def.Table() != inbox.DefaultTable {
		t.Errorf("default table %q", def.Table())
	}
	script, err := def.MigrationSQL(context.Background(), nil)
	if err != nil || !strings.Contains(script, `CREATE TABLE IF NOT EXISTS "exactly_inbox"`) {
		t.Errorf("dry run: %v\n%s", err, script)
	}
}

// TestSQLHandleBadInput: nothing runs, nothing is claimed, the error says why.
func TestSQLHandleBadInput(t *testing.T) {
	t.Parallel()
	db := openSQLite(t)
	f := newSQLFixture(t, inbox.SQLite, db, nil)
	ib := f.inbox(t, "c")
	ctx := context.Background()
	msg := &exactly.Message{ID: "m1", Topic: "t"}
	ran := false
	fn := func(context.Context, *sql.Tx) error { ran = true; return nil }
	check := func(name string, out inbox.Outcome, err error, want string) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), want) || out != inbox.Retry {
			t.Errorf("%s: %v, %v; want retry and an error containing %q", name, out, err, want)
		}
	}
	out, err := ib.Handle(ctx, nil, msg, fn)
	check("nil db", out, err, "nil *sql.DB")
	out, err = ib.Handle(ctx, db, nil, fn)
	check("nil message", out, err, "nil message")
	out, err = ib.Handle(ctx, db, msg, nil)
	check("nil fn", out, err, "nil handler function")
	out, err = ib.Handle(ctx, db, &exactly.Message{ID: strings.Repeat("x", exactly.MaxIDLen+1)}, fn)
	check("long id", out, err, "limit is 128")
	out, err = ib.HandlePgx(ctx, (*pgxpool.Pool)(nil), msg, func(context.Context, pgx.Tx) error { return nil })
	check("nil pool", out, err, "nil pgx database")
	out, err = ib.HandlePgx(ctx, &fakeBeginner{}, msg, func(context.Context, pgx.Tx) error { return nil })
	check("pgx on sqlite", out, err, "dialect is sqlite")
	if err := ib.Handler(db, nil)(ctx, msg); err == nil || !strings.Contains(err.Error(), "nil handler function") {
		t.Errorf("Handler with nil fn: %v", err)
	}
	if _, err := ib.GC(ctx, db, 0, 10); err == nil || !strings.Contains(err.Error(), "olderThan must be positive") {
		t.Errorf("GC olderThan 0: %v", err)
	}
	if _, err := ib.GC(ctx, db, time.Hour, -1); err == nil || !strings.Contains(err.Error(), "batchSize") {
		t.Errorf("GC negative batch: %v", err)
	}
	if _, err := ib.GC(ctx, nil, time.Hour, 0); err == nil || !strings.Contains(err.Error(), "nil database handle") {
		t.Errorf("GC nil db: %v", err)
	}
	if err := ib.Migrate(ctx, "not a db"); err == nil || !strings.Contains(err.Error(), "unsupported database handle") {
		t.Errorf("Migrate with a string: %v", err)
	}
	outs, err := ib.HandleBatch(ctx, db, []*exactly.Message{msg, {ID: ""}}, func(context.Context, *sql.Tx, []*exactly.Message) error {
		ran = true
		return nil
	})
	if !errors.Is(err, inbox.ErrNoID) || len(outs) != 2 || !strings.Contains(err.Error(), "message 1 of the batch") {
		t.Errorf("batch with an empty ID: %v, %v", outs, err)
	}
	if ran {
		t.Error("a handler ran on bad input")
	}
	if got := f.effectCounts(t, "c"); len(got) != 0 {
		t.Errorf("effects on bad input: %v", got)
	}
	// A table that was never migrated: a clear error, nothing handled.
	missing, _ := inbox.NewSQL(inbox.Config{Dialect: inbox.SQLite, Table: "xi_never_migrated", Consumer: "c"})
	out, err = missing.Handle(ctx, db, msg, fn)
	check("unmigrated table", out, err, "xi_never_migrated")
	if st := missing.Stats(); st.Failed != 1 {
		t.Errorf("stats after a store failure: %+v", st)
	}
}

type fakeBeginner struct{}

func (*fakeBeginner) Begin(context.Context) (pgx.Tx, error) { return nil, errors.New("not used") }

// TestSQLCrashBetweenCommitAndAck: a consumer commits the effect and dies
// before it acknowledges; the broker hands the message to a new consumer
// process (a new inbox, a new connection pool on the same database). The
// effect is applied once and the new process acknowledges the copy.
func TestSQLCrashBetweenCommitAndAck(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	open := func() *sql.DB {
		db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "app.db")+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		return db
	}
	ctx := context.Background()
	process := func(db *sql.DB) (*inbox.SQL, exactly.Handler) {
		ib, err := inbox.NewSQL(inbox.Config{Dialect: inbox.SQLite, Consumer: "billing"})
		if err != nil {
			t.Fatal(err)
		}
		if err := ib.Migrate(ctx, db); err != nil {
			t.Fatal(err)
		}
		return ib, ib.Handler(db, func(ctx context.Context, tx *sql.Tx, msg *exactly.Message) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO invoices (order_id) VALUES (?)", msg.Key)
			return err
		})
	}
	first := open()
	if _, err := first.Exec("CREATE TABLE invoices (order_id TEXT NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	msg := &exactly.Message{ID: exactly.NewID(), Topic: "orders.paid", Key: "order-7"}
	_, h1 := process(first)
	if err := h1(ctx, msg); err != nil {
		t.Fatal(err)
	}
	first.Close() // the process dies here: the ack is never sent

	second := open()
	ib2, h2 := process(second)
	redelivered := *msg
	if err := h2(ctx, &redelivered); err != nil {
		t.Fatalf("redelivery: %v (a duplicate must be acknowledged)", err)
	}
	var n int
	if err := second.QueryRow("SELECT count(*) FROM invoices").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("%d invoices, want 1", n)
	}
	if st := ib2.Stats(); st.Duplicates != 1 || st.Processed != 0 {
		t.Errorf("the new process: %+v, want 1 duplicate", st)
	}
}

// TestSQLHooksAndStats: every outcome reaches the hooks and the counters.
func TestSQLHooksAndStats(t *testing.T) {
	t.Parallel()
	db := openSQLite(t)
	var mu sync.Mutex
	var events []string
	record := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		events = append(events, fmt.Sprintf(format, args...))
	}
	ib, err := inbox.NewSQL(inbox.Config{Dialect: inbox.SQLite, Consumer: "c", Hooks: inbox.Hooks{
		Processed: func(m *exactly.Message, took time.Duration) { record("processed %s", m.ID) },
		Duplicate: func(m *exactly.Message) { record("duplicate %s", m.ID) },
		Failed:    func(m *exactly.Message, err error) { record("failed %s: %v", m.ID, err) },
	}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := ib.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	ok := func(context.Context, *sql.Tx) error { return nil }
	m1, m2 := &exactly.Message{ID: "m1"}, &exactly.Message{ID: "m2"}
	ib.Handle(ctx, db, m1, ok)
	ib.Handle(ctx, db, m1, ok)
	ib.Handle(ctx, db, m2, func(context.Context, *sql.Tx) error { return errors.New("boom") })
	func() {
		defer func() { recover() }()
		ib.Handle(ctx, db, m2, func(context.Context, *sql.Tx) error { panic("kaboom") })
	}()
	ib.HandleBatch(ctx, db, []*exactly.Message{m1, m2, m2}, func(context.Context, *sql.Tx, []*exactly.Message) error { return nil })
	want := []string{
		"processed m1", "duplicate m1", "failed m2: boom", "failed m2: handler panicked: kaboom",
		"processed m2", "duplicate m1", "duplicate m2",
	}
	if strings.Join(events, "\n") != strings.Join(want, "\n") {
		t.Errorf("hook calls:\n%s\nwant:\n%s", strings.Join(events, "\n"), strings.Join(want, "\n"))
	}
	if st := ib.Stats(); st != (inbox.Stats{Processed: 2, Duplicates: 3, Failed: 2}) {
		t.Errorf("stats %+v", st)
	}
}

// TestSQLMigrate: idempotent, dry run empty once applied.
func TestSQLMigrate(t *testing.T) {
	t.Parallel()
	db := openSQLite(t)
	ib, _ := inbox.NewSQL(inbox.Config{Dialect: inbox.SQLite, Table: "my_inbox", Consumer: "c"})
	ctx := context.Background()
	pending, err := ib.MigrationSQL(ctx, db)
	if err != nil || !strings.Contains(pending, `"my_inbox"`) {
		t.Fatalf("dry run before migrating: %v\n%s", err, pending)
	}
	for range 2 {
		if err := ib.Migrate(ctx, db); err != nil {
			t.Fatal(err)
		}
	}
	if pending, err := ib.MigrationSQL(ctx, db); err != nil || strings.TrimSpace(pending) != "" {
		t.Errorf("after migrating: %v, pending:\n%s", err, pending)
	}
	var scope string
	if err := db.QueryRow("SELECT scope FROM exactly_migrations").Scan(&scope); err != nil || scope != "inbox:my_inbox" {
		t.Errorf("migration scope %q, %v", scope, err)
	}
}

// TestPgxHandler: the exactly.Handler over a pgx pool applies a message
// redelivered three times once.
func TestPgxHandler(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.Postgres)
	pool, err := pgxpool.New(context.Background(), testenv.PostgresDSN()+"&pool_max_conns=4")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	f := newSQLFixture(t, inbox.Postgres, nil, pool)
	ib := f.inbox(t, "billing")
	h := ib.PgxHandler(pool, func(ctx context.Context, tx pgx.Tx, msg *exactly.Message) error {
		_, err := tx.Exec(ctx, f.insertEffect(), "billing", msg.ID)
		return err
	})
	msg := &exactly.Message{ID: exactly.NewID(), Topic: "t"}
	for i := range 3 {
		if err := h(context.Background(), msg); err != nil {
			t.Fatalf("delivery %d: %v", i+1, err)
		}
	}
	if got := f.effectCounts(t, "billing"); got[msg.ID] != 1 || len(got) != 1 {
		t.Errorf("effects %v", got)
	}
	if err := ib.PgxHandler(pool, nil)(context.Background(), msg); err == nil {
		t.Error("PgxHandler with a nil function accepted")
	}
	if st := ib.Stats(); st.Processed != 1 || st.Duplicates != 2 {
		t.Errorf("stats %+v", st)
	}
}

func TestOutcome(t *testing.T) {
	t.Parallel()
	for o, want := range map[inbox.Outcome]string{inbox.Retry: "retry", inbox.Processed: "processed", inbox.Duplicate: "duplicate", 9: "Outcome(9)"} {
		if o.String() != want {
			t.Errorf("%d: %q, want %q", int(o), o.String(), want)
		}
		if o.Ack() != (o == inbox.Processed || o == inbox.Duplicate) {
			t.Errorf("%v.Ack() = %v", o, o.Ack())
		}
	}
}

// TestClaimInCallersTx: Claim in a transaction the caller opened (sql.Tx on
// SQLite and PostgreSQL, pgx.Tx on PostgreSQL) reports a fresh message once,
// a rolled-back claim lets the message through again, and bad input is
// refused with an error naming it.
func TestClaimInCallersTx(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	check := func(t *testing.T, f *sqlFixture, begin func() (any, func(commit bool) error)) {
		ib := f.inbox(t, "ledger")
		msg := &exactly.Message{ID: exactly.NewID(), Topic: "t"}
		// A claim whose transaction rolls back leaves nothing behind.
		tx, end := begin()
		if fresh, err := ib.Claim(ctx, tx, msg); err != nil || !fresh {
			t.Fatalf("first claim: fresh=%v err=%v", fresh, err)
		}
		if err := end(false); err != nil {
			t.Fatal(err)
		}
		applied := 0
		for i := range 3 {
			tx, end := begin()
			fresh, err := ib.Claim(ctx, tx, msg)
			if err != nil {
				t.Fatalf("delivery %d: %v", i+1, err)
			}
			if fresh {
				applied++
			}
			if err := end(true); err != nil {
				t.Fatal(err)
			}
		}
		if applied != 1 {
			t.Errorf("fresh %d times after a rollback and 3 deliveries, want 1", applied)
		}
		if st := ib.Stats(); st.Duplicates != 2 {
			t.Errorf("stats %+v, want 2 duplicates", st)
		}
		tx, end = begin()
		defer end(false)
		if _, err := ib.Claim(ctx, tx, &exactly.Message{Topic: "t"}); !errors.Is(err, inbox.ErrNoID) {
			t.Errorf("empty id: %v, want ErrNoID", err)
		}
	}
	sqlBegin := func(t *testing.T, db *sql.DB) func() (any, func(bool) error) {
		return func() (any, func(bool) error) {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			return tx, func(commit bool) error {
				if commit {
					return tx.Commit()
				}
				return tx.Rollback()
			}
		}
	}
	t.Run("sqlite", func(t *testing.T) {
		db := openSQLite(t)
		check(t, newSQLFixture(t, inbox.SQLite, db, nil), sqlBegin(t, db))
		ib, _ := inbox.NewSQL(inbox.Config{Dialect: inbox.SQLite, Table: "x", Consumer: "c"})
		msg := &exactly.Message{ID: "a", Topic: "t"}
		for _, bad := range []any{nil, (*sql.Tx)(nil), db, "tx"} {
			if _, err := ib.Claim(ctx, bad, msg); err == nil || !strings.Contains(err.Error(), "Claim needs") {
				t.Errorf("Claim(%T): %v", bad, err)
			}
		}
	})
	t.Run("postgres-sql", func(t *testing.T) {
		testenv.Need(t, testenv.Postgres)
		db := openSQL(t, "pgx", testenv.PostgresDSN())
		check(t, newSQLFixture(t, inbox.Postgres, db, nil), sqlBegin(t, db))
	})
	t.Run("postgres-pgx", func(t *testing.T) {
		testenv.Need(t, testenv.Postgres)
		pool, err := pgxpool.New(ctx, testenv.PostgresDSN()+"&pool_max_conns=4")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Close)
		check(t, newSQLFixture(t, inbox.Postgres, nil, pool), func() (any, func(bool) error) {
			tx, err := pool.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			return tx, func(commit bool) error {
				if commit {
					return tx.Commit(ctx)
				}
				return tx.Rollback(ctx)
			}
		})
		// A pgx.Tx on an inbox configured for another dialect is refused.
		my, _ := inbox.NewSQL(inbox.Config{Dialect: inbox.MySQL, Table: "x", Consumer: "c"})
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(ctx)
		if _, err := my.Claim(ctx, tx, &exactly.Message{ID: "a", Topic: "t"}); err == nil || !strings.Contains(err.Error(), "PostgreSQL") {
			t.Errorf("pgx.Tx on a MySQL inbox: %v", err)
		}
	})
}
