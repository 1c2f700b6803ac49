package sqldb_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib"
	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly/internal/sqldb"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// TestCheckColumns: one column reader for every dialect tells a missing
// table, a missing column, a column of the wrong kind and a NOT NULL column
// without a default that inserts would leave out, and accepts a table with
// the wanted columns and harmless extras.
func TestCheckColumns(t *testing.T) {
	for _, tc := range []struct {
		d          sqldb.Dialect
		open       func(t *testing.T) *sql.DB
		int, bytes string
	}{
		{sqldb.Postgres, func(t *testing.T) *sql.DB {
			testenv.Need(t, testenv.Postgres)
			return open(t, "pgx", testenv.PostgresDSN())
		}, "bigint", "bytea"},
		{sqldb.MySQL, func(t *testing.T) *sql.DB {
			testenv.Need(t, testenv.MariaDB)
			return open(t, "mysql", testenv.MySQLDSN())
		}, "BIGINT", "LONGBLOB"},
		{sqldb.SQLite, func(t *testing.T) *sql.DB {
			return open(t, "sqlite", "file:"+filepath.Join(t.TempDir(), "c.db"))
		}, "INTEGER", "BLOB"},
	} {
		t.Run(string(tc.d), func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			db := tc.open(t)
			name := fmt.Sprintf("cols_%d", time.Now().UnixNano()%1e12)
			id := sqldb.Ident{Name: name}
			t.Cleanup(func() { db.Exec("DROP TABLE IF EXISTS " + id.Quoted(tc.d)) })
			want := []sqldb.Want{{Name: "n", Kind: sqldb.Int}, {Name: "s", Kind: sqldb.Text}, {Name: "b", Kind: sqldb.Bytes}}
			inserted := []string{"n", "s", "b"}

			var se *sqldb.SchemaError
			err := sqldb.CheckColumns(ctx, db, tc.d, id, want, inserted)
			if !errors.As(err, &se) || !se.Missing {
				t.Fatalf("missing table: %v", err)
			}
			if _, err := db.Exec("CREATE TABLE " + id.Quoted(tc.d) + " (n " + tc.int + " NOT NULL, s " + tc.bytes +
				", extra_ok " + tc.int + " NOT NULL DEFAULT 0, extra_bad " + tc.int + " NOT NULL, extra_null " + tc.int + ")"); err != nil {
				t.Fatal(err)
			}
			err = sqldb.CheckColumns(ctx, db, tc.d, id, want, inserted)
			if !errors.As(err, &se) || se.Missing || !reflect.DeepEqual(se.Lacks, []string{"b"}) || !reflect.DeepEqual(se.Extra, []string{"extra_bad"}) {
				t.Fatalf("table lacking b: %#v (%v)", se, err)
			}
			// A binary column holds what a text column must on MySQL and
			// SQLite, not on PostgreSQL.
			if (len(se.Wrong) == 1) != (tc.d == sqldb.Postgres) {
				t.Errorf("s as %s: wrong = %q", tc.bytes, se.Wrong)
			}
			if err := sqldb.CheckColumns(ctx, db, tc.d, id, want[:1], nil); err != nil {
				t.Errorf("a table with the wanted column and extras: %v", err)
			}
			cols, err := sqldb.Columns(ctx, db, tc.d, id)
			if err != nil || len(cols) != 5 || cols[0].Name != "n" || cols[0].Nullable || !cols[2].HasDefault || cols[3].HasDefault || !cols[4].Nullable {
				t.Errorf("Columns = %+v, %v", cols, err)
			}
		})
	}
}

func open(t *testing.T, driver, dsn string) *sql.DB {
	db, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}
