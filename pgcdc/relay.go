package pgcdc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/pause"
	"github.com/exactlyonce/exactly/internal/relaycore"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// Errors Run returns when the slot cannot be trusted any more. Both mean
// changes may be missing from the slot; nothing is skipped silently.
var (
	// ErrSlotLost: a slot this relay created (and recorded) no longer
	// exists: it was dropped while the relay was down, or while it ran.
	ErrSlotLost = errors.New("pgcdc: replication slot lost")
	// ErrSlotInvalidated: PostgreSQL invalidated the slot (wal_status
	// lost), usually because it retained more than max_slot_wal_keep_size.
	ErrSlotInvalidated = errors.New("pgcdc: replication slot invalidated")
)

// Relay streams outbox messages from a replication slot to a publisher.
// Create it with New and start it with Run.
type Relay struct {
	cfg   Config
	log   *slog.Logger
	store *outboxstore.Store
	pool  *pgxpool.Pool
	track tracker

	tables []tableRef // the publication's tables: the outbox, maybe Debezium's
	disp   *dispatcher
	ckpt   *position // exactly-once: the checkpoint read from Kafka

	stats   counters
	tally   *relaycore.Tally
	running atomic.Bool
	// slotUp is set once the slot was checked or created in this Run;
	// until then watchSlot does not judge it.
	slotUp atomic.Bool
	// writeTrouble is set while the writer cannot write to the database:
	// the stream then disconnects and retries.
	writeTrouble atomic.Bool

	fatalOnce sync.Once
	fatalErr  error
	fatal     chan struct{}

	// afterPublish, when set (tests only), runs after the broker confirmed
	// a batch and before anything is recorded or confirmed: the crash
	// window.
	afterPublish func(batch []*entry, errs []error)
}

type tableRef struct {
	kind   relKind
	quoted string // as written in SQL
	schema string // as PostgreSQL resolved it
	name   string
}

type counters struct {
	received, skipped, reconnects atomic.Int64
	receivedLSN                   atomic.Uint64
	lagBytes                      atomic.Int64
	lagSeconds                    atomic.Uint64 // milliseconds
	blockedKeys                   atomic.Int64
}

// Stats are running totals since the relay started, and the slot's state.
type Stats struct {
	Received    int64 // messages decoded from the slot (not counting those at or below the exactly-once checkpoint)
	Published   int64 // messages confirmed by the broker
	Republished int64 // confirmed messages published again to keep their key in order
	Failed      int64 // failed publish attempts that will be retried
	Dead        int64 // messages parked as dead
	Skipped     int64 // messages at or below the exactly-once checkpoint, already in Kafka
	Batches     int64
	Reconnects  int64 // replication connections re-established
	Pending     int64 // messages received and not yet confirmed or parked

	ReceivedLSN  LSN // the last position received
	ConfirmedLSN LSN // the position confirmed to PostgreSQL
	// SlotLagBytes is the WAL the slot retains: pg_current_wal_lsn() -
	// confirmed_flush_lsn, as of the last check (every LagInterval).
	SlotLagBytes int64
	// SlotLagSeconds is the age of the oldest committed transaction
	// received and not yet confirmed; 0 when all are confirmed.
	SlotLagSeconds float64
	// BlockedKeys is how many keys are held back now because their head
	// message failed to publish and waits for its retry (the attempts are
	// kept in memory; the table shows them only once a message is parked).
	BlockedKeys int64
}

// Stats returns the running totals.
func (r *Relay) Stats() Stats {
	return Stats{
		Received: r.stats.received.Load(), Published: r.tally.Published.Load(), Republished: r.tally.Republished.Load(),
		Failed: r.tally.Failed.Load(), Dead: r.tally.Dead.Load(), Skipped: r.stats.skipped.Load(),
		Batches: r.tally.Batches.Load(), Reconnects: r.stats.reconnects.Load(), Pending: r.track.pending.Load(),
		ReceivedLSN: LSN(r.stats.receivedLSN.Load()), ConfirmedLSN: r.track.position(),
		SlotLagBytes: r.stats.lagBytes.Load(), SlotLagSeconds: float64(r.stats.lagSeconds.Load()) / 1000,
		BlockedKeys: r.stats.blockedKeys.Load(),
	}
}

