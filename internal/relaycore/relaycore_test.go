package relaycore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
)

func TestParks(t *testing.T) {
	t.Parallel()
	down := errors.New("connection refused")
	tooBig := fmt.Errorf("publish: %w", exactly.Unpublishable(errors.New("too large")))
	for _, c := range []struct {
		attempt int
		err     error
		want    bool
	}{
		{1, down, false},
		{24, down, false},
		{25, down, true},
		{26, down, true},
		{1, tooBig, true},
		{1, exactly.ErrOutcomeUnknown, false},
	} {
		if got := Parks(c.attempt, 25, c.err); got != c.want {
			t.Errorf("Parks(%d, 25, %v) = %v, want %v", c.attempt, c.err, got, c.want)
		}
	}
}

func TestNonNegative(t *testing.T) {
	t.Parallel()
	if err := NonNegative(Fields{{"BatchSize", 0}, {"MaxAttempts", 3}}); err != nil {
		t.Fatalf("NonNegative of valid fields = %v", err)
	}
	err := NonNegative(Fields{{"BatchSize", 1}, {"MaxBackoff", -1}, {"LeaseTTL", -2}})
	if err == nil || err.Error() != "Config.MaxBackoff must not be negative" {
		t.Fatalf("NonNegative = %v, want the first negative field named", err)
	}
}

// StartRetrying retries what waiting can fix and nothing else.
func TestStartRetrying(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	noWait := func(int) time.Duration { return 0 }

	calls := 0
	err := StartRetrying(t.Context(), log, noWait, time.Second, func() error {
		if calls++; calls < 3 {
			return fmt.Errorf("dial: %w", syscall.ECONNREFUSED)
		}
		return nil
	})
	if err != nil || calls != 3 {
		t.Fatalf("StartRetrying = %v after %d calls, want nil after 3", err, calls)
	}
	if n := strings.Count(buf.String(), "database not reachable at start; retrying"); n != 2 {
		t.Errorf("logged %d retries, want 2:\n%s", n, buf.String())
	}

	missing := errors.New(`relation "exactly_outbox" does not exist`)
	calls = 0
	if err := StartRetrying(t.Context(), log, noWait, time.Second, func() error { calls++; return missing }); err != missing || calls != 1 {
		t.Fatalf("StartRetrying = %v after %d calls, want the error at once", err, calls)
	}

	ctx, cancel := context.WithCancel(t.Context())
	calls = 0
	err = StartRetrying(ctx, log, func(int) time.Duration { return time.Hour }, time.Hour, func() error {
		calls++
		cancel()
		return syscall.ECONNREFUSED
	})
	if err != syscall.ECONNREFUSED || calls != 1 {
		t.Fatalf("StartRetrying with ctx ended = %v after %d calls, want the last error, no retry", err, calls)
	}
}

// FailureLog warns once per topic per FailureLogEvery, counting what it
// left out, and logs every failure at debug level.
func TestFailureLog(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	l := NewFailureLog(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})), 25)
	m := &exactly.Message{ID: "m1", Topic: "orders", Key: "k"}
	now := time.Now()
	err := errors.New("no stream")
	l.Failed(m, 1, now.Add(time.Second), err, now)
	l.Failed(m, 2, now.Add(2*time.Second), err, now.Add(time.Second))
	l.Failed(m, 3, now.Add(FailureLogEvery+time.Minute), err, now.Add(FailureLogEvery+time.Second))
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("got %d lines, want 3:\n%s", len(lines), buf.String())
	}
	for i, want := range []string{
		`level=WARN msg="publish failed; the key's later messages wait for its retry" topic=orders key=k id=m1 attempt=1 max_attempts=25`,
		`level=DEBUG msg="publish failed; will retry" id=m1 topic=orders key=k attempt=2`,
		`attempt=3 max_attempts=25 next_attempt_in=59s err="no stream" suppressed=1`,
	} {
		if !strings.Contains(lines[i], want) {
			t.Errorf("line %d = %s, want it to hold %s", i+1, lines[i], want)
		}
	}
}

// Judge keeps each key in order within a batch: after a message of a key
// fails, the key's later messages stay pending, confirmed or not; a parked
// message does not hold its key; unkeyed messages never wait for others.
func TestJudge(t *testing.T) {
	t.Parallel()
	now := time.Now()
	backoff := func(attempt int) time.Duration { return time.Duration(attempt) * time.Second }
	down := errors.New("timeout")
	tooBig := exactly.Unpublishable(errors.New("too large"))
	j := NewJudge(3, backoff, now)
	for i, c := range []struct {
		key      string
		attempts int
		err      error
		behind   bool
		want     Verdict
	}{
		{"a", 0, nil, false, Verdict{Kind: Confirmed}},
		{"a", 1, down, false, Verdict{Kind: Retry, Attempt: 2, Next: now.Add(2 * time.Second)}},
		{"a", 0, nil, false, Verdict{Kind: Behind}},
		{"a", 0, down, false, Verdict{Kind: Behind}},
		{"b", 0, tooBig, false, Verdict{Kind: Park, Attempt: 1}},
		{"b", 0, nil, false, Verdict{Kind: Confirmed}},
		{"c", 2, down, false, Verdict{Kind: Park, Attempt: 3}},
		{"d", 0, nil, true, Verdict{Kind: Behind}},
		{"", 0, down, false, Verdict{Kind: Retry, Attempt: 1, Next: now.Add(time.Second)}},
		{"", 0, nil, false, Verdict{Kind: Confirmed}},
		{"", 0, nil, true, Verdict{Kind: Confirmed}},
	} {
		if got := j.Of(c.key, c.attempts, c.err, c.behind); got != c.want {
			t.Errorf("message %d (key %q, %d attempts, err %v, behind %v): %+v, want %+v", i, c.key, c.attempts, c.err, c.behind, got, c.want)
		}
	}
}
