package relay_test

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// pgOutbox creates a migrated outbox table of the test's own on the shared
// PostgreSQL and drops it afterwards.
func pgOutbox(t *testing.T) (*pgxpool.Pool, *outbox.Outbox) {
	t.Helper()
	testenv.Need(t, testenv.Postgres)
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool, exactlytest.MigratedOutbox(t, pool, "postgres", "rt")
}

func enqueue(t *testing.T, pool *pgxpool.Pool, ob *outbox.Outbox, msgs ...*exactly.Message) {
	t.Helper()
	ctx := context.Background()
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
}

func run(t *testing.T, cfg relay.Config) *relay.Relay {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	r, _ := exactlytest.StartRelay(t, cfg)
	return r
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestNotifyWakesRelay: with polling effectively off, a commit still reaches
// the publisher at once, through LISTEN/NOTIFY.
func TestNotifyWakesRelay(t *testing.T) {
	t.Parallel()
	pool, ob := pgOutbox(t)
	rec := &exactlytest.Recorder{}
	run(t, relay.Config{Outbox: ob, DB: pool, Publisher: rec, PollInterval: time.Hour})
	time.Sleep(300 * time.Millisecond) // the first poll and LISTEN are done
	var worst time.Duration
	for i := range 20 {
		enqueue(t, pool, ob, &exactly.Message{Topic: "t", Payload: []byte{byte(i)}})
		start := time.Now()
		waitFor(t, "the NOTIFY wake-up", 5*time.Second, func() bool { return len(rec.Delivered()) == i+1 })
		worst = max(worst, time.Since(start))
	}
	t.Logf("commit to publish, worst of 20: %s", worst)
}

// kafkaSetup starts kfake with one topic and returns a publisher and a
// reader of the topic.
func kafkaSetup(t *testing.T, topic string, configs map[string]*string) (*kfake.Cluster, *kafka.Publisher) {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	admin, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := kadm.NewClient(admin).CreateTopic(t.Context(), 3, -1, configs, topic); err != nil {
		t.Fatal(err)
	}
	pub, err := kafka.NewClientPublisher(c.ListenAddrs(), kgo.RecordDeliveryTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pub.Close() })
	return c, pub
}

// readTopic reads every record of topic, to its end, and fails the test
// when there are fewer than atLeast.
func readTopic(t *testing.T, c *kfake.Cluster, topic string, atLeast int) []exactly.Message {
	t.Helper()
	got := testenv.Messages(testenv.ReadTopic(t, c.ListenAddrs(), topic, 20*time.Second))
	if len(got) < atLeast {
		t.Fatalf("%d records on %s, want at least %d", len(got), topic, atLeast)
	}
	return got
}

func keyed(topic string, keys, perKey int) []*exactly.Message {
	var out []*exactly.Message
	for n := range perKey {
		for k := range keys {
			out = append(out, &exactly.Message{Topic: topic, Key: fmt.Sprintf("k%02d", k), Payload: fmt.Appendf(nil, "k%02d:%d", k, n)})
		}
	}
	return out
}

