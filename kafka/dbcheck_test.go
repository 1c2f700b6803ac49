package kafka_test

import (
	"strings"
	"testing"
	"time"

	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
)

// TestDBConsumerRefusesUnusableTable: an offsets table that lacks a column
// the consumer needs, or that was dropped by hand after migrating, stops
// Run at start with one error naming the table and what is wrong, before
// any record is handled.
func TestDBConsumerRefusesUnusableTable(t *testing.T) {
	t.Parallel()
	f := newConsumerFixture(t, 1, 1)
	runErr := func() error {
		t.Helper()
		c, err := kafka.NewDBConsumer(f.seeds(), f.config(t, "g-"+f.topic, f.effectHandler("a")))
		if err != nil {
			t.Fatal(err)
		}
		return testenv.ReturnsWithin(t, 15*time.Second, "the consumer ran on an offsets table it cannot use", c.Run)
	}
	if _, err := f.db.Exec("ALTER TABLE " + f.offsets + " DROP COLUMN next_offset"); err != nil {
		t.Fatal(err)
	}
	if err := runErr(); err == nil || !strings.Contains(err.Error(), f.offsets) || !strings.Contains(err.Error(), "missing columns next_offset") {
		t.Errorf("Run on an offsets table without next_offset = %v", err)
	}
	if _, err := f.db.Exec("DROP TABLE " + f.offsets); err != nil {
		t.Fatal(err)
	}
	if err := runErr(); err == nil || !strings.Contains(err.Error(), "dropped or changed by hand") || !strings.Contains(err.Error(), "DELETE FROM") {
		t.Errorf("Run on a dropped offsets table = %v", err)
	}
	if got := f.effects(t); len(got) != 0 {
		t.Errorf("records handled on an unusable offsets table: %v", got)
	}
}
