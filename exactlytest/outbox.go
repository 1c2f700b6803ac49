package exactlytest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/sqldb"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// OutboxHarness describes one database (dialect and driver) to the outbox
// conformance suite.
type OutboxHarness struct {
	// Dialect is the outbox dialect: "postgres", "mysql" or "sqlite".
	Dialect string
	// Open returns the database handle (*sql.DB or *pgxpool.Pool) the tests
	// use. It may return the same handle every time; every test works in a
	// table of its own.
	Open func(t *testing.T) any
	// Begin starts a transaction on db and returns it (as Enqueue takes it)
	// with its commit and rollback.
	Begin func(t *testing.T, db any) (tx any, commit, rollback func() error)
	// ConcurrentWriters is true when two transactions can insert at once, so
	// a lower sequence number can commit after a higher one (not SQLite).
	ConcurrentWriters bool
}

// RunOutboxSuite checks that an outbox dialect and the relay keep their
// guarantees on it: atomic enqueue, nothing lost, per-key order, late
// commits, retries, parking, retention, several relays, shutdown.
func RunOutboxSuite(t *testing.T, h OutboxHarness) {
	s := &outboxSuite{h: h}
	for _, tc := range []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"CommitPublishesRollbackDoesNot", s.testCommitRollback},
		{"MigrateIsIdempotent", s.testMigrateIdempotent},
		{"BadInput", s.testBadInput},
		{"BadInputRefusedBeforeWrite", s.testRefusedBeforeWrite},
		{"TwoRelaysPerKeyOrder", s.testTwoRelays},
		{"RelaysStartTogether", s.testRelaysStartTogether},
		{"PartitionCountGrown", s.testPartitionGrowth},
		{"StalledRelayLosesItsLeases", s.testLeaseTakeover},
		{"LateCommitNotSkipped", s.testLateCommit},
		{"RetryKeepsKeyOrder", s.testRetryKeepsOrder},
		{"ParkAndRedrive", s.testPark},
		{"PublisherOutage", s.testOutage},
		{"FailingKeyIsVisible", s.testFailingVisible},
		{"Retention", s.testRetention},
		{"ShutdownAndRestart", s.testShutdownRestart},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t)
		})
	}
}

type outboxSuite struct {
	h OutboxHarness
}

var tableSeq atomic.Int64

// fixture is one test's outbox table.
type fixture struct {
	t  *testing.T
	h  OutboxHarness
	db any
	ob *outbox.Outbox
}

func (s *outboxSuite) setup(t *testing.T) *fixture {
	t.Helper()
	db := s.h.Open(t)
	return &fixture{t: t, h: s.h, db: db, ob: MigratedOutbox(t, db, s.h.Dialect, "xt")}
}

// MigratedOutbox creates an outbox table of the test's own (prefix plus a
// unique suffix) in db, a *sql.DB or *pgxpool.Pool, applies its migrations,
// and drops it when the test ends, with its lease and relay tables, its
// trigger function and its migration record.
func MigratedOutbox(t testing.TB, db any, dialect, prefix string) *outbox.Outbox {
	t.Helper()
	name := fmt.Sprintf("%s_%d_%d", prefix, time.Now().UnixNano()%1e9, tableSeq.Add(1))
	ob, err := outbox.New(outbox.Config{Dialect: dialect, Table: name})
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Migrate(context.Background(), db); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	t.Cleanup(func() { dropOutbox(t, db, ob) })
	return ob
}

func dropOutbox(t testing.TB, db any, ob *outbox.Outbox) {
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		t.Error(err)
		return
	}
	defer done()
	st := outboxstore.For(ob)
	ctx := context.Background()
	for _, suffix := range []string{"", "_leases", "_relays"} {
		if _, err := sdb.ExecContext(ctx, "DROP TABLE IF EXISTS "+st.Table.Derived(suffix).Quoted(st.D)); err != nil {
			t.Errorf("drop: %v", err)
		}
	}
	if st.D == sqldb.Postgres {
		sdb.ExecContext(ctx, "DROP FUNCTION IF EXISTS "+st.Table.Derived("_notify").Quoted(st.D)+"()")
	}
	a := sqldb.NewArgs(st.D)
	sdb.ExecContext(ctx, "DELETE FROM exactly_migrations WHERE scope = "+a.Add("outbox:"+st.Table.String()), a.Vals...)
}

// enqueue writes msgs in one transaction and commits it.
func (f *fixture) enqueue(msgs ...*exactly.Message) {
	f.t.Helper()
	tx, commit, rollback := f.h.Begin(f.t, f.db)
	if err := f.ob.Enqueue(context.Background(), tx, msgs...); err != nil {
		rollback()
		f.t.Fatalf("enqueue: %v", err)
	}
	if err := commit(); err != nil {
		f.t.Fatalf("commit: %v", err)
	}
}

// keyedMessages returns perKey messages for each of keys, interleaved the
// way concurrent traffic would write them. Payload is "key:n".
func keyedMessages(topic string, keys, perKey int) []*exactly.Message {
	var out []*exactly.Message
	for n := range perKey {
		for k := range keys {
			out = append(out, &exactly.Message{Topic: topic, Key: fmt.Sprintf("k%03d", k),
				Payload: fmt.Appendf(nil, "k%03d:%d", k, n)})
		}
	}
	return out
}