// New validates cfg and returns a relay ready to Run. It does not connect.
func New(cfg Config) (*Relay, error) {
	c, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	store, err := outboxstore.New("postgres", c.Table)
	if err != nil {
		return nil, fmt.Errorf("pgcdc: Config.Table: %w", err)
	}
	log := c.Logger.With("component", "pgcdc", "slot", c.Slot)
	r := &Relay{
		cfg:   c,
		store: store,
		log:   log,
		fatal: make(chan struct{}),
		tally: relaycore.NewTally(log, c.MaxAttempts, relaycore.Hooks{
			Published: c.Hooks.Published, Failed: c.Hooks.Failed, Dead: c.Hooks.Dead,
		}),
	}
	r.tables = append(r.tables, tableRef{kind: relOutbox, quoted: store.QuotedTable()})
	if c.Debezium != nil {
		id, err := sqldb.ParseIdent(c.Debezium.Table)
		if err != nil {
			return nil, fmt.Errorf("pgcdc: Config.Debezium.Table: %w", err)
		}
		r.tables = append(r.tables, tableRef{kind: relDebezium, quoted: id.Quoted(sqldb.Postgres)})
	}
	r.track.onAdvance = func(l LSN) {
		if h := r.cfg.Hooks.Confirmed; h != nil {
			h(l)
		}
	}
	return r, nil
}

// fail records a fatal error and stops Run.
func (r *Relay) fail(err error) {
	r.fatalOnce.Do(func() {
		r.fatalErr = err
		close(r.fatal)
	})
}

// Run streams and publishes until ctx is cancelled (it returns nil then)
// or a fatal error: the relay cannot start, or the slot was lost or
// invalidated. Connection failures are retried. A Relay runs once.
func (r *Relay) Run(ctx context.Context) error {
	if !r.running.CompareAndSwap(false, true) {
		return errors.New("pgcdc: Run called twice")
	}
	pcfg, err := pgxpool.ParseConfig(r.cfg.DSN)
	if err != nil {
		return fmt.Errorf("pgcdc: %w", err)
	}
	pcfg.MaxConns = max(pcfg.MaxConns, 8) // writer, heartbeat, slot watch, set-up, snapshot read
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return fmt.Errorf("pgcdc: %w", err)
	}
	defer pool.Close()
	r.pool = pool

	eng := &relaycore.Engine{Publisher: r.cfg.Publisher, Backoff: r.backoff, Log: r.log}
	if r.afterPublish != nil {
		eng.AfterPublish = func(o *relaycore.Outcome) { r.afterPublish(entriesOf(&o.Batch), o.Errs) }
	}
	if eos := r.cfg.ExactlyOnce; eos != nil {
		ckpt, err := openExactlyOnce(ctx, eos, r.cfg.Slot, r.log)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("pgcdc: %w", err)
		}
		defer eos.Close()
		snk := exactlyOnceSink{eos, r.log}
		eng.Publish = func(ctx context.Context, b *relaycore.Batch) ([]error, error) { return snk.publish(ctx, entriesOf(b)) }
		r.ckpt = ckpt
		if ckpt != nil {
			r.log.Info("exactly-once checkpoint read from Kafka", "checkpoint", ckpt.String())
		}
	}
	// A server that is restarting or unreachable at start is waited for, as
	// the stream waits for it later: a relay restarted while PostgreSQL is
	// down comes up when PostgreSQL does.
	if err := relaycore.StartRetrying(ctx, r.log, r.backoff, 10*time.Second, func() error { return r.prepare(ctx) }); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-r.fatal:
			cancel()
		case <-runCtx.Done():
		}
	}()
	// Work that must outlive runCtx a little (the batch being published,
	// the writes that finish it) uses stopCtx.
	stopCtx, stopCancel := relaycore.Grace(runCtx, r.cfg.ShutdownTimeout)
	defer stopCancel()

	// The stream feeds the dispatcher, which forms the batches the engine
	// publishes and hands what they confirmed to the writer.
	r.disp = newDispatcher(r)
	var pipeline sync.WaitGroup
	pipeline.Go(func() { r.disp.run(runCtx, stopCtx) })
	pipeline.Go(func() { eng.Run(runCtx, stopCtx, r.disp.out, r.disp) })
	pipeline.Go(func() { r.writeLoop(stopCtx, r.disp.writes) })

	var bg sync.WaitGroup
	bgCtx, bgCancel := context.WithCancel(runCtx)
	bg.Go(func() { r.watchSlot(bgCtx) })
	if r.cfg.HeartbeatInterval > 0 {
		bg.Go(func() { r.heartbeat(bgCtx) })
	}

	conn, err := r.stream(runCtx)
	if err != nil {
		r.fail(err)
	}
	cancel()
	bgCancel()
	bg.Wait()
	pipeline.Wait()
	if conn != nil {
		// The final word: what the shutdown finished.
		if err := conn.status(r.track.position()); err != nil {
			r.log.Warn("could not send the final confirmed position; the slot resumes from the previous one", "err", err)
		}
		conn.close()
	}
	r.log.Info("relay stopped", "published", r.tally.Published.Load(), "confirmed", r.track.position().String())
	select {
	case <-r.fatal:
		return r.fatalErr
	default:
	}
	return nil
}

