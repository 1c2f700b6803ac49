package exactlytest

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
)

// Ordering is the order a consumer promises to apply the messages of one
// key in, when nothing fails.
type Ordering int

const (
	// NoOrder: no order is promised.
	NoOrder Ordering = iota
	// OrderWithOneWorker: with Workers 1 messages are applied in the order
	// they were published; with more, in any order (an AMQP queue).
	OrderWithOneWorker
	// OrderPerKey: with any number of Workers, the messages of one key are
	// applied one at a time, in the order they were published (per-key
	// workers, Kafka partitions).
	OrderPerKey
)

// NoIDRule is what a consumer does with a message that carries no id, by
// the rule of exactly.ErrNoID.
type NoIDRule int

const (
	// NoIDDeadLettered: the handler never sees the message; it is
	// dead-lettered at once with a reason matching exactly.ErrNoID (AMQP,
	// NATS).
	NoIDDeadLettered NoIDRule = iota + 1
	// NoIDDerived: the consumer derives the id from the broker's position,
	// stable across redeliveries, and handles the message (Kafka).
	NoIDDerived
)

// ConsumerHarness connects RunConsumerSuite to one consumer adapter.
type ConsumerHarness struct {
	// DB is a PostgreSQL database (any database/sql driver) where each case
	// keeps an inbox table and an effects table of its own, dropped when
	// the case ends. Required.
	DB *sql.DB

	// Setup returns a fresh source for one case: a queue, topic or stream
	// no other case uses, so cases can run in parallel. It must register
	// its cleanup with t.Cleanup. Required.
	Setup func(t *testing.T) ConsumerSource

	// Ordering is the order the consumer promises.
	Ordering Ordering

	// NoID is what the consumer does with a message without an id.
	// Required.
	NoID NoIDRule

	// AckDeadline is how long the broker waits for the acknowledgement of
	// a delivered message before it hands the message to another consumer
	// (NATS AckWait, an SQS visibility timeout), as the harness configures
	// it; the consumer must keep the message of a slower handler (keep-alive,
	// in-progress, visibility extension). Zero for a broker that never takes
	// a message back from a live connection (RabbitMQ). The suite runs a
	// handler for three times this long, at least 2s.
	AckDeadline time.Duration

	// Timeout bounds every wait for the consumer to catch up, and for Run to
	// return after its context ended. Default 60s. A broker that hands a
	// crashed member's work over only after a session timeout (Kafka) needs
	// that timeout well below this.
	Timeout time.Duration
}

// ConsumerSource is one case's source of messages on the broker.
type ConsumerSource struct {
	// Topic is the Message.Topic the suite publishes with, and that the
	// consumer's messages carry: a Kafka topic, a NATS subject, an AMQP
	// queue name (routed through the default exchange). Required.
	Topic string

	// Publisher publishes to Topic: the adapter's own. Required.
	Publisher exactly.Publisher

	// PublishWithoutID publishes a message with this payload to Topic and
	// no id at all (no exactly-id header, no native id), as a producer
	// that knows nothing of exactly would. Required.
	PublishWithoutID func(t *testing.T, payload []byte)

	// New returns a consumer of Topic built with cfg, the settings every
	// consumer shares (Handler, Retry, DeadLetter, Workers, Hooks, Logger),
	// and the harness's own for the broker. Every consumer New returns for
	// one source shares its deliveries (the same queue, group or durable):
	// a second one takes over what the first leaves. It is called on the
	// test's goroutine, once per consumer process the case runs. Required.
	New func(t *testing.T, cfg exactly.ConsumerConfig) TestConsumer
}

// TestConsumer is one consumer, as a process running it would be.
type TestConsumer struct {
	// Run consumes until ctx ends. After a graceful end (ctx ended, no
	// Crash) it must return nil. Required.
	Run func(ctx context.Context) error

	// Stats returns the consumer's totals. Required.
	Stats func() exactly.ConsumerStats

	// Crash makes the consumer lose its connection to the broker at once,
	// as a killed process does: nothing it has not acknowledged yet can be
	// acknowledged any more, and the broker gives it to the next consumer.
	// The suite calls it from a handler (after the effect committed, or
	// before it) or from the test, then ends Run's context and starts
	// another consumer with New. Required.
	Crash func()

	// LoseAcks makes the acknowledgements the consumer sends from now on
	// vanish on the way to the broker, its connection dropping after the
	// first: the consumer believes a message acknowledged that the broker
	// redelivers. The consumer must get past it by itself (reconnect) or
	// return from Run with an error, after which the suite starts another.
	// Optional: without it the LostAck case is skipped.
	LoseAcks func()
}

