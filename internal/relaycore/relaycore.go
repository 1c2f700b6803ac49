// Package relaycore holds what the polling relay (relay) and the CDC relay
// (pgcdc) share: the engine both publish through (engine.go: a Source
// feeds it batches in order, it hands them to the broker, one at a time or
// pipelined, backs off after an outage and gives the outcomes back in
// order), the settings' checks and the retry defaults, the start-up
// retries and the shutdown grace (this file), and what the outcome of a
// published batch does: the verdict on each message (Judge: per-key order,
// the park rule, backoff) and the log lines (outcome.go), and the counters,
// hooks and failure logs behind both relays' Stats (Tally, tally.go).
package relaycore

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/exactlyonce/exactly/internal/pause"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// The retry settings' defaults of both relays.
const (
	DefaultMaxAttempts    = 25
	DefaultInitialBackoff = time.Second
	DefaultMaxBackoff     = 5 * time.Minute
)

// Fields are numeric settings of a Config, by field name.
type Fields []struct {
	Name  string
	Value int64
}

// NonNegative fails for the first field below zero, naming it.
func NonNegative(fields Fields) error {
	for _, f := range fields {
		if f.Value < 0 {
			return fmt.Errorf("Config.%s must not be negative", f.Name)
		}
	}
	return nil
}

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

// StartRetrying runs start until it succeeds, fails for a reason that
// waiting will not fix (anything but sqldb.Transient: a missing table,
// privileges, wal_level), or ctx ends. A database that is restarting or
// unreachable when a relay starts is waited for, as it is later, with
// backoff(failures) capped at maxWait between tries. It returns nil once
// ctx ended while waiting; the caller checks ctx.
func StartRetrying(ctx context.Context, log *slog.Logger, backoff func(attempt int) time.Duration, maxWait time.Duration, start func() error) error {
	for failures := 1; ; failures++ {
		err := start()
		if err == nil || ctx.Err() != nil || !sqldb.Transient(err) {
			return err
		}
		wait := min(backoff(failures), maxWait)
		log.Warn("database not reachable at start; retrying", "err", err, "in", wait)
		if !pause.For(ctx, wait) {
			return nil
		}
	}
}
