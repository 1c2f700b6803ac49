package main

import (
	"context"
	"database/sql"
	"errors"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/outbox"
)

func TestMigrateBadInput(t *testing.T) {
	for _, tc := range []struct{ args, want string }{
		{"migrate", "no database given"},
		{"migrate --db oracle://x", "unrecognised database DSN"},
		{"migrate --db postgres://u:secret@127.0.0.1:1/db --table bad;name", "--table: "},
		{"migrate --db postgres://u:secret@127.0.0.1:1/db --inbox-table a.b.c", "--inbox-table: "},
		{"migrate --db postgres://u:secret@127.0.0.1:1/db --offsets-table x-y", "--offsets-table: "},
		{"migrate --db postgres://u:secret@127.0.0.1:1/db --only outbox,queue", `--only: unknown part "queue"`},
		{"migrate --db postgres://u:secret@127.0.0.1:1/db", "cannot reach the database postgres://u:***@127.0.0.1:1/db"},
	} {
		out, err := run(t, migrateCmd(), strings.Fields(tc.args)[1:]...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.args, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error()+out, "secret") {
			t.Errorf("%s: the password leaked: %v", tc.args, err)
		}
	}
}

// migrate creates the three tables the library would, idempotently; its dry
// run prints the SQL and changes nothing.
func TestMigrate(t *testing.T) {
	t.Run("Postgres", func(t *testing.T) {
		db := pgDB(t)
		schema := uniqueName("migrate_cmd")
		if _, err := db.Exec("CREATE SCHEMA " + schema); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Exec("DROP SCHEMA " + schema + " CASCADE") })
		testMigrate(t, db, testenv.PostgresDSN(), outbox.Postgres, schema+".")
	})
	t.Run("SQLite", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "m.db")
		db, _, err := openDB("sqlite:" + path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		testMigrate(t, db, "sqlite:"+path, outbox.SQLite, "")
	})
}

func testMigrate(t *testing.T, db *sql.DB, dsn, dialect, prefix string) {
	ctx := context.Background()
	args := []string{"--db", dsn, "--table", prefix + "ob", "--inbox-table", prefix + "ib", "--offsets-table", prefix + "offs"}
	tableExists := func(name string) bool {
		_, err := db.Exec("SELECT 1 FROM " + prefix + name + " WHERE 1 = 0")
		return err == nil
	}

	// Dry run on an empty database: every migration's SQL, nothing created.
	out := mustRun(t, migrateCmd(), append(args, "--dry-run")...)
	for _, want := range []string{"-- outbox table " + prefix + "ob", "-- inbox table " + prefix + "ib",
		"-- Kafka offsets table " + prefix + "offs", "-- version 1:", "CREATE TABLE"} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run lacks %q:\n%s", want, out)
		}
	}
	for _, n := range []string{"ob", "ib", "offs"} {
		if tableExists(n) {
			t.Fatalf("the dry run created %s", n)
		}
	}

	// --only picks a part.
	out = mustRun(t, migrateCmd(), append(args, "--only", "inbox")...)
	if !regexp.MustCompile(`inbox table \S*ib: applied version\(s\) 1`).MatchString(out) || strings.Contains(out, "outbox") {
		t.Errorf("--only inbox printed:\n%s", out)
	}
	if !tableExists("ib") || tableExists("ob") || tableExists("offs") {
		t.Fatal("--only inbox did not create exactly the inbox table")
	}

	// Everything, then again: nothing left to apply.
	out = mustRun(t, migrateCmd(), args...)
	for _, want := range []string{"outbox table " + prefix + "ob: applied version(s) 1", "inbox table " + prefix + "ib is up to date",
		"Kafka offsets table " + prefix + "offs: applied version(s) 1"} {
		if !strings.Contains(out, want) {
			t.Errorf("migrate lacks %q:\n%s", want, out)
		}
	}
	out = mustRun(t, migrateCmd(), args...)
	if strings.Count(out, "is up to date") != 3 {
		t.Errorf("second run applied something:\n%s", out)
	}
	out = mustRun(t, migrateCmd(), append(args, "--dry-run")...)
	if strings.Count(out, "up to date, nothing to apply") != 3 || strings.Contains(out, "CREATE") {
		t.Errorf("dry run after migrating:\n%s", out)
	}

	// The library sees the same schema: nothing pending, and it works.
	ob, err := outbox.New(outbox.Config{Dialect: dialect, Table: prefix + "ob"})
	if err != nil {
		t.Fatal(err)
	}
	if s, err := ob.MigrationSQL(ctx, db); err != nil || strings.TrimSpace(s) != "" {
		t.Errorf("outbox.MigrationSQL after the CLI: %q %v", s, err)
	}
	in, err := inbox.NewSQL(inbox.Config{Dialect: dialect, Table: prefix + "ib", Consumer: "c"})
	if err != nil {
		t.Fatal(err)
	}
	if s, err := in.MigrationSQL(ctx, db); err != nil || strings.TrimSpace(s) != "" {
		t.Errorf("inbox MigrationSQL after the CLI: %q %v", s, err)
	}
	if err := kafka.MigrateOffsets(ctx, db, dialect, prefix+"offs"); err != nil {
		t.Errorf("kafka.MigrateOffsets after the CLI: %v", err)
	}
	if st, err := ob.Status(ctx, db); err != nil || st.Pending != 0 {
		t.Errorf("status of the migrated outbox: %+v %v", st, err)
	}
}

