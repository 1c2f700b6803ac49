package relaycore

import (
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/exactlyonce/exactly"
)

// Hooks are the calls both relays make as messages are confirmed, fail or
// are parked (their Config.Hooks add the source's own).
type Hooks struct {
	Published func(msgs []*exactly.Message, took time.Duration)
	Failed    func(msg *exactly.Message, attempt int, err error)
	Dead      func(msg *exactly.Message, err error)
}

// Tally counts what a relay did with its messages, logs it, and calls the
// hooks: the part of Stats and Hooks both relays share.
type Tally struct {
	Published, Republished, Failed, Dead, Batches atomic.Int64

	hooks   Hooks
	log     *slog.Logger
	failLog *FailureLog
}

// NewTally returns the tally of a relay logging to log with maxAttempts.
func NewTally(log *slog.Logger, maxAttempts int, hooks Hooks) *Tally {
	return &Tally{hooks: hooks, log: log, failLog: NewFailureLog(log, maxAttempts)}
}

// Confirmed counts a batch whose msgs the broker confirmed (and the relay
// recorded), and calls Hooks.Published with how long publishing took.
func (t *Tally) Confirmed(msgs []*exactly.Message, took time.Duration) {
	if len(msgs) == 0 {
		return
	}
	t.Published.Add(int64(len(msgs)))
	t.Batches.Add(1)
	if h := t.hooks.Published; h != nil {
		h(msgs, took)
	}
}

// Retrying counts and logs (see FailureLog) a failed publish that will be
// retried at next, and calls Hooks.Failed.
func (t *Tally) Retrying(m *exactly.Message, attempt int, next time.Time, err error, now time.Time) {
	t.failLog.Failed(m, attempt, next, err, now)
	t.FailedOnce(m, attempt, err)
}

// FailedOnce counts a failed publish that will be retried and calls
// Hooks.Failed, for a relay that logs the failure its own way.
func (t *Tally) FailedOnce(m *exactly.Message, attempt int, err error) {
	t.Failed.Add(1)
	if h := t.hooks.Failed; h != nil {
		h(m, attempt, err)
	}
}

// Parked counts and logs a message parked as dead after attempts
// publishes, and calls Hooks.Dead.
func (t *Tally) Parked(m *exactly.Message, attempts int, err error) {
	LogDead(t.log, m, attempts, err)
	t.Unreadable(m, err)
}

// Unreadable counts a message parked as dead before any publish (it could
// not be read; the reader logged why), and calls Hooks.Dead.
func (t *Tally) Unreadable(m *exactly.Message, err error) {
	t.Dead.Add(1)
	if h := t.hooks.Dead; h != nil {
		h(m, err)
	}
}
