package kafka

import (
	"context"
	"fmt"
	"time"

	"github.com/exactlyonce/exactly/internal/sqldb"
)

// check runs when a DB-offsets consumer starts: an offsets table that is
// missing or lacks a column is an error naming the table and what to do
// (apply the migrations, or reset them after a table dropped by hand); a
// database that cannot be reached is waited for. It returns nil when ctx
// ends first.
func (d *dbOffsets) check(ctx context.Context) error {
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		err := d.store.Verify(ctx, d.db)
		if err == nil || ctx.Err() != nil {
			return nil
		}
		if !sqldb.Transient(err) {
			return fmt.Errorf("kafka: %w", err)
		}
		d.log.Warn("database not reachable at start; retrying", "err", err, "in", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}
