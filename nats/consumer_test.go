package nats_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/nats"
)

// consumerEnv is one consumer test's bundle: its own stream (capturing the
// subject and its dead-letter subject), durable name and effect log.
type consumerEnv struct {
	*testServer
	stream, subject, dlq, durable string
	effects                       *effects
}

func setupConsumer(t *testing.T) *consumerEnv {
	t.Helper()
	s := connect(t)
	stream, subject := names()
	s.createStream(t, stream, subject, nil)
	e := &consumerEnv{
		testServer: s,
		stream:     stream,
		subject:    subject,
		dlq:        subject + ".dlq",
		durable:    "C_" + stream,
		effects:    &effects{},
	}
	t.Cleanup(func() { // before the stream's deletion: cleanups run last first
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.js.DeleteConsumer(ctx, stream, e.durable); err != nil &&
			!errors.Is(err, jetstream.ErrConsumerNotFound) && !errors.Is(err, jetstream.ErrStreamNotFound) {
			t.Errorf("deleting consumer %s: %v", e.durable, err)
		}
	})
	return e
}

// config returns a consumer configuration for the bundle's stream, with
// fast retries, the handler recording its effect, and warnings logged to
// the test.
func (e *consumerEnv) config(t *testing.T) nats.ConsumerConfig {
	return nats.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: e.effects.record,
			Retry:   exactly.RetryPolicy{MaxAttempts: 3, InitialBackoff: 5 * time.Millisecond, MaxBackoff: 20 * time.Millisecond},
			Logger:  slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
		},
		Stream:         e.stream,
		Durable:        e.durable,
		FilterSubjects: []string{e.subject},
	}
}

func newConsumer(t *testing.T, js jetstream.JetStream, cfg nats.ConsumerConfig) *nats.Consumer {
	t.Helper()
	c, err := nats.NewConsumer(js, cfg)
	if err != nil {
		t.Fatalf("NewConsumer: %v", err)
	}
	return c
}

// running is a Consumer's Run in its own goroutine.
type running struct {
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	err    error
}

// start runs c until stop, or until the test ends.
func start(t *testing.T, c *nats.Consumer) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- c.Run(ctx) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// wait returns Run's result, failing the test if it takes longer than d.
func (r *running) wait(t *testing.T, d time.Duration) error {
	t.Helper()
	r.once.Do(func() {
		select {
		case r.err = <-r.done:
		case <-time.After(d):
			r.err = fmt.Errorf("Run did not return within %v", d)
			t.Errorf("%v", r.err)
		}
	})
	return r.err
}

// stop cancels Run's context and returns its result.
func (r *running) stop(t *testing.T) error {
	t.Helper()
	r.cancel()
	return r.wait(t, 30*time.Second)
}

// effects records what handlers did, per message id.
type effects struct {
	mu    sync.Mutex
	count map[string]int
	seen  []seen
}

type seen struct {
	msg       exactly.Message
	delivered uint64 // the delivery count the server reported
}

func (e *effects) record(ctx context.Context, m *exactly.Message) error {
	md, ok := nats.DeliveryMetadata(ctx)
	if !ok {
		return errors.New("no delivery metadata in the handler's context")
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.count == nil {
		e.count = make(map[string]int)
	}
	e.count[m.ID]++
	e.seen = append(e.seen, seen{*m, md.NumDelivered})
	return nil
}

func (e *effects) of(id string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.count[id]
}

func (e *effects) all() []seen {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.seen)
}

func (e *effects) total() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.seen)
}

// checkNoneLost fails unless every message had its effect at least once,
// and returns how many had it more than once.
func (e *effects) checkNoneLost(t *testing.T, msgs []*exactly.Message) (duplicated int) {
	t.Helper()
	for _, m := range msgs {
		switch n := e.of(m.ID); {
		case n == 0:
			t.Errorf("message %s lost: its effect never happened", m.ID)
		case n > 1:
			duplicated++
		}
	}
	return duplicated
}

