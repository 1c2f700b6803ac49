package pgcdc_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/pgcdc"
)

// TestPostgresRestart restarts PostgreSQL twice (a clean stop, then a
// crash-like immediate stop) while an application writes: the relay
// reconnects, resumes from the confirmed position and loses nothing.
func TestPostgresRestart(t *testing.T) {
	t.Parallel()
	in := testenv.LogicalPostgres(t, nil)
	f := setupOn(t, in.DSN("test"))
	rec := &exactlytest.Recorder{}
	r, _ := start(t, f.config(rec))
	f.waitStreaming()

	var mu sync.Mutex
	var want []*exactly.Message
	stop := make(chan struct{})
	var writers sync.WaitGroup
	writers.Go(func() {
		ctx := context.Background()
		for n := 0; ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			m := &exactly.Message{Topic: "t", Key: fmt.Sprintf("k%d", n%5), Payload: fmt.Appendf(nil, "k%d:%d", n%5, n)}
			tx, err := f.pool.Begin(ctx)
			if err == nil {
				if err = f.ob.Enqueue(ctx, tx, m); err == nil {
					err = tx.Commit(ctx)
				} else {
					tx.Rollback(ctx)
				}
			}
			if err == nil { // an ambiguous commit is left out of want: it may or may not be there
				mu.Lock()
				want = append(want, m)
				mu.Unlock()
			}
			time.Sleep(2 * time.Millisecond)
		}
	})
	ctx := context.Background()
	for _, mode := range []string{"fast", "immediate"} {
		time.Sleep(500 * time.Millisecond)
		if err := in.Restart(ctx, mode); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	writers.Wait()
	mu.Lock()
	defer mu.Unlock()
	waitFor(t, "every committed message", 60*time.Second, func() bool {
		got := map[string]bool{}
		for _, m := range rec.Delivered() {
			got[m.ID] = true
		}
		for _, m := range want {
			if !got[m.ID] {
				return false
			}
		}
		return true
	})
	exactlytest.CheckExactlyOnceDedup(t, want, rec.Delivered())
	exactlytest.CheckLastDeliveryOrder(t, rec.Delivered())
	if st := r.Stats(); st.Reconnects < 2 {
		t.Errorf("Stats.Reconnects = %d after two restarts", st.Reconnects)
	}
	t.Logf("%d messages committed across two restarts, %d deliveries", len(want), len(rec.Delivered()))
}

// TestBrokerRefusesProduces: kfake refuses every produce for a while. The
// relay holds the messages, confirms no position past them, and publishes
// them all once the broker is back.
func TestBrokerRefusesProduces(t *testing.T) {
	t.Parallel()
	f := setup(t)
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(2, "outage"))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	pub, err := kafka.NewClientPublisher(cluster.ListenAddrs())
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	start(t, f.config(pub))
	f.waitStreaming()

	// The broker refuses every produce (it drops the connection) until
	// down is cleared.
	var down atomic.Bool
	var refused atomic.Int64
	down.Store(true)
	cluster.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		cluster.KeepControl()
		if down.Load() {
			refused.Add(1)
			return nil, errors.New("broker down"), true
		}
		return nil, nil, false
	})
	msgs := keyed("outage", 4, 25)
	f.enqueue(true, msgs...)
	during := currentLSN(t, f.pool)
	waitFor(t, "produces refused", 10*time.Second, func() bool { return refused.Load() > 0 })
	time.Sleep(1500 * time.Millisecond) // heartbeats and keepalives come and go meanwhile
	if c, _ := slotConfirmed(t, f.pool, f.slot); c >= during {
		t.Fatalf("the slot confirmed %s, past the unpublished messages (%s)", c, during)
	}
	down.Store(false)

	// Once the slot is confirmed past them, every copy is on the topic:
	// read it to its end.
	waitFor(t, "the slot confirmed past them", 30*time.Second, func() bool {
		c, _ := slotConfirmed(t, f.pool, f.slot)
		return c >= during
	})
	got := testenv.Messages(testenv.ReadTopic(t, cluster.ListenAddrs(), "outage", 30*time.Second))
	exactlytest.CheckExactlyOnceDedup(t, msgs, got)
	exactlytest.CheckLastDeliveryOrder(t, got)
	t.Logf("%d produce requests refused; %d messages, %d records", refused.Load(), len(msgs), len(got))
}

