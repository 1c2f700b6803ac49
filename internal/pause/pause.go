// Package pause is the one pause of the module's retry and back-off loops.
package pause

import (
	"context"
	"time"
)

// For waits d or until ctx ends, and reports whether it waited d.
func For(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