// eventually polls cond until it holds, failing the test after d.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: still waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (e *consumerEnv) publish(t *testing.T, msgs []*exactly.Message) {
	t.Helper()
	if err := e.publisher(t).Publish(t.Context(), msgs); err != nil {
		t.Fatalf("Publish: %v", err)
	}
}

func (e *consumerEnv) publishRaw(t *testing.T, m *natsgo.Msg) {
	t.Helper()
	if _, err := e.js.PublishMsg(t.Context(), m); err != nil {
		t.Fatalf("PublishMsg: %v", err)
	}
}

func (e *consumerEnv) info(t *testing.T) *jetstream.ConsumerInfo {
	t.Helper()
	c, err := e.js.Consumer(t.Context(), e.stream, e.durable)
	if err != nil {
		t.Fatalf("consumer %s: %v", e.durable, err)
	}
	info, err := c.Info(t.Context())
	if err != nil {
		t.Fatalf("consumer %s info: %v", e.durable, err)
	}
	return info
}

// deadLetters returns the messages stored on the dead-letter subject.
func (e *consumerEnv) deadLetters(t *testing.T) []*jetstream.RawStreamMsg {
	t.Helper()
	stream, err := e.js.Stream(t.Context(), e.stream)
	if err != nil {
		t.Fatalf("stream %s: %v", e.stream, err)
	}
	var out []*jetstream.RawStreamMsg
	for seq := uint64(1); ; seq++ {
		m, err := stream.GetMsg(t.Context(), seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			info, ierr := stream.Info(t.Context())
			if ierr != nil {
				t.Fatalf("stream %s info: %v", e.stream, ierr)
			}
			if seq > info.State.LastSeq {
				return out
			}
			continue
		}
		if err != nil {
			t.Fatalf("reading message %d of %s: %v", seq, e.stream, err)
		}
		if m.Subject == e.dlq {
			out = append(out, m)
		}
	}
}

// Nothing fails: every message is handled once, in stream order, and
// acknowledged.
func TestConsumerHandlesEachMessageOnce(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	msgs := batch(e.subject, []string{"a", "b", "c", "d"}, 200)
	e.publish(t, msgs)
	cfg := e.config(t)
	cfg.Batch = 16 // several fetches
	c := newConsumer(t, e.js, cfg)
	r := start(t, c)

	eventually(t, 20*time.Second, "200 messages handled", func() bool { return e.effects.total() >= len(msgs) })
	if err := c.Run(t.Context()); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Errorf("a second concurrent Run = %v, want an \"already running\" error", err)
	}
	if err := r.stop(t); err != nil {
		t.Fatalf("Run = %v after its context ended, want nil", err)
	}
	if dup := e.effects.checkNoneLost(t, msgs); dup != 0 {
		t.Errorf("%d messages handled more than once with nothing failing", dup)
	}
	got := e.effects.all()
	if len(got) != len(msgs) {
		t.Fatalf("handled %d times, want %d", len(got), len(msgs))
	}
	for i, s := range got {
		if s.msg.ID != msgs[i].ID {
			t.Fatalf("handled #%d is %s, want %s: not in stream order", i, s.msg.ID, msgs[i].ID)
		}
		if s.delivered != 1 {
			t.Errorf("message %s delivered %d times", s.msg.ID, s.delivered)
		}
	}
	st := c.Stats()
	if st != (nats.ConsumerStats{ConsumerStats: exactly.ConsumerStats{Received: 200, Handled: 200}}) {
		t.Errorf("Stats = %+v", st)
	}
	info := e.info(t)
	if info.NumAckPending != 0 || info.NumPending != 0 || info.AckFloor.Stream != uint64(len(msgs)) {
		t.Errorf("server: %d awaiting ack, %d pending, ack floor %d; want everything acknowledged",
			info.NumAckPending, info.NumPending, info.AckFloor.Stream)
	}
}

