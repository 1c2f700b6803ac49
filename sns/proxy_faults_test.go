package sns_test

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssns "github.com/aws/aws-sdk-go-v2/service/sns"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/sqstest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
	"github.com/exactlyonce/exactly/sns"
)

// Throttling, 503s and answers lost after the emulator applied the call, on
// 4 of every 10 PublishBatch calls, through an HTTP proxy in front of the
// emulator: outbox → relay → SNS FIFO topic → an SQS FIFO queue subscribed
// with raw delivery. The relay's client has the SDK's retries off, so the
// Publisher and the relay see every fault: a lost answer is outcome
// unknown and the relay publishes the batch again, which the FIFO topic
// drops by its dedup id. Counted per id on the queue: every message once,
// each key in order, nothing parked.
func TestThrottlingAndLostAnswersThroughRelay(t *testing.T) {
	t.Parallel()
	queues := sqstest.NewSQSQueues(t)
	cfg := testenv.AWSConfig(t)
	testenv.Need(t, testenv.Postgres)
	arn, url := topicWithQueue(t, awssns.NewFromConfig(cfg), queues, true)
	proxy := sqstest.NewFaultProxy(t, testenv.SQSEndpoint())
	proxy.Set(true)
	ctx := context.Background()

	cfg.BaseEndpoint = aws.String(proxy.URL)
	cfg.RetryMaxAttempts = 1
	pub, err := sns.NewPublisher(awssns.NewFromConfig(cfg), sns.PublisherConfig{BatchSize: 9})
	if err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	ob := exactlytest.MigratedOutbox(t, pool, outbox.Postgres, "sns_proxy")
	r, err := relay.New(relay.Config{DB: pool, Outbox: ob, Publisher: pub, BatchSize: 9,
		PollInterval: 50 * time.Millisecond, InitialBackoff: 50 * time.Millisecond, MaxBackoff: 300 * time.Millisecond,
		MaxAttempts: 1000, StrictOrder: true,
		Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError}))})
	if err != nil {
		t.Fatal(err)
	}
	relayCtx, stopRelay := context.WithCancel(ctx)
	relayDone := make(chan error, 1)
	go func() { relayDone <- r.Run(relayCtx) }()
	defer func() {
		stopRelay()
		if err := <-relayDone; err != nil {
			t.Errorf("relay Run: %v", err)
		}
	}()

	var msgs []*exactly.Message
	for seq := range 12 {
		for _, k := range []string{"k-0", "k-1", "k-2", "k-3", "k-4"} {
			msgs = append(msgs, &exactly.Message{ID: exactly.NewID(), Topic: arn, Key: k, Payload: fmt.Appendf(nil, "%s:%d", k, seq)})
		}
	}
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Enqueue(ctx, tx, msgs...); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		st, err := ob.Status(ctx, pool)
		if err == nil && st.Pending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the outbox did not drain: %+v, %v; faults: %s", st, err, proxy)
		}
		time.Sleep(50 * time.Millisecond)
	}
	proxy.Set(false)
	got := queues.Read(t, url, len(msgs)+1, 5*time.Second)
	t.Logf("faults: %s; relay %+v", proxy, r.Stats())
	counts := map[string]int{}
	for _, g := range got {
		counts[g.ID]++
	}
	for i, m := range msgs {
		if counts[m.ID] != 1 {
			t.Errorf("message %d (id %s) reached the queue %d times, want once", i, m.ID, counts[m.ID])
		}
	}
	if len(got) != len(msgs) {
		t.Errorf("the queue got %d messages, want %d", len(got), len(msgs))
	}
	if t.Failed() {
		t.FailNow()
	}
	recv := make([]exactly.Message, len(got))
	for i, g := range got {
		recv[i] = exactly.Message{ID: g.ID, Key: g.Key, Payload: g.Payload}
	}
	exactlytest.CheckKeyOrder(t, recv)
	if st := r.Stats(); st.Dead != 0 || st.Failed == 0 {
		t.Fatalf("relay %+v: want nothing parked, and failed publishes (its client does not retry)", st)
	}
	for _, f := range []sqstest.Fault{sqstest.Throttled, sqstest.Unavailable, sqstest.AnswerLost} {
		if proxy.Count("PublishBatch", f) == 0 {
			t.Errorf("no PublishBatch call was %s: the test did not inject what it claims (%s)", f, proxy)
		}
	}
}
