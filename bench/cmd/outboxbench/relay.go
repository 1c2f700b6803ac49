package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/relay"
)

// runRelayNull drains the outbox to a publisher that confirms at once: what
// is left is the relay's own cost and the database's.
func runRelayNull(ctx context.Context, b *bench) (result, error) {
	null := exactly.PublisherFunc(func(context.Context, []*exactly.Message) error { return nil })
	return b.drainRelay(ctx, "relay-null", "exactlybench.relay_null.events", null, nil)
}

// drainRelay fills a fresh outbox, then times relay.Run from its start until
// the Published hook has counted every message (the hook runs after the
// broker confirmed a batch and its rows were removed).
func (b *bench) drainRelay(ctx context.Context, id, topic string, pub exactly.Publisher, br *broker) (result, error) {
	schema, drop, err := b.freshSchema(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer drop()
	ob, err := b.prefillOutbox(ctx, schema, topic)
	if err != nil {
		return result{}, err
	}

	pool, closePool, err := b.relayPool(ctx)
	if err != nil {
		return result{}, err
	}
	defer closePool()
	n := int64(b.cfg.n)
	var confirmed, publishing atomic.Int64
	done := make(chan struct{})
	var once sync.Once
	r, err := relay.New(relay.Config{
		Outbox:    ob,
		DB:        pool,
		Publisher: pub,
		BatchSize: b.cfg.batch,
		Logger:    b.quiet,
		Hooks: relay.Hooks{Published: func(msgs []*exactly.Message, took time.Duration) {
			publishing.Add(int64(took))
			if confirmed.Add(int64(len(msgs))) >= n {
				once.Do(func() { close(done) })
			}
		}},
	})
	if err != nil {
		return result{}, err
	}

	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	runErr := make(chan error, 1)
	tm := b.startTimer(id)
	go func() { runErr <- r.Run(rctx) }()
	select {
	case <-done:
	case err := <-runErr:
		tm.stop()
		if err == nil {
			err = errors.New("relay stopped before draining the outbox")
		}
		return result{}, err
	case <-ctx.Done():
		tm.stop()
		return result{}, fmt.Errorf("relay confirmed %d of %d messages: %w", confirmed.Load(), n, ctx.Err())
	}
	elapsed := tm.stop()
	cancel()
	if err := <-runErr; err != nil {
		return result{}, err
	}

	if left, err := b.pending(ctx, schema); err != nil {
		return result{}, err
	} else if left != 0 {
		return result{}, fmt.Errorf("%d rows still pending after the relay confirmed %d", left, confirmed.Load())
	}
	if br != nil {
		if err := br.checkStream(ctx, b.cfg.n); err != nil {
			return result{}, err
		}
	}
	st := r.Stats()
	note := fmt.Sprintf("%d batches (avg %.0f msgs); Publish took %.0f%% of the time", st.Batches,
		float64(st.Published)/float64(max(st.Batches, 1)), 100*float64(publishing.Load())/float64(elapsed))
	if st.Republished > 0 || st.Failed > 0 {
		note += fmt.Sprintf("; republished %d, failed %d", st.Republished, st.Failed)
	}
	note += "; " + tm.cpu()
	return result{msgs: int(confirmed.Load()), elapsed: elapsed, note: note}, nil
}

// relayPool is the pool the relay runs on: the shared one, or with
// -relay-async-commit one of its own whose sessions commit without waiting
// for the WAL flush.
func (b *bench) relayPool(ctx context.Context) (*pgxpool.Pool, func(), error) {
	if !b.cfg.relayAsyncCommit {
		return b.pool, func() {}, nil
	}
	cfg, err := pgxpool.ParseConfig(b.cfg.pgDSN)
	if err != nil {
		return nil, nil, err
	}
	cfg.MaxConns = 8
	cfg.ConnConfig.RuntimeParams["synchronous_commit"] = "off"
	cfg.AfterConnect = b.trackBackend
	cfg.ConnConfig.Tracer = &b.sqlTrace
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	return pool, pool.Close, nil
}