// dispatch hands a message to the pipeline, waiting while MaxPending
// messages are unfinished. keepAlive runs while it waits.
func (r *Relay) dispatch(ctx context.Context, e *entry, keepAlive func() error) error {
	r.track.add(e.unit)
	if !e.inKafka {
		r.stats.received.Add(1)
	}
	for r.track.pending.Load() > int64(r.cfg.MaxPending) {
		if err := keepAlive(); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	select {
	case r.disp.in <- e:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (r *Relay) backoff(attempt int) time.Duration {
	return exactly.RetryPolicy{InitialBackoff: r.cfg.InitialBackoff, MaxBackoff: r.cfg.MaxBackoff}.Backoff(attempt)
}

// heartbeat writes a non-transactional logical message every
// HeartbeatInterval; its position lets the slot advance while the outbox
// is idle.
func (r *Relay) heartbeat(ctx context.Context) {
	pause.Every(ctx, r.cfg.HeartbeatInterval, func() bool {
		if _, err := r.pool.Exec(ctx, "SELECT pg_logical_emit_message(false, $1, ''::text)", HeartbeatPrefix); err != nil && ctx.Err() == nil {
			r.log.Warn("heartbeat failed", "err", err)
		}
		return true
	})
}

// watchSlot checks the slot every LagInterval: it reports the lag, and
// fails the relay when the slot is gone or invalidated.
func (r *Relay) watchSlot(ctx context.Context) {
	pause.Every(ctx, r.cfg.LagInterval, func() bool {
		if !r.slotUp.Load() {
			// Not set up yet in this Run (the first start creates the slot,
			// a restart checks it): a slot still to be created is not lost.
			return true
		}
		st, err := r.slotState(ctx)
		if err != nil {
			if ctx.Err() == nil {
				r.log.Warn("reading the slot's state failed", "err", err)
			}
			return true
		}
		if err := st.usable(r.cfg.Slot); err != nil {
			r.fail(err)
			return false
		}
		var seconds float64
		if old := r.track.oldest(); !old.IsZero() {
			seconds = max(time.Since(old).Seconds(), 0)
		}
		r.stats.lagBytes.Store(st.lagBytes)
		r.stats.lagSeconds.Store(uint64(seconds * 1000))
		if h := r.cfg.Hooks.Lag; h != nil {
			h(st.lagBytes, seconds)
		}
		return true
	})
}
