package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	exnats "github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
)

// latencyFixture is what every latency row of our relays writes to and
// publishes into: an outbox in a schema of the row's own and a fresh
// stream. done removes both.
func (b *bench) latencyFixture(ctx context.Context, id string) (*outbox.Outbox, *broker, func(), error) {
	schema, drop, err := b.freshSchema(ctx, id)
	if err != nil {
		return nil, nil, nil, err
	}
	ob, err := b.newOutbox(ctx, schema)
	if err != nil {
		drop()
		return nil, nil, nil, err
	}
	br, closeBroker, err := b.freshStream(ctx, id)
	if err != nil {
		drop()
		return nil, nil, nil, err
	}
	return ob, br, func() { closeBroker(); drop() }, nil
}

// runLatencyFloor is the least a commit → ack path costs here: each writer
// commits its transaction (the same outbox.Enqueue as row 6a, on the same
// server) and then publishes the same message to JetStream itself, with
// the headers the nats publisher sends, and waits for its PubAck. No relay,
// no table read: the broker round trip after the commit and nothing else.
func runLatencyFloor(ctx context.Context, b *bench) (result, error) {
	const id = "lat-floor"
	ob, br, done, err := b.latencyFixture(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer done()
	prod, err := b.producerPool(ctx)
	if err != nil {
		return result{}, err
	}
	defer prod.Close()
	probe := newLatencyProbe()
	gen := b.messages(br.subject)
	sent, took, tm, err := b.measureLatency(ctx, id, br, probe, nil, func(ctx context.Context, i int) (string, error) {
		tx, err := prod.Begin(ctx)
		if err != nil {
			return "", err
		}
		m := gen.get(i)
		if err := ob.Enqueue(ctx, tx, m); err != nil {
			tx.Rollback(ctx)
			return "", err
		}
		if err := tx.Commit(ctx); err != nil {
			return "", err
		}
		now := time.Now()
		probe.commit(m.ID, now)
		probe.hand(now, m.ID)
		if _, err := br.js.PublishMsg(ctx, natsMsg(m)); err != nil {
			return "", err
		}
		probe.ack(time.Now(), m.ID)
		return m.ID, nil
	})
	if err != nil {
		return result{}, err
	}
	return latencyResult(probe, sent, took, "one tx per message via outbox.Enqueue, then the writer's own PublishMsg of it and its PubAck; "+tm.cpu()), nil
}

// runLatencyCDC is row 6a with the CDC relay (pgcdc, logical replication
// with pgoutput) in place of the polling relay: the same server, writers,
// schedule, publisher and stream settings. It needs wal_level=logical on
// the -pg server (-pg private starts one).
func runLatencyCDC(ctx context.Context, b *bench) (result, error) {
	const id = "lat-cdc"
	var level string
	if err := b.pool.QueryRow(ctx, "SHOW wal_level").Scan(&level); err != nil {
		return result{}, err
	}
	if level != "logical" {
		return result{}, fmt.Errorf("row 6c needs wal_level=logical on the -pg server, which has %s (-pg private starts a server that has it)", level)
	}
	ob, br, done, err := b.latencyFixture(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer done()
	inner, err := exnats.NewPublisher(br.js)
	if err != nil {
		return result{}, err
	}
	probe := newLatencyProbe()
	const slot = "exactly_bench_lat_cdc"
	cleanup := func(ctx context.Context) {
		pgcdc.DropSlot(ctx, b.cfg.pgDSN, slot)
		b.pool.Exec(ctx, "DROP PUBLICATION IF EXISTS "+pgx.Identifier{slot}.Sanitize())
	}
	cleanup(ctx)
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		cleanup(cctx)
	}()
	r, err := pgcdc.New(pgcdc.Config{DSN: b.cfg.pgDSN, Slot: slot, Table: ob.Table(), Publisher: probe.recording(inner),
		BatchSize: b.cfg.batch, Logger: b.quiet})
	if err != nil {
		return result{}, err
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	runErr := make(chan error, 1)
	go func() { runErr <- r.Run(rctx) }()
	// Ready once the slot streams; its WAL sender is counted as the
	// relay's backend in the CPU note. Then give it a moment.
	if err := awaitRelay(ctx, runErr, "CDC relay", func() (bool, error) {
		var pid *int32
		err := b.pool.QueryRow(ctx, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&pid)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return false, err
		}
		if pid != nil {
			b.pgBackends.Add(int(*pid))
		}
		return pid != nil, nil
	}); err != nil {
		return result{}, err
	}
	sent, took, tm, err := b.relayLatency(ctx, id, ob, br, probe, cancel, runErr)
	if err != nil {
		return result{}, err
	}
	st := r.Stats()
	return latencyResult(probe, sent, took, fmt.Sprintf("one tx per message via outbox.Enqueue; pgcdc (pgoutput), rows deleted after the ack; %d batches (avg %.1f msgs); %s",
		st.Batches, float64(st.Published)/float64(max(st.Batches, 1)), tm.cpu())), nil
}
