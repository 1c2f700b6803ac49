package relaycore

import (
	"errors"
	"log/slog"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/ratelog"
)

// Parks reports whether a message whose publish failed for the attempt-th
// time with err is parked as dead: it has had maxAttempts, or the broker
// refused it for good (exactly.ErrUnpublishable), which no retry can fix.
func Parks(attempt, maxAttempts int, err error) bool {
	return attempt >= maxAttempts || errors.Is(err, exactly.ErrUnpublishable)
}

// LogDead logs a message parked as dead after attempts publishes, with the
// last error.
func LogDead(log *slog.Logger, m *exactly.Message, attempts int, err error) {
	log.Warn("message parked as dead", "id", m.ID, "topic", m.Topic, "key", m.Key, "attempts", attempts, "err", err)
}

// FailureLogEvery is how often, at most, a failed publish is logged at warn
// level per topic; the first failure of a topic is logged at once, and each
// line counts the failures of the topic left out since the one before.
const FailureLogEvery = time.Minute

// FailureLog logs the failed publishes of one relay that will be retried:
// at warn level, rate-limited per topic (a topic with no stream or no
// permission fails every message and every retry), and at debug level
// every time.
type FailureLog struct {
	log         *slog.Logger
	lim         *ratelog.Limiter
	maxAttempts int
}

// NewFailureLog returns the failure log of a relay with maxAttempts.
func NewFailureLog(log *slog.Logger, maxAttempts int) *FailureLog {
	return &FailureLog{log: log, lim: ratelog.New(FailureLogEvery), maxAttempts: maxAttempts}
}

// Failed logs the attempt-th failed publish of m (1 for the first), tried
// again at next.
func (l *FailureLog) Failed(m *exactly.Message, attempt int, next time.Time, err error, now time.Time) {
	ok, suppressed := l.lim.Allow(m.Topic, now)
	if !ok {
		l.log.Debug("publish failed; will retry", "id", m.ID, "topic", m.Topic, "key", m.Key, "attempt", attempt, "err", err)
		return
	}
	attrs := []any{"topic", m.Topic, "key", m.Key, "id", m.ID, "attempt", attempt, "max_attempts", l.maxAttempts,
		"next_attempt_in", next.Sub(now).Round(time.Millisecond), "err", err}
	if suppressed > 0 {
		attrs = append(attrs, "suppressed", suppressed)
	}
	msg := "publish failed; will retry"
	if m.Key != "" {
		msg = "publish failed; the key's later messages wait for its retry"
	}
	l.log.Warn(msg, attrs...)
}

// Kind is what a relay does with one message of a published batch.
type Kind uint8

const (
	// Confirmed: the broker has it; finish it.
	Confirmed Kind = iota
	// Behind: an earlier message of its key is not confirmed; it stays
	// pending, to be published again after that one (whatever its own
	// outcome), so the key's last delivery is in order.
	Behind
	// Retry: it failed and is tried again at Verdict.Next; its key waits.
	Retry
	// Park: it failed for the last time (MaxAttempts, or unpublishable).
	Park
)

// Verdict is the fate of one message of a published batch.
type Verdict struct {
	Kind    Kind
	Attempt int       // Retry, Park: the failed attempt, 1 for the first
	Next    time.Time // Retry: when it is tried again
}

// Judge reads the per-message outcomes of one published batch (from
// exactly.Verdicts, not an outage), message by message in batch order, by
// the rules both relays keep: per-key order, the park rule, exponential
// backoff. Make one per batch with NewJudge.
type Judge struct {
	maxAttempts int
	backoff     func(attempt int) time.Duration
	now         time.Time
	heldBack    map[string]bool // keys with an earlier unconfirmed message in this batch
}

// NewJudge returns the judge of a batch whose outcome arrived at now.
func NewJudge(maxAttempts int, backoff func(attempt int) time.Duration, now time.Time) *Judge {
	return &Judge{maxAttempts: maxAttempts, backoff: backoff, now: now, heldBack: map[string]bool{}}
}

// Of returns the verdict on the next message of the batch: its key, the
// failed attempts it had before this publish, its error (nil: confirmed),
// and whether its key is held back behind an earlier message from an
// earlier batch.
func (j *Judge) Of(key string, attempts int, err error, behind bool) Verdict {
	if key != "" && (behind || j.heldBack[key]) {
		return Verdict{Kind: Behind}
	}
	if err == nil {
		return Verdict{Kind: Confirmed}
	}
	attempt := attempts + 1
	if Parks(attempt, j.maxAttempts, err) {
		return Verdict{Kind: Park, Attempt: attempt}
	}
	if key != "" {
		j.heldBack[key] = true
	}
	return Verdict{Kind: Retry, Attempt: attempt, Next: j.now.Add(j.backoff(attempt))}
}