// migrateDB is a database for the migrate tests: PostgreSQL in a schema of
// its own, MariaDB with tables of unique names in the test database, SQLite
// in a file of its own. prefix qualifies table names.
type migrateDB struct {
	db     *sql.DB
	dsn    string
	prefix string
}

func migrateDBs(t *testing.T) map[string]func(t *testing.T) migrateDB {
	return map[string]func(t *testing.T) migrateDB{
		"Postgres": func(t *testing.T) migrateDB {
			db := pgDB(t)
			schema := uniqueName("migrate_shape")
			if _, err := db.Exec("CREATE SCHEMA " + schema); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Exec("DROP SCHEMA " + schema + " CASCADE") })
			return migrateDB{db, testenv.PostgresDSN(), schema + "."}
		},
		"MySQL": func(t *testing.T) migrateDB {
			testenv.Need(t, testenv.MariaDB)
			db, err := sql.Open("mysql", testenv.MySQLDSN())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			return migrateDB{db, "mysql://" + testenv.MySQLDSN(), ""}
		},
		"SQLite": func(t *testing.T) migrateDB {
			path := filepath.Join(t.TempDir(), "m.db")
			db, _, err := openDB("sqlite:" + path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			return migrateDB{db, "sqlite:" + path, ""}
		},
	}
}

// uniqueTable is a fresh table name for d, dropped (with the outbox's
// sibling tables and its bookkeeping rows) at the end of the test.
func (d migrateDB) uniqueTable(t *testing.T, prefix string) string {
	name := uniqueName(prefix)
	t.Cleanup(func() {
		for _, s := range []string{"", "_leases", "_relays"} {
			d.db.Exec("DROP TABLE IF EXISTS " + d.prefix + name + s)
		}
		d.db.Exec("DELETE FROM " + d.prefix + "exactly_migrations WHERE scope LIKE '%" + name + "'")
	})
	return name
}

// migrateWithin runs `exactly migrate` and fails the test when it does not
// return within d.
func migrateWithin(t *testing.T, d time.Duration, args ...string) (string, error) {
	t.Helper()
	type result struct {
		out string
		err error
	}
	ch := make(chan result, 1)
	go func() {
		out, err := run(t, migrateCmd(), args...)
		ch <- result{out, err}
	}()
	select {
	case r := <-ch:
		return r.out, r.err
	case <-time.After(d):
		t.Fatalf("migrate %v did not return within %s", args, d)
		return "", nil
	}
}