// RunConsumerSuite runs the consumer conformance suite: every consumer of
// this module passes it, and an adapter of your own should too. Each case
// publishes real messages to a fresh source on the broker, runs the
// consumer with its Handler wrapped by the SQL inbox (inbox.NewSQL on
// PostgreSQL), and counts the effects per message id in a table the
// inbox's transaction writes: an effect applied twice or never fails the
// case, and so does a case whose fault was not followed by the redelivery
// it must cause (it would prove nothing). The dead-letter destination is a
// Recorder the suite passes as DeadLetter, so it can see each dead letter
// and hold it back.
//
//   - HandlesEachOnce: every message applied once, each handler run once,
//     stats and hooks counting exactly that, nothing dead-lettered; per-key
//     order with one worker where Ordering promises it.
//   - CrashAfterEffectBeforeAck: the consumer dies after an effect
//     committed and before its ack; the next one gets the message again and
//     the inbox absorbs it.
//   - LostAck: the ack of a committed effect never reaches the broker.
//   - SecondConsumerTakesOver: of two consumers sharing the source, one
//     dies mid-stream; the other finishes its work, redeliveries absorbed.
//   - CrashBeforeEffect: the consumer dies while a message is being retried,
//     before its effect; the next consumer applies it (a consumer that
//     acknowledges before the effect loses it here).
//   - RetryWithBackoff: an error, then a panic, then success: three runs,
//     spaced by the backoff, one effect, nothing dead-lettered; Failed hooks
//     with attempts 1 and 2, the second matching exactly.ErrPanic.
//   - DeadLetterAfterMaxAttempts: a message that always fails is
//     dead-lettered after Retry.MaxAttempts runs, with the same id, key and
//     payload and the exactly-dead-* headers, the others applied; it is
//     acknowledged: a new consumer does not get it again.
//   - DeadLetterHeldUntilConfirmed: while the dead-letter destination
//     refuses the copy the message stays unacknowledged: a crash then
//     brings it back, and it is dead-lettered once the destination heals.
//   - SlowHandlerStaysOwned: a handler running past AckDeadline (at least
//     2s) keeps its message: a second consumer does not get it meanwhile.
//   - MessageWithoutID: a message with no id follows NoID.
//   - KeyOrder: per-key order under Ordering, with failures retried in
//     place (skipped for NoOrder).
//   - ConcurrencyAcrossKeys: Workers 4 handles several keys at once (and
//     never one key twice at once, under OrderPerKey).
//   - GracefulShutdown: Run's context ends with a handler in flight; Run
//     returns nil, the message is not acknowledged, the next consumer
//     applies it once; a handler cut short is not counted as failed.
//
// Every case runs in parallel with a source, an inbox and an effects table
// of its own.
//
//	func TestConsumerSuite(t *testing.T) {
//		exactlytest.RunConsumerSuite(t, exactlytest.ConsumerHarness{
//			DB:       db, // PostgreSQL
//			Setup:    broker.newSource,
//			Ordering: exactlytest.OrderPerKey,
//			NoID:     exactlytest.NoIDDeadLettered,
//		})
//	}
func RunConsumerSuite(t *testing.T, h ConsumerHarness) {
	t.Helper()
	switch {
	case h.DB == nil:
		t.Fatal("exactlytest: ConsumerHarness.DB is nil: the suite keeps its inboxes and effects in PostgreSQL")
	case h.Setup == nil:
		t.Fatal("exactlytest: ConsumerHarness.Setup is nil")
	case h.NoID != NoIDDeadLettered && h.NoID != NoIDDerived:
		t.Fatal("exactlytest: ConsumerHarness.NoID is not set: say what the consumer does with a message without an id")
	}
	if h.Timeout <= 0 {
		h.Timeout = 60 * time.Second
	}
	s := &consumerSuite{h: h}
	for _, tc := range []struct {
		name string
		fn   func(*consumerCase)
	}{
		{"HandlesEachOnce", s.testHandlesEachOnce},
		{"CrashAfterEffectBeforeAck", s.testCrashAfterEffect},
		{"LostAck", s.testLostAck},
		{"SecondConsumerTakesOver", s.testTakeOver},
		{"CrashBeforeEffect", s.testCrashBeforeEffect},
		{"RetryWithBackoff", s.testRetryWithBackoff},
		{"DeadLetterAfterMaxAttempts", s.testDeadLetter},
		{"DeadLetterHeldUntilConfirmed", s.testDeadLetterHeld},
		{"SlowHandlerStaysOwned", s.testSlowHandler},
		{"MessageWithoutID", s.testNoID},
		{"KeyOrder", s.testKeyOrder},
		{"ConcurrencyAcrossKeys", s.testConcurrency},
		{"GracefulShutdown", s.testGracefulShutdown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(s.setup(t))
		})
	}
}

