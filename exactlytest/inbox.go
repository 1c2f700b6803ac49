package exactlytest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
)

// InboxStage says where in the handler the suite's work runs.
type InboxStage int

const (
	// BeforeEffect: the handler has not applied its effect yet.
	BeforeEffect InboxStage = iota + 1
	// AfterEffect: the handler has applied its effect (in the store's
	// transaction, where it has one) and is about to return.
	AfterEffect
)

// InboxWork is the suite's part of a handler. The harness's handler calls
// it with BeforeEffect, applies its effect, then calls it with AfterEffect,
// and returns the first error. It may also panic; the harness lets the
// panic through.
type InboxWork func(ctx context.Context, stage InboxStage) error

// InboxHarness describes one inbox store to the inbox conformance suite.
type InboxHarness struct {
	// Setup returns a fresh, empty inbox for one test (a table or key
	// prefix of its own), removed when t ends.
	Setup func(t *testing.T, opts InboxOptions) *InboxFixture
	// Transactional is true when the handler's effect commits atomically
	// with the dedup record (the SQL inbox): a failure after the effect
	// must then leave no trace of it.
	Transactional bool
}

// InboxOptions tune a fixture for one test.
type InboxOptions struct {
	// TTL, when not zero, is how long a store that expires its records by
	// itself (Redis) keeps them. Zero means a long one. Stores cleaned by
	// GC ignore it.
	TTL time.Duration
}

// InboxFixture is one test's inbox, as the harness built it.
type InboxFixture struct {
	// Deliver runs one delivery of msg through the inbox of consumer. Its
	// handler calls work (see InboxWork) and applies the effect: it records
	// one application of msg.ID for consumer, as a real side effect (a row
	// written in the store's transaction, a Redis counter).
	Deliver func(ctx context.Context, consumer string, msg *exactly.Message, work InboxWork) (inbox.Outcome, error)
	// DeliverBatch, when set, runs one delivery of msgs through the batched
	// path. Its handler calls work once per batch around the effects of
	// all the fresh messages.
	DeliverBatch func(ctx context.Context, consumer string, msgs []*exactly.Message, work InboxWork) ([]inbox.Outcome, error)
	// Effects returns how many times the effect of each message ID was
	// applied for consumer.
	Effects func(t *testing.T, consumer string) map[string]int
	// GC deletes consumer's records processed more than olderThan ago.
	// Nil for stores that expire records by themselves (InboxOptions.TTL).
	GC func(ctx context.Context, consumer string, olderThan time.Duration, batchSize int) (int64, error)
}

// RunInboxSuite checks that an inbox store applies each message's effect
// once per ID and consumer, counting the effects per ID in a real side
// effect (zero lost, zero applied twice):
//
//   - the same message delivered 5 times in a row, and by 5 goroutines at
//     once: one effect, one Processed and four Duplicate outcomes;
//   - a redelivery after a lost ack (the effect committed, the consumer
//     died before acknowledging): a duplicate;
//   - a handler that fails, or panics, is not marked done: its error (or
//     panic value) reaches the caller unchanged and the retry applies the
//     effect; on a Transactional store a failure after the effect leaves no
//     trace of it;
//   - 1000 messages, each delivered 1 to 4 times in random order from 8
//     goroutines, with random transient failures: one effect each;
//   - two consumers of one message each apply it once;
//   - a message without an ID is refused with inbox.ErrNoID, unhandled;
//   - retention: records older than the retention go (GC, per consumer, in
//     small batches; or the TTL) and a redelivery of such a message is
//     applied again, the documented limit; recent records stay;
//   - the batched path, when the harness has one: overlapping batches with
//     repeats, all-or-nothing failure, no handler call for a batch of
//     duplicates.
//
// Every subtest runs in parallel with a fixture of its own.
func RunInboxSuite(t *testing.T, h InboxHarness) {
	s := &inboxSuite{h: h}
	for _, tc := range []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"RedeliveredSequentially", s.testSequential},
		{"RedeliveredConcurrently", s.testConcurrent},
		{"LostAckRedelivered", s.testLostAck},
		{"FailureIsRetried", s.testFailure},
		{"FailureAfterEffectLeavesNoTrace", s.testFailureAfterEffect},
		{"PanicIsNotMarkedDone", s.testPanic},
		{"ManyMessagesRandomRedeliveries", s.testMany},
		{"ConsumersAreSeparate", s.testConsumers},
		{"EmptyIDRefused", s.testEmptyID},
		{"Retention", s.testRetention},
		{"Batch", s.testBatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t)
		})
	}
}

