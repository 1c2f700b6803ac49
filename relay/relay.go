package relay

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/relaycore"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// Relay moves committed outbox rows to a Publisher. Create it with New and
// start it with Run.
type Relay struct {
	cfg     Config
	db      *sql.DB
	closeDB func() // releases db's adapter when it wraps a pgxpool
	// pgPool is the user's pool on PostgreSQL when one was passed; the hot
	// statements (fetch, mark) then go through pgx directly. With a *sql.DB
	// from the pgx driver they use its connections' pgx.Conn (withPg).
	pgPool *pgxpool.Pool
	store  *outboxstore.Store
	log    *slog.Logger
	wake   chan struct{}

	mu sync.Mutex
	// order is the per-key ordering state; r.mu guards it.
	order   keyOrder
	drained *sync.Cond // signalled whenever order.inflight shrinks
	// fence is set when a batch was handed back because the lease ran out:
	// every batch read up to then (gen <= fence) is handed back too, since
	// it may hold later messages of the same keys, and the next read waits
	// until none of them is in flight, so that no read excludes them, and
	// starts over from the lowest pending row.
	fence   uint64
	fencing bool

	owned    []int64 // partitions held; only the Run goroutine writes it
	fatal    error   // why fetchLoop stopped on its own; read by Run after it returns
	allOwned bool
	// leaseUntil (Unix ns, local clock) is when the leases renewed last
	// expire, less a margin. A batch is not published after it: the
	// partitions may belong to another relay by then.
	leaseUntil atomic.Int64

	// pipe is the Publisher when it takes overlapping batches of shared
	// keys (see relaycore.Engine).
	pipe exactly.PipelinedPublisher

	tally      *relaycore.Tally
	partitions atomic.Int64 // held now
	running    atomic.Bool

	// afterPublish, when set (tests only), runs after the broker confirmed a
	// batch and before the rows are marked sent: the crash window.
	afterPublish func(rows []outboxstore.Row)
	// beforeLeaseCheck, when set (tests only), runs when the publish stage
	// takes a batch, before it checks the lease.
	beforeLeaseCheck func()
}

// New validates cfg and returns a relay ready to Run.
func New(cfg Config) (*Relay, error) {
	c, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	db, done, err := sqldb.Open(c.DB)
	if err != nil {
		return nil, fmt.Errorf("relay: %w", err)
	}
	store := outboxstore.For(c.Outbox)
	if store.D == sqldb.Postgres && !sqldb.IsPgx(db) {
		done()
		return nil, errors.New("relay: on PostgreSQL the database handle must come from pgx (pgxpool.Pool, or sql.Open(\"pgx\", dsn))")
	}
	log := c.Logger.With("component", "relay", "table", store.Table.String(), "instance", c.InstanceID)
	pp, pipelined := c.Publisher.(exactly.PipelinedPublisher)
	r := &Relay{
		cfg:     c,
		db:      db,
		closeDB: done,
		store:   store,
		log:     log,
		wake:    make(chan struct{}, 1),
		order:   newKeyOrder(c.BatchSize, c.StrictOrder, pipelined),
		tally: relaycore.NewTally(log, c.MaxAttempts, relaycore.Hooks{
			Published: c.Hooks.Published, Failed: c.Hooks.Failed, Dead: c.Hooks.Dead,
		}),
		pipe: pp,
	}
	r.drained = sync.NewCond(&r.mu)
	if store.D == sqldb.Postgres {
		r.pgPool, _ = c.DB.(*pgxpool.Pool)
	}
	return r, nil
}

// Stats are running totals since the relay started.
type Stats struct {
	Published   int64 // messages confirmed by the broker and marked sent
	Republished int64 // confirmed messages left pending to keep their key in order
	Failed      int64 // failed publish attempts that will be retried
	Dead        int64 // messages parked as dead
	Batches     int64
	Partitions  int // partitions held now
	// BlockedKeys is how many keys this relay holds back now because the
	// head message of the key failed (or its publisher is down): the key's
	// later messages wait until that one is confirmed or parked.
	BlockedKeys int
	// OldestBlocked is the age (since it was enqueued) of the oldest of
	// those head messages; 0 when no key is held back.
	OldestBlocked time.Duration
}

// Stats returns the running totals.
func (r *Relay) Stats() Stats {
	st := Stats{
		Published: r.tally.Published.Load(), Republished: r.tally.Republished.Load(),
		Failed: r.tally.Failed.Load(), Dead: r.tally.Dead.Load(), Batches: r.tally.Batches.Load(),
		Partitions: int(r.partitions.Load()),
	}
	r.mu.Lock()
	var oldest time.Time
	st.BlockedKeys, oldest = r.order.blocked()
	r.mu.Unlock()
	if !oldest.IsZero() {
		st.OldestBlocked = max(time.Since(oldest), 0)
	}
	return st
}

