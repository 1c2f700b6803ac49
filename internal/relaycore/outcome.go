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