type inboxSuite struct {
	h InboxHarness
}

const consumerA = "consumer-a"

func (s *inboxSuite) setup(t *testing.T) *InboxFixture {
	t.Helper()
	return s.h.Setup(t, InboxOptions{})
}

// noWork is a handler that does nothing besides its effect.
func noWork(context.Context, InboxStage) error { return nil }

func testMessage(id string) *exactly.Message {
	return &exactly.Message{ID: id, Topic: "orders", Key: "k", Payload: []byte("p:" + id)}
}

// deliverUntilAcked behaves like a broker and a consumer: it redelivers msg
// until the inbox says it may be acknowledged, backing off a little on
// errors (a failing handler, a message in progress elsewhere).
func deliverUntilAcked(t testing.TB, f *InboxFixture, consumer string, msg *exactly.Message, work InboxWork) inbox.Outcome {
	deadline := time.Now().Add(30 * time.Second)
	for attempt := 1; ; attempt++ {
		out, err := f.Deliver(context.Background(), consumer, msg, work)
		if err == nil {
			if !out.Ack() {
				t.Errorf("message %s: nil error with outcome %v", msg.ID, out)
			}
			return out
		}
		if out != inbox.Retry {
			t.Errorf("message %s: error %v with outcome %v, want retry", msg.ID, err, out)
		}
		if time.Now().After(deadline) {
			t.Errorf("message %s: still failing after %d attempts: %v", msg.ID, attempt, err)
			return out
		}
		time.Sleep(time.Duration(min(attempt, 20)) * time.Millisecond)
	}
}

// checkEffects fails unless each of ids was applied exactly want times
// for consumer, and nothing else was applied.
func checkEffects(t *testing.T, f *InboxFixture, consumer string, want int, ids ...string) {
	t.Helper()
	got := f.Effects(t, consumer)
	lost, extra := 0, 0
	for _, id := range ids {
		switch n := got[id]; {
		case n < want:
			lost++
			if lost <= 5 {
				t.Errorf("message %s: effect applied %d times, want %d", id, n, want)
			}
		case n > want:
			extra++
			if extra <= 5 {
				t.Errorf("message %s: effect applied %d times, want %d", id, n, want)
			}
		}
	}
	if lost > 0 || extra > 0 {
		t.Errorf("of %d messages: %d applied fewer than %d times, %d applied more", len(ids), lost, want, extra)
	}
	known := map[string]bool{}
	for _, id := range ids {
		known[id] = true
	}
	for id, n := range got {
		if !known[id] {
			t.Errorf("unexpected effect for message %q (%d times)", id, n)
		}
	}
}

func (s *inboxSuite) testSequential(t *testing.T) {
	f := s.setup(t)
	msg := testMessage(exactly.NewID())
	for i := range 5 {
		out, err := f.Deliver(context.Background(), consumerA, msg, noWork)
		want := inbox.Duplicate
		if i == 0 {
			want = inbox.Processed
		}
		if err != nil || out != want {
			t.Fatalf("delivery %d: %v, %v; want %v, nil", i+1, out, err, want)
		}
	}
	checkEffects(t, f, consumerA, 1, msg.ID)
}

// testConcurrent: several messages, each delivered by 5 goroutines at once.
func (s *inboxSuite) testConcurrent(t *testing.T) {
	f := s.setup(t)
	var ids []string
	for range 10 {
		msg := testMessage(exactly.NewID())
		ids = append(ids, msg.ID)
		start := make(chan struct{})
		outs := make(chan inbox.Outcome, 5)
		var wg sync.WaitGroup
		for range 5 {
			wg.Go(func() {
				<-start
				// Each goroutine has its own copy, as each redelivery would.
				c := *msg
				outs <- deliverUntilAcked(t, f, consumerA, &c, noWork)
			})
		}
		close(start)
		wg.Wait()
		close(outs)
		count := map[inbox.Outcome]int{}
		for o := range outs {
			count[o]++
		}
		if count[inbox.Processed] != 1 || count[inbox.Duplicate] != 4 {
			t.Errorf("message %s: outcomes %v, want 1 processed and 4 duplicates", msg.ID, count)
		}
	}
	checkEffects(t, f, consumerA, 1, ids...)
}

