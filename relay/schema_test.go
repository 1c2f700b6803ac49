package relay_test

import (
	"context"
	"database/sql"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/sqldb"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// schemaDBs open a database of each dialect for the start-up check tests.
var schemaDBs = map[string]func(t *testing.T) any{
	outbox.Postgres: func(t *testing.T) any {
		testenv.Need(t, testenv.Postgres)
		pool, err := pgxpool.New(context.Background(), testenv.PostgresDSN())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Close)
		return pool
	},
	outbox.MySQL: func(t *testing.T) any {
		testenv.Need(t, testenv.MariaDB)
		db, err := sql.Open("mysql", testenv.MySQLDSN())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		return db
	},
	outbox.SQLite: func(t *testing.T) any {
		db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "o.db")+"?_pragma=busy_timeout(10000)")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		return db
	},
}

// startErr runs a relay on ob and returns the error Run returns, failing
// the test when Run keeps running.
func startErr(t *testing.T, db any, ob *outbox.Outbox) error {
	t.Helper()
	r, err := relay.New(relay.Config{Outbox: ob, DB: db, Publisher: &exactlytest.Recorder{}, PollInterval: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		t.Fatal(err)
	}
	return testenv.ReturnsWithin(t, 15*time.Second, "the relay started on an outbox it cannot use", r.Run)
}

// TestStartRefusesUnusableTable: on every dialect the relay refuses at start
// an outbox table that lacks a column it reads (one clear error naming the
// table and the column, instead of an SQL error logged every poll), and a
// table dropped by hand while its migrations are recorded (with how to
// reset them).
func TestStartRefusesUnusableTable(t *testing.T) {
	for dialect, open := range schemaDBs {
		t.Run(dialect, func(t *testing.T) {
			t.Parallel()
			db := open(t)
			sdb, done, err := sqldb.Open(db)
			if err != nil {
				t.Fatal(err)
			}
			defer done()
			ob := exactlytest.MigratedOutbox(t, db, dialect, "rt_shape")
			st := outboxstore.For(ob)
			table := st.Table.Quoted(st.D)
			if _, err := sdb.Exec("ALTER TABLE " + table + " DROP COLUMN attempts"); err != nil {
				t.Fatal(err)
			}
			err = startErr(t, db, ob)
			if err == nil || !strings.Contains(err.Error(), ob.Table()) || !strings.Contains(err.Error(), "missing columns attempts") {
				t.Errorf("Run on a table without attempts = %v", err)
			}

			if _, err := sdb.Exec("DROP TABLE " + table); err != nil {
				t.Fatal(err)
			}
			err = startErr(t, db, ob)
			if err == nil || !strings.Contains(err.Error(), "dropped or changed by hand") || !strings.Contains(err.Error(), "DELETE FROM") {
				t.Errorf("Run on a dropped table = %v", err)
			}
		})
	}
}