// TestBrokerRefusesThenRecovers: Kafka refuses every produce for a while;
// the relay keeps retrying, parks nothing, and everything arrives in order
// once the broker accepts again.
func TestBrokerRefusesThenRecovers(t *testing.T) {
	t.Parallel()
	pool, ob := pgOutbox(t)
	c, pub := kafkaSetup(t, "orders", nil)
	var refusing atomic.Bool
	refusing.Store(true)
	c.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if !refusing.Load() {
			return nil, nil, false
		}
		resp := req.(*kmsg.ProduceRequest).ResponseKind().(*kmsg.ProduceResponse)
		for _, rt := range req.(*kmsg.ProduceRequest).Topics {
			st := kmsg.NewProduceResponseTopic()
			st.Topic = rt.Topic
			for _, rp := range rt.Partitions {
				sp := kmsg.NewProduceResponseTopicPartition()
				sp.Partition = rp.Partition
				sp.ErrorCode = kerr.NotEnoughReplicas.Code
				st.Partitions = append(st.Partitions, sp)
			}
			resp.Topics = append(resp.Topics, st)
		}
		return resp, nil, true
	})
	msgs := keyed("orders", 10, 30)
	enqueue(t, pool, ob, msgs...)
	r := run(t, relay.Config{Outbox: ob, DB: pool, Publisher: pub, MaxAttempts: 3,
		InitialBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	time.Sleep(3 * time.Second)
	if n := r.Stats().Published; n != 0 {
		t.Fatalf("%d published while the broker refused everything", n)
	}
	refusing.Store(false)
	waitFor(t, "the backlog to drain", 30*time.Second, func() bool {
		st, err := ob.Status(context.Background(), pool)
		return err == nil && st.Pending == 0
	})
	got := readTopic(t, c, "orders", len(msgs))
	exactlytest.CheckExactlyOnceDedup(t, msgs, got)
	exactlytest.CheckLastDeliveryOrder(t, got)
	if st, _ := ob.Status(context.Background(), pool); st.Dead != 0 {
		t.Errorf("%d messages parked because the broker was down", st.Dead)
	}
}

// TestOversizedMessageParked: Kafka refuses a message larger than the
// topic's max.message.bytes; it is parked dead with the reason, at once,
// and the other keys keep flowing.
func TestOversizedMessageParked(t *testing.T) {
	t.Parallel()
	pool, ob := pgOutbox(t)
	limit := "2000"
	c, pub := kafkaSetup(t, "orders", map[string]*string{"max.message.bytes": &limit})
	msgs := keyed("orders", 5, 20)
	huge := msgs[7]
	huge.Payload = make([]byte, 10000)
	rand.Read(huge.Payload) // incompressible: the limit applies to compressed batches
	enqueue(t, pool, ob, msgs...)
	r := run(t, relay.Config{Outbox: ob, DB: pool, Publisher: pub})
	waitFor(t, "the backlog to drain", 30*time.Second, func() bool {
		st, err := ob.Status(context.Background(), pool)
		return err == nil && st.Pending == 0
	})
	dead, err := ob.ListDead(context.Background(), pool, outbox.DeadFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 1 || dead[0].Message.ID != huge.ID {
		t.Fatalf("dead = %+v, want only the oversized message", dead)
	}
	if dead[0].Attempts != 1 || !strings.Contains(strings.ToLower(dead[0].LastError), "large") {
		t.Errorf("parked after %d attempts with %q; want at once, saying it is too large", dead[0].Attempts, dead[0].LastError)
	}
	if r.Stats().Published != int64(len(msgs)-1) {
		t.Errorf("published %d, want %d", r.Stats().Published, len(msgs)-1)
	}
	var rest []*exactly.Message
	for _, m := range msgs {
		if m != huge {
			rest = append(rest, m)
		}
	}
	got := readTopic(t, c, "orders", len(rest))
	exactlytest.CheckExactlyOnce(t, rest, got)
	exactlytest.CheckKeyOrder(t, got)
}

// TestHooks: the metric hooks see what the relay does.
func TestHooks(t *testing.T) {
	t.Parallel()
	pool, ob := pgOutbox(t)
	msgs := keyed("t", 3, 10)
	enqueue(t, pool, ob, msgs...)
	var published atomic.Int64
	var backlogCalls atomic.Int64
	var sawLatency atomic.Bool
	rec := &exactlytest.Recorder{}
	rec.SetDelay(time.Millisecond)
	r := run(t, relay.Config{Outbox: ob, DB: pool, Publisher: rec, Hooks: relay.Hooks{
		Published: func(m []*exactly.Message, took time.Duration) {
			published.Add(int64(len(m)))
			if took >= time.Millisecond {
				sawLatency.Store(true)
			}
		},
		Backlog:         func(pending int64, oldest time.Duration) { backlogCalls.Add(1) },
		BacklogInterval: 20 * time.Millisecond,
	}})
	waitFor(t, "all published", 10*time.Second, func() bool { return published.Load() == int64(len(msgs)) })
	waitFor(t, "backlog reports", 10*time.Second, func() bool { return backlogCalls.Load() >= 2 })
	if !sawLatency.Load() {
		t.Error("the Published hook did not report the publish latency")
	}
	if st := r.Stats(); st.Published != int64(len(msgs)) || st.Partitions != 16 {
		t.Errorf("stats = %+v", st)
	}
}

// TestStartWhileDatabaseDown: a relay (re)started while its database is
// down waits for it instead of failing with a misleading "apply the
// migrations" error, and publishes once the database is back.
func TestStartWhileDatabaseDown(t *testing.T) {
	t.Parallel()
	in := testenv.LogicalPostgres(t, nil) // a private server this test may stop
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, in.DSN("test"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	ob := exactlytest.MigratedOutbox(t, pool, "postgres", "rt_down")
	if err := in.Stop(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	rec := &exactlytest.Recorder{}
	r, err := relay.New(relay.Config{Outbox: ob, DB: pool, Publisher: rec, PollInterval: 50 * time.Millisecond,
		InitialBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError}))})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(runCtx) }()
	select {
	case err := <-done:
		cancel()
		t.Fatalf("Run returned while the database was down: %v", err)
	case <-time.After(1500 * time.Millisecond):
	}
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	if err := in.Start(ctx); err != nil {
		t.Fatal(err)
	}
	msgs := keyed("down", 3, 5)
	enqueue(t, pool, ob, msgs...)
	waitFor(t, "the messages written after the database came back", 30*time.Second, func() bool {
		return len(rec.Delivered()) >= len(msgs)
	})
	exactlytest.CheckExactlyOnceDedup(t, msgs, rec.Delivered())
}

