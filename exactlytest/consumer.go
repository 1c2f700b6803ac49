package exactlytest

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
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
	if lose := r.current().tc.LoseAcks; lose != nil {
		lose()
	}
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
