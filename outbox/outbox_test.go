package outbox_test

import (
	"context"
	"database/sql"
	"path/filepath"
	"testing"

	_ "github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
)

func sqlBegin(t *testing.T, db any) (any, func() error, func() error) {
	tx, err := db.(*sql.DB).BeginTx(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	return tx, tx.Commit, tx.Rollback
}

func TestSQLite(t *testing.T) {
	t.Parallel()
	exactlytest.RunOutboxSuite(t, exactlytest.OutboxHarness{
		Dialect: "sqlite",
		Open: func(t *testing.T) any {
			// One database file per test: SQLite has one writer at a time.
			db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "outbox.db")+
				"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_pragma=synchronous(NORMAL)")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			return db
		},
		Begin: sqlBegin,
	})
}

func TestPostgresPgx(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.Postgres)
	pool, err := pgxpool.New(context.Background(), testenv.PostgresDSN()+"&pool_max_conns=40")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	exactlytest.RunOutboxSuite(t, exactlytest.OutboxHarness{
		Dialect: "postgres",
		Open:    func(*testing.T) any { return pool },
		Begin: func(t *testing.T, db any) (any, func() error, func() error) {
			ctx := context.Background()
			tx, err := db.(*pgxpool.Pool).Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			return tx, func() error { return tx.Commit(ctx) }, func() error { return tx.Rollback(ctx) }
		},
		ConcurrentWriters: true,
	})
}

func openSQL(t *testing.T, driver, dsn string) *sql.DB {
	db, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(40)
	t.Cleanup(func() { db.Close() })
	return db
}

func TestPostgresDatabaseSQL(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.Postgres)
	db := openSQL(t, "pgx", testenv.PostgresDSN())
	exactlytest.RunOutboxSuite(t, exactlytest.OutboxHarness{
		Dialect:           "postgres",
		Open:              func(*testing.T) any { return db },
		Begin:             sqlBegin,
		ConcurrentWriters: true,
	})
}

func TestMariaDB(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.MariaDB)
	db := openSQL(t, "mysql", testenv.MySQLDSN())
	exactlytest.RunOutboxSuite(t, exactlytest.OutboxHarness{
		Dialect:           "mysql",
		Open:              func(*testing.T) any { return db },
		Begin:             sqlBegin,
		ConcurrentWriters: true,
	})
}
