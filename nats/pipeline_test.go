package nats_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// After a message fails, Send sends no later message of its key, whichever
// call hands it over, until Resume; other keys go on.
func TestSendPausesAFailedKeyUntilResume(t *testing.T) {
	t.Parallel()
	s := connect(t)
	subject := s.topic(t, nil)
	_, nowhere := names() // a valid subject no stream captures
	p := s.publisher(t, nats.SubjectFunc(func(m *exactly.Message) string {
		if m.Headers["route"] == "nowhere" {
			return nowhere
		}
		return m.Topic
	}))
	ctx := t.Context()
	msgs := batch(subject, []string{"a", "b"}, 12) // a/0 b/0 a/1 b/1 ...
	first, second := msgs[:6], msgs[6:]
	first[2].Headers = map[string]string{"route": "nowhere"} // a/1

	errs := exactly.PerMessage(p.Send(ctx, first)(), len(first))
	if !errors.Is(errs[2], jetstream.ErrNoStreamResponse) {
		t.Fatalf("a/1: %v, want no responders", errs[2])
	}
	errs = exactly.PerMessage(p.Send(ctx, second)(), len(second))
	for i, m := range second {
		switch {
		case m.Key == "a" && (errs[i] == nil || errors.Is(errs[i], exactly.ErrUnpublishable) || !strings.Contains(errs[i].Error(), "not sent")):
			t.Fatalf("second call, %s of the failed key: %v, want a retryable \"not sent\"", m.Payload, errs[i])
		case m.Key == "b" && errs[i] != nil:
			t.Fatalf("second call, %s: %v", m.Payload, errs[i])
		}
	}
	// The relay's retry: the failed message and the key's later ones, after
	// Resume.
	first[2].Headers = nil
	var retry []*exactly.Message
	for _, m := range append(first[3:], second...) {
		if m.Key == "a" {
			retry = append(retry, m)
		}
	}
	retry = append([]*exactly.Message{first[2]}, retry...)
	p.Resume(ctx, retry[0])
	if err := p.Send(ctx, retry)(); err != nil {
		t.Fatalf("the retry after Resume: %v", err)
	}
	s.checkStored(t, subject, msgs, false)
}

// The relay hands the JetStream publisher batches that share keys while
// earlier ones await their acks. With messages failing now and then, every
// message is stored once (the stream drops a re-publish by Nats-Msg-Id), and
// with StrictOrder each key stays in order.
func TestRelayPipelinesToJetStream(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.Postgres)
	for _, strict := range []bool{false, true} {
		t.Run(fmt.Sprintf("StrictOrder=%v", strict), func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			pool, err := pgxpool.New(ctx, testenv.PostgresDSN())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(pool.Close)
			ob := exactlytest.MigratedOutbox(t, pool, outbox.Postgres, fmt.Sprintf("nats_pipeline_%v", strict))
			s := connect(t)
			subject := s.topic(t, nil)
			_, nowhere := names()

			// The first attempt of every 25th message of key a or b goes
			// to a subject no stream captures: 16 failures.
			var mu sync.Mutex
			failed := map[string]bool{}
			inner := s.publisher(t, nats.SubjectFunc(func(m *exactly.Message) string {
				var n int
				fmt.Sscanf(string(m.Payload[strings.IndexByte(string(m.Payload), ':')+1:]), "%d", &n)
				mu.Lock()
				defer mu.Unlock()
				if (m.Key == "a" || m.Key == "b") && n%25 == 0 && !failed[m.ID] {
					failed[m.ID] = true
					return nowhere
				}
				return m.Topic
			}))
			pub := &exactlytest.SendCounter{PipelinedPublisher: inner}
			var msgs []*exactly.Message
			for n := range 200 {
				for _, k := range []string{"a", "b", "c", "d", "e"} {
					msgs = append(msgs, &exactly.Message{ID: exactly.NewID(), Topic: subject, Key: k, Payload: fmt.Appendf(nil, "%s:%d", k, n)})
				}
			}
			exactlytest.EnqueueAll(t, pool, ob, 100, msgs)
			r, _ := exactlytest.StartRelay(t, relay.Config{
				DB: pool, Outbox: ob, Publisher: pub, BatchSize: 20, StrictOrder: strict,
				PollInterval: 20 * time.Millisecond, InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
				MaxAttempts: 1000,
				Logger:      slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError})),
			})
			exactlytest.WaitDrained(t, pool, ob, 60*time.Second)
			got := s.read(t, subject, len(msgs)+1, 200*time.Millisecond)
			exactlytest.CheckExactlyOnce(t, msgs, asMessages(got))
			if strict {
				// Without it, a message of a failed key already sent may be
				// stored before the failed one's retry, as without
				// pipelining (relay.Config.StrictOrder).
				exactlytest.CheckKeyOrder(t, asMessages(got))
			}
			mu.Lock()
			nFailed := len(failed)
			mu.Unlock()
			if nFailed != 16 {
				t.Fatalf("%d messages were sent nowhere, want 16", nFailed)
			}
			if pub.MaxOutstanding() < 2 {
				t.Fatalf("at most %d Send calls were out at once: the relay did not overlap its batches", pub.MaxOutstanding())
			}
			if st := r.Stats(); st.Dead != 0 || st.BlockedKeys != 0 {
				t.Fatalf("relay stats at the end: %+v", st)
			}
		})
	}
}

func asMessages(got []exactlytest.Received) []exactly.Message {
	out := make([]exactly.Message, len(got))
	for i, r := range got {
		out[i] = exactly.Message{ID: r.ID, Key: r.Key, Payload: r.Payload}
	}
	return out
}