// Fields travel from the Publisher to the handler; a message from another
// producer takes its ID from Nats-Msg-Id and its time from the stream.
func TestConsumerDecodesMessages(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	created := time.Date(2025, 3, 4, 5, 6, 7, 890123456, time.UTC)
	sent := &exactly.Message{ID: exactly.NewID(), Topic: e.subject, Key: "order-7", Payload: []byte(`{"n":1}`),
		Headers: map[string]string{"traceparent": "00-abc-def-01"}, CreatedAt: created}
	e.publish(t, []*exactly.Message{sent})
	before := time.Now().Add(-time.Minute)
	e.publishRaw(t, &natsgo.Msg{Subject: e.subject, Data: []byte("raw"),
		Header: natsgo.Header{jetstream.MsgIDHeader: {"native-1"}, "x-custom": {"v"}}})
	r := start(t, newConsumer(t, e.js, e.config(t)))
	eventually(t, 20*time.Second, "2 messages handled", func() bool { return e.effects.total() >= 2 })
	if err := r.stop(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
	got := e.effects.all()
	m := got[0].msg
	if m.ID != sent.ID || m.Topic != sent.Topic || m.Key != sent.Key || string(m.Payload) != string(sent.Payload) ||
		!m.CreatedAt.Equal(created) || len(m.Headers) != 1 || m.Headers["traceparent"] != "00-abc-def-01" {
		t.Errorf("handled %+v, want %+v", m, sent)
	}
	raw := got[1].msg
	if raw.ID != "native-1" || raw.Key != "" || string(raw.Payload) != "raw" || raw.CreatedAt.Before(before) ||
		len(raw.Headers) != 1 || raw.Headers["x-custom"] != "v" {
		t.Errorf("raw message handled as %+v; want ID native-1, the stream's time, and no Nats-* headers", raw)
	}
}

// The same message stored five times (five Nats-Msg-Ids, one exactly-id)
// reaches the handler five times with the same ID: the inbox's job.
func TestConsumerSameIDDeliveredFiveTimes(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	id := exactly.NewID()
	for i := range 5 {
		e.publishRaw(t, &natsgo.Msg{Subject: e.subject, Data: []byte("p"), Header: natsgo.Header{
			jetstream.MsgIDHeader: {fmt.Sprintf("copy-%d-%s", i, id)},
			exactly.HeaderID:      {id},
		}})
	}
	r := start(t, newConsumer(t, e.js, e.config(t)))
	eventually(t, 20*time.Second, "5 deliveries", func() bool { return e.effects.total() >= 5 })
	if err := r.stop(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if n := e.effects.of(id); n != 5 {
		t.Fatalf("handler saw ID %s %d times, want 5 (all seen: %+v)", id, n, e.effects.all())
	}
}

// The consumer stops after the handler's effect and before the ack: the
// message comes again, with the same ID and a higher delivery count, and
// so do the messages it held. Gracefully (the consumer hands them back)
// they come at once; in a crash (nothing reaches the server) after AckWait.
func TestConsumerStopsAfterEffectBeforeAck(t *testing.T) {
	t.Parallel()
	for _, crash := range []bool{false, true} {
		t.Run(map[bool]string{false: "Shutdown", true: "Crash"}[crash], func(t *testing.T) {
			t.Parallel()
			e := setupConsumer(t)
			msgs := batch(e.subject, []string{"a", "b"}, 10)
			e.publish(t, msgs)

			// The first consumer has its own connection, which a crash loses.
			first := connect(t)
			cfg := e.config(t)
			if crash {
				cfg.AckWait = time.Second
			}
			ctx, cancel := context.WithCancel(context.Background())
			var once sync.Once
			cfg.Handler = func(hctx context.Context, m *exactly.Message) error {
				if err := e.effects.record(hctx, m); err != nil {
					return err
				}
				once.Do(func() {
					cancel()
					if crash {
						first.nc.Close()
					}
				})
				return hctx.Err() // what a handler returns when its context ends
			}
			c1 := newConsumer(t, first.js, cfg)
			if err := c1.Run(ctx); err != nil {
				t.Fatalf("Run = %v after its context ended, want nil", err)
			}
			victim := e.effects.all()[0].msg.ID
			if victim != msgs[0].ID || e.effects.total() != 1 {
				t.Fatalf("the first consumer handled %d messages, first %s; want only %s", e.effects.total(), victim, msgs[0].ID)
			}
			if st := c1.Stats(); st.Handled != 0 || st.AckFailures != 0 {
				t.Errorf("first consumer stats %+v: nothing may be counted handled or acknowledged", st)
			}

			// A new consumer on the same durable, with the default AckWait
			// of 30s: after a graceful stop the messages must come well
			// before it.
			cfg = e.config(t)
			if crash {
				cfg.AckWait = time.Second
			}
			start(t, newConsumer(t, e.js, cfg))
			eventually(t, 15*time.Second, "every message handled again", func() bool { return e.effects.total() >= len(msgs)+1 })
			if n := e.effects.of(victim); n != 2 {
				t.Fatalf("the message stopped after its effect was handled %d times, want 2", n)
			}
			again := e.effects.all()[1:]
			i := slices.IndexFunc(again, func(s seen) bool { return s.msg.ID == victim })
			if again[i].delivered != 2 {
				t.Errorf("its second delivery has NumDelivered %d, want 2", again[i].delivered)
			}
			if again[0].msg.ID != victim {
				t.Errorf("the redelivery came after %s, want it first (key order)", again[0].msg.ID)
			}
			if dup := e.effects.checkNoneLost(t, msgs); dup != 1 {
				t.Errorf("%d messages had their effect twice, want 1", dup)
			}
		})
	}
}

// The acknowledgement is lost (the connection drops after the handler's
// effect, before its ack): the consumer counts it, Run ends with the
// connection's error, and the message is redelivered after AckWait with
// the same ID.
func TestConsumerLostAck(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	msgs := batch(e.subject, []string{"a"}, 3)
	e.publish(t, msgs)

	first := connect(t)
	cfg := e.config(t)
	cfg.AckWait = time.Second
	var once sync.Once
	var ackFailed atomic.Int32
	cfg.Hooks.AckFailed = func(*exactly.Message, error) { ackFailed.Add(1) }
	cfg.Handler = func(ctx context.Context, m *exactly.Message) error {
		err := e.effects.record(ctx, m)
		once.Do(first.nc.Close)
		return err
	}
	c1 := newConsumer(t, first.js, cfg)
	err := start(t, c1).wait(t, 30*time.Second)
	if !errors.Is(err, natsgo.ErrConnectionClosed) {
		t.Fatalf("Run = %v, want the closed connection's error", err)
	}
	t.Logf("Run: %v", err)
	if st := c1.Stats(); st.Handled != 1 || st.AckFailures != 1 || ackFailed.Load() != 1 {
		t.Errorf("stats %+v, AckFailed hook %d: want 1 handled, 1 ack failure", st, ackFailed.Load())
	}

	cfg = e.config(t)
	cfg.AckWait = time.Second
	c2 := newConsumer(t, e.js, cfg)
	start(t, c2)
	eventually(t, 20*time.Second, "every message handled", func() bool { return e.effects.total() >= len(msgs)+1 })
	if n := e.effects.of(msgs[0].ID); n != 2 {
		t.Fatalf("the message whose ack was lost was handled %d times, want 2", n)
	}
	if s := e.effects.all()[1]; s.msg.ID != msgs[0].ID || s.delivered < 2 {
		t.Errorf("second consumer first handled %s (delivery %d), want %s redelivered", s.msg.ID, s.delivered, msgs[0].ID)
	}
	if dup := e.effects.checkNoneLost(t, msgs); dup != 1 {
		t.Errorf("%d messages had their effect twice, want 1", dup)
	}
	if c2.Stats().Redeliveries < 1 {
		t.Errorf("second consumer saw no redelivery: %+v", c2.Stats())
	}
}

// A handler that fails, then panics, then succeeds is retried and its
// message handled once; nothing is dead-lettered.
func TestConsumerRetriesThenHandlesOnce(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	msgs := batch(e.subject, []string{"a"}, 3)
	e.publish(t, msgs)
	cfg := e.config(t)
	var calls atomic.Int32
	var failures []error
	var mu sync.Mutex
	cfg.Hooks.Failed = func(m *exactly.Message, attempt int, err error) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, fmt.Errorf("attempt %d: %w", attempt, err))
	}
	cfg.Handler = func(ctx context.Context, m *exactly.Message) error {
		if m.ID == msgs[1].ID {
			switch calls.Add(1) {
			case 1:
				return errors.New("transient")
			case 2:
				panic("boom")
			}
		}
		return e.effects.record(ctx, m)
	}
	c := newConsumer(t, e.js, cfg)
	r := start(t, c)
	eventually(t, 20*time.Second, "3 messages handled", func() bool { return e.effects.total() >= 3 })
	if err := r.stop(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if dup := e.effects.checkNoneLost(t, msgs); dup != 0 || e.effects.total() != 3 {
		t.Errorf("%d handled twice, %d effects; want each once", dup, e.effects.total())
	}
	mu.Lock()
	defer mu.Unlock()
	if len(failures) != 2 || !errors.Is(failures[1], exactly.ErrPanic) || !strings.HasPrefix(failures[1].Error(), "attempt 2:") {
		t.Errorf("Failed hook saw %v; want the error then the panic", failures)
	}
	if st := c.Stats(); st.Handled != 3 || st.Failed != 2 || st.DeadLettered != 0 || st.Redeliveries != 0 {
		t.Errorf("Stats = %+v", st)
	}
	if n := len(e.deadLetters(t)); n != 0 {
		t.Errorf("%d dead letters, want none", n)
	}
}

// A handler that always fails: after MaxAttempts the message is on the
// dead-letter subject, with the reason, and the consumer moves on. The
// dead letter is stored although it is in the same stream, within the
// duplicate window, as the original message with the same ID.
func TestConsumerDeadLettersAfterMaxAttempts(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	msgs := batch(e.subject, []string{"a"}, 3)
	e.publish(t, msgs)
	poison := msgs[1]
	cfg := e.config(t)
	var poisonCalls atomic.Int32
	cfg.Handler = func(ctx context.Context, m *exactly.Message) error {
		if m.ID == poison.ID {
			poisonCalls.Add(1)
			return errors.New("cannot apply: order 7 does not exist")
		}
		return e.effects.record(ctx, m)
	}
	c := newConsumer(t, e.js, cfg)
	r := start(t, c)
	eventually(t, 20*time.Second, "the message after the poison handled", func() bool { return e.effects.of(msgs[2].ID) == 1 })
	eventually(t, 10*time.Second, "the poison acknowledged", func() bool { return e.info(t).AckFloor.Stream >= 3 })
	if err := r.stop(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if n := poisonCalls.Load(); n != 3 {
		t.Errorf("poison handled %d times, want MaxAttempts (3)", n)
	}
	dls := e.deadLetters(t)
	if len(dls) != 1 {
		t.Fatalf("%d dead letters on %s, want 1", len(dls), e.dlq)
	}
	h := dls[0].Header
	if h.Get(exactly.HeaderID) != poison.ID || h.Get(exactly.HeaderKey) != "a" || string(dls[0].Data) != string(poison.Payload) ||
		!strings.Contains(h.Get(exactly.HeaderDeadReason), "order 7 does not exist") ||
		h.Get(exactly.HeaderDeadAttempts) != "3" || h.Get(exactly.HeaderDeadTopic) != e.subject ||
		h.Get(jetstream.MsgIDHeader) != "dlq:"+e.durable+":"+poison.ID {
		t.Errorf("dead letter headers %v", h)
	}
	if st := c.Stats(); st.DeadLettered != 1 || st.Handled != 2 || st.Failed != 3 {
		t.Errorf("Stats = %+v", st)
	}
}

// Attempts count from the server's delivery count, so they add up over
// redeliveries: one attempt in a first run, two in the next make three.
func TestConsumerAttemptsSurviveRedelivery(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	msgs := batch(e.subject, []string{"a"}, 1)
	e.publish(t, msgs)
	var calls atomic.Int32
	cfg := e.config(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg.Handler = func(hctx context.Context, m *exactly.Message) error {
		calls.Add(1)
		cancel() // the first run stops during the first attempt
		return errors.New("failing")
	}
	if err := newConsumer(t, e.js, cfg).Run(ctx); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if calls.Load() != 1 {
		t.Fatalf("first run handled %d times, want 1", calls.Load())
	}
	c := newConsumer(t, e.js, cfg)
	start(t, c)
	eventually(t, 20*time.Second, "the message dead-lettered", func() bool { return c.Stats().DeadLettered == 1 })
	if n := calls.Load(); n != 3 {
		t.Errorf("handled %d times over two runs, want MaxAttempts (3)", n)
	}
	if dls := e.deadLetters(t); len(dls) != 1 || dls[0].Header.Get(exactly.HeaderDeadAttempts) != "3" {
		t.Errorf("dead letters %+v, want one after 3 attempts", dls)
	}
}

// A message without any id is never handled: it is dead-lettered with the
// reason, under a stand-in id, and the consumer moves on.
func TestConsumerMessageWithoutID(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	e.publishRaw(t, &natsgo.Msg{Subject: e.subject, Data: []byte("anonymous")})
	msgs := batch(e.subject, []string{"a"}, 1)
	e.publish(t, msgs)
	cfg := e.config(t)
	var deadErr error
	var mu sync.Mutex
	cfg.Hooks.DeadLettered = func(m *exactly.Message, err error) {
		mu.Lock()
		defer mu.Unlock()
		deadErr = err
	}
	c := newConsumer(t, e.js, cfg)
	r := start(t, c)
	eventually(t, 20*time.Second, "the next message handled", func() bool { return e.effects.of(msgs[0].ID) == 1 })
	eventually(t, 10*time.Second, "the anonymous message acknowledged", func() bool { return e.info(t).AckFloor.Stream >= 2 })
	if err := r.stop(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got := e.effects.all(); len(got) != 1 {
		t.Fatalf("handler ran %d times (%+v); a message without an id must never reach it", len(got), got)
	}
	dls := e.deadLetters(t)
	if len(dls) != 1 {
		t.Fatalf("%d dead letters, want 1", len(dls))
	}
	h := dls[0].Header
	if reason := h.Get(exactly.HeaderDeadReason); !strings.Contains(reason, "neither an exactly-id nor a Nats-Msg-Id") ||
		h.Get(exactly.HeaderID) != "nats:"+e.stream+":1" || string(dls[0].Data) != "anonymous" {
		t.Errorf("dead letter %v %q", h, dls[0].Data)
	}
	mu.Lock()
	defer mu.Unlock()
	if !errors.Is(deadErr, exactly.ErrNoID) {
		t.Errorf("DeadLettered hook error %v, want exactly.ErrNoID", deadErr)
	}
}

// With Workers > 1 messages are handled in parallel, each key's in order.
func TestConsumerWorkersKeepKeyOrder(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	keys := make([]string, 20)
	for i := range keys {
		keys[i] = fmt.Sprintf("k%02d", i)
	}
	msgs := batch(e.subject, keys, 1000) // payload "key/seq"
	e.publish(t, msgs)

	var mu sync.Mutex
	next := make(map[string]int)
	var outOfOrder []string
	var active, maxActive atomic.Int32
	cfg := e.config(t)
	cfg.Workers = 8
	cfg.Handler = func(ctx context.Context, m *exactly.Message) error {
		n := active.Add(1)
		defer active.Add(-1)
		for {
			old := maxActive.Load()
			if n <= old || maxActive.CompareAndSwap(old, n) {
				break
			}
		}
		time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
		var key string
		var seq int
		if _, err := fmt.Sscanf(strings.Replace(string(m.Payload), "/", " ", 1), "%s %d", &key, &seq); err != nil || key != m.Key {
			return fmt.Errorf("payload %q of key %q: %v", m.Payload, m.Key, err)
		}
		mu.Lock()
		if seq != next[key] {
			outOfOrder = append(outOfOrder, fmt.Sprintf("%s: #%d where #%d was due", key, seq, next[key]))
		}
		next[key] = seq + 1
		mu.Unlock()
		return e.effects.record(ctx, m)
	}
	c := newConsumer(t, e.js, cfg)
	r := start(t, c)
	eventually(t, 40*time.Second, "1000 messages handled", func() bool { return e.effects.total() >= len(msgs) })
	if err := r.stop(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(outOfOrder) > 0 {
		t.Fatalf("%d out of order, first: %s", len(outOfOrder), outOfOrder[0])
	}
	if dup := e.effects.checkNoneLost(t, msgs); dup != 0 || e.effects.total() != len(msgs) {
		t.Errorf("%d handled twice, %d effects for %d messages", dup, e.effects.total(), len(msgs))
	}
	if maxActive.Load() < 2 {
		t.Errorf("at most %d handler ran at a time with 8 workers", maxActive.Load())
	}
	t.Logf("up to %d handlers at a time; stats %+v", maxActive.Load(), c.Stats())
}

// A handler running longer than AckWait, and a message queued behind it
// for as long, are not redelivered: the consumer extends their AckWait.
func TestConsumerExtendsAckWaitForSlowHandler(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	msgs := batch(e.subject, []string{"a"}, 2)
	e.publish(t, msgs)
	cfg := e.config(t)
	cfg.AckWait = 2 * time.Second
	cfg.Handler = func(ctx context.Context, m *exactly.Message) error {
		if m.ID == msgs[0].ID {
			time.Sleep(5 * time.Second)
		}
		return e.effects.record(ctx, m)
	}
	c := newConsumer(t, e.js, cfg)
	r := start(t, c)
	eventually(t, 30*time.Second, "2 messages handled", func() bool { return e.effects.total() >= 2 })
	if err := r.stop(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, s := range e.effects.all() {
		if s.delivered != 1 {
			t.Errorf("message %s handled on delivery %d, want 1", s.msg.ID, s.delivered)
		}
	}
	if info := e.info(t); info.Delivered.Consumer != 2 || info.NumAckPending != 0 {
		t.Errorf("server delivered %d times with %d awaiting ack; want 2 deliveries, all acknowledged",
			info.Delivered.Consumer, info.NumAckPending)
	}
	if st := c.Stats(); st.Redeliveries != 0 || st.Handled != 2 {
		t.Errorf("Stats = %+v", st)
	}
}

// Dead letters that no stream captures, or that the consumer itself would
// consume again, make Run fail at once with what to change.
func TestConsumerChecksDeadLetterRoute(t *testing.T) {
	t.Parallel()
	e := setupConsumer(t)
	prefix := e.subject[:strings.LastIndexByte(e.subject, '.')]

	cfg := e.config(t)
	cfg.FilterSubjects = []string{prefix + ".>"} // captures its own "<subject>.dlq"
	err := newConsumer(t, e.js, cfg).Run(t.Context())
	if err == nil || !strings.Contains(err.Error(), "consumes again") || !strings.Contains(err.Error(), "DeadLetterTopic") {
		t.Errorf("Run with a filter covering its dead letters = %v", err)
	}

	cfg = e.config(t)
	cfg.FilterSubjects = nil // the whole stream, dead letters included
	if err := newConsumer(t, e.js, cfg).Run(t.Context()); err == nil || !strings.Contains(err.Error(), "consumes again") {
		t.Errorf("Run without a filter on a stream holding its dead letters = %v", err)
	}

	_, nowhere := names()
	cfg = e.config(t)
	cfg.DeadLetterTopic = func(*exactly.Message) string { return nowhere }
	err = newConsumer(t, e.js, cfg).Run(t.Context())
	if !errors.Is(err, jetstream.ErrStreamNotFound) || !strings.Contains(err.Error(), nowhere) {
		t.Errorf("Run with dead letters no stream captures = %v", err)
	}

	cfg = e.config(t)
	cfg.Stream = "EXACTLY_TEST_MISSING_" + e.durable
	if err := newConsumer(t, e.js, cfg).Run(t.Context()); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Errorf("Run on a missing stream = %v", err)
	}
}

func TestNewConsumerValidation(t *testing.T) {
	t.Parallel()
	js := struct{ jetstream.JetStream }{} // NewConsumer does no I/O
	h := func(context.Context, *exactly.Message) error { return nil }
	valid := func() nats.ConsumerConfig {
		return nats.ConsumerConfig{ConsumerConfig: exactly.ConsumerConfig{Handler: h}, Stream: "S", Durable: "D"}
	}
	for name, edit := range map[string]func(*nats.ConsumerConfig){
		"no Stream":             func(c *nats.ConsumerConfig) { c.Stream = "" },
		"no Durable":            func(c *nats.ConsumerConfig) { c.Durable = "" },
		"Durable with a dot":    func(c *nats.ConsumerConfig) { c.Durable = "a.b" },
		"no Handler":            func(c *nats.ConsumerConfig) { c.Handler = nil },
		"empty filter token":    func(c *nats.ConsumerConfig) { c.FilterSubjects = []string{"a..b"} },
		"short AckWait":         func(c *nats.ConsumerConfig) { c.AckWait = 10 * time.Millisecond },
		"negative Batch":        func(c *nats.ConsumerConfig) { c.Batch = -1 },
		"Batch > MaxAckPending": func(c *nats.ConsumerConfig) { c.Batch, c.MaxAckPending = 20, 10 },
		"negative Workers":      func(c *nats.ConsumerConfig) { c.Workers = -2 },
		"negative Retry":        func(c *nats.ConsumerConfig) { c.Retry.MaxAttempts = -1 },
		"Configure MaxDeliver": func(c *nats.ConsumerConfig) {
			c.Configure = func(s *jetstream.ConsumerConfig) { s.MaxDeliver = 3 }
		},
		"Configure AckPolicy": func(c *nats.ConsumerConfig) {
			c.Configure = func(s *jetstream.ConsumerConfig) { s.AckPolicy = jetstream.AckNonePolicy }
		},
		"Configure AckWait": func(c *nats.ConsumerConfig) {
			c.Configure = func(s *jetstream.ConsumerConfig) { s.AckWait = time.Hour }
		},
		"Configure Durable": func(c *nats.ConsumerConfig) {
			c.Configure = func(s *jetstream.ConsumerConfig) { s.Durable = "other" }
		},
	} {
		cfg := valid()
		edit(&cfg)
		var field *exactly.ConfigError
		if _, err := nats.NewConsumer(js, cfg); err == nil {
			t.Errorf("%s: accepted", name)
		} else if !strings.HasPrefix(err.Error(), "nats: NewConsumer: ") || !errors.As(err, &field) {
			t.Errorf("%s: %v, want a *exactly.ConfigError naming the field", name, err)
		}
	}
	if _, err := nats.NewConsumer(nil, valid()); err == nil {
		t.Error("nil JetStream accepted")
	}
	cfg := valid()
	cfg.MaxAckPending = 10
	cfg.Configure = func(s *jetstream.ConsumerConfig) { s.DeliverPolicy = jetstream.DeliverNewPolicy }
	if _, err := nats.NewConsumer(js, cfg); err != nil {
		t.Errorf("valid config refused: %v", err)
	}
}
