package pubsub_test

import (
	"log/slog"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/pubsub"
	"github.com/exactlyonce/exactly/relay"
)

// The relay and the Publisher together: a key whose publishes Pub/Sub
// refuses is held back by the relay and paused by Pub/Sub, while the other
// keys flow; once the cause is gone, the relay's retry resumes the key by
// itself and every message arrives once, each key in order, none parked.
func TestRelayHoldsOnlyTheFailingKey(t *testing.T) {
	t.Parallel()
	pool, ob := pgOutbox(t, "pubsub_relay")

	fail := &failPublish{code: codes.FailedPrecondition}
	f := newFake(t, fail.option())
	topic := f.topic(t)
	fail.set(-1, orderingKey("a"))

	r, _ := exactlytest.StartRelay(t, relay.Config{
		DB: pool, Outbox: ob, Publisher: f.publisher(t, pubsub.PublisherConfig{}),
		PollInterval: 50 * time.Millisecond, InitialBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		MaxAttempts: 1000,
		Logger:      slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError})),
	})

	msgs := messages(topic, []string{"a", "b", "c"}, 10)
	exactlytest.EnqueueAll(t, pool, ob, len(msgs), msgs)

	waitUntil(t, "keys b and c published while a fails", func() bool {
		got := f.stored(topic)
		return countKey(got, "b") == 10 && countKey(got, "c") == 10
	})
	if n := countKey(f.stored(topic), "a"); n != 0 {
		t.Fatalf("%d messages of the failing key a stored", n)
	}
	waitUntil(t, "the relay retried key a", func() bool { return fail.count() >= 3 })
	if st := r.Stats(); st.BlockedKeys != 1 || st.Dead != 0 {
		t.Fatalf("relay stats while a fails: %+v, want one blocked key and none dead", st)
	}

	fail.set(0, nil)
	waitUntil(t, "key a published once the failure stopped", func() bool { return countKey(f.stored(topic), "a") >= 10 })
	exactlytest.WaitDrained(t, pool, ob, 30*time.Second)
	got := f.stored(topic)
	exactlytest.CheckExactlyOnce(t, msgs, asMessages(got))
	exactlytest.CheckKeyOrder(t, asMessages(got))
	if st := r.Stats(); st.Dead != 0 || st.BlockedKeys != 0 {
		t.Fatalf("relay stats at the end: %+v", st)
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitWithin(t, 30*time.Second, what, cond)
}

func waitWithin(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: timed out", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
