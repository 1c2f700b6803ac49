package pgcdc_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
)

// natsStream creates a memory stream for the test and returns a publisher,
// the subject prefix it captures and a reader of what it stored.
func natsStream(t *testing.T) (*nats.Publisher, string, func(n int, timeout time.Duration) []exactly.Message) {
	t.Helper()
	testenv.Need(t, testenv.NATS)
	nc, err := natsgo.Connect(testenv.NATSURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	id := strings.ReplaceAll(exactly.NewID(), "-", "")
	name, prefix := "PGCDC_"+id, "pgcdc."+id
	if _, err := js.CreateStream(t.Context(), jetstream.StreamConfig{Name: name, Subjects: []string{prefix + ".>"}, Storage: jetstream.MemoryStorage}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { js.DeleteStream(context.Background(), name) })
	pub, err := nats.NewPublisher(js)
	if err != nil {
		t.Fatal(err)
	}
	read := func(n int, timeout time.Duration) []exactly.Message {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), timeout)
		defer cancel()
		cons, err := js.OrderedConsumer(ctx, name, jetstream.OrderedConsumerConfig{})
		if err != nil {
			t.Fatal(err)
		}
		var got []exactly.Message
		for len(got) < n && ctx.Err() == nil {
			batch, err := cons.Fetch(n-len(got), jetstream.FetchMaxWait(500*time.Millisecond))
			if err != nil {
				continue
			}
			for m := range batch.Messages() {
				h := m.Headers()
				got = append(got, exactly.Message{ID: h.Get(exactly.HeaderID), Key: h.Get(exactly.HeaderKey), Topic: m.Subject(), Payload: m.Data()})
			}
		}
		return got
	}
	return pub, prefix, read
}

// TestCommitsArriveRollbacksNever: committed inserts reach JetStream, in
// order per key, rolled-back ones never do; published rows are deleted and
// the slot's confirmed position moves past them.
func TestCommitsArriveRollbacksNever(t *testing.T) {
	t.Parallel()
	f := setup(t)
	pub, prefix, read := natsStream(t)
	r, _ := start(t, f.config(pub))

	want := keyed(prefix+".orders", 10, 50)
	for i := range 10 {
		f.enqueue(true, want[i*50:(i+1)*50]...)
		f.enqueue(false, &exactly.Message{Topic: prefix + ".orders", Key: "k00", Payload: []byte("rolled back:" + string(rune('0'+i)))})
	}
	got := read(len(want), 30*time.Second)
	exactlytest.CheckExactlyOnce(t, want, got)
	exactlytest.CheckKeyOrder(t, got)
	for _, m := range got {
		if strings.HasPrefix(string(m.Payload), "rolled back") {
			t.Errorf("a rolled-back message was published: %s", m.Payload)
		}
	}
	target := currentLSN(t, f.pool)
	waitFor(t, "rows deleted and the slot confirmed past them", 10*time.Second, func() bool {
		c, _ := slotConfirmed(t, f.pool, f.slot)
		return f.rows(0) == 0 && c >= target
	})
	if st := r.Stats(); st.Published < int64(len(want)) || st.Dead != 0 {
		t.Errorf("stats: %+v", st)
	}
	if more := read(len(want)+1, time.Second); len(more) > len(want) {
		t.Errorf("%d messages on the stream, want %d", len(more), len(want))
	}
}

// TestBackfillOnFirstStart: rows pending before the slot existed (a move
// from the polling relay) are published by the first start.
func TestBackfillOnFirstStart(t *testing.T) {
	t.Parallel()
	f := setup(t)
	before := keyed("t", 5, 20)
	f.enqueue(true, before...)
	rec := &exactlytest.Recorder{}
	start(t, f.config(rec))
	waitFor(t, "the backlog", 20*time.Second, func() bool { return distinct(rec.Delivered()) >= len(before) })
	var after []*exactly.Message
	for k := range 5 {
		after = append(after, &exactly.Message{Topic: "t", Key: fmt.Sprintf("k%02d", k), Payload: fmt.Appendf(nil, "k%02d:100", k)})
	}
	f.enqueue(true, after...)
	waitFor(t, "new messages", 20*time.Second, func() bool { return distinct(rec.Delivered()) >= len(before)+len(after) })
	exactlytest.CheckExactlyOnce(t, append(before, after...), rec.Delivered())
	exactlytest.CheckKeyOrder(t, rec.Delivered())
}

