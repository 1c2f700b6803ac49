// Package relaycore holds what the polling relay (relay) and the CDC relay
// (pgcdc) share: the retry settings' defaults, the shutdown grace and the
// log line of a failed publish.
package relaycore

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/ratelog"
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

// Failure is one failed publish of a message that will be retried.
type Failure struct {
	Msg         *exactly.Message
	Attempt     int // 1 for the first failure
	MaxAttempts int
	Next        time.Time // when it is tried again
	Err         error
}

// LogFailure logs f at warn level, at most as often as lim allows per
// topic (a line then says how many were suppressed), and at debug level
// otherwise.
func LogFailure(log *slog.Logger, lim *ratelog.Limiter, f Failure, now time.Time) {
	m := f.Msg
	ok, suppressed := lim.Allow(m.Topic, now)
	if !ok {
		log.Debug("publish failed; will retry", "id", m.ID, "topic", m.Topic, "key", m.Key, "attempt", f.Attempt, "err", f.Err)
		return
	}
	attrs := []any{"topic", m.Topic, "key", m.Key, "id", m.ID, "attempt", f.Attempt, "max_attempts", f.MaxAttempts,
		"next_attempt_in", f.Next.Sub(now).Round(time.Millisecond), "err", f.Err}
	if suppressed > 0 {
		attrs = append(attrs, "suppressed", suppressed)
	}
	msg := "publish failed; will retry"
	if m.Key != "" {
		msg = "publish failed; the key's later messages wait for its retry"
	}
	log.Warn(msg, attrs...)
}