// TestIdleOutboxBusyDatabase: while the outbox is idle and another table
// takes heavy writes, heartbeats keep the slot's retained WAL bounded.
func TestIdleOutboxBusyDatabase(t *testing.T) {
	t.Parallel()
	f := setup(t)
	r, _ := start(t, f.config(&exactlytest.Recorder{}))
	f.waitStreaming()
	ctx := context.Background()
	busy := "busy_" + f.slot
	if _, err := f.pool.Exec(ctx, "CREATE TABLE "+busy+" (id bigserial PRIMARY KEY, pad text)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.pool.Exec(context.Background(), "DROP TABLE IF EXISTS "+busy) })

	// A slot nobody reads, for comparison: it retains everything.
	control := f.slot + "_idle"
	if _, err := f.pool.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", control); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.pool.Exec(context.Background(), "SELECT pg_drop_replication_slot($1)", control) })

	from := currentLSN(t, f.pool)
	var worst int64
	for range 40 {
		if _, err := f.pool.Exec(ctx, "INSERT INTO "+busy+" (pad) SELECT repeat('x', 1000) FROM generate_series(1, 1000)"); err != nil {
			t.Fatal(err)
		}
		_, lag := slotConfirmed(t, f.pool, f.slot)
		worst = max(worst, lag)
		time.Sleep(25 * time.Millisecond)
	}
	written := int64(currentLSN(t, f.pool) - from)
	_, idle := slotConfirmed(t, f.pool, control)
	waitFor(t, "the slot to catch up with the busy table", 15*time.Second, func() bool {
		_, lag := slotConfirmed(t, f.pool, f.slot)
		return lag < 1<<20
	})
	if written < 20<<20 || idle < written {
		t.Fatalf("%d bytes of WAL written, the unread slot retains %d: the test shows nothing", written, idle)
	}
	if worst > written/2 {
		t.Errorf("the relay's slot retained up to %d bytes while %d were written: not bounded", worst, written)
	}
	waitFor(t, "the lag reported", 5*time.Second, func() bool { return r.Stats().SlotLagBytes < 1<<20 })
	t.Logf("%d MB of WAL written to another table; the relay's idle slot retained at most %d KB (an unread slot: %d MB), and under 1 MB once the writes stopped",
		written>>20, worst>>10, idle>>20)
}

// TestStartWhilePostgresDown: a relay (re)started while PostgreSQL is down
// waits for it instead of exiting, and streams once it is back.
func TestStartWhilePostgresDown(t *testing.T) {
	t.Parallel()
	in := testenv.LogicalPostgres(t, nil)
	f := setupOn(t, in.DSN("test"))
	ctx := context.Background()
	if err := in.Stop(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	rec := &exactlytest.Recorder{}
	r, err := pgcdc.New(f.config(rec))
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(runCtx) }()
	select {
	case err := <-done:
		cancel()
		t.Fatalf("Run returned while PostgreSQL was down: %v", err)
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
	f.waitStreaming()
	var want []*exactly.Message
	for i := range 20 {
		want = append(want, &exactly.Message{Topic: "t", Key: fmt.Sprintf("k%d", i%3), Payload: fmt.Appendf(nil, "%d", i)})
	}
	f.enqueue(true, want...)
	waitFor(t, "the messages written after the server came back", 30*time.Second, func() bool {
		return len(rec.Delivered()) >= len(want)
	})
	exactlytest.CheckExactlyOnceDedup(t, want, rec.Delivered())
}

// TestSlotSetupDelayedIsNotLost: on a first start the slot does not exist
// until the relay creates it; while that is delayed (here another session
// holds the slot's set-up lock, as a standby relay would), the slot watcher
// must not take the missing slot for a lost one.
func TestSlotSetupDelayedIsNotLost(t *testing.T) {
	t.Parallel()
	f := setup(t)
	ctx := context.Background()
	lock, err := f.pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lock.Exec(ctx, "SELECT pg_advisory_lock(hashtext($1))", "exactly_cdc_slot:"+f.slot); err != nil {
		t.Fatal(err)
	}
	rec := &exactlytest.Recorder{}
	r, err := pgcdc.New(f.config(rec)) // LagInterval 200ms
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(runCtx) }()
	select {
	case err := <-done:
		cancel()
		lock.Release()
		t.Fatalf("Run returned while the slot's set-up waited: %v", err)
	case <-time.After(1500 * time.Millisecond):
	}
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	if _, err := lock.Exec(ctx, "SELECT pg_advisory_unlock(hashtext($1))", "exactly_cdc_slot:"+f.slot); err != nil {
		t.Fatal(err)
	}
	lock.Release()
	f.waitStreaming()
	msgs := []*exactly.Message{{Topic: "t", Key: "k", Payload: []byte("1")}, {Topic: "t", Key: "k", Payload: []byte("2")}}
	f.enqueue(true, msgs...)
	waitFor(t, "the messages", 30*time.Second, func() bool { return len(rec.Delivered()) >= len(msgs) })
	exactlytest.CheckExactlyOnceDedup(t, msgs, rec.Delivered())
}

// TestBatchAfterAnOutageTakesWhatCameMeanwhile: when the publisher fails a
// whole batch, the relay backs off, and the batch it publishes after the
// backoff holds the messages written during it too, not only the failed
// batch's.
func TestBatchAfterAnOutageTakesWhatCameMeanwhile(t *testing.T) {
	t.Parallel()
	f := setup(t)
	var mu sync.Mutex
	var calls [][]string // the payloads of each Publish call
	pub := exactly.PublisherFunc(func(_ context.Context, msgs []*exactly.Message) error {
		mu.Lock()
		defer mu.Unlock()
		var call []string
		for _, m := range msgs {
			call = append(call, string(m.Payload))
		}
		calls = append(calls, call)
		if len(calls) == 1 {
			return errors.New("broker down") // a whole-batch outage
		}
		return nil
	})
	cfg := f.config(pub)
	cfg.InitialBackoff, cfg.MaxBackoff = 3*time.Second, 3*time.Second // backs off 1.5–3s
	start(t, cfg)
	f.waitStreaming()

	first := keyed("outage", 2, 3)
	f.enqueue(true, first...)
	waitFor(t, "the outage", 10*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return len(calls) > 0 })
	second := []*exactly.Message{{Topic: "outage", Key: "late", Payload: []byte("late:0")}}
	f.enqueue(true, second...)
	waitFor(t, "the batch after the backoff", 15*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return len(calls) > 1 })

	mu.Lock()
	defer mu.Unlock()
	// The failed batch may hold only the first of them to be decoded.
	if got := calls[1]; len(got) != len(first)+1 || got[len(got)-1] != "late:0" {
		t.Fatalf("the batch after the backoff holds %v (the failed one %v); want the %d messages written first and late:0, written during the backoff",
			got, calls[0], len(first))
	}
}