// TestParkAndRedrive: an unpublishable message is parked at once and one
// that keeps failing after MaxAttempts, durably (dead rows visible to
// ListDead); their keys move on; a re-drive publishes them again.
func TestParkAndRedrive(t *testing.T) {
	t.Parallel()
	f := setup(t)
	rec := &exactlytest.Recorder{MaxPayload: 100}
	flaky := true
	rec.FailWhen(func(m *exactly.Message) error {
		if string(m.Payload) == "flaky" && flaky {
			return errors.New("broker says no")
		}
		return nil
	})
	cfg := f.config(rec)
	cfg.MaxAttempts = 3
	r, _ := start(t, cfg)
	big := &exactly.Message{Topic: "t", Key: "a", Payload: []byte(strings.Repeat("x", 200))}
	bad := &exactly.Message{Topic: "t", Key: "b", Payload: []byte("flaky")}
	nextA := &exactly.Message{Topic: "t", Key: "a", Payload: []byte("a-after")}
	nextB := &exactly.Message{Topic: "t", Key: "b", Payload: []byte("b-after")}
	f.enqueue(true, big, bad, nextA, nextB)
	waitFor(t, "both parked", 20*time.Second, func() bool { return f.rows(2) == 2 })
	waitFor(t, "the keys moving on", 10*time.Second, func() bool { return rec.Count(nextA.ID) >= 1 && rec.Count(nextB.ID) >= 1 })
	dead, err := f.ob.ListDead(context.Background(), f.pool, outbox.DeadFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 2 || dead[0].Message.ID != big.ID || dead[1].Message.ID != bad.ID || !strings.Contains(dead[1].LastError, "broker says no") || dead[1].Attempts != 3 {
		t.Fatalf("dead rows: %+v", dead)
	}
	if st := r.Stats(); st.Dead != 2 {
		t.Errorf("Stats.Dead = %d", st.Dead)
	}
	flaky = false
	if _, err := f.ob.RetryDead(context.Background(), f.pool, outbox.DeadFilter{IDs: []string{bad.ID}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the re-driven message", 10*time.Second, func() bool { return rec.Count(bad.ID) == 1 })
	waitFor(t, "its row deleted", 10*time.Second, func() bool { return f.rows(0) == 0 && f.rows(2) == 1 })
}

// TestSlotDroppedWhileDown: a recorded slot that disappears while the relay
// is down fails the next start with ErrSlotLost; DropSlot is the deliberate
// way on, after which a start creates a fresh slot and publishes what is
// pending.
func TestSlotDroppedWhileDown(t *testing.T) {
	t.Parallel()
	f := setup(t)
	rec := &exactlytest.Recorder{}
	cfg := f.config(rec)
	_, stop := start(t, cfg)
	f.waitStreaming()
	f.enqueue(true, &exactly.Message{Topic: "t", Payload: []byte("1")})
	waitFor(t, "the first message", 10*time.Second, func() bool { return len(rec.Delivered()) == 1 })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	// Dropped behind the relay's back (its WAL sender may linger a moment).
	waitFor(t, "the slot dropped", 10*time.Second, func() bool {
		_, err := f.pool.Exec(context.Background(), "SELECT pg_drop_replication_slot($1)", f.slot)
		return err == nil
	})
	f.enqueue(true, &exactly.Message{Topic: "t", Payload: []byte("2")})

	r, err := pgcdc.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = r.Run(ctx)
	if !errors.Is(err, pgcdc.ErrSlotLost) || !strings.Contains(err.Error(), "DropSlot") {
		t.Fatalf("Run after the slot was dropped = %v, want ErrSlotLost naming DropSlot", err)
	}
	if len(rec.Delivered()) != 1 {
		t.Fatalf("published %d messages from a lost slot", len(rec.Delivered()))
	}
	if err := pgcdc.DropSlot(context.Background(), f.dsn, f.slot); err != nil {
		t.Fatal(err)
	}
	start(t, cfg)
	waitFor(t, "the pending row, after DropSlot", 10*time.Second, func() bool { return len(rec.Delivered()) == 2 })
}

// TestSlotDroppedWhileRunning: the relay fails loudly when its slot is
// dropped under it.
func TestSlotDroppedWhileRunning(t *testing.T) {
	t.Parallel()
	f := setup(t)
	rec := &exactlytest.Recorder{}
	cfg := f.config(rec)
	r, err := pgcdc.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background()) }()
	f.waitStreaming()
	f.enqueue(true, &exactly.Message{Topic: "t", Payload: []byte("1")})
	waitFor(t, "the first message", 10*time.Second, func() bool { return len(rec.Delivered()) == 1 })
	// An operator drops it by force (terminating the walsender first).
	ctx := context.Background()
	waitFor(t, "the slot dropped", 10*time.Second, func() bool {
		f.pool.Exec(ctx, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL", f.slot)
		_, err := f.pool.Exec(ctx, "SELECT pg_drop_replication_slot($1)", f.slot)
		return err == nil
	})
	select {
	case err := <-done:
		if !errors.Is(err, pgcdc.ErrSlotLost) {
			t.Fatalf("Run = %v, want ErrSlotLost", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not fail after its slot was dropped")
	}
}

func TestConfigErrors(t *testing.T) {
	t.Parallel()
	pub := &exactlytest.Recorder{}
	for _, tc := range []struct {
		cfg  pgcdc.Config
		want string
	}{
		{pgcdc.Config{Publisher: pub}, "DSN is required"},
		{pgcdc.Config{DSN: "postgres://x/y"}, "Publisher is required"},
		{pgcdc.Config{DSN: "postgres://x/y", Publisher: pub, ExactlyOnce: &kafka.CDCExactlyOnce{Seeds: []string{"x:1"}}}, "not both"},
		{pgcdc.Config{DSN: "postgres://x/y", Publisher: pub, Slot: "Bad-Slot"}, "Config.Slot"},
		{pgcdc.Config{DSN: "postgres://x/y", Publisher: pub, Table: "a;drop"}, "Config.Table"},
		{pgcdc.Config{DSN: "postgres://x/y", Publisher: pub, Debezium: &pgcdc.Debezium{}}, "Debezium.Table"},
		{pgcdc.Config{DSN: "postgres://x/y", Publisher: pub, BatchSize: -1}, "BatchSize"},
		{pgcdc.Config{DSN: "postgres://x/y", Publisher: pub, MessagePrefix: pgcdc.HeartbeatPrefix}, "heartbeat"},
	} {
		_, err := pgcdc.New(tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error about %q", tc.cfg, err, tc.want)
		}
	}
}

// TestTableMissing: a clear error when the outbox was not migrated.
func TestTableMissing(t *testing.T) {
	t.Parallel()
	r, err := pgcdc.New(pgcdc.Config{DSN: dsn(t), Slot: "never_created", Table: "no_such_outbox", Publisher: &exactlytest.Recorder{}, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "apply the migrations") {
		t.Fatalf("Run = %v", err)
	}
}
