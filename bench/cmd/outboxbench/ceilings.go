package main

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	exnats "github.com/exactlyonce/exactly/nats"
)

// outboxRow is a whole outbox row, as the raw drain reads it.
type outboxRow struct {
	seq           int64
	id            string
	topic         string
	key           string
	keyHash       int32
	payload       []byte
	headers       *string
	createdAt     int64
	status        int16
	attempts      int32
	nextAttemptAt int64
	lastError     *string
	doneAt        *int64
}

// runSQLCeiling drains the outbox with the least work that still claims,
// reads and removes every row in order: one statement per batch, on one
// connection, each its own transaction.
func runSQLCeiling(ctx context.Context, b *bench) (result, error) {
	schema, drop, err := b.freshSchema(ctx, "sql")
	if err != nil {
		return result{}, err
	}
	defer drop()
	if _, err := b.prefillOutbox(ctx, schema, "exactlybench.sql.events"); err != nil {
		return result{}, err
	}
	t := pgx.Identifier{schema, "outbox"}.Sanitize()
	q := "DELETE FROM " + t + " WHERE seq IN (SELECT seq FROM " + t +
		" WHERE status = 0 ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)" +
		" RETURNING seq, id, topic, msg_key, key_hash, payload, headers, created_at, status, attempts, next_attempt_at, last_error, done_at"
	conn, err := b.pool.Acquire(ctx)
	if err != nil {
		return result{}, err
	}
	defer conn.Release()

	tm := b.startTimer("sql")
	total, batches := 0, 0
	for {
		rows, err := conn.Query(ctx, q, b.cfg.batch)
		if err != nil {
			tm.stop()
			return result{}, err
		}
		got := make([]outboxRow, 0, b.cfg.batch)
		for rows.Next() {
			var r outboxRow
			if err := rows.Scan(&r.seq, &r.id, &r.topic, &r.key, &r.keyHash, &r.payload, &r.headers, &r.createdAt,
				&r.status, &r.attempts, &r.nextAttemptAt, &r.lastError, &r.doneAt); err != nil {
				rows.Close()
				tm.stop()
				return result{}, err
			}
			got = append(got, r)
		}
		if err := rows.Err(); err != nil {
			tm.stop()
			return result{}, err
		}
		if len(got) == 0 {
			break
		}
		total += len(got)
		batches++
	}
	elapsed := tm.stop()
	if total != b.cfg.n {
		return result{}, fmt.Errorf("drained %d rows, want %d", total, b.cfg.n)
	}
	return result{msgs: total, elapsed: elapsed, note: fmt.Sprintf("%d statements of ≤ %d rows, 1 connection; %s", batches, b.cfg.batch, tm.cpu())}, nil
}

// natsMaxPending bounds the async publishes in flight in the JetStream
// ceiling (the nats.go default is 4000).
const natsMaxPending = 4096

// runNATSCeiling publishes the messages as fast as JetStream takes them:
// async publish with a bounded window, then waits for every ack. The
// messages are built before the clock starts and carry the same headers the
// relay's publisher sends.
func runNATSCeiling(ctx context.Context, b *bench) (result, error) {
	br, closeBroker, err := b.freshStream(ctx, "nats")
	if err != nil {
		return result{}, err
	}
	defer closeBroker()
	var failed atomic.Int64
	var firstErr atomic.Value
	js, err := jetstream.New(br.nc,
		jetstream.WithPublishAsyncMaxPending(natsMaxPending),
		jetstream.WithPublishAsyncErrHandler(func(_ jetstream.JetStream, _ *nats.Msg, err error) {
			failed.Add(1)
			firstErr.CompareAndSwap(nil, err)
		}))
	if err != nil {
		return result{}, err
	}
	gen := b.messages(br.subject)
	msgs := make([]*nats.Msg, b.cfg.n)
	for i := range msgs {
		msgs[i] = natsMsg(gen.get(i))
	}

	tm := b.startTimer("nats")
	for _, m := range msgs {
		for {
			_, err := js.PublishMsgAsync(m)
			if err == nil {
				break
			}
			if !errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
				tm.stop()
				return result{}, err
			}
			if ctx.Err() != nil {
				tm.stop()
				return result{}, ctx.Err()
			}
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		tm.stop()
		return result{}, ctx.Err()
	}
	elapsed := tm.stop()
	if n := failed.Load(); n > 0 {
		return result{}, fmt.Errorf("%d publishes failed, first: %v", n, firstErr.Load())
	}
	if err := br.checkStream(ctx, b.cfg.n); err != nil {
		return result{}, err
	}
	return result{msgs: b.cfg.n, elapsed: elapsed, note: fmt.Sprintf("PublishMsgAsync, ≤ %d in flight, file storage; %s", natsMaxPending, tm.cpu())}, nil
}

// natsMsg is m as the nats publisher sends it: the same subject, payload
// and headers, Nats-Msg-Id included.
func natsMsg(m *exactly.Message) *nats.Msg {
	h := nats.Header{}
	h.Set(jetstream.MsgIDHeader, m.ID)
	h.Set(exactly.HeaderID, m.ID)
	h.Set(exactly.HeaderKey, m.Key)
	h.Set(exactly.HeaderCreatedAt, m.CreatedAt.UTC().Format(time.RFC3339Nano))
	for k, v := range m.Headers {
		h.Set(k, v)
	}
	return &nats.Msg{Subject: m.Topic, Data: m.Payload, Header: h}
}

// runPublisherAlone calls the nats publisher the way the relay does, in
// batches of -batch messages one after the other, with no database: the
// rate the publisher itself allows.
func runPublisherAlone(ctx context.Context, b *bench) (result, error) {
	const id = "pub-nats"
	br, closeBroker, err := b.freshStream(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer closeBroker()
	pub, err := exnats.NewPublisher(br.js)
	if err != nil {
		return result{}, err
	}
	gen := b.messages(br.subject)
	batches := make([][]*exactly.Message, 0, b.cfg.n/b.cfg.batch+1)
	for i := 0; i < b.cfg.n; i += b.cfg.batch {
		batch := make([]*exactly.Message, 0, b.cfg.batch)
		for j := i; j < min(i+b.cfg.batch, b.cfg.n); j++ {
			batch = append(batch, gen.get(j))
		}
		batches = append(batches, batch)
	}
	tm := b.startTimer(id)
	err = sendPipelined(ctx, pub, batches)
	elapsed := tm.stop()
	if err != nil {
		return result{}, err
	}
	if err := br.checkStream(ctx, b.cfg.n); err != nil {
		return result{}, err
	}
	return result{msgs: b.cfg.n, elapsed: elapsed, note: fmt.Sprintf("%d Send calls, up to %d awaiting their outcome; %s", len(batches), relayDepth, tm.cpu())}, nil
}

// relayDepth is how many batches the relay hands a PipelinedPublisher
// before the first one's outcome is known (relay.Config.PipelineDepth's default).
const relayDepth = 16

// sendPipelined hands the batches to pp in order, as the relay does, with
// up to relayDepth awaiting their outcome, and returns the first error.
func sendPipelined(ctx context.Context, pp exactly.PipelinedPublisher, batches [][]*exactly.Message) error {
	waits := make(chan func() error, relayDepth-1) // and one awaited
	errc := make(chan error, 1)
	go func() {
		var first error
		for wait := range waits {
			if err := wait(); err != nil && first == nil {
				first = err
			}
		}
		errc <- first
	}()
	for _, batch := range batches {
		waits <- pp.Send(ctx, batch) // blocks while relayDepth are out
	}
	close(waits)
	return <-errc
}
