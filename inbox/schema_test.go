package inbox_test

import (
	"context"
	"database/sql"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// TestSQLRefusesUnusableTable: on every dialect an inbox table that lacks a
// column the claim writes, or that was dropped by hand after migrating, is
// refused before the first transaction with one error naming the table and
// what is wrong (with how to reset the recorded migrations); fn never runs.
func TestSQLRefusesUnusableTable(t *testing.T) {
	for _, tc := range []struct {
		dialect string
		open    func(t *testing.T) (*sql.DB, any)
	}{
		{inbox.SQLite, func(t *testing.T) (*sql.DB, any) { db := openSQLite(t); return db, db }},
		{inbox.MySQL, func(t *testing.T) (*sql.DB, any) {
			testenv.Need(t, testenv.MariaDB)
			db := openSQL(t, "mysql", testenv.MySQLDSN())
			return db, db
		}},
		{inbox.Postgres, func(t *testing.T) (*sql.DB, any) {
			testenv.Need(t, testenv.Postgres)
			pool, err := pgxpool.New(context.Background(), testenv.PostgresDSN())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(pool.Close)
			return openSQL(t, "pgx", testenv.PostgresDSN()), pool
		}},
	} {
		t.Run(tc.dialect, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			db, handle := tc.open(t)
			table := uniqueTable()
			t.Cleanup(func() {
				db.Exec("DROP TABLE IF EXISTS " + table)
				db.Exec("DELETE FROM exactly_migrations WHERE scope = 'inbox:" + table + "'")
			})
			cfg := inbox.Config{Dialect: tc.dialect, Table: table, Consumer: "c"}
			ib, err := inbox.NewSQL(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := ib.Migrate(ctx, handle); err != nil {
				t.Fatal(err)
			}
			if tc.dialect == inbox.SQLite { // SQLite keeps indexed columns
				if _, err := db.Exec("DROP INDEX " + table + "_processed_idx"); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := db.Exec("ALTER TABLE " + table + " DROP COLUMN processed_at"); err != nil {
				t.Fatal(err)
			}
			ran := false
			try := func() error {
				t.Helper()
				ib, err := inbox.NewSQL(cfg) // a new process: nothing checked yet
				if err != nil {
					t.Fatal(err)
				}
				msg := &exactly.Message{ID: "m1", Topic: "t"}
				if tc.dialect == inbox.Postgres {
					_, err = ib.HandlePgx(ctx, handle.(*pgxpool.Pool), msg, func(context.Context, pgx.Tx) error { ran = true; return nil })
				} else {
					_, err = ib.Handle(ctx, db, msg, func(context.Context, *sql.Tx) error { ran = true; return nil })
				}
				return err
			}
			if err := try(); err == nil || !strings.Contains(err.Error(), table) || !strings.Contains(err.Error(), "missing columns processed_at") {
				t.Errorf("Handle on a table without processed_at: %v", err)
			}
			if err := ib.Check(ctx, db); err == nil || !strings.Contains(err.Error(), "missing columns processed_at") {
				t.Errorf("Check on a table without processed_at: %v", err)
			}
			if _, err := db.Exec("DROP TABLE " + table); err != nil {
				t.Fatal(err)
			}
			if err := try(); err == nil || !strings.Contains(err.Error(), "dropped or changed by hand") || !strings.Contains(err.Error(), "DELETE FROM") {
				t.Errorf("Handle on a dropped table: %v", err)
			}
			if ran {
				t.Error("fn ran on an unusable table")
			}
		})
	}
}
