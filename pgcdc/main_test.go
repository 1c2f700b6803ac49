package pgcdc_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/pginstance"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
)

// One private server with wal_level=logical serves the package; tests that
// restart the server start their own.
var (
	shared    *pginstance.Instance
	sharedErr error
)

func TestMain(m *testing.M) {
	if os.Getenv(crashChildEnv) != "" {
		os.Exit(crashChild())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	shared, sharedErr = pginstance.Start(ctx, pginstance.Options{})
	if sharedErr == nil {
		sharedErr = warmUp(ctx, shared.DSN("test"))
	}
	cancel()
	code := m.Run()
	if shared != nil {
		shared.Remove()
	}
	os.Exit(code)
}

// dsn is the shared server's test database, or skips (fails under CI).
func dsn(t testing.TB) string {
	t.Helper()
	if sharedErr != nil {
		if testenv.InCI() {
			t.Fatalf("private PostgreSQL server: %v", sharedErr)
		}
		t.Skipf("private PostgreSQL server: %v", sharedErr)
	}
	return shared.DSN("test")
}

// fixture is one test's outbox table, slot and publication.
type fixture struct {
	t    *testing.T
	dsn  string
	pool *pgxpool.Pool
	ob   *outbox.Outbox
	slot string
}

var fixtureSeq atomic.Int64

func setup(t *testing.T) *fixture {
	t.Helper()
	return setupOn(t, dsn(t))
}

func setupOn(t *testing.T, dsn string) *fixture {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	ob := exactlytest.MigratedOutbox(t, pool, "postgres", "cdc")
	f := &fixture{t: t, dsn: dsn, pool: pool, ob: ob, slot: fmt.Sprintf("s_%s_%d", strings.ReplaceAll(ob.Table(), "cdc_", ""), fixtureSeq.Add(1))}
	t.Cleanup(func() {
		ctx := context.Background()
		if err := pgcdc.DropSlot(ctx, dsn, f.slot); err != nil {
			t.Logf("DropSlot: %v", err)
		}
		pool.Exec(ctx, "DROP PUBLICATION IF EXISTS "+f.slot)
	})
	return f
}

func (f *fixture) config(p exactly.Publisher) pgcdc.Config {
	return pgcdc.Config{
		DSN: f.dsn, Slot: f.slot, Table: f.ob.Table(), Publisher: p,
		InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		HeartbeatInterval: 200 * time.Millisecond, StatusInterval: 100 * time.Millisecond, LagInterval: 200 * time.Millisecond,
		Logger: testLogger(f.t),
	}
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: logLevel()}))
}

// start runs a relay until stop (or the test's end); stop returns Run's
// error.
func start(t *testing.T, cfg pgcdc.Config) (*pgcdc.Relay, func() error) {
	t.Helper()
	r, err := pgcdc.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var stopped atomic.Bool
	var result error
	stop := func() error {
		if stopped.CompareAndSwap(false, true) {
			cancel()
			result = <-done
		}
		return result
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return r, stop
}

// enqueue writes msgs in one transaction and commits it (or rolls it back).
func (f *fixture) enqueue(commit bool, msgs ...*exactly.Message) {
	f.t.Helper()
	ctx := context.Background()
	tx, err := f.pool.Begin(ctx)
	if err != nil {
		f.t.Fatal(err)
	}
	if err := f.ob.Enqueue(ctx, tx, msgs...); err != nil {
		f.t.Fatal(err)
	}
	if commit {
		err = tx.Commit(ctx)
	} else {
		err = tx.Rollback(ctx)
	}
	if err != nil {
		f.t.Fatal(err)
	}
}

// keyed returns perKey messages for each of keys, interleaved; payload
// "key:n".
func keyed(topic string, keys, perKey int) []*exactly.Message {
	var out []*exactly.Message
	for n := range perKey {
		for k := range keys {
			key := fmt.Sprintf("k%02d", k)
			out = append(out, &exactly.Message{Topic: topic, Key: key, Payload: fmt.Appendf(nil, "%s:%d", key, n)})
		}
	}
	return out
}

func waitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func distinct(got []exactly.Message) int {
	ids := map[string]bool{}
	for _, m := range got {
		ids[m.ID] = true
	}
	return len(ids)
}

// rows counts the rows of the outbox table with the given status.
func (f *fixture) rows(status int) int {
	f.t.Helper()
	var n int
	if err := f.pool.QueryRow(context.Background(), "SELECT count(*) FROM "+f.ob.Table()+" WHERE status = $1", status).Scan(&n); err != nil {
		f.t.Fatal(err)
	}
	return n
}

// slotConfirmed is the slot's confirmed_flush_lsn and the WAL it retains.
func slotConfirmed(t testing.TB, pool *pgxpool.Pool, slot string) (pgcdc.LSN, int64) {
	t.Helper()
	var lsn string
	var lag int64
	if err := pool.QueryRow(context.Background(), "SELECT confirmed_flush_lsn::text, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&lsn, &lag); err != nil {
		t.Fatal(err)
	}
	l, err := pgcdc.ParseLSN(lsn)
	if err != nil {
		t.Fatal(err)
	}
	return l, lag
}

func currentLSN(t testing.TB, pool *pgxpool.Pool) pgcdc.LSN {
	t.Helper()
	var s string
	if err := pool.QueryRow(context.Background(), "SELECT pg_current_wal_lsn()::text").Scan(&s); err != nil {
		t.Fatal(err)
	}
	l, err := pgcdc.ParseLSN(s)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func logLevel() slog.Level {
	if os.Getenv("PGCDC_DEBUG") != "" {
		return slog.LevelDebug
	}
	return slog.LevelWarn
}

// waitStreaming waits until a relay streams the fixture's slot.
func (f *fixture) waitStreaming() {
	f.t.Helper()
	waitFor(f.t, "the relay streaming", 20*time.Second, func() bool {
		var active bool
		err := f.pool.QueryRow(context.Background(), `SELECT s.active FROM pg_replication_slots s JOIN exactly_cdc_slots r USING (slot_name)
WHERE s.slot_name = $1 AND r.state = 'streaming'`, f.slot).Scan(&active)
		return err == nil && active
	})
}

// warmUp creates the migrations table once, before parallel tests race to.
func warmUp(ctx context.Context, dsn string) error {
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return err
	}
	defer pool.Close()
	ob, err := outbox.New(outbox.Config{Dialect: "postgres", Table: "warm_up"})
	if err != nil {
		return err
	}
	return ob.Migrate(ctx, pool)
}
