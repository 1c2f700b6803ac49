// Package relaycore holds what the polling relay (relay) and the CDC relay
// (pgcdc) share: the retry settings' defaults and the shutdown grace.
package relaycore

import (
	"context"
	"fmt"
	"time"
)

// The retry settings' defaults of both relays.
const (
	DefaultMaxAttempts    = 25
	DefaultInitialBackoff = time.Second
	DefaultMaxBackoff     = 5 * time.Minute
)

// RetryDefaults fills in the retry settings left zero and checks that
// maxBackoff is not below initialBackoff. The error names the fields of
// Config.
func RetryDefaults(maxAttempts *int, initialBackoff, maxBackoff *time.Duration) error {
	if *maxAttempts == 0 {
		*maxAttempts = DefaultMaxAttempts
	}
	if *initialBackoff == 0 {
		*initialBackoff = DefaultInitialBackoff
	}
	if *maxBackoff == 0 {
		*maxBackoff = DefaultMaxBackoff
	}
	if *maxBackoff < *initialBackoff {
		return fmt.Errorf("Config.MaxBackoff (%s) is below InitialBackoff (%s)", *maxBackoff, *initialBackoff)
	}
	return nil
}

// Grace returns a context for the work that must outlive ctx a little (the
// batch being published, the writes that finish it): it ends grace after
// ctx ends, or when stop is called. Call stop when that work is done.
func Grace(ctx context.Context, grace time.Duration) (_ context.Context, stop context.CancelFunc) {
	stopCtx, stopCancel := context.WithCancel(context.WithoutCancel(ctx))
	go func() {
		select {
		case <-ctx.Done():
		case <-stopCtx.Done():
			return
		}
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-t.C:
			stopCancel()
		case <-stopCtx.Done():
		}
	}()
	return stopCtx, stopCancel
}
