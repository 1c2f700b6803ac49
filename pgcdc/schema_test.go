package pgcdc_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/pgcdc"
)

// TestStartRefusesUnusableTable: an outbox table that lacks a column the
// relay reads is refused at start with one error naming the table and the
// column, and so is a table dropped by hand while its migrations are
// recorded, with how to reset them.
func TestStartRefusesUnusableTable(t *testing.T) {
	t.Parallel()
	f := setup(t)
	ctx := context.Background()
	runErr := func() error {
		t.Helper()
		r, err := pgcdc.New(f.config(&exactlytest.Recorder{}))
		if err != nil {
			t.Fatal(err)
		}
		return testenv.ReturnsWithin(t, 15*time.Second, "the relay started on an outbox it cannot use", r.Run)
	}
	if _, err := f.pool.Exec(ctx, "ALTER TABLE "+f.ob.Table()+" DROP COLUMN attempts"); err != nil {
		t.Fatal(err)
	}
	if err := runErr(); err == nil || !strings.Contains(err.Error(), f.ob.Table()) || !strings.Contains(err.Error(), "missing columns attempts") {
		t.Errorf("Run on a table without attempts = %v", err)
	}
	if _, err := f.pool.Exec(ctx, "DROP TABLE "+f.ob.Table()); err != nil {
		t.Fatal(err)
	}
	if err := runErr(); err == nil || !strings.Contains(err.Error(), "dropped or changed by hand") || !strings.Contains(err.Error(), "DELETE FROM") {
		t.Errorf("Run on a dropped table = %v", err)
	}
}