type consumerSuite struct{ h ConsumerHarness }

var caseSeq atomic.Int64

// consumerCase is one case's world: its source, inbox, effects table,
// dead-letter Recorder, and what the handlers and hooks saw.
type consumerCase struct {
	t       *testing.T
	h       ConsumerHarness
	src     ConsumerSource
	in      *inbox.SQL
	effects string
	dlq     *Recorder

	mu       sync.Mutex
	calls    map[string]int      // handler runs per id, duplicates included
	payloads map[string]string   // payload -> id, of every message a handler saw
	failed   map[string][]string // Failed hook per id: "attempt:error"
	hooks    struct{ handled, failed, deadLettered, ackFailed int }
	deadErrs map[string]error // DeadLettered hook's error per id
}

func (s *consumerSuite) setup(t *testing.T) *consumerCase {
	t.Helper()
	src := s.h.Setup(t)
	switch {
	case src.Topic == "":
		t.Fatal("exactlytest: ConsumerSource.Topic is empty")
	case src.Publisher == nil || src.New == nil || src.PublishWithoutID == nil:
		t.Fatal("exactlytest: ConsumerSource needs Publisher, PublishWithoutID and New")
	}
	n := caseSeq.Add(1)
	table := fmt.Sprintf("exactly_cs_%d_%d", time.Now().UnixNano()%1e9, n)
	in, err := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Table: table, Consumer: "suite-" + table})
	if err != nil {
		t.Fatalf("inbox.NewSQL: %v", err)
	}
	c := &consumerCase{
		t: t, h: s.h, src: src, in: in, effects: table + "_effects", dlq: &Recorder{},
		calls: map[string]int{}, payloads: map[string]string{}, failed: map[string][]string{}, deadErrs: map[string]error{},
	}
	ctx := context.Background()
	if err := in.Migrate(ctx, s.h.DB); err != nil {
		t.Fatalf("migrating the inbox table %s: %v", table, err)
	}
	if _, err := s.h.DB.ExecContext(ctx, "CREATE TABLE "+c.effects+
		" (seq BIGSERIAL PRIMARY KEY, id TEXT NOT NULL, msg_key TEXT NOT NULL, payload TEXT NOT NULL)"); err != nil {
		t.Fatalf("creating the effects table: %v", err)
	}
	t.Cleanup(func() {
		for _, tbl := range []string{table, c.effects} {
			if _, err := s.h.DB.ExecContext(ctx, "DROP TABLE IF EXISTS "+tbl); err != nil {
				t.Errorf("dropping %s: %v", tbl, err)
			}
		}
		_, _ = s.h.DB.ExecContext(ctx, "DELETE FROM exactly_migrations WHERE scope = $1", "inbox:"+table)
	})
	return c
}

// step is a case's fault, run for each attempt: before the effect (inside
// the inbox's transaction: an error or a panic rolls it back), or after
// the effect committed. A nil step does nothing.
type step func(ctx context.Context, m *exactly.Message) error

// handler is the Handler the case's consumers run: it counts the run,
// then through the inbox runs before, applies the effect (a row in the
// effects table) and commits, then runs after.
func (c *consumerCase) handler(before, after step) exactly.Handler {
	apply := c.in.Handler(c.h.DB, func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
		if before != nil {
			if err := before(ctx, m); err != nil {
				return err
			}
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+c.effects+" (id, msg_key, payload) VALUES ($1, $2, $3)", m.ID, m.Key, string(m.Payload))
		return err
	})
	return func(ctx context.Context, m *exactly.Message) error {
		c.mu.Lock()
		c.calls[m.ID]++
		c.payloads[string(m.Payload)] = m.ID
		c.mu.Unlock()
		if err := apply(ctx, m); err != nil {
			return err
		}
		if after != nil {
			return after(ctx, m)
		}
		return nil
	}
}

