package exactlytest

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/sqldb"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// StartRelay runs a relay of cfg until the test ends or stop is called,
// and fails the test if Run returns an error.
func StartRelay(t testing.TB, cfg relay.Config) (r *relay.Relay, stop func()) {
	t.Helper()
	r, err := relay.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("relay.Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return r, stop
}

// EnqueueAll writes msgs through ob into db (a *sql.DB or *pgxpool.Pool),
// perTx messages a transaction.
func EnqueueAll(t testing.TB, db any, ob *outbox.Outbox, perTx int, msgs []*exactly.Message) {
	t.Helper()
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		t.Fatal(err)
	}
	defer done()
	ctx := context.Background()
	for i := 0; i < len(msgs); i += perTx {
		tx, err := sdb.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := ob.Enqueue(ctx, tx, msgs[i:min(i+perTx, len(msgs))]...); err != nil {
			tx.Rollback()
			t.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
	}
}

// WaitDrained waits up to timeout until ob has no pending message in db,
// and fails the test if it still has some then.
func WaitDrained(t testing.TB, db any, ob *outbox.Outbox, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, err := ob.Status(context.Background(), db)
		if err == nil && st.Pending == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the outbox did not drain within %v: %+v, %v", timeout, st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