// testLostAck: the consumer commits the effect and crashes before it acks;
// the broker redelivers to another member.
func (s *inboxSuite) testLostAck(t *testing.T) {
	f := s.setup(t)
	msg := testMessage(exactly.NewID())
	if out, err := f.Deliver(context.Background(), consumerA, msg, noWork); err != nil || out != inbox.Processed {
		t.Fatalf("first delivery: %v, %v", out, err)
	}
	// No ack: the same message comes back, maybe more than once.
	for range 2 {
		redelivered := *msg
		if out, err := f.Deliver(context.Background(), consumerA, &redelivered, noWork); err != nil || out != inbox.Duplicate {
			t.Fatalf("redelivery after the lost ack: %v, %v; want duplicate", out, err)
		}
	}
	checkEffects(t, f, consumerA, 1, msg.ID)
}

var errInjected = errors.New("injected handler failure")

func (s *inboxSuite) testFailure(t *testing.T) {
	f := s.setup(t)
	msg := testMessage(exactly.NewID())
	var calls atomic.Int32
	failTwice := func(_ context.Context, st InboxStage) error {
		if st == BeforeEffect && calls.Add(1) <= 2 {
			return errInjected
		}
		return nil
	}
	for i := range 2 {
		out, err := f.Deliver(context.Background(), consumerA, msg, failTwice)
		if !errors.Is(err, errInjected) || out != inbox.Retry {
			t.Fatalf("failing attempt %d: %v, %v; want retry and the handler's error", i+1, out, err)
		}
	}
	checkEffects(t, f, consumerA, 0, msg.ID)
	if out, err := f.Deliver(context.Background(), consumerA, msg, failTwice); err != nil || out != inbox.Processed {
		t.Fatalf("retry after the failures: %v, %v; want processed (a failed handler must not mark the message done)", out, err)
	}
	if out, err := f.Deliver(context.Background(), consumerA, msg, failTwice); err != nil || out != inbox.Duplicate {
		t.Fatalf("redelivery after success: %v, %v; want duplicate", out, err)
	}
	checkEffects(t, f, consumerA, 1, msg.ID)
	if n := calls.Load(); n != 3 {
		t.Errorf("the handler ran %d times, want 3 (2 failures, 1 success, not for the duplicate)", n)
	}
}

func (s *inboxSuite) testFailureAfterEffect(t *testing.T) {
	if !s.h.Transactional {
		t.Skip("the store does not commit the effect with its record")
	}
	f := s.setup(t)
	msg := testMessage(exactly.NewID())
	failed := false
	failOnce := func(_ context.Context, st InboxStage) error {
		if st == AfterEffect && !failed {
			failed = true
			return errInjected
		}
		return nil
	}
	if out, err := f.Deliver(context.Background(), consumerA, msg, failOnce); !errors.Is(err, errInjected) || out != inbox.Retry {
		t.Fatalf("failing delivery: %v, %v", out, err)
	}
	checkEffects(t, f, consumerA, 0, msg.ID) // rolled back with the claim
	if out := deliverUntilAcked(t, f, consumerA, msg, failOnce); out != inbox.Processed {
		t.Fatalf("retry: %v, want processed", out)
	}
	checkEffects(t, f, consumerA, 1, msg.ID)
}

type injectedPanic struct{ stage InboxStage }

