package exactly

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Handler applies the effect of one message. A nil error means the effect is
// durable: the consumer then acknowledges the message (or commits its
// offset). An error means it is not: the consumer retries it, and after
// RetryPolicy.MaxAttempts hands it to the dead-letter destination.
//
// Brokers redeliver, so a Handler runs more than once for the same message
// ID unless it is wrapped by the inbox, which applies the effect once per ID.
type Handler func(ctx context.Context, msg *Message) error

// RetryPolicy says how a consumer retries a failing handler before it gives
// up on the message and dead-letters it. The zero value takes the defaults.
type RetryPolicy struct {
	// MaxAttempts is how many times the handler runs for one delivery before
	// the message is dead-lettered. Default 5.
	MaxAttempts int
	// InitialBackoff is the wait after the first failure; it doubles per
	// attempt up to MaxBackoff, with jitter. Defaults 100ms and 10s.
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
}

// WithDefaults fills in the zero fields and checks the others.
func (p RetryPolicy) WithDefaults() (RetryPolicy, error) {
	if p.MaxAttempts < 0 || p.InitialBackoff < 0 || p.MaxBackoff < 0 {
		return p, errors.New("exactly: RetryPolicy fields must not be negative")
	}
	if p.MaxAttempts == 0 {
		p.MaxAttempts = 5
	}
	if p.InitialBackoff == 0 {
		p.InitialBackoff = 100 * time.Millisecond
	}
	if p.MaxBackoff == 0 {
		p.MaxBackoff = 10 * time.Second
	}
	if p.MaxBackoff < p.InitialBackoff {
		return p, fmt.Errorf("exactly: RetryPolicy.MaxBackoff (%s) is below InitialBackoff (%s)", p.MaxBackoff, p.InitialBackoff)
	}
	return p, nil
}

// Backoff is the wait after the given failed attempt (1 for the first):
// exponential, capped at MaxBackoff, with jitter (50-100% of the value) so
// that many consumers do not retry in step.
func (p RetryPolicy) Backoff(attempt int) time.Duration {
	d := p.InitialBackoff
	for i := 1; i < attempt && d < p.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, p.MaxBackoff)
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

// Headers a dead-lettered message carries beside its own.
const (
	HeaderDeadReason   = "exactly-dead-reason"
	HeaderDeadAttempts = "exactly-dead-attempts"
	HeaderDeadTopic    = "exactly-dead-topic" // where it was consumed from
	HeaderDeadAt       = "exactly-dead-at"
)

// ErrPanic wraps a panic recovered from a handler.
var ErrPanic = errors.New("handler panicked")
