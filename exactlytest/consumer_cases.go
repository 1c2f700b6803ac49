package exactlytest

// The cases of RunConsumerSuite.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/exactlyonce/exactly"
)

// onceFor returns a step that runs fn the first time it sees id.
func onceFor(id string, fn step) step {
	var fired atomic.Bool
	return func(ctx context.Context, m *exactly.Message) error {
		if m.ID == id && fired.CompareAndSwap(false, true) {
			return fn(ctx, m)
		}
		return nil
	}
}

func (s *consumerSuite) testHandlesEachOnce(c *consumerCase) {
	t := c.t
	msgs := c.messages(5, 10)
	r := c.run(c.handler(nil, nil))
	c.waitApplied(msgs, r)
	r.stop()
	c.checkOnce(msgs)
	for _, m := range msgs {
		if n := c.callsOf(m.ID); n != 1 {
			t.Fatalf("message %s reached the handler %d times in a run without faults, want 1", m.ID, n)
		}
	}
	if s.h.Ordering != NoOrder {
		c.checkPerKeyOrder(msgs)
	}
	n := int64(len(msgs))
	st := r.stats()
	if st.Received != n || st.Handled != n || st.Failed != 0 || st.DeadLettered != 0 || st.AckFailures != 0 {
		t.Fatalf("Stats = %+v, want %d received and handled, nothing failed, dead-lettered or unacknowledged", st, n)
	}
	c.mu.Lock()
	hooks := c.hooks
	c.mu.Unlock()
	if hooks.handled != len(msgs) || hooks.failed != 0 || hooks.deadLettered != 0 || hooks.ackFailed != 0 {
		t.Fatalf("hooks saw %+v, want %d handled and nothing else", hooks, len(msgs))
	}
	if d := c.dlq.Delivered(); len(d) != 0 {
		t.Fatalf("%d messages dead-lettered in a run without faults", len(d))
	}
}

// crashAfterEffect makes the consumer handling msgs[5] fail as fault says, after
// its effect committed, then checks that the message came back to the
// next consumer and was absorbed.
//
// restart false is the lost ack: the consumer must get past it by itself,
// and the case is skipped when the harness cannot lose acks.
func (s *consumerSuite) crashAfterEffect(c *consumerCase, fault string, fail func(r *runner), restart bool) {
	msgs := c.messages(2, 10)
	victim := msgs[5]
	failed := make(chan struct{})
	// The victim's deliveries and the inbox's duplicates up to the fault:
	// the victim may have reached the handler before (an effect that failed
	// and was retried, a copy from a queue that delivers twice), so the
	// redelivery is one after, and it is absorbed once the inbox counted
	// it (a delivery reaches the handler before the inbox's claim ends).
	var atFault, dupsAtFault atomic.Int64
	r := c.newRunner()
	r.cfg = c.config(c.handler(nil, onceFor(victim.ID, func(context.Context, *exactly.Message) error {
		atFault.Store(int64(c.callsOf(victim.ID)))
		dupsAtFault.Store(c.in.Stats().Duplicates)
		fail(r)
		close(failed)
		return nil
	})))
	r.start()
	if !restart && r.current().tc.LoseAcks == nil {
		r.stop()
		c.t.Skip("the harness's TestConsumer has no LoseAcks")
	}
	c.await(failed, "the victim's effect")
	if restart {
		r.restart()
	}
	c.waitUntil("every message applied and the victim redelivered", func() (bool, string) {
		if ok, state := c.missing(msgs); !ok {
			return false, state
		}
		if int64(c.callsOf(victim.ID)) <= atFault.Load() {
			return false, "the victim was not redelivered"
		}
		return c.in.Stats().Duplicates > dupsAtFault.Load(), "the victim's redelivery is not absorbed by the inbox yet"
	}, r)
	r.stop()
	c.checkOnce(msgs)
	c.checkRedelivered(victim.ID, fault)
	st := r.stats()
	c.mu.Lock()
	hooks := c.hooks
	c.mu.Unlock()
	if st.AckFailures != int64(hooks.ackFailed) || st.Handled != int64(hooks.handled) {
		c.t.Fatalf("Stats = %+v, but the hooks saw %d handled and %d failed acks: they must agree", st, hooks.handled, hooks.ackFailed)
	}
	if st.Handled < int64(len(msgs))+1 {
		c.t.Fatalf("Stats = %+v: %d handled, want at least %d (every message, and the redelivery)", st, st.Handled, len(msgs)+1)
	}
}

