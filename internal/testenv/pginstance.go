package testenv

import (
	"context"
	"testing"
	"time"

	"github.com/exactlyonce/exactly/internal/pginstance"
)

// LogicalPostgres starts a private PostgreSQL server with wal_level=logical
// for the test (the shared server's configuration stays as it is) and removes
// it when the test ends. A machine without the PostgreSQL server package
// skips the test, or fails it under CI.
func LogicalPostgres(t testing.TB, settings map[string]string) *pginstance.Instance {
	t.Helper()
	in := StartLogicalPostgres(t, settings)
	t.Cleanup(func() { _ = in.Remove() })
	return in
}

// StartLogicalPostgres is LogicalPostgres without the cleanup, for a
// TestMain that shares one server across a package (call Remove yourself).
func StartLogicalPostgres(t testing.TB, settings map[string]string) *pginstance.Instance {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	in, err := pginstance.Start(ctx, pginstance.Options{Settings: settings})
	if err != nil {
		if InCI() {
			t.Fatalf("private PostgreSQL server: %v", err)
		}
		t.Skipf("private PostgreSQL server: %v", err)
	}
	return in
}
