package pginstance_test

import (
	"context"
	"testing"
	"time"

	"github.com/exactlyonce/exactly/internal/pginstance"
	"github.com/jackc/pgx/v5"
)

func TestStartRestartLogical(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	in, err := pginstance.Start(ctx, pginstance.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Remove()

	query := func() string {
		c, err := pgx.Connect(ctx, in.DSN("test"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		var lvl string
		if err := c.QueryRow(ctx, "SHOW wal_level").Scan(&lvl); err != nil {
			t.Fatal(err)
		}
		return lvl
	}
	if got := query(); got != "logical" {
		t.Fatalf("wal_level = %q, want logical", got)
	}
	if err := in.Restart(ctx, "immediate"); err != nil {
		t.Fatal(err)
	}
	if got := query(); got != "logical" {
		t.Fatalf("after restart wal_level = %q", got)
	}
	if err := in.Stop(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	if in.Running(ctx) {
		t.Fatal("server still running after Stop")
	}
}