// An existing table of another shape: migrate fails within seconds on
// every dialect, naming the step and what the table lacks, records nothing
// and leaves no lock behind (a second migrate fails the same way, at once).
func TestMigrateWrongShape(t *testing.T) {
	for name, open := range migrateDBs(t) {
		t.Run(name, func(t *testing.T) {
			d := open(t)
			table := d.uniqueTable(t, "shape_a")
			if _, err := d.db.Exec("CREATE TABLE " + d.prefix + table + " (id int primary key, payload text)"); err != nil {
				t.Fatal(err)
			}
			args := []string{"--db", d.dsn, "--table", d.prefix + table, "--only", "outbox"}
			for i := range 2 {
				out, err := migrateWithin(t, 20*time.Second, args...)
				if err == nil {
					t.Fatalf("run %d: migrate of a table of another shape succeeded:\n%s", i, out)
				}
				for _, want := range []string{"version 1 (create_outbox)", table, "missing columns seq", "rename or drop it"} {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("run %d: the error lacks %q: %v", i, want, err)
					}
				}
			}
			var n int
			if err := d.db.QueryRow("SELECT count(*) FROM " + d.prefix + "exactly_migrations WHERE scope = 'outbox:" + d.prefix + table + "'").Scan(&n); n != 0 || err != nil && !strings.Contains(err.Error(), "no such table") {
				t.Errorf("versions recorded for the unusable table: %d %v", n, err)
			}
		})
	}
}

// A table dropped by hand after migrating: migrate says so and how to reset
// instead of reporting it up to date, and following its advice works.
func TestMigrateDroppedTable(t *testing.T) {
	for name, open := range migrateDBs(t) {
		t.Run(name, func(t *testing.T) {
			d := open(t)
			table := d.uniqueTable(t, "dropped")
			args := []string{"--db", d.dsn, "--table", d.prefix + table, "--only", "outbox"}
			mustRun(t, migrateCmd(), args...)
			if _, err := d.db.Exec("DROP TABLE " + d.prefix + table); err != nil {
				t.Fatal(err)
			}
			if out, err := migrateWithin(t, 20*time.Second, append(args, "--dry-run")...); err == nil || !strings.Contains(err.Error(), "dropped or changed by hand") {
				t.Errorf("dry run after the table was dropped: %v\n%s", err, out)
			}
			_, err := migrateWithin(t, 20*time.Second, args...)
			if err == nil {
				t.Fatal("migrate after the table was dropped reported success")
			}
			for _, want := range []string{"does not exist", "dropped or changed by hand", "DELETE FROM"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("the error lacks %q: %v", want, err)
				}
			}
			reset := regexp.MustCompile(`(DELETE FROM .*);`).FindStringSubmatch(err.Error())
			if reset == nil {
				t.Fatalf("no reset statement in: %v", err)
			}
			if _, err := d.db.Exec(reset[1]); err != nil {
				t.Fatalf("the advised %q: %v", reset[1], err)
			}
			out := mustRun(t, migrateCmd(), args...)
			if !strings.Contains(out, "applied version(s) 1") {
				t.Errorf("migrate after the reset:\n%s", out)
			}
		})
	}
}

// The relay daemon refuses an outbox table that lacks a column it reads:
// it exits non-zero within seconds with one error naming the table and the
// column, and never logs "relay started".
func TestRelayRefusesUnusableTable(t *testing.T) {
	testenv.Need(t, testenv.NATS)
	bin := buildExactly(t)
	path := filepath.Join(t.TempDir(), "o.db")
	mustRun(t, migrateCmd(), "--db", "sqlite:"+path, "--table", "ob", "--only", "outbox")
	db, _, err := openDB("sqlite:" + path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("ALTER TABLE ob DROP COLUMN attempts"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "relay", "--db", "sqlite:"+path, "--table", "ob", "--broker", "nats",
		"--nats-url", testenv.NATSURL(), "--admin-addr", freeAddr(t))
	cmd.Env = relayEnvCleared()
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("the relay kept running on an outbox it cannot use:\n%s", out)
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() <= 0 {
		t.Errorf("want a non-zero exit, got %v", err)
	}
	if s := string(out); !strings.Contains(s, "ob") || !strings.Contains(s, "missing columns attempts") || strings.Contains(s, "relay started") {
		t.Errorf("relay output:\n%s", s)
	}
}
