package testenv

import (
	"context"
	"math/rand/v2"
	"os"
	"syscall"
	"testing"
	"time"
)

// KillSelf kills the calling process with SIGKILL with probability odds:
// a crash at that exact point, for the child processes of crash tests.
func KillSelf(odds float64) {
	if rand.Float64() < odds {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		time.Sleep(time.Hour)
	}
}

// RunUntil runs run until it returns or, checked every 50 ms, done reports
// true; then it cancels run and returns run's result.
func RunUntil(ctx context.Context, run func(context.Context) error, done func(context.Context) bool) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	result := make(chan error, 1)
	go func() { result <- run(ctx) }()
	for {
		select {
		case err := <-result:
			return err
		case <-time.After(50 * time.Millisecond):
		}
		if done(ctx) {
			cancel()
			return <-result
		}
	}
}

// ReturnsWithin runs run and returns its result when it returns within d,
// as a component refusing to start should. When it is still running then,
// the test fails with what: run is cancelled and waited for.
func ReturnsWithin(t testing.TB, d time.Duration, what string, run func(context.Context) error) error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	result := make(chan error, 1)
	go func() { result <- run(ctx) }()
	select {
	case err := <-result:
		return err
	case <-time.After(d):
		cancel()
		<-result
		t.Fatal(what)
		return nil
	}
}