// relayConfig is a relay tuned for fast tests.
func (f *fixture) relayConfig(p exactly.Publisher) relay.Config {
	return relay.Config{
		Outbox: f.ob, DB: f.db, Publisher: p,
		Logger:       slog.New(slog.NewTextHandler(f.t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
		PollInterval: 20 * time.Millisecond, InitialBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond,
		LeaseTTL: 900 * time.Millisecond, Partitions: 8, ShutdownTimeout: 5 * time.Second,
	}
}

// start runs a relay until the test ends or stop is called.
func (f *fixture) start(cfg relay.Config) (r *relay.Relay, stop func()) {
	f.t.Helper()
	return StartRelay(f.t, cfg)
}

func (s *outboxSuite) testCommitRollback(t *testing.T) {
	f := s.setup(t)
	committed := keyedMessages("orders", 3, 4)
	f.enqueue(committed...)
	for _, m := range committed {
		if m.ID == "" || m.CreatedAt.IsZero() {
			t.Fatalf("Enqueue did not assign ID and CreatedAt: %+v", m)
		}
	}
	tx, _, rollback := f.h.Begin(t, f.db)
	rolledBack := keyedMessages("orders", 3, 4)
	if err := f.ob.Enqueue(context.Background(), tx, rolledBack...); err != nil {
		t.Fatal(err)
	}
	if err := rollback(); err != nil {
		t.Fatal(err)
	}
	preset := &exactly.Message{ID: "caller-chosen-id", Topic: "orders", Payload: []byte("x"),
		Headers: map[string]string{"traceparent": "00-abc-def-01"}}
	f.enqueue(preset)

	rec := &Recorder{}
	f.start(f.relayConfig(rec))
	want := append(slices.Clone(committed), preset)
	waitDistinct(t, rec, len(want), 10*time.Second)
	time.Sleep(100 * time.Millisecond) // anything extra would show up now

	got := rec.Delivered()
	if len(got) != len(want) {
		t.Fatalf("published %d messages, want %d (the rolled-back ones must never appear)", len(got), len(want))
	}
	byID := map[string]exactly.Message{}
	for _, m := range got {
		byID[m.ID] = m
	}
	for _, w := range want {
		g, ok := byID[w.ID]
		if !ok {
			t.Fatalf("committed message %s was not published", w.ID)
		}
		if g.Topic != w.Topic || g.Key != w.Key || string(g.Payload) != string(w.Payload) {
			t.Errorf("message %s changed on the way: got %+v, want %+v", w.ID, g, w)
		}
		if !g.CreatedAt.Equal(w.CreatedAt.Truncate(time.Microsecond)) {
			t.Errorf("message %s CreatedAt = %v, want %v", w.ID, g.CreatedAt, w.CreatedAt)
		}
	}
	if byID[preset.ID].Headers["traceparent"] != "00-abc-def-01" {
		t.Errorf("headers lost: %v", byID[preset.ID].Headers)
	}
	for _, m := range rolledBack {
		if _, ok := byID[m.ID]; ok {
			t.Fatalf("rolled-back message %s was published", m.ID)
		}
	}
	waitBacklog(t, f, 0)
}

// waitDistinct waits until rec has delivered n distinct message ids.
func waitDistinct(t *testing.T, rec *Recorder, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		seen := map[string]bool{}
		for _, m := range rec.Delivered() {
			seen[m.ID] = true
		}
		if len(seen) >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s, %d distinct messages delivered, want %d", timeout, len(seen), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func waitBacklog(t *testing.T, f *fixture, want int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := f.ob.Status(context.Background(), f.db)
		if err != nil {
			t.Fatal(err)
		}
		if st.Pending == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("outbox still has %d pending rows, want %d", st.Pending, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (s *outboxSuite) testMigrateIdempotent(t *testing.T) {
	f := s.setup(t)
	for range 2 {
		if err := f.ob.Migrate(context.Background(), f.db); err != nil {
			t.Fatalf("second migrate: %v", err)
		}
	}
	if applied, err := f.ob.ApplyMigrations(context.Background(), f.db); err != nil || len(applied) != 0 {
		t.Fatalf("ApplyMigrations on a migrated table applied %v (want none), err %v", applied, err)
	}
	script, err := f.ob.MigrationSQL(context.Background(), f.db)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(script) != "" {
		t.Fatalf("a migrated table still has pending migrations:\n%s", script)
	}
	all, err := f.ob.MigrationSQL(context.Background(), nil)
	if err != nil || !strings.Contains(all, outboxstore.For(f.ob).Table.Name) {
		t.Fatalf("dry run without a database: %v\n%s", err, all)
	}
}

func (s *outboxSuite) testBadInput(t *testing.T) {
	f := s.setup(t)
	ctx := context.Background()
	if err := f.ob.Enqueue(ctx, nil, &exactly.Message{Topic: "t"}); err == nil || !strings.Contains(err.Error(), "nil transaction") {
		t.Errorf("nil tx: got %v", err)
	}
	tx, _, rollback := f.h.Begin(t, f.db)
	defer rollback()
	if err := f.ob.Enqueue(ctx, tx, &exactly.Message{Topic: ""}); err == nil || !strings.Contains(err.Error(), "empty Topic") {
		t.Errorf("empty topic: got %v", err)
	}
	if err := f.ob.Enqueue(ctx, tx, &exactly.Message{Topic: "t", Key: strings.Repeat("k", 300)}); err == nil || !strings.Contains(err.Error(), "Key") {
		t.Errorf("oversized key: got %v", err)
	}
	if err := f.ob.Enqueue(ctx, "not a tx", &exactly.Message{Topic: "t"}); err == nil || !strings.Contains(err.Error(), "unsupported transaction type") {
		t.Errorf("wrong tx type: got %v", err)
	}
	for _, bad := range []string{"orders; DROP TABLE x", `o"x`, "a.b.c", "1abc", "sp ace"} {
		if _, err := outbox.New(outbox.Config{Dialect: s.h.Dialect, Table: bad}); err == nil || !strings.Contains(err.Error(), "table name") {
			t.Errorf("table %q: got %v, want an unsafe table name error", bad, err)
		}
	}
	if _, err := outbox.New(outbox.Config{Dialect: "oracle"}); err == nil || !strings.Contains(err.Error(), `unknown dialect "oracle"`) {
		t.Errorf("unknown dialect: got %v", err)
	}
	// A relay on a table that was never migrated says so.
	missing, _ := outbox.New(outbox.Config{Dialect: s.h.Dialect, Table: "xt_never_migrated"})
	r, err := relay.New(relay.Config{Outbox: missing, DB: f.db, Publisher: &Recorder{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Run(ctx); err == nil || !strings.Contains(err.Error(), "apply the migrations") {
		t.Errorf("relay on unmigrated table: got %v", err)
	}
	if _, err := relay.New(relay.Config{Outbox: f.ob, DB: f.db}); err == nil || !strings.Contains(err.Error(), "Publisher") {
		t.Errorf("relay without publisher: got %v", err)
	}
}

// testRefusedBeforeWrite: text the database cannot store (invalid UTF-8, NUL),
// headers that would be changed on the way or are reserved, and an ID given
// twice in one call are refused by Enqueue before anything is written, with
// an error naming the field or header; the caller's transaction is still
// usable, and what was accepted travels unchanged.
func (s *outboxSuite) testRefusedBeforeWrite(t *testing.T) {
	f := s.setup(t)
	ctx := context.Background()
	good := func(n int) *exactly.Message {
		return &exactly.Message{Topic: "t", Key: "k", Payload: fmt.Appendf(nil, "good %d", n),
			Headers: map[string]string{"x-note": "ünï ✓", "Trace-Id": "abc"}}
	}
	cases := []struct {
		name string
		msgs []*exactly.Message
		want string // in the error
	}{
		{"topic invalid UTF-8", []*exactly.Message{{Topic: "t\xff"}}, "Topic"},
		{"topic NUL", []*exactly.Message{{Topic: "t\x00x"}}, "Topic"},
		{"key invalid UTF-8", []*exactly.Message{{Topic: "t", Key: "k\xc3"}}, "Key"},
		{"key NUL", []*exactly.Message{{Topic: "t", Key: "k\x00"}}, "Key"},
		{"id invalid UTF-8", []*exactly.Message{{Topic: "t", ID: "id-\xfe"}}, "ID"},
		{"id NUL", []*exactly.Message{{Topic: "t", ID: "id\x00"}}, "ID"},
		{"header value invalid UTF-8", []*exactly.Message{{Topic: "t", Headers: map[string]string{"a": "ok", "note": "caf\xe9"}}}, `"note"`},
		{"reserved header", []*exactly.Message{{Topic: "t", Headers: map[string]string{"exactly-foo": "1"}}}, `"exactly-foo"`},
		{"reserved header other case", []*exactly.Message{{Topic: "t", Headers: map[string]string{"Exactly-ID": "1"}}}, `"Exactly-ID"`},
		{"header name with a space", []*exactly.Message{{Topic: "t", Headers: map[string]string{"my header": "1"}}}, `"my header"`},
		{"header name with a control character", []*exactly.Message{{Topic: "t", Headers: map[string]string{"a\nb": "1"}}}, `"a\nb"`},
		{"empty header name", []*exactly.Message{{Topic: "t", Headers: map[string]string{"": "1"}}}, "empty name"},
		{"same ID twice", []*exactly.Message{{Topic: "t", ID: "order-1"}, {Topic: "t", ID: "order-1"}}, `messages 0 and 1 have the same ID "order-1"`},
		{"bad message after a good one", []*exactly.Message{good(-1), {Topic: "t", Key: "\xff"}}, "message 1"},
	}
	var accepted []*exactly.Message
	for i, c := range cases {
		tx, commit, rollback := f.h.Begin(t, f.db)
		before := good(2 * i)
		if err := f.ob.Enqueue(ctx, tx, before); err != nil {
			rollback()
			t.Fatalf("%s: good message: %v", c.name, err)
		}
		err := f.ob.Enqueue(ctx, tx, c.msgs...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error naming %s", c.name, err, c.want)
		}
		// The transaction is still usable: the caller's own work goes on.
		after := good(2*i + 1)
		if err := f.ob.Enqueue(ctx, tx, after); err != nil {
			rollback()
			t.Fatalf("%s: the transaction is not usable after the refusal: %v", c.name, err)
		}
		if err := commit(); err != nil {
			t.Fatalf("%s: commit after the refusal: %v", c.name, err)
		}
		accepted = append(accepted, before, after)
	}
	waitBacklog(t, f, int64(len(accepted))) // nothing of the refused calls was written

	// Reserved names stay usable by exactly itself: a dead letter carries
	// the reason headers through the publisher's own checks.
	if err := (&exactly.Message{Topic: "t", ID: "x", Headers: map[string]string{exactly.HeaderDeadReason: "r"}}).Validate(); err != nil {
		t.Errorf("Validate refuses exactly's own headers: %v", err)
	}

	rec := &Recorder{}
	f.start(f.relayConfig(rec))
	waitDistinct(t, rec, len(accepted), 10*time.Second)
	CheckExactlyOnce(t, accepted, rec.Delivered())
	for _, m := range rec.Delivered() {
		if m.Headers["x-note"] != "ünï ✓" || m.Headers["Trace-Id"] != "abc" || len(m.Headers) != 2 {
			t.Errorf("message %s: headers %q, want them as enqueued", m.ID, m.Headers)
		}
	}
}

// testTwoRelays: 10,000 messages over 100 keys, two relays sharing the table
// (the second joins mid-stream, so partitions move): every message exactly
// once, every key in order.
func (s *outboxSuite) testTwoRelays(t *testing.T) {
	f := s.setup(t)
	msgs := keyedMessages("orders", 100, 100)
	for i := 0; i < len(msgs); i += 500 {
		f.enqueue(msgs[i:min(i+500, len(msgs))]...)
	}
	rec := &Recorder{}
	rec.SetDelay(15 * time.Millisecond) // a broker round trip: long enough for the second relay to get its share
	cfg := f.relayConfig(rec)
	cfg.BatchSize = 100
	// Partitions move by hand-over here, not by expiry; a lease too short
	// for a loaded machine would let the other relay take a partition
	// whose batch is still being published: a legal duplicate, which this
	// test counts as a failure.
	cfg.LeaseTTL = 3 * time.Second
	r1, _ := f.start(cfg)
	waitDistinct(t, rec, 1000, 20*time.Second)
	cfg.InstanceID = "second"
	r2, _ := f.start(cfg)
	waitDistinct(t, rec, len(msgs), 60*time.Second)
	waitBacklog(t, f, 0)

	got := rec.Delivered()
	if len(got) != len(msgs) {
		t.Errorf("published %d, want %d", len(got), len(msgs))
	}
	CheckExactlyOnce(t, msgs, got)
	CheckKeyOrder(t, got)
	st1, st2 := r1.Stats(), r2.Stats()
	if st1.Published == 0 || st2.Published == 0 {
		t.Errorf("work was not shared: relay 1 published %d, relay 2 %d", st1.Published, st2.Published)
	}
	t.Logf("relay 1 published %d, relay 2 %d", st1.Published, st2.Published)
	if st1.Partitions+st2.Partitions != cfg.Partitions {
		t.Errorf("partitions held: %d + %d, want %d in all", st1.Partitions, st2.Partitions, cfg.Partitions)
	}
}

// testRelaysStartTogether: relays started at the same moment on a fresh
// outbox (a deployment rolling out several replicas at once) all set up the
// lease rows and run; none of them mistakes another's half-made set-up for a
// partition count mismatch.
func (s *outboxSuite) testRelaysStartTogether(t *testing.T) {
	const rounds, relays = 4, 6
	for round := range rounds {
		f := s.setup(t)
		msgs := keyedMessages("orders", 10, 10)
		f.enqueue(msgs...)
		rec := &Recorder{}
		cfg := f.relayConfig(rec)
		cfg.Partitions = 64 // many lease rows: a wide window for a half-made set-up
		var (
			start = make(chan struct{})
			wg    sync.WaitGroup
			errs  = make(chan error, relays)
		)
		ctx, cancel := context.WithCancel(context.Background())
		for i := range relays {
			c := cfg
			c.InstanceID = fmt.Sprintf("r%d-%d", round, i)
			r, err := relay.New(c)
			if err != nil {
				t.Fatal(err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				if err := r.Run(ctx); err != nil {
					errs <- fmt.Errorf("%s: %w", c.InstanceID, err)
				}
			}()
		}
		close(start)
		waitDistinct(t, rec, len(msgs), 20*time.Second)
		cancel()
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Errorf("round %d: a relay started with the others failed: %v", round, err)
		}
		CheckExactlyOnce(t, msgs, rec.Delivered())
	}
}

// testPartitionGrowth: a relay started with more partitions than the table
// has grows it and stops; the relay still running with the old count stops
// too, with an error naming both counts; relays restarted with the new count
// publish everything.
func (s *outboxSuite) testPartitionGrowth(t *testing.T) {
	f := s.setup(t)
	first := keyedMessages("orders", 10, 5)
	f.enqueue(first...)
	rec := &Recorder{}
	cfg := f.relayConfig(rec)
	cfg.Partitions, cfg.InstanceID = 4, "old"
	old, err := relay.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	oldDone := make(chan error, 1)
	go func() { oldDone <- old.Run(context.Background()) }()
	waitDistinct(t, rec, len(first), 20*time.Second)

	grown := cfg
	grown.Partitions, grown.InstanceID = 8, "new"
	g, err := relay.New(grown)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Run(context.Background()); !errors.Is(err, relay.ErrPartitionMismatch) {
		t.Fatalf("the relay that grew the table: Run = %v, want ErrPartitionMismatch", err)
	}
	select {
	case err := <-oldDone:
		if !errors.Is(err, relay.ErrPartitionMismatch) || !strings.Contains(err.Error(), "now has 8 partitions, this relay runs with 4") {
			t.Fatalf("the relay running with 4 partitions: Run = %v, want a mismatch naming both counts", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the relay running with the old count kept going after the table grew")
	}
	second := keyedMessages("orders", 10, 10)[50:] // numbers 5-9 of each key
	f.enqueue(second...)
	grown.InstanceID = "new-restarted"
	f.start(grown)
	waitBacklog(t, f, 0)
	CheckExactlyOnce(t, append(first, second...), rec.Delivered())
	CheckKeyOrder(t, rec.Delivered())
}

// testLeaseTakeover: a relay stalls inside Publish for longer than its lease
// (a GC pause, a hung connection); another relay takes its partitions and
// publishes everything; the stalled one wakes up as a zombie. Nothing is
// lost, and copies carry the same ids.
func (s *outboxSuite) testLeaseTakeover(t *testing.T) {
	f := s.setup(t)
	msgs := keyedMessages("orders", 20, 20)
	f.enqueue(msgs...)
	rec := &Recorder{}
	var stalled, woke atomic.Bool
	zombie := exactly.PublisherFunc(func(ctx context.Context, batch []*exactly.Message) error {
		if stalled.CompareAndSwap(false, true) {
			time.Sleep(3 * time.Second) // three lease lifetimes
			defer woke.Store(true)
		}
		return rec.Publish(ctx, batch)
	})
	cfg := f.relayConfig(zombie)
	cfg.BatchSize = 50
	cfg.InstanceID = "zombie"
	z, _ := f.start(cfg)
	waitFor(t, "the first relay to stall", func() bool { return stalled.Load() })

	cfg = f.relayConfig(rec)
	cfg.BatchSize = 50
	cfg.InstanceID = "survivor"
	survivor, _ := f.start(cfg)
	waitDistinct(t, rec, len(msgs), 20*time.Second)
	waitFor(t, "the stalled relay to wake up", woke.Load)
	waitBacklog(t, f, 0)
	time.Sleep(100 * time.Millisecond)
	CheckExactlyOnceDedup(t, msgs, rec.Delivered())
	CheckKeyOrder(t, rec.Delivered())
	// Only the batch that was inside Publish when the relay stalled may be
	// published twice; the ones queued behind it are handed back unpublished.
	if extra := len(rec.Delivered()) - len(msgs); extra > cfg.BatchSize {
		t.Errorf("%d copies: the stalled relay published more than its one batch in flight after losing its lease", extra)
	}
	if survivor.Stats().Published == 0 {
		t.Errorf("the survivor published nothing: it did not take over the stalled relay's partitions")
	}
	t.Logf("zombie published %d, survivor %d, %d deliveries for %d messages",
		z.Stats().Published, survivor.Stats().Published, len(rec.Delivered()), len(msgs))
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// CheckExactlyOnce fails unless got holds each of want's ids exactly once.
func CheckExactlyOnce(t testing.TB, want []*exactly.Message, got []exactly.Message) {
	t.Helper()
	seen := map[string]int{}
	for _, m := range got {
		seen[m.ID]++
	}
	lost, twice := 0, 0
	for _, m := range want {
		switch n := seen[m.ID]; {
		case n == 0:
			lost++
		case n > 1:
			twice++
		}
	}
	if lost > 0 || twice > 0 {
		t.Errorf("of %d messages: %d lost, %d published more than once", len(want), lost, twice)
	}
}

// CheckKeyOrder fails when messages of one key appear out of the order of
// their payload counter ("key:n"), ignoring repeats of a message already
// seen: the order a consumer that applies each id once observes.
func CheckKeyOrder(t testing.TB, got []exactly.Message) {
	t.Helper()
	last := map[string]int{}
	seen := map[string]bool{}
	bad := 0
	for _, m := range got {
		if seen[m.ID] {
			continue
		}
		seen[m.ID] = true
		var n int
		if _, err := fmt.Sscanf(string(m.Payload)[strings.IndexByte(string(m.Payload), ':')+1:], "%d", &n); err != nil {
			t.Fatalf("payload %q is not key:n", m.Payload)
		}
		prev, ok := last[m.Key]
		if ok && n < prev {
			bad++
			if bad <= 5 {
				t.Errorf("key %s: message %d after message %d", m.Key, n, prev)
			}
		}
		if !ok || n > prev {
			last[m.Key] = n
		}
	}
	if bad > 0 {
		t.Errorf("%d per-key order violations", bad)
	}
}

// testLateCommit: a transaction that took its sequence number first commits
// last; the relay has already published the later one, and must still
// publish the earlier one.
func (s *outboxSuite) testLateCommit(t *testing.T) {
	if !s.h.ConcurrentWriters {
		t.Skip("this database serializes writers: a lower sequence cannot commit after a higher one")
	}
	f := s.setup(t)
	rec := &Recorder{}
	f.start(f.relayConfig(rec))

	ctx := context.Background()
	slowTx, slowCommit, _ := f.h.Begin(t, f.db)
	slow := &exactly.Message{Topic: "t", Payload: []byte("slow")}
	if err := f.ob.Enqueue(ctx, slowTx, slow); err != nil {
		t.Fatal(err)
	}
	fast := &exactly.Message{Topic: "t", Payload: []byte("fast")}
	f.enqueue(fast)
	waitDistinct(t, rec, 1, 10*time.Second)
	time.Sleep(200 * time.Millisecond) // several polls go by with the gap open
	if err := slowCommit(); err != nil {
		t.Fatal(err)
	}
	waitDistinct(t, rec, 2, 10*time.Second)
	CheckExactlyOnce(t, []*exactly.Message{slow, fast}, rec.Delivered())
}

// testRetryKeepsOrder: one message fails twice; later messages of its key
// are published again after it, other keys flow meanwhile. With StrictOrder
// nothing of the key gets ahead of it even once.
func (s *outboxSuite) testRetryKeepsOrder(t *testing.T) {
	for _, strict := range []bool{false, true} {
		t.Run(fmt.Sprintf("StrictOrder=%v", strict), func(t *testing.T) {
			t.Parallel()
			s.retryKeepsOrder(t, strict)
		})
	}
}

func (s *outboxSuite) retryKeepsOrder(t *testing.T, strict bool) {
	f := s.setup(t)
	msgs := keyedMessages("t", 5, 10)
	f.enqueue(msgs...)
	victim := msgs[12] // key k002, third message of that key
	var fails atomic.Int32
	rec := &Recorder{}
	rec.FailWhen(func(m *exactly.Message) error {
		if m.ID == victim.ID && fails.Add(1) <= 2 {
			return errors.New("injected transient failure")
		}
		return nil
	})
	cfg := f.relayConfig(rec)
	cfg.BatchSize = 7
	cfg.StrictOrder = strict
	f.start(cfg)
	waitBacklog(t, f, 0)
	got := rec.Delivered()
	if strict {
		CheckExactlyOnce(t, msgs, got)
		CheckKeyOrder(t, got)
	} else {
		CheckExactlyOnceDedup(t, msgs, got)
		CheckLastDeliveryOrder(t, got)
	}
	if fails.Load() < 3 {
		t.Errorf("the failing message was tried %d times, want 3", fails.Load())
	}
}

// CheckLastDeliveryOrder checks per-key order on the last copy of each
// message: after a retry, whatever of a key went out ahead of the failed
// message is published again behind it, so the final sequence is in order.
func CheckLastDeliveryOrder(t testing.TB, got []exactly.Message) {
	t.Helper()
	last := map[string]int{}
	for i, m := range got {
		last[m.ID] = i
	}
	var final []exactly.Message
	for i, m := range got {
		if last[m.ID] == i {
			final = append(final, m)
		}
	}
	CheckKeyOrder(t, final)
}

// CheckExactlyOnceDedup fails unless every id of want was published at least
// once, and duplicates, if any, are exact copies (same id, same payload).
func CheckExactlyOnceDedup(t testing.TB, want []*exactly.Message, got []exactly.Message) {
	t.Helper()
	byID := map[string]exactly.Message{}
	for _, m := range got {
		if prev, ok := byID[m.ID]; ok && string(prev.Payload) != string(m.Payload) {
			t.Errorf("id %s published with two payloads", m.ID)
		}
		byID[m.ID] = m
	}
	for _, m := range want {
		if _, ok := byID[m.ID]; !ok {
			t.Errorf("message %s (%s) lost", m.ID, m.Payload)
		}
	}
}

// testPark: a message that always fails is parked after MaxAttempts, one the
// broker refuses is parked at once; their keys move on, nothing is deleted,
// and a re-drive publishes them.
func (s *outboxSuite) testPark(t *testing.T) {
	f := s.setup(t)
	msgs := keyedMessages("t", 3, 4)
	f.enqueue(msgs...)
	flaky, huge := msgs[0], msgs[4]
	var broken atomic.Bool
	broken.Store(true)
	rec := &Recorder{}
	rec.FailWhen(func(m *exactly.Message) error {
		switch {
		case !broken.Load():
			return nil
		case m.ID == flaky.ID:
			return errors.New("broker said no")
		case m.ID == huge.ID:
			return exactly.Unpublishable(errors.New("message too large"))
		}
		return nil
	})
	cfg := f.relayConfig(rec)
	cfg.MaxAttempts = 3
	relayDead := make(chan string, 10)
	cfg.Hooks.Dead = func(m *exactly.Message, err error) { relayDead <- m.ID }
	r, stop := f.start(cfg)
	waitDistinct(t, rec, len(msgs)-2, 10*time.Second)
	waitBacklog(t, f, 0)
	stop()

	ctx := context.Background()
	dead, err := f.ob.ListDead(ctx, f.db, outbox.DeadFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 2 {
		t.Fatalf("dead = %d messages, want 2", len(dead))
	}
	for _, d := range dead {
		switch d.Message.ID {
		case flaky.ID:
			if d.Attempts != 3 || !strings.Contains(d.LastError, "broker said no") {
				t.Errorf("flaky: attempts %d, last error %q", d.Attempts, d.LastError)
			}
		case huge.ID:
			if d.Attempts != 1 || !strings.Contains(d.LastError, "too large") {
				t.Errorf("unpublishable: attempts %d, last error %q (want parked at once)", d.Attempts, d.LastError)
			}
		default:
			t.Errorf("unexpected dead message %s", d.Message.ID)
		}
	}
	if st := r.Stats(); st.Dead != 2 || len(relayDead) != 2 {
		t.Errorf("stats dead = %d, hook calls = %d, want 2", st.Dead, len(relayDead))
	}
	st, _ := f.ob.Status(ctx, f.db)
	if st.Dead != 2 {
		t.Errorf("status dead = %d", st.Dead)
	}

	// Re-drive one by id, purge nothing: both eventually published.
	broken.Store(false)
	n, err := f.ob.RetryDead(ctx, f.db, outbox.DeadFilter{IDs: []string{flaky.ID}})
	if err != nil || n != 1 {
		t.Fatalf("retry dead: %d, %v", n, err)
	}
	n, err = f.ob.RetryDead(ctx, f.db, outbox.DeadFilter{Topic: "t"})
	if err != nil || n != 1 {
		t.Fatalf("retry dead by topic: %d, %v", n, err)
	}
	f.start(f.relayConfig(rec))
	waitDistinct(t, rec, len(msgs), 10*time.Second)
	// Messages of the failing keys that the broker took while the failed
	// one was pending were published again after it: copies, same ids.
	CheckExactlyOnceDedup(t, msgs, rec.Delivered())

	// Purge only takes dead rows.
	f.enqueue(&exactly.Message{Topic: "t", Payload: []byte("k:0")})
	if n, err := f.ob.PurgeDead(ctx, f.db, outbox.DeadFilter{}); err != nil || n != 0 {
		t.Errorf("purge with no dead rows removed %d (%v)", n, err)
	}
}

// testOutage: the publisher fails whole batches for a while (broker down);
// attempts are not spent, and everything arrives once it is back.
func (s *outboxSuite) testOutage(t *testing.T) {
	f := s.setup(t)
	msgs := keyedMessages("t", 10, 20)
	f.enqueue(msgs...)
	rec := &Recorder{}
	rec.FailCalls(-1, errors.New("connection refused"))
	cfg := f.relayConfig(rec)
	cfg.MaxAttempts = 2 // an outage must not park anything
	f.start(cfg)
	waitFor(t, "the relay to retry during the outage", func() bool { return rec.Calls() >= 3 })
	rec.Heal()
	waitDistinct(t, rec, len(msgs), 10*time.Second)
	waitBacklog(t, f, 0)
	CheckExactlyOnce(t, msgs, rec.Delivered())
	CheckKeyOrder(t, rec.Delivered())
	if st, _ := f.ob.Status(context.Background(), f.db); st.Dead != 0 {
		t.Errorf("%d messages parked during an outage", st.Dead)
	}
}

// LogBuffer collects log output written from several goroutines (a relay's
// or a consumer's), for a test to read: pass it to slog.NewTextHandler.
type LogBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// testFailingVisible: a topic the broker refuses every time (no stream for
// it) is not retried silently: the relay warns at once with the broker's
// reason, then at most once a minute per topic; the key it holds back shows
// in Stats, in the Failing hook and in outbox.Status with its attempts,
// last error and next attempt; other keys flow. Once the broker takes the
// topic, everything goes out and the status is clear again.
func (s *outboxSuite) testFailingVisible(t *testing.T) {
	f := s.setup(t)
	ctx := context.Background()
	head := &exactly.Message{Topic: "nostream", Key: "k1", Payload: []byte("k1:0")}
	behind := &exactly.Message{Topic: "nostream", Key: "k1", Payload: []byte("k1:1")}
	unkeyed := &exactly.Message{Topic: "nostream", Payload: []byte(":0")}
	other := &exactly.Message{Topic: "t", Key: "k2", Payload: []byte("k2:0")}
	msgs := []*exactly.Message{head, behind, unkeyed, other}
	f.enqueue(msgs...)

	var broken atomic.Bool
	broken.Store(true)
	rec := &Recorder{}
	rec.FailWhen(func(m *exactly.Message) error {
		if broken.Load() && m.Topic == "nostream" {
			return fmt.Errorf("no stream captures subject %q", m.Topic)
		}
		return nil
	})
	logs := &LogBuffer{}
	cfg := f.relayConfig(rec)
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg.MaxAttempts = 1000
	cfg.Hooks.BacklogInterval = 20 * time.Millisecond
	var report atomic.Pointer[relay.FailingReport]
	cfg.Hooks.Failing = func(fr relay.FailingReport) { report.Store(&fr) }
	r, stop := f.start(cfg)

	waitDistinct(t, rec, 1, 10*time.Second) // the other key flows
	waitFor(t, "the failing head to be retried", func() bool { return rec.Attempts(head.ID) >= 4 && rec.Attempts(unkeyed.ID) >= 4 })
	waitFor(t, "Stats to show the held-back key", func() bool { return r.Stats().BlockedKeys == 1 })
	if st := r.Stats(); st.OldestBlocked <= 0 {
		t.Errorf("Stats.OldestBlocked = %s, want the head's age", st.OldestBlocked)
	}
	waitFor(t, "the Failing hook to report the key", func() bool {
		fr := report.Load()
		return fr != nil && fr.Table.BlockedKeys == 1 && fr.Table.Messages == 2 && fr.BlockedKeys == 1 && fr.Table.OldestAge > 0
	})

	st, err := f.ob.Status(ctx, f.db)
	if err != nil {
		t.Fatal(err)
	}
	if st.Failing.Messages != 2 || st.Failing.BlockedKeys != 1 || st.Failing.OldestAge <= 0 {
		t.Errorf("status failing = %+v, want 2 messages, 1 blocked key and an age", st.Failing)
	}
	if len(st.Blocked) != 2 {
		t.Fatalf("status blocked = %+v, want the head and the unkeyed message", st.Blocked)
	}
	for _, b := range st.Blocked {
		want := map[string]struct {
			key     string
			waiting int64
		}{head.ID: {"k1", 2}, unkeyed.ID: {"", 1}}[b.ID]
		if b.ID != head.ID && b.ID != unkeyed.ID {
			t.Errorf("blocked %+v: not a failing message", b)
			continue
		}
		if b.Topic != "nostream" || b.Key != want.key || b.Attempts < 1 || !strings.Contains(b.LastError, "no stream captures subject") ||
			b.NextAttemptAt.IsZero() || b.Age <= 0 || b.Waiting != want.waiting {
			t.Errorf("blocked %+v: want topic nostream, key %q, attempts, the broker's reason, a next attempt, an age and %d waiting", b, want.key, want.waiting)
		}
	}

	// One warn line for the topic so far, with the broker's reason.
	var lines []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "publish failed") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || !strings.Contains(lines[0], "level=WARN") || !strings.Contains(lines[0], "topic=nostream") ||
		!strings.Contains(lines[0], "no stream captures subject") {
		t.Errorf("warn lines about the failures: %q, want one with the topic and the broker's reason", lines)
	}

	broken.Store(false)
	waitDistinct(t, rec, len(msgs), 10*time.Second)
	waitBacklog(t, f, 0)
	CheckKeyOrder(t, rec.Delivered())
	waitFor(t, "Stats to show no held-back key", func() bool { return r.Stats().BlockedKeys == 0 })
	stop()
	if st, err := f.ob.Status(ctx, f.db); err != nil || st.Failing != (outbox.Failing{}) || len(st.Blocked) != 0 {
		t.Errorf("status after the broker took the topic: %+v (%v), want nothing failing", st, err)
	}
}

// testRetention: sent rows are kept for the retention time, then deleted.
func (s *outboxSuite) testRetention(t *testing.T) {
	f := s.setup(t)
	msgs := keyedMessages("t", 2, 5)
	f.enqueue(msgs...)
	rec := &Recorder{}
	cfg := f.relayConfig(rec)
	cfg.Retention = 1500 * time.Millisecond
	f.start(cfg)
	waitDistinct(t, rec, len(msgs), 10*time.Second)
	sdb, done, _ := sqldb.Open(f.db)
	defer done()
	count := func() int {
		var n int
		if err := sdb.QueryRow("SELECT count(*) FROM " + outboxstore.For(f.ob).QuotedTable()).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	waitBacklog(t, f, 0)
	if n := count(); n != len(msgs) {
		t.Fatalf("right after sending, %d rows are kept, want %d", n, len(msgs))
	}
	deadline := time.Now().Add(10 * time.Second)
	for count() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("sent rows were not deleted after the retention time (%d left)", count())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// testShutdownRestart: the relay is stopped mid-stream several times; after
// the last restart everything is published, duplicates carry the same id.
func (s *outboxSuite) testShutdownRestart(t *testing.T) {
	f := s.setup(t)
	msgs := keyedMessages("t", 20, 50)
	f.enqueue(msgs...)
	rec := &Recorder{}
	rec.SetDelay(2 * time.Millisecond)
	cfg := f.relayConfig(rec)
	cfg.BatchSize = 50
	for i := range 3 {
		_, stop := f.start(cfg)
		waitDistinct(t, rec, (i+1)*200, 20*time.Second)
		stop()
	}
	f.start(cfg)
	waitBacklog(t, f, 0)
	CheckExactlyOnceDedup(t, msgs, rec.Delivered())
	CheckKeyOrder(t, rec.Delivered())
}