// config is the shared configuration of the case's consumers: quick
// retries, the Recorder as dead-letter destination, hooks counting into c.
func (c *consumerCase) config(h exactly.Handler) exactly.ConsumerConfig {
	return exactly.ConsumerConfig{
		Handler:    h,
		Retry:      exactly.RetryPolicy{MaxAttempts: 3, InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond},
		DeadLetter: c.dlq,
		Workers:    1,
		Logger:     slog.New(slog.NewTextHandler(c.t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})),
		Hooks: exactly.ConsumerHooks{
			Handled: func(*exactly.Message, time.Duration) {
				c.mu.Lock()
				c.hooks.handled++
				c.mu.Unlock()
			},
			Failed: func(m *exactly.Message, attempt int, err error) {
				c.mu.Lock()
				c.hooks.failed++
				c.failed[m.ID] = append(c.failed[m.ID], fmt.Sprintf("%d:%v", attempt, err))
				c.mu.Unlock()
			},
			DeadLettered: func(m *exactly.Message, err error) {
				c.mu.Lock()
				c.hooks.deadLettered++
				c.deadErrs[m.ID] = err
				c.mu.Unlock()
			},
			AckFailed: func(*exactly.Message, error) {
				c.mu.Lock()
				c.hooks.ackFailed++
				c.mu.Unlock()
			},
		},
	}
}

func (c *consumerCase) callsOf(id string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls[id]
}

// publish publishes msgs to the source.
func (c *consumerCase) publish(msgs []*exactly.Message) []*exactly.Message {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(c.t.Context(), c.h.Timeout)
	defer cancel()
	if err := c.src.Publisher.Publish(ctx, msgs); err != nil {
		c.t.Fatalf("publishing %d messages to %q: %v", len(msgs), c.src.Topic, err)
	}
	return msgs
}

// messages publishes perKey messages for each of n keys, interleaved.
func (c *consumerCase) messages(n, perKey int) []*exactly.Message {
	c.t.Helper()
	return c.publish(keyed(c.src.Topic, keyNames("key", n), 0, perKey))
}

// effectCounts returns how many times each id's effect was applied.
func (c *consumerCase) effectCounts() map[string]int {
	c.t.Helper()
	rows, err := c.h.DB.QueryContext(context.Background(), "SELECT id, count(*) FROM "+c.effects+" GROUP BY id")
	if err != nil {
		c.t.Fatalf("counting effects: %v", err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var id string
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			c.t.Fatal(err)
		}
		out[id] = n
	}
	if err := rows.Err(); err != nil {
		c.t.Fatal(err)
	}
	return out
}

// appliedInOrder returns the ids of the effects in the order they were
// written.
func (c *consumerCase) appliedInOrder() []string {
	c.t.Helper()
	rows, err := c.h.DB.QueryContext(context.Background(), "SELECT id FROM "+c.effects+" ORDER BY seq")
	if err != nil {
		c.t.Fatalf("reading effects: %v", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			c.t.Fatal(err)
		}
		out = append(out, id)
	}
	return out
}

// waitApplied waits until every message of msgs has been applied,
// restarting any of the runners whose consumer returned from Run by
// itself, as an orchestrator would.
func (c *consumerCase) waitApplied(msgs []*exactly.Message, runners ...*runner) {
	c.t.Helper()
	c.waitUntil("every message applied", func() (bool, string) { return c.missing(msgs) }, runners...)
}

// missing reports whether every message of msgs was applied, and if not
// which were not.
func (c *consumerCase) missing(msgs []*exactly.Message) (bool, string) {
	counts := c.effectCounts()
	var missing []string
	for _, m := range msgs {
		if counts[m.ID] == 0 {
			missing = append(missing, m.ID)
		}
	}
	if len(missing) == 0 {
		return true, ""
	}
	return false, fmt.Sprintf("%d of %d messages never applied (lost, if the broker no longer holds them), first %s",
		len(missing), len(msgs), missing[0])
}

// waitFor polls cond until it holds, failing the case after Timeout.
func (c *consumerCase) waitFor(what string, cond func() bool, runners ...*runner) {
	c.t.Helper()
	c.waitUntil(what, func() (bool, string) { return cond(), "" }, runners...)
}