func (s *consumerSuite) testCrashAfterEffect(c *consumerCase) {
	s.crashAfterEffect(c, "a crash between the effect and the ack", (*runner).crash, true)
}

func (s *consumerSuite) testLostAck(c *consumerCase) {
	s.crashAfterEffect(c, "a lost ack", (*runner).loseAcks, false)
}

func (s *consumerSuite) testTakeOver(c *consumerCase) {
	t := c.t
	msgs := c.messages(4, 10)
	slow := func(ctx context.Context, _ *exactly.Message) error {
		select {
		case <-time.After(20 * time.Millisecond):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	// Whichever consumer applies the fifth effect dies right after it (the
	// broker decides which of the two gets what); the other must take over
	// what the dead one held.
	var (
		handled atomic.Int32
		victim  atomic.Pointer[string]
		dead    atomic.Pointer[runner]
		died    = make(chan struct{})
	)
	var atDeath, dupsAtDeath atomic.Int64 // as in crashAfterEffect
	dieOnFifth := func(r **runner) step {
		return func(_ context.Context, m *exactly.Message) error {
			if handled.Add(1) == 5 {
				atDeath.Store(int64(c.callsOf(m.ID)))
				dupsAtDeath.Store(c.in.Stats().Duplicates)
				victim.Store(&m.ID)
				dead.Store(*r)
				(*r).crash()
				close(died)
			}
			return nil
		}
	}
	var a, b *runner
	a, b = c.newRunner(), c.newRunner()
	a.cfg = c.config(c.handler(slow, dieOnFifth(&a)))
	b.cfg = c.config(c.handler(slow, dieOnFifth(&b)))
	a.start()
	b.start()
	c.await(died, "the fifth effect")
	survivor := a
	if dead.Load() == a {
		survivor = b
	}
	before := survivor.stats().Handled
	c.waitUntil("every message applied and the dead consumer's last message redelivered", func() (bool, string) {
		if ok, state := c.missing(msgs); !ok {
			return false, state
		}
		if int64(c.callsOf(*victim.Load())) <= atDeath.Load() {
			return false, "the dead consumer's last message was not redelivered"
		}
		return c.in.Stats().Duplicates > dupsAtDeath.Load(), "the redelivery of the dead consumer's last message is not absorbed by the inbox yet"
	}, survivor)
	survivor.stop()
	c.checkOnce(msgs)
	c.checkRedelivered(*victim.Load(), "the consumer holding it died")
	if st := survivor.stats(); st.Handled <= before {
		t.Fatalf("the consumer that took over handled nothing after the other died: %+v", st)
	}
}

func (s *consumerSuite) testCrashBeforeEffect(c *consumerCase) {
	msgs := c.messages(1, 5)
	victim := msgs[2]
	var attempts atomic.Int32
	crashed := make(chan struct{})
	r := c.newRunner()
	r.cfg = c.config(c.handler(func(ctx context.Context, m *exactly.Message) error {
		if m.ID != victim.ID {
			return nil
		}
		switch attempts.Add(1) {
		case 1, 2:
			return errors.New("exactlytest: transient failure before the effect")
		case 3:
			r.crash()
			close(crashed)
			<-ctx.Done()
			return ctx.Err()
		}
		return nil
	}, nil))
	r.cfg.Retry.MaxAttempts = 100
	r.start()
	c.await(crashed, "the third attempt at the victim")
	if n := c.effectCounts()[victim.ID]; n != 0 {
		c.t.Fatalf("the victim was applied %d times before the crash, by a handler that never got past its fault", n)
	}
	r.restart()
	c.waitApplied(msgs, r)
	r.stop()
	c.checkOnce(msgs)
}

func (s *consumerSuite) testRetryWithBackoff(c *consumerCase) {
	t := c.t
	msgs := c.messages(1, 3)
	var (
		mu    sync.Mutex
		times = map[string][]time.Time{}
	)
	r := c.newRunner()
	r.cfg = c.config(c.handler(func(ctx context.Context, m *exactly.Message) error {
		mu.Lock()
		times[m.ID] = append(times[m.ID], time.Now())
		n := len(times[m.ID])
		mu.Unlock()
		switch n {
		case 1:
			return errors.New("exactlytest: transient failure")
		case 2:
			panic("exactlytest: handler bug")
		}
		return nil
	}, nil))
	r.cfg.Retry = exactly.RetryPolicy{MaxAttempts: 5, InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second}
	r.start()
	c.waitApplied(msgs, r)
	r.stop()
	c.checkOnce(msgs)
	mu.Lock()
	defer mu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, m := range msgs {
		ts := times[m.ID]
		if len(ts) != 3 {
			t.Fatalf("message %s ran %d times, want 3 (an error, a panic, a success)", m.ID, len(ts))
		}
		// The backoff is 100ms then 200ms, with jitter down to half.
		if gap := ts[1].Sub(ts[0]); gap < 50*time.Millisecond {
			t.Errorf("message %s: retried %v after its first failure, want at least 50ms of backoff", m.ID, gap)
		}
		if gap := ts[2].Sub(ts[1]); gap < 100*time.Millisecond {
			t.Errorf("message %s: retried %v after its second failure, want at least 100ms of backoff", m.ID, gap)
		}
		f := c.failed[m.ID]
		if len(f) != 2 || !strings.HasPrefix(f[0], "1:") || !strings.HasPrefix(f[1], "2:") || !strings.Contains(f[1], "exactlytest: handler bug") {
			t.Errorf("message %s: Failed hooks %q, want attempt 1 (the error) and attempt 2 (the panic)", m.ID, f)
		}
	}
	n := int64(len(msgs))
	if st := r.stats(); st.Handled != n || st.Failed != 2*n || st.DeadLettered != 0 {
		t.Errorf("Stats = %+v, want %d handled, %d failed attempts, nothing dead-lettered", st, n, 2*n)
	}
	if c.hooks.failed != 2*len(msgs) || c.hooks.handled != len(msgs) {
		t.Errorf("hooks saw %+v, want %d handled and %d failed", c.hooks, len(msgs), 2*len(msgs))
	}
	if d := c.dlq.Delivered(); len(d) != 0 {
		t.Errorf("%d messages dead-lettered, want none: each succeeded on its third attempt", len(d))
	}
}

// errPoison is the error of a handler that can never apply a message.
var errPoison = errors.New("exactlytest: cannot apply: schema mismatch")

func (s *consumerSuite) testDeadLetter(c *consumerCase) {
	t := c.t
	msgs := c.messages(1, 4)
	poison, good := msgs[1], append([]*exactly.Message{msgs[0]}, msgs[2:]...)
	r := c.newRunner()
	r.cfg = c.config(c.handler(func(_ context.Context, m *exactly.Message) error {
		if m.ID == poison.ID {
			return fmt.Errorf("order %s: %w", m.Key, errPoison)
		}
		return nil
	}, nil))
	r.start()
	c.waitApplied(good, r)
	c.waitFor("the poison message dead-lettered", func() bool { return c.dlq.Count(poison.ID) > 0 }, r)
	r.stop()
	c.checkOnce(good)

	dead := c.dlq.Delivered()
	if len(dead) != 1 {
		t.Fatalf("%d dead letters, want 1", len(dead))
	}
	d := dead[0]
	switch {
	case d.ID != poison.ID || d.Key != poison.Key || string(d.Payload) != string(poison.Payload):
		t.Fatalf("dead letter id %q key %q payload %q, want the message's own %q %q %q", d.ID, d.Key, d.Payload, poison.ID, poison.Key, poison.Payload)
	case d.Topic != c.src.Topic+".dlq":
		t.Fatalf("dead letter topic %q, want the default %q", d.Topic, c.src.Topic+".dlq")
	case !strings.Contains(d.Headers[exactly.HeaderDeadReason], errPoison.Error()):
		t.Fatalf("dead letter reason %q, want the handler's error", d.Headers[exactly.HeaderDeadReason])
	case d.Headers[exactly.HeaderDeadAttempts] != "3":
		t.Fatalf("dead letter attempts %q, want 3 (Retry.MaxAttempts)", d.Headers[exactly.HeaderDeadAttempts])
	case d.Headers[exactly.HeaderDeadTopic] != c.src.Topic:
		t.Fatalf("dead letter topic header %q, want %q", d.Headers[exactly.HeaderDeadTopic], c.src.Topic)
	case d.Headers["x-seq"] != poison.Headers["x-seq"]:
		t.Fatalf("dead letter headers %v lost the message's own", d.Headers)
	}
	if _, err := time.Parse(time.RFC3339Nano, d.Headers[exactly.HeaderDeadAt]); err != nil {
		t.Fatalf("dead letter %s = %q: %v", exactly.HeaderDeadAt, d.Headers[exactly.HeaderDeadAt], err)
	}
	if n := c.callsOf(poison.ID); n != 3 {
		t.Fatalf("the poison message ran %d times, want Retry.MaxAttempts (3)", n)
	}
	st := r.stats()
	if st.DeadLettered != 1 || st.Failed != 3 || st.Handled != int64(len(good)) {
		t.Fatalf("Stats = %+v, want 1 dead-lettered, 3 failed attempts, %d handled", st, len(good))
	}
	c.mu.Lock()
	deadErr, hooks := c.deadErrs[poison.ID], c.hooks
	c.mu.Unlock()
	if hooks.deadLettered != 1 || !errors.Is(deadErr, errPoison) {
		t.Fatalf("DeadLettered hooks %d, error %v; want 1, with the handler's error", hooks.deadLettered, deadErr)
	}

	// It was acknowledged once dead-lettered: a new consumer does not get
	// it again.
	again := c.run(c.handler(nil, nil))
	time.Sleep(time.Second)
	again.stop()
	if n := c.callsOf(poison.ID); n != 3 {
		t.Fatalf("the dead-lettered message reached a new consumer (%d runs in all): it was not acknowledged", n)
	}
	if n := c.dlq.Count(poison.ID); n != 1 {
		t.Fatalf("the poison message was dead-lettered %d times", n)
	}
}

func (s *consumerSuite) testDeadLetterHeld(c *consumerCase) {
	t := c.t
	msgs := c.messages(1, 2)
	poison := msgs[0]
	c.dlq.FailWhen(func(m *exactly.Message) error {
		if m.ID == poison.ID {
			return fmt.Errorf("exactlytest: the dead-letter destination is down: %w", ErrInjected)
		}
		return nil
	})
	r := c.newRunner()
	r.cfg = c.config(c.handler(func(_ context.Context, m *exactly.Message) error {
		if m.ID == poison.ID {
			return errPoison
		}
		return nil
	}, nil))
	r.start()
	c.waitFor("the dead-letter publish retried", func() bool { return c.dlq.Attempts(poison.ID) >= 2 }, r)
	before := c.callsOf(poison.ID)
	if before != 3 {
		t.Fatalf("the poison message ran %d times before its dead letter, want Retry.MaxAttempts (3)", before)
	}
	r.crash()
	c.dlq.Heal()
	r.restart()
	c.waitApplied(msgs[1:], r)
	c.waitFor("the poison message dead-lettered", func() bool { return c.dlq.Count(poison.ID) > 0 }, r)
	r.stop()
	c.checkOnce(msgs[1:])
	if n := c.callsOf(poison.ID); n <= before {
		t.Fatalf("the poison message did not come back after the crash (%d runs, as before it): "+
			"it was acknowledged though its dead letter was never confirmed", n)
	}
	if n := c.dlq.Count(poison.ID); n != 1 {
		t.Fatalf("the poison message was dead-lettered %d times, want 1", n)
	}
}

func (s *consumerSuite) testSlowHandler(c *consumerCase) {
	t := c.t
	hold := max(3*s.h.AckDeadline, 2*time.Second)
	msgs := c.messages(1, 1)
	slow := onceFor(msgs[0].ID, func(ctx context.Context, _ *exactly.Message) error {
		select {
		case <-time.After(hold):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	a := c.run(c.handler(slow, nil))
	b := c.run(c.handler(slow, nil))
	c.waitApplied(msgs, a, b)
	time.Sleep(time.Second)
	a.stop()
	b.stop()
	c.checkOnce(msgs)
	if n := c.callsOf(msgs[0].ID); n != 1 {
		t.Fatalf("a handler running %v (AckDeadline %v) lost its message: it ran %d times", hold, s.h.AckDeadline, n)
	}
}

func (s *consumerSuite) testNoID(c *consumerCase) {
	t := c.t
	payload := "no-id/" + exactly.NewID()
	c.src.PublishWithoutID(t, []byte(payload))
	good := c.messages(1, 1)
	r := c.run(c.handler(nil, nil))
	c.waitApplied(good, r)
	switch s.h.NoID {
	case NoIDDeadLettered:
		c.waitFor("the id-less message dead-lettered", func() bool { return len(c.dlq.Delivered()) > 0 }, r)
		r.stop()
		c.checkOnce(good)
		c.mu.Lock()
		_, seen := c.payloads[payload]
		c.mu.Unlock()
		if seen {
			t.Fatal("the handler got the message without an id")
		}
		dead := c.dlq.Delivered()
		if len(dead) != 1 {
			t.Fatalf("%d dead letters, want 1", len(dead))
		}
		d := dead[0]
		if string(d.Payload) != payload || d.ID == "" || d.Headers[exactly.HeaderDeadReason] == "" {
			t.Fatalf("dead letter id %q payload %q reason %q, want a stand-in id, the payload and a reason", d.ID, d.Payload, d.Headers[exactly.HeaderDeadReason])
		}
		c.mu.Lock()
		deadErr := c.deadErrs[d.ID]
		c.mu.Unlock()
		if !errors.Is(deadErr, exactly.ErrNoID) {
			t.Fatalf("DeadLettered hook error %v, want one matching exactly.ErrNoID", deadErr)
		}
		if st := r.stats(); st.DeadLettered != 1 || st.Handled != 1 || st.Failed != 1 {
			t.Fatalf("Stats = %+v, want 1 handled, 1 failed (the id-less message) and 1 dead-lettered", st)
		}
	case NoIDDerived:
		c.waitFor("the id-less message handled", func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			return c.payloads[payload] != ""
		}, r)
		c.mu.Lock()
		id := c.payloads[payload]
		c.mu.Unlock()
		// Handled is not applied yet: the inbox commits the effect after
		// the handler returns, and stopping first would cancel it.
		derived := &exactly.Message{ID: id}
		c.waitApplied([]*exactly.Message{derived}, r)
		r.stop()
		c.checkOnce(append(good, derived))
		if d := c.dlq.Delivered(); len(d) != 0 {
			t.Fatalf("%d dead letters, want none: the id is derived", len(d))
		}
	}
}

func (s *consumerSuite) testKeyOrder(c *consumerCase) {
	workers := 4
	switch s.h.Ordering {
	case NoOrder:
		c.t.Skip("the consumer promises no order (Ordering is NoOrder)")
	case OrderWithOneWorker:
		workers = 1
	}
	msgs := c.messages(8, 15)
	// Every seventh message fails once: a retry must not let the next
	// message of its key overtake it.
	flaky := map[string]bool{}
	for i := 0; i < len(msgs); i += 7 {
		flaky[msgs[i].ID] = true
	}
	var mu sync.Mutex
	r := c.newRunner()
	r.cfg = c.config(c.handler(func(_ context.Context, m *exactly.Message) error {
		mu.Lock()
		defer mu.Unlock()
		if flaky[m.ID] {
			delete(flaky, m.ID)
			return errors.New("exactlytest: transient failure")
		}
		return nil
	}, nil))
	r.cfg.Workers = workers
	r.start()
	c.waitApplied(msgs, r)
	r.stop()
	c.checkOnce(msgs)
	c.checkPerKeyOrder(msgs)
}

func (s *consumerSuite) testConcurrency(c *consumerCase) {
	t := c.t
	msgs := c.messages(8, 4)
	var (
		mu       sync.Mutex
		inFlight int
		most     int
		perKey   = map[string]int{}
		overlap  []string
	)
	r := c.newRunner()
	r.cfg = c.config(c.handler(func(ctx context.Context, m *exactly.Message) error {
		mu.Lock()
		inFlight++
		most = max(most, inFlight)
		perKey[m.Key]++
		if perKey[m.Key] > 1 {
			overlap = append(overlap, m.Key)
		}
		mu.Unlock()
		defer func() {
			mu.Lock()
			inFlight--
			perKey[m.Key]--
			mu.Unlock()
		}()
		select {
		case <-time.After(100 * time.Millisecond):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}, nil))
	r.cfg.Workers = 4
	r.start()
	c.waitApplied(msgs, r)
	r.stop()
	c.checkOnce(msgs)
	mu.Lock()
	defer mu.Unlock()
	if most < 2 {
		t.Fatalf("at most %d handler ran at once with Workers 4 over 8 keys", most)
	}
	if s.h.Ordering == OrderPerKey && len(overlap) > 0 {
		t.Fatalf("two messages of key %s were handled at once, though the consumer promises per-key order", overlap[0])
	}
	t.Logf("up to %d handlers at once", most)
}

func (s *consumerSuite) testGracefulShutdown(c *consumerCase) {
	t := c.t
	msgs := c.messages(1, 10)
	victim := msgs[5]
	started := make(chan struct{})
	first := c.newRunner()
	first.cfg = c.config(c.handler(onceFor(victim.ID, func(ctx context.Context, _ *exactly.Message) error {
		close(started)
		<-ctx.Done()
		return ctx.Err()
	}), nil))
	first.start()
	c.await(started, "the handler of the sixth message")
	first.stop()
	if t.Failed() {
		t.FailNow()
	}
	if n := c.effectCounts()[victim.ID]; n != 0 {
		t.Fatalf("the message in flight at shutdown was applied %d times by a handler that gave up", n)
	}
	st := first.stats()
	if st.Failed != 0 || st.DeadLettered != 0 {
		t.Fatalf("Stats = %+v after shutdown, want nothing failed or dead-lettered: a handler cut short by shutdown is not a failure", st)
	}
	if s.h.Ordering != NoOrder && st.Handled != 5 {
		t.Fatalf("Stats = %+v after shutdown, want the 5 messages before the one in flight handled", st)
	}
	second := c.run(c.handler(nil, nil))
	c.waitApplied(msgs, second)
	second.stop()
	c.checkOnce(msgs)
	if n := c.callsOf(victim.ID); n != 2 {
		t.Fatalf("the message in flight at shutdown ran %d times, want 2 (cut short, then handled by the next consumer)", n)
	}
	if d := c.dlq.Delivered(); len(d) != 0 {
		t.Fatalf("%d dead letters after a shutdown, want none", len(d))
	}
}
