package main

import (
	"context"
	"database/sql"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

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
