package main

import (
	"context"
	"os"
	"time"

	"github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/pgcdc"
)

// relayCDC is the CDC relay: pgcdc reads the outbox inserts from a logical
// replication slot (through the fault proxy, like every other connection)
// and publishes them to NATS.
func (w *worker) relayCDC(ctx context.Context) error {
	nc, js, err := connectNATS()
	if err != nil {
		return err
	}
	defer nc.Close()
	pub, err := nats.NewPublisher(js)
	if err != nil {
		return err
	}
	r, err := pgcdc.New(pgcdc.Config{
		DSN: os.Getenv("CHAOS_PG"), Slot: "chaos_cdc", Table: outboxCDC, Publisher: pub,
		BatchSize: 200, MaxAttempts: 1_000_000, InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second,
		HeartbeatInterval: 2 * time.Second, ShutdownTimeout: 5 * time.Second, Logger: w.log,
	})
	if err != nil {
		return err
	}
	return r.Run(ctx)
}
