package kafka_test

import (
	"context"
	"database/sql"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly/kafka"
)

// The offsets table's public migration entry points, on SQLite (no
// server): the first apply reports every version, the second none, and the
// dry run shows exactly what is pending.
func TestOffsetsTableMigrations(t *testing.T) {
	ctx := context.Background()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "o.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := kafka.NewOffsetsTable("sqlite", "bad name"); err == nil || !strings.Contains(err.Error(), "bad name") {
		t.Fatalf("an unsafe table name: got %v, want an error naming it", err)
	}
	ot, err := kafka.NewOffsetsTable("sqlite", "")
	if err != nil {
		t.Fatal(err)
	}
	if ot.Table() != kafka.DefaultOffsetsTable {
		t.Fatalf("Table() = %q, want the default %q", ot.Table(), kafka.DefaultOffsetsTable)
	}
	all, err := ot.MigrationSQL(ctx, nil)
	if err != nil || !strings.Contains(all, kafka.DefaultOffsetsTable) {
		t.Fatalf("every migration without a database: %v\n%s", err, all)
	}
	pending, err := ot.MigrationSQL(ctx, db)
	if err != nil || pending != all {
		t.Fatalf("on an empty database the pending SQL should be every migration: %v\n%s", err, pending)
	}
	applied, err := ot.ApplyMigrations(ctx, db)
	if err != nil || len(applied) == 0 || !slices.IsSorted(applied) {
		t.Fatalf("first apply: versions %v, err %v", applied, err)
	}
	if again, err := ot.ApplyMigrations(ctx, db); err != nil || len(again) != 0 {
		t.Fatalf("second apply: versions %v (want none), err %v", again, err)
	}
	if pending, err := ot.MigrationSQL(ctx, db); err != nil || pending != "" {
		t.Fatalf("after applying, pending SQL %q, err %v", pending, err)
	}
	if err := kafka.MigrateOffsets(ctx, db, "sqlite", ""); err != nil {
		t.Fatalf("MigrateOffsets on a migrated table: %v", err)
	}
}
