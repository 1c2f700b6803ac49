package sqs_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/effecttest"
	"github.com/exactlyonce/exactly/internal/sqstest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
	"github.com/exactlyonce/exactly/sqs"
)

// Throttling, 503s and answers lost after the emulator applied the call,
// on 4 of every 10 calls of every operation (SendMessageBatch and
// GetQueueUrl of the relay's Publisher; ReceiveMessage, DeleteMessageBatch
// and ChangeMessageVisibility of the consumers), through an HTTP proxy in
// front of the emulator: outbox → relay → SQS FIFO queue → two consumers
// with the SQL inbox. The relay's client has the SDK's retries off, so the
// Publisher and the relay see every fault (a lost SendMessageBatch answer
// is outcome unknown; the relay sends the batch again and the FIFO queue
// drops it by its dedup id); one consumer's client keeps the SDK's standard
// retryer, as users run it, the other's has its retries off too, so its
// refused deletes bring handled messages back. Counted per id: nothing lost,
// nothing applied twice, nothing parked or dead-lettered.
func TestThrottlingAndLostAnswersThroughRelay(t *testing.T) {
	t.Parallel()
	e := sqstest.NewSQSQueues(t)
	ef := effecttest.New(t, "exactly_sqs_", "sqs-faults")
	name := sqstest.QueueName(true)
	url := e.CreateQueue(t, name, nil)
	proxy := sqstest.NewFaultProxy(t, testenv.SQSEndpoint())
	proxy.Set(true)
	ctx := context.Background()

	cfg := testenv.AWSConfig(t)
	cfg.BaseEndpoint = aws.String(proxy.URL)
	relayCfg := cfg.Copy()
	relayCfg.RetryMaxAttempts = 1
	pub, err := sqs.NewPublisher(awssqs.NewFromConfig(relayCfg), sqs.PublisherConfig{})
	if err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	ob := exactlytest.MigratedOutbox(t, pool, outbox.Postgres, "sqs_proxy")
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError}))
	r, err := relay.New(relay.Config{DB: pool, Outbox: ob, Publisher: pub, BatchSize: 10,
		PollInterval: 50 * time.Millisecond, InitialBackoff: 50 * time.Millisecond, MaxBackoff: 300 * time.Millisecond,
		MaxAttempts: 1000, Logger: logger})
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

	dlq := &exactlytest.Recorder{}
	var stops []func()
	for i := range 2 {
		ccfg := cfg.Copy()
		if i == 1 {
			// The second consumer's client does not retry either: its
			// refused deletes bring messages back, for the inbox.
			ccfg.RetryMaxAttempts = 1
		}
		c, err := sqs.NewConsumer(awssqs.NewFromConfig(ccfg), sqs.ConsumerConfig{QueueURL: url, VisibilityTimeout: visibility, WaitTime: time.Second,
			ConsumerConfig: exactly.ConsumerConfig{Handler: ef.Handler(nil, nil), Workers: 4, DeadLetter: dlq, Logger: logger}})
		if err != nil {
			t.Fatal(err)
		}
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- c.Run(cctx) }()
		stops = append(stops, func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("consumer Run: %v", err)
			}
		})
	}
	defer func() {
		for _, stop := range stops {
			stop()
		}
	}()

	const rounds, keys, perKey = 4, 5, 6
	var msgs []*exactly.Message
	for range rounds {
		round := batch(name, keys, perKey)
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := ob.Enqueue(ctx, tx, round...); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		msgs = append(msgs, round...)
		time.Sleep(300 * time.Millisecond)
	}
	ef.WaitApplied(msgs, 2*time.Minute)
	exactlytest.WaitDrained(t, pool, ob, 30*time.Second)
	proxy.Set(false)
	ef.CheckOnce(msgs)
	t.Logf("faults: %s", proxy)
	t.Logf("relay %+v; %s", r.Stats(), ef)

	if st := r.Stats(); st.Dead != 0 {
		t.Fatalf("the relay parked %d messages", st.Dead)
	}
	if d := dlq.Delivered(); len(d) != 0 {
		t.Fatalf("%d messages dead-lettered", len(d))
	}
	for _, c := range []struct {
		op string
		f  sqstest.Fault
	}{
		{"SendMessageBatch", sqstest.Throttled}, {"SendMessageBatch", sqstest.Unavailable}, {"SendMessageBatch", sqstest.AnswerLost},
		{"ReceiveMessage", sqstest.Throttled}, {"ReceiveMessage", sqstest.AnswerLost},
		{"DeleteMessageBatch", sqstest.Throttled}, {"DeleteMessageBatch", sqstest.AnswerLost},
	} {
		if proxy.Count(c.op, c.f) == 0 {
			t.Errorf("no %s call was %s: the test did not inject what it claims (%s)", c.op, c.f, proxy)
		}
	}
	// Every lost SendMessageBatch answer left a batch the emulator stored
	// and the relay sent again: the FIFO queue dropped those re-sends, and
	// what reached the consumers twice anyway (lost receive answers, lost
	// deletes) the inbox absorbed; the count above says none was applied
	// twice.
	if d := ef.In.Stats().Duplicates; d < 1 {
		t.Errorf("the inbox absorbed %d duplicates, want the redeliveries of refused deletes", d)
	}
	if r.Stats().Failed == 0 {
		t.Errorf("the relay saw no failed publish, though its client does not retry: %+v", r.Stats())
	}
}