func (s *inboxSuite) testPanic(t *testing.T) {
	f := s.setup(t)
	stages := []InboxStage{BeforeEffect}
	if s.h.Transactional {
		stages = append(stages, AfterEffect)
	}
	var ids []string
	for _, stage := range stages {
		msg := testMessage(exactly.NewID())
		ids = append(ids, msg.ID)
		panicking := func(_ context.Context, st InboxStage) error {
			if st == stage {
				panic(injectedPanic{stage})
			}
			return nil
		}
		func() {
			defer func() {
				if v := recover(); v != (injectedPanic{stage}) {
					t.Errorf("stage %d: recovered %v, want the handler's own panic value re-raised", stage, v)
				}
			}()
			out, err := f.Deliver(context.Background(), consumerA, msg, panicking)
			t.Errorf("stage %d: Deliver returned %v, %v instead of re-raising the panic", stage, out, err)
		}()
		if n := f.Effects(t, consumerA)[msg.ID]; n != 0 {
			t.Errorf("stage %d: effect applied %d times by a panicking handler, want 0", stage, n)
		}
		// Not marked done, and nothing left held: the retry runs at once.
		if out, err := f.Deliver(context.Background(), consumerA, msg, noWork); err != nil || out != inbox.Processed {
			t.Fatalf("stage %d: retry after the panic: %v, %v; want processed", stage, out, err)
		}
	}
	if f.DeliverBatch != nil {
		batch := []*exactly.Message{testMessage(exactly.NewID()), testMessage(exactly.NewID())}
		panicking := func(_ context.Context, st InboxStage) error {
			if st == BeforeEffect {
				panic(injectedPanic{st})
			}
			return nil
		}
		func() {
			defer func() {
				if v := recover(); v != (injectedPanic{BeforeEffect}) {
					t.Errorf("batch: recovered %v, want the handler's own panic value re-raised", v)
				}
			}()
			outs, err := f.DeliverBatch(context.Background(), consumerA, batch, panicking)
			t.Errorf("batch: DeliverBatch returned %v, %v instead of re-raising the panic", outs, err)
		}()
		outs, err := f.DeliverBatch(context.Background(), consumerA, batch, noWork)
		if err != nil || outs[0] != inbox.Processed || outs[1] != inbox.Processed {
			t.Errorf("batch: retry after the panic: %v, %v; want both processed", outs, err)
		}
		ids = append(ids, batch[0].ID, batch[1].ID)
	}
	checkEffects(t, f, consumerA, 1, ids...)
}

// testMany: 1000 messages, each delivered one to four times, in random
// order from 8 goroutines, with a transient failure now and then. Each
// effect must be applied once: zero lost, zero applied twice.
func (s *inboxSuite) testMany(t *testing.T) {
	f := s.setup(t)
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 7))
	const n = 1000
	ids := make([]string, n)
	var deliveries []*exactly.Message
	for i := range ids {
		ids[i] = fmt.Sprintf("m-%04d-%s", i, exactly.NewID())
		for range 1 + rng.IntN(4) {
			deliveries = append(deliveries, testMessage(ids[i]))
		}
	}
	rng.Shuffle(len(deliveries), func(i, j int) { deliveries[i], deliveries[j] = deliveries[j], deliveries[i] })
	work := make(chan *exactly.Message)
	var processed, duplicates atomic.Int64
	var wg sync.WaitGroup
	for w := range 8 {
		wrng := rand.New(rand.NewPCG(uint64(seed), uint64(w))) // used by this worker only
		flaky := func(_ context.Context, st InboxStage) error {
			if st == BeforeEffect && wrng.IntN(20) == 0 {
				return errInjected
			}
			return nil
		}
		wg.Go(func() {
			for m := range work {
				switch deliverUntilAcked(t, f, consumerA, m, flaky) {
				case inbox.Processed:
					processed.Add(1)
				case inbox.Duplicate:
					duplicates.Add(1)
				}
			}
		})
	}
	for _, m := range deliveries {
		work <- m
	}
	close(work)
	wg.Wait()
	if processed.Load() != n || duplicates.Load() != int64(len(deliveries)-n) {
		t.Errorf("%d deliveries of %d messages: %d processed, %d duplicates; want %d and %d",
			len(deliveries), n, processed.Load(), duplicates.Load(), n, len(deliveries)-n)
	}
	checkEffects(t, f, consumerA, 1, ids...)
}

