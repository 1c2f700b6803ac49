// Package pause is the one pause of the module's retry and back-off loops,
// and the one ticker of its periodic checks.
package pause

import (
	"context"
	"time"
)

// Every calls fn every d until ctx ends or fn returns false.
func Every(ctx context.Context, d time.Duration, fn func() bool) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !fn() {
			return
		}
	}
}

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
