package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	exnats "github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// runRelayNATS drains the outbox to JetStream through the nats publisher,
// with its defaults, on the row's own stream.
func runRelayNATS(ctx context.Context, b *bench) (result, error) {
	const id = "relay-nats"
	br, closeBroker, err := b.freshStream(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer closeBroker()
	pub, err := exnats.NewPublisher(br.js)
	if err != nil {
		return result{}, err
	}
	return b.drainRelay(ctx, id, br.subject, pub, br)
}

// runLatencyRelay writes one message per transaction with outbox.Enqueue at
// a steady rate while the relay, woken by LISTEN/NOTIFY, moves them to
// JetStream, and measures commit → PubAck (the time the nats publisher's
// Publish returned with the message confirmed).
func runLatencyRelay(ctx context.Context, b *bench) (result, error) {
	const id = "lat-relay"
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
	recording := probe.recording(inner)
	pool, closePool, err := b.relayPool(ctx)
	if err != nil {
		return result{}, err
	}
	defer closePool()
	r, err := relay.New(relay.Config{Outbox: ob, DB: pool, Publisher: recording, BatchSize: b.cfg.batch, Logger: b.quiet})
	if err != nil {
		return result{}, err
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	runErr := make(chan error, 1)
	go func() { runErr <- r.Run(rctx) }()
	// Ready once it holds its partitions; then give LISTEN a moment.
	if err := awaitRelay(ctx, runErr, "relay", func() (bool, error) { return r.Stats().Partitions > 0, nil }); err != nil {
		return result{}, err
	}
	sent, took, tm, err := b.relayLatency(ctx, id, ob, br, probe, cancel, runErr)
	if err != nil {
		return result{}, err
	}
	st := r.Stats()
	return latencyResult(probe, sent, took, fmt.Sprintf("one tx per message via outbox.Enqueue; %d batches (avg %.1f msgs); %s",
		st.Batches, float64(st.Published)/float64(max(st.Batches, 1)), tm.cpu())), nil
}

// awaitRelay waits until ready says the relay started as runErr's Run
// (what names it) is ready, then half a second more for it to settle.
func awaitRelay(ctx context.Context, runErr <-chan error, what string, ready func() (bool, error)) error {
	for {
		ok, err := ready()
		if err != nil {
			return err
		}
		if ok {
			break
		}
		select {
		case err := <-runErr:
			return fmt.Errorf("%s stopped at start: %v", what, err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	time.Sleep(500 * time.Millisecond)
	return nil
}

// relayLatency is the measured part of a relay's latency row, once the
// relay runs (its Run's outcome on runErr, stopped by cancel): the writers
// commit one message per transaction with outbox.Enqueue.
func (b *bench) relayLatency(ctx context.Context, id string, ob *outbox.Outbox, br *broker, probe *latencyProbe,
	cancel context.CancelFunc, runErr <-chan error) (int, time.Duration, *timer, error) {
	prod, err := b.producerPool(ctx)
	if err != nil {
		return 0, 0, nil, err
	}
	defer prod.Close()
	stop := func() error {
		cancel()
		if err := <-runErr; err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
		return nil
	}
	return b.measureLatency(ctx, id, br, probe, stop, enqueueOne(prod, ob, b.messages(br.subject)))
}

// measureLatency is the measured part of every latency row: send commits
// message after message at the row's rate until the probe has every ack;
// then stop (when not nil) stops the forwarder, and the stream must hold
// each message once.
func (b *bench) measureLatency(ctx context.Context, id string, br *broker, probe *latencyProbe, stop func() error,
	send func(ctx context.Context, i int) (string, error)) (sent int, took time.Duration, tm *timer, err error) {
	tm = b.startTimer(id)
	sent, took, err = b.produce(ctx, probe, send)
	if err == nil {
		err = probe.waitAcked(ctx, 30*time.Second)
	}
	tm.stop()
	if err == nil && stop != nil {
		err = stop()
	}
	if err == nil {
		err = br.checkStream(ctx, sent)
	}
	if err != nil {
		return 0, 0, nil, err
	}
	return sent, took, tm, nil
}

// enqueueOne is the application side of the latency rows of our relays:
// message i in a transaction of its own, written with outbox.Enqueue.
func enqueueOne(prod *pgxpool.Pool, ob *outbox.Outbox, gen *messages) func(ctx context.Context, i int) (string, error) {
	return func(ctx context.Context, i int) (string, error) {
		tx, err := prod.Begin(ctx)
		if err != nil {
			return "", err
		}
		m := gen.get(i)
		if err := ob.Enqueue(ctx, tx, m); err != nil {
			tx.Rollback(ctx)
			return "", err
		}
		return m.ID, tx.Commit(ctx)
	}
}