func (s *inboxSuite) testConsumers(t *testing.T) {
	f := s.setup(t)
	msg := testMessage(exactly.NewID())
	for _, c := range []string{"billing", "shipping"} {
		for i := range 3 {
			out, err := f.Deliver(context.Background(), c, msg, noWork)
			want := inbox.Duplicate
			if i == 0 {
				want = inbox.Processed
			}
			if err != nil || out != want {
				t.Fatalf("consumer %s, delivery %d: %v, %v; want %v", c, i+1, out, err, want)
			}
		}
	}
	checkEffects(t, f, "billing", 1, msg.ID)
	checkEffects(t, f, "shipping", 1, msg.ID)
}

func (s *inboxSuite) testEmptyID(t *testing.T) {
	f := s.setup(t)
	ran := false
	spy := func(context.Context, InboxStage) error { ran = true; return nil }
	out, err := f.Deliver(context.Background(), consumerA, &exactly.Message{Topic: "orders", Payload: []byte("x")}, spy)
	if !errors.Is(err, inbox.ErrNoID) || out != inbox.Retry {
		t.Errorf("empty ID: %v, %v; want retry and ErrNoID", out, err)
	}
	if ran {
		t.Errorf("the handler ran for a message without an ID")
	}
	if f.DeliverBatch != nil {
		outs, err := f.DeliverBatch(context.Background(), consumerA, []*exactly.Message{testMessage("ok"), {Topic: "orders"}}, spy)
		if !errors.Is(err, inbox.ErrNoID) || outs[0] != inbox.Retry || outs[1] != inbox.Retry {
			t.Errorf("batch with an empty ID: %v, %v; want all retry and ErrNoID", outs, err)
		}
		if ran {
			t.Errorf("the batch handler ran although a message had no ID")
		}
	}
	checkEffects(t, f, consumerA, 0)
}

// testRetention: records older than the retention go (GC or TTL); recent
// ones stay. A message redelivered after its record went is applied again:
// that is the documented limit, checked here so that it stays true.
func (s *inboxSuite) testRetention(t *testing.T) {
	const ttl = 1500 * time.Millisecond
	f := s.h.Setup(t, InboxOptions{TTL: ttl})
	ctx := context.Background()
	var old, recent []*exactly.Message
	for i := range 10 {
		old = append(old, testMessage(fmt.Sprintf("old-%d", i)))
		recent = append(recent, testMessage(fmt.Sprintf("recent-%d", i)))
	}
	for _, m := range old {
		deliverUntilAcked(t, f, consumerA, m, noWork)
	}
	for _, m := range old[:3] {
		deliverUntilAcked(t, f, "other-consumer", m, noWork)
	}
	time.Sleep(ttl + 300*time.Millisecond)
	for _, m := range recent {
		deliverUntilAcked(t, f, consumerA, m, noWork)
	}
	if f.GC != nil {
		// Small batches, so that GC has to loop.
		n, err := f.GC(ctx, consumerA, ttl, 3)
		if err != nil {
			t.Fatal(err)
		}
		if n != int64(len(old)) {
			t.Errorf("GC deleted %d records, want %d", n, len(old))
		}
		if n, err := f.GC(ctx, consumerA, ttl, 3); err != nil || n != 0 {
			t.Errorf("second GC: %d, %v; want nothing left to delete", n, err)
		}
	}
	for _, m := range recent {
		if out, err := f.Deliver(ctx, consumerA, m, noWork); err != nil || out != inbox.Duplicate {
			t.Errorf("recent message %s after retention: %v, %v; want duplicate (kept)", m.ID, out, err)
		}
	}
	for _, m := range old {
		if out, err := f.Deliver(ctx, consumerA, m, noWork); err != nil || out != inbox.Processed {
			t.Errorf("old message %s after retention: %v, %v; want processed again (record gone)", m.ID, out, err)
		}
	}
	var oldIDs, recentIDs []string
	for i := range old {
		oldIDs = append(oldIDs, old[i].ID)
		recentIDs = append(recentIDs, recent[i].ID)
	}
	got := f.Effects(t, consumerA)
	for _, id := range oldIDs {
		if got[id] != 2 {
			t.Errorf("old message %s applied %d times, want 2 (once, then again after its record went)", id, got[id])
		}
	}
	for _, id := range recentIDs {
		if got[id] != 1 {
			t.Errorf("recent message %s applied %d times, want 1", id, got[id])
		}
	}
	if f.GC != nil {
		// GC of one consumer leaves the others' records alone.
		for _, m := range old[:3] {
			if out, err := f.Deliver(ctx, "other-consumer", m, noWork); err != nil || out != inbox.Duplicate {
				t.Errorf("other consumer's record of %s: %v, %v; want duplicate (GC is per consumer)", m.ID, out, err)
			}
		}
	}
}