// slowFirst is a publisher whose first call hangs for a while (a GC pause, a
// slow broker) before handing the batch to the recorder.
type slowFirst struct {
	*exactlytest.Recorder
	calls atomic.Int32
	stall time.Duration
}

func (p *slowFirst) Publish(ctx context.Context, msgs []*exactly.Message) error {
	if p.calls.Add(1) == 1 {
		time.Sleep(p.stall)
	}
	return p.Recorder.Publish(ctx, msgs)
}

// TestLeaseExpiryKeepsKeyOrder: the first publish stalls past the lease, so
// the batch read behind it is handed back; the lease is renewed before the
// publish stage takes the batch read after that one. That batch holds later
// messages of the same keys and must be handed back too: published, it
// would overtake the first.
func TestLeaseExpiryKeepsKeyOrder(t *testing.T) {
	pool, ob := pgOutbox(t)
	const keys, perKey = 10, 200
	var msgs []*exactly.Message
	for i := range perKey {
		for k := range keys {
			msgs = append(msgs, &exactly.Message{Topic: "orders", Key: fmt.Sprintf("k%02d", k), Payload: fmt.Appendf(nil, "k%02d:%d", k, i)})
		}
	}
	enqueue(t, pool, ob, msgs...)

	pub := &slowFirst{Recorder: &exactlytest.Recorder{}, stall: 1500 * time.Millisecond}
	r, err := relay.New(relay.Config{
		Outbox: ob, DB: pool, Publisher: pub, BatchSize: 100, LeaseTTL: 600 * time.Millisecond,
		PollInterval: 10 * time.Millisecond, Partitions: 4,
		Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	var expiredSeen, waited atomic.Bool
	relay.SetBeforeLeaseCheck(r, func() {
		switch {
		case !expiredSeen.Load():
			expiredSeen.Store(relay.LeaseExpired(r)) // this batch is handed back
		case !waited.Load():
			waited.Store(true)
			// Let the lease be renewed before the next batch is checked.
			deadline := time.Now().Add(5 * time.Second)
			for relay.LeaseExpired(r) && time.Now().Before(deadline) {
				time.Sleep(time.Millisecond)
			}
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	waitFor(t, "every message published", 60*time.Second, func() bool {
		seen := map[string]bool{}
		for _, m := range pub.Delivered() {
			seen[m.ID] = true
		}
		return len(seen) == len(msgs)
	})
	if !expiredSeen.Load() || !waited.Load() {
		t.Fatalf("the lease never ran out between two batches (expired %v, renewed %v): the test did not exercise the hand-back", expiredSeen.Load(), waited.Load())
	}
	got := pub.Delivered()
	exactlytest.CheckExactlyOnce(t, msgs, got)
	exactlytest.CheckKeyOrder(t, got)
}

// TestTakeOverKeepsKeyOrder: a relay working through a backlog takes over
// partitions whose previous owner died (its leases run out meanwhile). The
// rows of those partitions lie below the relay's read position; reads must
// start over from them, or later messages of their keys would go first.
func TestTakeOverKeepsKeyOrder(t *testing.T) {
	t.Parallel()
	pool, ob := pgOutbox(t)
	ctx := context.Background()
	const keys, perKey = 20, 150
	var msgs []*exactly.Message
	for i := range perKey {
		for k := range keys {
			msgs = append(msgs, &exactly.Message{Topic: "orders", Key: fmt.Sprintf("k%02d", k), Payload: fmt.Appendf(nil, "k%02d:%d", k, i)})
		}
	}
	enqueue(t, pool, ob, msgs...)
	// A relay that died holds partitions 2 and 3 for another 1.5 s.
	leases := ob.Table() + "_leases"
	for p := range 4 {
		owner, expires := "NULL", "0"
		if p >= 2 {
			owner, expires = "'dead-relay'", "(extract(epoch from clock_timestamp())*1000)::bigint + 1500"
		}
		if _, err := pool.Exec(ctx, fmt.Sprintf("INSERT INTO %s (part, owner, expires_at) VALUES (%d, %s, %s)", leases, p, owner, expires)); err != nil {
			t.Fatal(err)
		}
	}
	rec := &exactlytest.Recorder{}
	rec.SetDelay(50 * time.Millisecond) // the backlog of partitions 0 and 1 takes longer than 1.5 s
	r := run(t, relay.Config{Outbox: ob, DB: pool, Publisher: rec, BatchSize: 20, Partitions: 4,
		LeaseTTL: 600 * time.Millisecond, PollInterval: 10 * time.Millisecond})
	waitFor(t, "the partitions of the dead relay taken over", 10*time.Second, func() bool { return r.Stats().Partitions == 4 })
	if n := len(rec.Delivered()); n >= len(msgs)/2 {
		t.Fatalf("%d of %d published before the take-over: the backlog was gone, the test proved nothing", n, len(msgs))
	}
	waitFor(t, "every message published", 60*time.Second, func() bool {
		st, err := ob.Status(ctx, pool)
		return err == nil && st.Pending == 0
	})
	got := rec.Delivered()
	exactlytest.CheckExactlyOnce(t, msgs, got)
	exactlytest.CheckKeyOrder(t, got)
}

// TestPartitionCountChangedUnderRelay: a relay runs with 4 partitions; one
// started with 8 grows the lease table (and refuses to go on until
// restarted). The running relay, whose key-to-partition map is now wrong,
// must notice, hand its partitions back and stop with an error, rather than
// keep publishing keys a relay with the new count also publishes.
func TestPartitionCountChangedUnderRelay(t *testing.T) {
	t.Parallel()
	pool, ob := pgOutbox(t)
	ctx := context.Background()
	rec := &exactlytest.Recorder{}
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg := relay.Config{Outbox: ob, DB: pool, Publisher: rec, BatchSize: 20, Partitions: 4,
		LeaseTTL: 600 * time.Millisecond, PollInterval: 10 * time.Millisecond, Logger: logger, InstanceID: "old"}
	old, err := relay.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	oldDone := make(chan error, 1)
	oldCtx, oldCancel := context.WithCancel(ctx)
	defer oldCancel()
	go func() { oldDone <- old.Run(oldCtx) }()
	msgs := keyed("orders", 20, 10)
	first, second := msgs[:100], msgs[100:] // numbers 0-4 and 5-9 of each key
	enqueue(t, pool, ob, first...)
	waitFor(t, "the first messages published", 10*time.Second, func() bool { return len(rec.Delivered()) >= len(first) })

	grow := cfg
	grow.Partitions, grow.InstanceID = 8, "new"
	g, err := relay.New(grow)
	if err != nil {
		t.Fatal(err)
	}
	err = g.Run(ctx)
	if !errors.Is(err, relay.ErrPartitionMismatch) || !strings.Contains(err.Error(), "grown to 8") {
		t.Fatalf("the relay that grew the table: Run = %v, want a partition mismatch saying it grew the table", err)
	}
	// The added partitions are held for a lease period, so that a relay
	// with the new count cannot take them while the old one still runs.
	var held int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM "+ob.Table()+"_leases WHERE part >= 4 AND owner = 'exactly:grown'"+
		" AND expires_at > (extract(epoch from clock_timestamp())*1000)::bigint").Scan(&held); err != nil {
		t.Fatal(err)
	}
	if held != 4 {
		t.Errorf("%d of the 4 added partitions held for a lease period after the growth, want 4", held)
	}
	// Restarted at once with the new count, the relay carries on beside the
	// old one until that one stops; no key is published by both.
	enqueue(t, pool, ob, second...)
	grow.InstanceID = "new-restarted"
	run(t, grow)
	select {
	case err := <-oldDone:
		if !errors.Is(err, relay.ErrPartitionMismatch) || !strings.Contains(err.Error(), "now has 8 partitions, this relay runs with 4") {
			t.Fatalf("the running relay: Run = %v, want a partition mismatch naming both counts", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the relay running with the old count kept going after the table grew")
	}
	var owners int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM "+ob.Table()+"_leases WHERE owner = 'old'").Scan(&owners); err != nil {
		t.Fatal(err)
	}
	if owners != 0 {
		t.Errorf("%d partitions still held by the old relay after it stopped", owners)
	}
	waitFor(t, "every message published", 20*time.Second, func() bool {
		st, err := ob.Status(ctx, pool)
		return err == nil && st.Pending == 0
	})
	got := rec.Delivered()
	exactlytest.CheckExactlyOnce(t, msgs, got)
	exactlytest.CheckKeyOrder(t, got)
}