// waitUntil polls cond until it holds, restarting any of the runners whose
// consumer returned from Run by itself (as an orchestrator would), and
// fails the case after Timeout with what cond last said was missing.
func (c *consumerCase) waitUntil(what string, cond func() (bool, string), runners ...*runner) {
	c.t.Helper()
	deadline := time.Now().Add(c.h.Timeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			if state != "" {
				state = ": " + state
			}
			c.t.Fatalf("timed out after %v waiting for %s%s", c.h.Timeout, what, state)
		}
		for _, r := range runners {
			r.restartIfExited()
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// await waits for ch to close.
func (c *consumerCase) await(ch <-chan struct{}, what string) {
	c.t.Helper()
	select {
	case <-ch:
	case <-time.After(c.h.Timeout):
		c.t.Fatalf("timed out after %v waiting for %s", c.h.Timeout, what)
	}
}

// checkOnce fails unless every message of msgs was applied exactly once,
// and nothing else was applied, after a moment for late duplicates.
func (c *consumerCase) checkOnce(msgs []*exactly.Message) {
	c.t.Helper()
	time.Sleep(300 * time.Millisecond)
	counts := c.effectCounts()
	want := make(map[string]bool, len(msgs))
	for i, m := range msgs {
		want[m.ID] = true
		switch n := counts[m.ID]; {
		case n == 0:
			c.t.Errorf("message %d (id %s, key %s) was never applied: lost", i, m.ID, m.Key)
		case n > 1:
			c.t.Errorf("message %d (id %s, key %s) was applied %d times", i, m.ID, m.Key, n)
		}
	}
	for id, n := range counts {
		if !want[id] {
			c.t.Errorf("an effect for id %s (%d times) that the case never published", id, n)
		}
	}
	if c.t.Failed() {
		c.t.FailNow()
	}
}

// checkRedelivered fails unless the handler ran more than once for id and
// the inbox absorbed a duplicate: the case's fault must have caused a
// redelivery, or it proved nothing.
func (c *consumerCase) checkRedelivered(id, fault string) {
	c.t.Helper()
	if n := c.callsOf(id); n < 2 {
		c.t.Fatalf("message %s reached the handler %d time(s) after %s: the broker never got it back, "+
			"so it was acknowledged before its effect was safe or the fault did not happen", id, n, fault)
	}
	if d := c.in.Stats().Duplicates; d < 1 {
		c.t.Fatalf("the inbox absorbed %d duplicates after %s, want the redelivery of %s", d, fault, id)
	}
}

// checkPerKeyOrder fails unless the effects of each key were written in
// the order of msgs.
func (c *consumerCase) checkPerKeyOrder(msgs []*exactly.Message) {
	c.t.Helper()
	key := make(map[string]string, len(msgs))
	pos := make(map[string]int, len(msgs))
	next := map[string]int{}
	for _, m := range msgs {
		key[m.ID] = m.Key
		pos[m.ID] = next[m.Key]
		next[m.Key]++
	}
	due := map[string]int{}
	for _, id := range c.appliedInOrder() {
		k, ok := key[id]
		if !ok {
			continue
		}
		if pos[id] != due[k] {
			c.t.Fatalf("key %s: message #%d (id %s) was applied where #%d was due: per-key order broken", k, pos[id], id, due[k])
		}
		due[k]++
	}
}

// runner runs the consumer processes of one role in a case, one at a
// time: a crash ends one, restart starts the next.
type runner struct {
	c   *consumerCase
	cfg exactly.ConsumerConfig

	mu   sync.Mutex
	cur  *instance
	past []*instance
}

type instance struct {
	tc      TestConsumer
	cancel  context.CancelFunc
	done    chan struct{}
	err     error
	crashed atomic.Bool
	ended   atomic.Bool // its context was ended by the suite
}

// newRunner returns a runner; set cfg, then start it.
func (c *consumerCase) newRunner() *runner {
	r := &runner{c: c}
	c.t.Cleanup(func() { r.shutdown(false) })
	return r
}

// start starts a consumer process. Call it on the test's goroutine.
func (r *runner) start() {
	r.c.t.Helper()
	tc := r.c.src.New(r.c.t, r.cfg)
	if tc.Run == nil || tc.Stats == nil || tc.Crash == nil {
		r.c.t.Fatal("exactlytest: ConsumerSource.New returned a TestConsumer without Run, Stats or Crash")
	}
	ctx, cancel := context.WithCancel(context.Background())
	in := &instance{tc: tc, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(in.done)
		in.err = tc.Run(ctx)
	}()
	r.mu.Lock()
	if r.cur != nil {
		r.past = append(r.past, r.cur)
	}
	r.cur = in
	r.mu.Unlock()
}

func (r *runner) current() *instance {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur
}

// crash kills the current process: its connection goes, then its context.
// It may be called from a handler.
func (r *runner) crash() {
	in := r.current()
	in.crashed.Store(true)
	in.ended.Store(true)
	in.tc.Crash()
	in.cancel()
}

// loseAcks makes the current process's acknowledgements vanish.
func (r *runner) loseAcks() {
	r.current().tc.LoseAcks()
}

// restart waits for the crashed process to exit and starts another.
func (r *runner) restart() {
	r.c.t.Helper()
	in := r.current()
	select {
	case <-in.done:
	case <-time.After(r.c.h.Timeout):
		r.c.t.Fatalf("Run did not return within %v of its context ending (after a crash)", r.c.h.Timeout)
	}
	r.start()
}

// restartIfExited starts another process when the current one returned
// from Run by itself.
func (r *runner) restartIfExited() {
	in := r.current()
	if in == nil || in.ended.Load() {
		return
	}
	select {
	case <-in.done:
		r.c.t.Logf("the consumer's Run returned by itself (%v); starting another", in.err)
		in.ended.Store(true)
		r.start()
	default:
	}
}

// stop ends the current process gracefully: Run must return nil within
// Timeout.
func (r *runner) stop() {
	r.c.t.Helper()
	r.shutdown(true)
}

func (r *runner) shutdown(check bool) {
	in := r.current()
	if in == nil {
		return
	}
	graceful := !in.ended.Swap(true)
	in.cancel()
	select {
	case <-in.done:
		if check && graceful && in.err != nil {
			r.c.t.Errorf("Run = %v after its context ended, want nil", in.err)
		}
	case <-time.After(r.c.h.Timeout):
		if check {
			r.c.t.Errorf("Run did not return within %v of its context ending", r.c.h.Timeout)
		}
	}
}

// stats adds up the totals of every process the runner ran.
func (r *runner) stats() exactly.ConsumerStats {
	r.mu.Lock()
	all := append(append([]*instance(nil), r.past...), r.cur)
	r.mu.Unlock()
	var sum exactly.ConsumerStats
	for _, in := range all {
		if in == nil {
			continue
		}
		s := in.tc.Stats()
		sum.Received += s.Received
		sum.Handled += s.Handled
		sum.Failed += s.Failed
		sum.DeadLettered += s.DeadLettered
		sum.AckFailures += s.AckFailures
		sum.Redeliveries += s.Redeliveries
	}
	return sum
}

// run starts a runner with the case's config around h.
func (c *consumerCase) run(h exactly.Handler) *runner {
	c.t.Helper()
	r := c.newRunner()
	r.cfg = c.config(h)
	r.start()
	return r
}

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

// crashCase makes the consumer handling msgs[5] fail as fault says, after
// its effect committed, then checks that the message came back to the
// next consumer and was absorbed.
func (s *consumerSuite) crashAfterEffect(c *consumerCase, fault string, fail func(r *runner), restart bool) {
	msgs := c.messages(2, 10)
	victim := msgs[5]
	failed := make(chan struct{})
	r := c.newRunner()
	r.cfg = c.config(c.handler(nil, onceFor(victim.ID, func(context.Context, *exactly.Message) error {
		fail(r)
		close(failed)
		return nil
	})))
	r.start()
	c.await(failed, "the victim's effect")
	if restart {
		r.restart()
	}
	c.waitUntil("every message applied and the victim redelivered", func() (bool, string) {
		if ok, state := c.missing(msgs); !ok {
			return false, state
		}
		return c.callsOf(victim.ID) >= 2, "the victim was not redelivered"
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
	probe := c.src.New(c.t, c.config(c.handler(nil, nil)))
	if probe.LoseAcks == nil {
		c.t.Skip("the harness's TestConsumer has no LoseAcks")
	}
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
	dieOnFifth := func(r **runner) step {
		return func(_ context.Context, m *exactly.Message) error {
			if handled.Add(1) == 5 {
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
		return c.callsOf(*victim.Load()) >= 2, "the dead consumer's last message was not redelivered"
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
		r.stop()
		c.mu.Lock()
		id := c.payloads[payload]
		c.mu.Unlock()
		c.checkOnce(append(good, &exactly.Message{ID: id}))
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