// testBatch: overlapping batches with repeats inside, from 4 goroutines; a
// failing batch first, which must leave nothing done.
func (s *inboxSuite) testBatch(t *testing.T) {
	f := s.setup(t)
	if f.DeliverBatch == nil {
		t.Skip("the harness has no batched path")
	}
	ctx := context.Background()
	const n = 300
	msgs := make([]*exactly.Message, n)
	ids := make([]string, n)
	for i := range msgs {
		msgs[i] = testMessage(fmt.Sprintf("b-%03d-%s", i, exactly.NewID()))
		ids[i] = msgs[i].ID
	}
	// A failing batch: nothing is marked done.
	// A transactional store must roll the effects back; the others are
	// failed before their effects.
	failAt := BeforeEffect
	if s.h.Transactional {
		failAt = AfterEffect
	}
	outs, err := f.DeliverBatch(ctx, consumerA, msgs[:20], func(_ context.Context, st InboxStage) error {
		if st == failAt {
			return errInjected
		}
		return nil
	})
	if !errors.Is(err, errInjected) {
		t.Fatalf("failing batch: %v, want the handler's error", err)
	}
	for i, o := range outs {
		if o != inbox.Retry {
			t.Fatalf("failing batch: message %d outcome %v, want retry", i, o)
		}
	}
	checkEffects(t, f, consumerA, 0)

	// Batches of 25 overlapping by 10, each with a repeat inside.
	var batches [][]*exactly.Message
	for start := 0; start < n; start += 15 {
		b := append([]*exactly.Message(nil), msgs[start:min(start+25, n)]...)
		b = append(b, b[0])
		batches = append(batches, b, b) // and every batch delivered twice
	}
	rand.Shuffle(len(batches), func(i, j int) { batches[i], batches[j] = batches[j], batches[i] })
	var processed atomic.Int64
	ch := make(chan []*exactly.Message)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for b := range ch {
				deadline := time.Now().Add(30 * time.Second)
				for {
					outs, err := f.DeliverBatch(ctx, consumerA, b, noWork)
					retry := false
					for _, o := range outs {
						switch o {
						case inbox.Processed:
							processed.Add(1)
						case inbox.Retry:
							retry = true
						}
					}
					if err == nil && retry {
						t.Errorf("batch: nil error with a message to retry: %v", outs)
					}
					if !retry {
						break
					}
					if time.Now().After(deadline) {
						t.Errorf("batch still failing after 30s: %v", err)
						break
					}
					// Redeliver only what was not acknowledged, as a broker would.
					var rest []*exactly.Message
					for i, o := range outs {
						if !o.Ack() {
							rest = append(rest, b[i])
						}
					}
					b = rest
					time.Sleep(5 * time.Millisecond)
				}
			}
		})
	}
	for _, b := range batches {
		ch <- b
	}
	close(ch)
	wg.Wait()
	if processed.Load() != n {
		t.Errorf("%d messages processed, want %d", processed.Load(), n)
	}
	checkEffects(t, f, consumerA, 1, ids...)
	// A batch of nothing but duplicates does not call the handler.
	ran := false
	outs, err = f.DeliverBatch(ctx, consumerA, msgs[:5], func(context.Context, InboxStage) error { ran = true; return nil })
	if err != nil || ran {
		t.Errorf("batch of duplicates: %v, handler ran: %v", err, ran)
	}
	for i, o := range outs {
		if o != inbox.Duplicate {
			t.Errorf("batch of duplicates: message %d outcome %v", i, o)
		}
	}
}