// Wake makes the relay read the table now instead of at its next poll. The
// PostgreSQL listener calls it on NOTIFY; applications on MySQL or SQLite
// can call it after committing an Enqueue to cut latency.
func (r *Relay) Wake() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Run publishes until ctx is cancelled, then finishes or hands back the batch
// in flight and returns nil. It returns an error only when it cannot start
// (tables missing, partition mismatch), or when another relay changed the
// partition count under it (it then finishes its batch in flight, hands its
// partitions back and returns an error wrapping the mismatch).
//
// A Relay runs once: Run closes what New opened when it returns.
func (r *Relay) Run(ctx context.Context) error {
	if !r.running.CompareAndSwap(false, true) {
		return errors.New("relay: Run called twice")
	}
	defer r.closeDB()
	// A database that is unreachable or restarting at start is waited for,
	// as it is later; a missing table or a partition mismatch is not.
	err := relaycore.StartRetrying(ctx, r.log, r.backoff, 5*time.Second, func() error {
		err := r.store.CheckTables(ctx, r.db)
		if err == nil {
			err = r.store.EnsurePartitions(ctx, r.db, r.cfg.Partitions, r.cfg.LeaseTTL)
		}
		return err
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("relay: %w", err)
	}
	// Work that must outlive ctx a little (finishing the in-flight batch)
	// uses stopCtx, cancelled ShutdownTimeout after ctx.
	stopCtx, stopCancel := relaycore.Grace(ctx, r.cfg.ShutdownTimeout)
	defer stopCancel()

	var bg sync.WaitGroup
	bgCtx, bgCancel := context.WithCancel(ctx)
	defer func() { bgCancel(); bg.Wait() }()
	if r.store.D == sqldb.Postgres {
		bg.Go(func() { r.listen(bgCtx) })
	}
	if r.cfg.Retention > 0 {
		bg.Go(func() { r.retain(bgCtx) })
	}
	if r.cfg.Hooks.Backlog != nil || r.cfg.Hooks.Failing != nil {
		bg.Go(func() { r.backlog(bgCtx) })
	}

	// The fetch loop feeds the engine; after ctx is cancelled the engine
	// starts no new batch (queued rows are handed back and stay pending)
	// and finishes the batches out.
	pubCh := make(chan relaycore.Batch, 1)
	var engine sync.WaitGroup
	engine.Go(func() { r.engine().Run(ctx, stopCtx, pubCh, source{r}) })
	r.fetchLoop(ctx, pubCh)
	close(pubCh)
	engine.Wait()

	leaveCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := r.store.Leave(leaveCtx, r.db, r.cfg.InstanceID); err != nil {
		r.log.Warn("could not release partitions on shutdown; they free up when their lease expires", "err", err)
	}
	if r.fatal != nil {
		return fmt.Errorf("relay: %w", r.fatal)
	}
	r.log.Info("relay stopped", "published", r.tally.Published.Load())
	return nil
}

func (r *Relay) backoff(attempt int) time.Duration {
	return exactly.RetryPolicy{InitialBackoff: r.cfg.InitialBackoff, MaxBackoff: r.cfg.MaxBackoff}.Backoff(attempt)
}

func (r *Relay) sleep(ctx context.Context, d time.Duration, wakeable bool) {
	t := time.NewTimer(d)
	defer t.Stop()
	var wake chan struct{}
	if wakeable {
		wake = r.wake
	}
	select {
	case <-t.C:
	case <-wake:
	case <-ctx.Done():
	}
}

// withPg runs fn on pgx: the user's pool, or one connection of the *sql.DB
// (from the pgx driver, checked in New) unwrapped to its pgx.Conn.
func (r *Relay) withPg(ctx context.Context, fn func(outboxstore.PgxConn) error) error {
	if r.pgPool != nil {
		return fn(r.pgPool)
	}
	return r.onPgxConn(ctx, func(c *pgx.Conn) error { return fn(c) })
}

// onPgxConn runs fn on one connection of the *sql.DB (from the pgx driver,
// checked in New) unwrapped to its pgx.Conn.
func (r *Relay) onPgxConn(ctx context.Context, fn func(*pgx.Conn) error) error {
	conn, err := r.db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Raw(func(dc any) error {
		sc, ok := dc.(*stdlib.Conn)
		if !ok {
			return errors.New("not a pgx connection")
		}
		return fn(sc.Conn())
	})
}
