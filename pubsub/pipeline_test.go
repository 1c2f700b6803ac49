package pubsub_test

import (
	"errors"
	"log/slog"
	"strconv"
	"sync"
	"testing"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"google.golang.org/grpc/codes"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/pubsub"
	"github.com/exactlyonce/exactly/relay"
)

// Send does not resume a paused key: a call handed over after an earlier
// one of its key failed fails unsent, however late it comes, and only
// Resume lets the key go again, in order.
func TestSendKeepsAPausedKeyUntilResume(t *testing.T) {
	t.Parallel()
	fail := &failPublish{code: codes.FailedPrecondition}
	f := newFake(t, fail.option())
	topic := f.topic(t)
	p := f.publisher(t, pubsub.PublisherConfig{})
	ctx := t.Context()

	fail.set(1, orderingKey("a"))
	all := messages(topic, []string{"a", "b"}, 6) // a:0 b:0 a:1 b:1 ... a:5 b:5
	first, second := all[:6], all[6:]
	waitFirst := p.Send(ctx, first)
	errs := exactly.PerMessage(waitFirst(), len(first))
	for i, m := range first {
		if (m.Key == "a") != (errs[i] != nil) {
			t.Fatalf("first call, message %d of key %s: err %v; want only key a failed", i, m.Key, errs[i])
		}
	}
	// Handed over after the failure, as a pipelining relay would hand over
	// a batch it read before it learnt of it.
	errs = exactly.PerMessage(p.Send(ctx, second)(), len(second))
	for i, m := range second {
		var paused gpubsub.ErrPublishingPaused
		switch {
		case m.Key == "a" && !errors.As(errs[i], &paused):
			t.Fatalf("second call, message %d of the paused key a: %v, want it unsent (key paused)", i, errs[i])
		case m.Key == "b" && errs[i] != nil:
			t.Fatalf("second call, message %d of key b: %v", i, errs[i])
		}
	}
	if n := countKey(f.stored(topic), "a"); n != 0 {
		t.Fatalf("%d messages of key a stored while it was paused", n)
	}

	// The relay resumes the key with the failed message's retry and sends
	// the key's messages again, in order.
	var retry []*exactly.Message
	for _, m := range all {
		if m.Key == "a" {
			retry = append(retry, m)
		}
	}
	p.Resume(ctx, retry[0])
	if err := p.Send(ctx, retry)(); err != nil {
		t.Fatalf("the retry after Resume: %v", err)
	}
	got := f.stored(topic)
	exactlytest.CheckExactlyOnce(t, all, asMessages(got))
	exactlytest.CheckKeyOrder(t, asMessages(got))
}

// The relay hands the Publisher batches that share keys while earlier ones
// await their outcome. With a key failing now and then, every message still
// arrives once and, as a consumer that applies each id once sees them, each
// key in order: what Pub/Sub pausing the key and the relay resuming it only
// once none of the key's messages is in flight keep.
func TestRelayPipelinesBatchesInKeyOrder(t *testing.T) {
	t.Parallel()
	pool, ob := pgOutbox(t, "pubsub_pipeline")

	// The first request of key "a" or "b" to carry one of the key's
	// messages 0, 25, 50, ... fails: 16 failures, each at its own place in
	// the stream.
	fail := &failPublish{code: codes.FailedPrecondition}
	var mu sync.Mutex
	failedOnce := map[string]bool{}
	fail.set(-1, func(req *pb.PublishRequest) bool {
		mu.Lock()
		defer mu.Unlock()
		for _, m := range req.Messages {
			k := m.OrderingKey + "/" + m.Attributes["x-seq"]
			if seq, _ := strconv.Atoi(m.Attributes["x-seq"]); (m.OrderingKey == "a" || m.OrderingKey == "b") && seq%25 == 0 && !failedOnce[k] {
				failedOnce[k] = true
				return true
			}
		}
		return false
	})
	f := newFake(t, fail.option())
	topic := f.topic(t)
	pub := &exactlytest.SendCounter{PipelinedPublisher: f.publisher(t, pubsub.PublisherConfig{})}

	msgs := messages(topic, []string{"a", "b", "c", "d", "e"}, 200)
	exactlytest.EnqueueAll(t, pool, ob, 100, msgs)
	r, _ := exactlytest.StartRelay(t, relay.Config{
		DB: pool, Outbox: ob, Publisher: pub, BatchSize: 20, PipelineDepth: 6,
		PollInterval: 20 * time.Millisecond, InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		MaxAttempts: 1000,
		Logger:      slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError})),
	})
	exactlytest.WaitDrained(t, pool, ob, 60*time.Second)
	got := f.stored(topic)
	exactlytest.CheckExactlyOnce(t, msgs, asMessages(got))
	exactlytest.CheckKeyOrder(t, asMessages(got))
	if fail.count() != 16 {
		t.Fatalf("%d publishes failed, want 16: the test did not test what happens after them", fail.count())
	}
	if n := pub.MaxOutstanding(); n < 2 || n > 6 {
		t.Fatalf("at most %d Send calls were out at once, want 2 to PipelineDepth (6)", n)
	}
	if st := r.Stats(); st.Dead != 0 || st.BlockedKeys != 0 {
		t.Fatalf("relay stats at the end: %+v", st)
	}
	t.Logf("%d requests failed; up to %d batches out at once; %d stored for %d messages", fail.count(), pub.MaxOutstanding(), len(got), len(msgs))
}
