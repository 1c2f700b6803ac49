package relay

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// Relay moves committed outbox rows to a Publisher. Create it with New and
// start it with Run.
type Relay struct {
	cfg     Config
	db      *sql.DB
	closeDB func() // releases db's adapter when it wraps a pgxpool
	store   *outboxstore.Store
	log     *slog.Logger
	wake    chan struct{}

	mu       sync.Mutex
	inflight map[int64]struct{}
	keysBusy map[string]int // rows in flight per key (StrictOrder)
	blocks   map[string]*block
	drained  *sync.Cond // signalled whenever inflight shrinks

	owned    []int64 // partitions held; only the Run goroutine writes it
	allOwned bool
	// leaseUntil (Unix ns, local clock) is when the leases renewed last
	// expire, less a margin. A batch is not published after it: the
	// partitions may belong to another relay by then.
	leaseUntil atomic.Int64

	stats   counters
	running atomic.Bool

	// afterPublish, when set (tests only), runs after the broker confirmed a
	// batch and before the rows are marked sent: the crash window.
	afterPublish func(rows []outboxstore.Row)
}

// block holds back a key whose message at seq failed: later messages of the
// key wait until that one is confirmed or parked, so the key stays in order.
type block struct {
	seq      int64
	until    time.Time
	released bool // the retry is under way; rows after it may flow again
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
	store := c.Outbox.Store()
	if store.D == sqldb.Postgres && !sqldb.IsPgx(db) {
		done()
		return nil, errors.New("relay: on PostgreSQL the database handle must come from pgx (pgxpool.Pool, or sql.Open(\"pgx\", dsn))")
	}
	r := &Relay{
		cfg:      c,
		db:       db,
		closeDB:  done,
		store:    store,
		log:      c.Logger.With("component", "relay", "table", store.Table.String(), "instance", c.InstanceID),
		wake:     make(chan struct{}, 1),
		inflight: map[int64]struct{}{},
		keysBusy: map[string]int{},
		blocks:   map[string]*block{},
	}
	r.drained = sync.NewCond(&r.mu)
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
}

type counters struct {
	published, republished, failed, dead, batches atomic.Int64
	partitions                                    atomic.Int64
}

// Stats returns the running totals.
func (r *Relay) Stats() Stats {
	return Stats{
		Published: r.stats.published.Load(), Republished: r.stats.republished.Load(),
		Failed: r.stats.failed.Load(), Dead: r.stats.dead.Load(), Batches: r.stats.batches.Load(),
		Partitions: int(r.stats.partitions.Load()),
	}
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

type batch struct {
	rows []outboxstore.Row
}

type result struct {
	rows []outboxstore.Row
	errs []error // per row; nil when confirmed
	took time.Duration
	// outage is set when the publisher failed as a whole (no per-message
	// verdict): the rows are handed back without counting an attempt.
	outage bool
}

// Run publishes until ctx is cancelled, then finishes or hands back the batch
// in flight and returns nil. It returns an error only when it cannot start
// (tables missing, partition mismatch).
//
// A Relay runs once: Run closes what New opened when it returns.
func (r *Relay) Run(ctx context.Context) error {
	if !r.running.CompareAndSwap(false, true) {
		return errors.New("relay: Run called twice")
	}
	defer r.closeDB()
	if err := r.store.CheckTables(ctx, r.db); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("relay: %w", err)
	}
	if err := r.store.EnsurePartitions(ctx, r.db, r.cfg.Partitions); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("relay: %w", err)
	}
	// Work that must outlive ctx a little (finishing the in-flight batch)
	// uses stopCtx, cancelled ShutdownTimeout after ctx.
	stopCtx, stopCancel := context.WithCancel(context.WithoutCancel(ctx))
	defer stopCancel()
	go func() {
		<-ctx.Done()
		t := time.NewTimer(r.cfg.ShutdownTimeout)
		defer t.Stop()
		select {
		case <-t.C:
			stopCancel()
		case <-stopCtx.Done():
		}
	}()

	var bg sync.WaitGroup
	bgCtx, bgCancel := context.WithCancel(ctx)
	defer func() { bgCancel(); bg.Wait() }()
	if r.store.D == sqldb.Postgres {
		bg.Go(func() { r.listen(bgCtx) })
	}
	if r.cfg.Retention > 0 {
		bg.Go(func() { r.retain(bgCtx) })
	}
	if r.cfg.Hooks.Backlog != nil {
		bg.Go(func() { r.backlog(bgCtx) })
	}

	pubCh := make(chan batch, 1)
	markCh := make(chan result, 1)
	var workers sync.WaitGroup
	workers.Go(func() { r.publishLoop(ctx, stopCtx, pubCh, markCh) })
	workers.Go(func() { r.markLoop(stopCtx, markCh) })

	r.fetchLoop(ctx, pubCh)
	close(pubCh)
	workers.Wait()

	leaveCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := r.store.Leave(leaveCtx, r.db, r.cfg.InstanceID); err != nil {
		r.log.Warn("could not release partitions on shutdown; they free up when their lease expires", "err", err)
	}
	r.log.Info("relay stopped", "published", r.stats.published.Load())
	return nil
}

// fetchLoop reads pending rows and feeds the publisher until ctx ends.
func (r *Relay) fetchLoop(ctx context.Context, pubCh chan<- batch) {
	var nextLease time.Time
	leaseEvery := r.cfg.LeaseTTL / 3
	dbBackoff := r.cfg.InitialBackoff
	for ctx.Err() == nil {
		if time.Now().After(nextLease) {
			if err := r.maintainLeases(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				r.log.Error("lease maintenance failed; retrying", "err", err)
				nextLease = time.Now().Add(min(leaseEvery, time.Second))
			} else {
				nextLease = time.Now().Add(leaseEvery)
			}
		}
		if len(r.owned) == 0 || time.Now().UnixNano() > r.leaseUntil.Load() {
			// Nothing held, or the leases could not be renewed in time.
			r.sleep(ctx, min(leaseEvery, r.cfg.PollInterval*4), false)
			continue
		}

		now := time.Now()
		q := outboxstore.FetchQuery{
			Limit: r.cfg.BatchSize, Partitions: r.cfg.Partitions, Owned: r.owned, AllOwned: r.allOwned,
			NowMillis: now.UnixMilli(),
		}
		r.mu.Lock()
		q.Exclude = make([]int64, 0, len(r.inflight))
		for seq := range r.inflight {
			q.Exclude = append(q.Exclude, seq)
		}
		for k, b := range r.blocks {
			if !b.released && now.Before(b.until) {
				q.Blocked = append(q.Blocked, k)
			}
		}
		r.mu.Unlock()

		rows, err := r.store.Fetch(ctx, r.db, q)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			r.log.Error("reading the outbox failed; retrying", "err", err, "in", dbBackoff)
			r.sleep(ctx, dbBackoff, false)
			dbBackoff = min(dbBackoff*2, 30*time.Second)
			continue
		}
		dbBackoff = r.cfg.InitialBackoff

		ready, wait, busy := r.admit(rows, now)
		if len(ready) > 0 {
			select {
			case pubCh <- batch{rows: ready}:
			case <-ctx.Done():
				r.handBack(ready)
				return
			}
		}
		switch {
		case len(ready) == 0 && busy:
			// Every row waits for a message of its key in flight: the mark
			// stage wakes us when that one is done.
			r.sleep(ctx, r.cfg.PollInterval, true)
		case len(rows) == r.cfg.BatchSize:
			// More is waiting (rows held back now are excluded next time).
		default:
			d := r.cfg.PollInterval
			if wait > 0 && wait < d {
				d = wait
			}
			r.sleep(ctx, d, true)
		}
	}
}

// admit picks the rows that may go now, in seq order, and marks them in
// flight. It returns how long until the earliest held-back key is due, and
// whether rows were held back behind a message of their key in flight.
func (r *Relay) admit(rows []outboxstore.Row, now time.Time) (_ []outboxstore.Row, _ time.Duration, busy bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ready := rows[:0:0]
	var wait time.Duration
	due := func(t time.Time) {
		if d := t.Sub(now); d > 0 && (wait == 0 || d < wait) {
			wait = d
		}
	}
	for _, row := range rows {
		notBefore := time.UnixMilli(row.NextAttemptAt)
		key := row.Msg.Key
		if key == "" {
			if now.Before(notBefore) { // the query leaves these out; a clock step may not
				due(notBefore)
				continue
			}
		} else if b, ok := r.blocks[key]; ok {
			switch {
			case b.released:
				// retry under way: later rows follow it in order
			case now.Before(b.until):
				due(b.until)
				continue
			case row.Seq == b.seq:
				b.released = true
			case row.Seq > b.seq:
				if _, busy := r.inflight[b.seq]; busy {
					// The held row's failure is still being recorded.
					continue
				}
				// The held row is no longer pending (parked, or purged by an
				// operator): the key is free again.
				delete(r.blocks, key)
			default: // row.Seq < b.seq: an earlier row is due first
				if now.Before(notBefore) {
					b.seq, b.until = row.Seq, notBefore
					due(notBefore)
					continue
				}
			}
		} else if now.Before(notBefore) {
			r.blocks[key] = &block{seq: row.Seq, until: notBefore}
			due(notBefore)
			continue
		}
		if r.cfg.StrictOrder && key != "" {
			if r.keysBusy[key] > 0 {
				busy = true
				continue // the next fetch after its predecessor is marked takes it
			}
			r.keysBusy[key]++
		}
		ready = append(ready, row)
		r.inflight[row.Seq] = struct{}{}
	}
	return ready, wait, busy
}

// release forgets rows that left the pipeline. Called with r.mu held.
func (r *Relay) release(rows []outboxstore.Row) {
	for _, row := range rows {
		delete(r.inflight, row.Seq)
		if b, ok := r.blocks[row.Msg.Key]; ok && b.seq == row.Seq {
			b.released = false
		}
		if r.cfg.StrictOrder && row.Msg.Key != "" {
			if r.keysBusy[row.Msg.Key]--; r.keysBusy[row.Msg.Key] <= 0 {
				delete(r.keysBusy, row.Msg.Key)
			}
		}
	}
	r.drained.Broadcast()
}

// handBack returns rows that were admitted but will not be published now.
func (r *Relay) handBack(rows []outboxstore.Row) {
	r.mu.Lock()
	r.release(rows)
	r.mu.Unlock()
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

// publishLoop publishes batches in order. After ctx is cancelled it starts no
// new batch: queued rows are handed back and stay pending.
func (r *Relay) publishLoop(ctx, stopCtx context.Context, pubCh <-chan batch, markCh chan<- result) {
	defer close(markCh)
	outages := 0 // consecutive whole-batch failures
	for b := range pubCh {
		if ctx.Err() != nil {
			r.handBack(b.rows)
			continue
		}
		if time.Now().UnixNano() > r.leaseUntil.Load() {
			// This relay stalled past its lease (a pause, a hung call): the
			// rows may be another relay's now. Leave them to their owner.
			r.log.Warn("lease expired before the batch was published; handing it back", "messages", len(b.rows))
			r.handBack(b.rows)
			continue
		}
		msgs := make([]*exactly.Message, len(b.rows))
		for i := range b.rows {
			msgs[i] = &b.rows[i].Msg
		}
		start := time.Now()
		err := r.cfg.Publisher.Publish(stopCtx, msgs)
		res := result{rows: b.rows, took: time.Since(start)}
		var be *exactly.BatchError
		if err != nil && !errors.As(err, &be) && !(len(msgs) == 1 && errors.Is(err, exactly.ErrUnpublishable)) {
			res.outage = true
			outages++
			wait := r.backoff(outages)
			r.log.Warn("publisher failed for the whole batch; retrying", "err", err, "messages", len(msgs), "in", wait)
			res.errs = exactly.PerMessage(err, len(msgs))
			markCh <- res
			select {
			case <-time.After(wait):
			case <-ctx.Done():
			}
			continue
		}
		outages = 0
		res.errs = exactly.PerMessage(err, len(msgs))
		if r.afterPublish != nil {
			r.afterPublish(b.rows)
		}
		markCh <- res
	}
}

// markLoop records the outcome of each batch in the table, in batch order.
func (r *Relay) markLoop(ctx context.Context, markCh <-chan result) {
	for res := range markCh {
		r.mark(ctx, res)
	}
}

func (r *Relay) mark(ctx context.Context, res result) {
	now := time.Now()
	var sent []int64
	var sentMsgs []*exactly.Message
	var fails []outboxstore.Failure
	type hookCall struct {
		msg     *exactly.Message
		attempt int
		err     error
		dead    bool
	}
	var calls []hookCall
	heldBack := map[string]bool{} // keys with an earlier unconfirmed row in this batch

	r.mu.Lock()
	for i := range res.rows {
		row := &res.rows[i]
		key := row.Msg.Key
		err := res.errs[i]
		b := r.blocks[key]
		if key != "" && (heldBack[key] || (b != nil && b.seq < row.Seq)) {
			// An earlier message of this key is not confirmed: leave this one
			// pending so it is published again after that one.
			if err == nil {
				r.stats.republished.Add(1)
			}
			continue
		}
		if err == nil {
			sent = append(sent, row.Seq)
			sentMsgs = append(sentMsgs, &row.Msg)
			if b != nil && b.seq == row.Seq {
				delete(r.blocks, key)
			}
			continue
		}
		if res.outage {
			if key != "" {
				heldBack[key] = true
				r.blocks[key] = &block{seq: row.Seq, until: now.Add(r.cfg.InitialBackoff)}
			}
			continue
		}
		attempt := row.Attempts + 1
		f := outboxstore.Failure{Seq: row.Seq, Attempts: attempt, Err: err.Error()}
		if attempt >= r.cfg.MaxAttempts || errors.Is(err, exactly.ErrUnpublishable) {
			f.Dead = true
			if b != nil && b.seq == row.Seq {
				delete(r.blocks, key)
			}
		} else {
			next := now.Add(r.backoff(attempt))
			f.NextAttemptAt = next.UnixMilli()
			if key != "" {
				heldBack[key] = true
				r.blocks[key] = &block{seq: row.Seq, until: next}
			}
		}
		fails = append(fails, f)
		calls = append(calls, hookCall{&row.Msg, attempt, err, f.Dead})
	}
	r.mu.Unlock()

	if err := r.store.MarkSent(ctx, r.db, sent, r.cfg.Retention > 0, now.UnixMilli()); err != nil {
		// Not marked: the rows stay pending and go out again with the same
		// ids. At-least-once, never lost.
		r.log.Error("marking rows sent failed; they will be published again", "err", err, "rows", len(sent))
	} else if len(sent) > 0 {
		r.stats.published.Add(int64(len(sent)))
		r.stats.batches.Add(1)
		if h := r.cfg.Hooks.Published; h != nil {
			h(sentMsgs, res.took)
		}
	}
	if err := r.store.RecordFailures(ctx, r.db, fails, now.UnixMilli()); err != nil {
		r.log.Error("recording failed publishes failed; they will be retried", "err", err, "rows", len(fails))
	}
	for _, c := range calls {
		if c.dead {
			r.stats.dead.Add(1)
			r.log.Warn("message parked as dead", "id", c.msg.ID, "topic", c.msg.Topic, "key", c.msg.Key, "attempts", c.attempt, "err", c.err)
			if h := r.cfg.Hooks.Dead; h != nil {
				h(c.msg, c.err)
			}
		} else {
			r.stats.failed.Add(1)
			r.log.Debug("publish failed; will retry", "id", c.msg.ID, "attempt", c.attempt, "err", c.err)
			if h := r.cfg.Hooks.Failed; h != nil {
				h(c.msg, c.attempt, c.err)
			}
		}
	}

	r.mu.Lock()
	r.release(res.rows)
	r.mu.Unlock()
	if len(fails) > 0 || res.outage || r.cfg.StrictOrder {
		r.Wake() // re-read: rows held back can go now
	}
}

func (r *Relay) backoff(attempt int) time.Duration {
	return exactly.RetryPolicy{InitialBackoff: r.cfg.InitialBackoff, MaxBackoff: r.cfg.MaxBackoff}.Backoff(attempt)
}

// waitDrained blocks until no batch is in flight.
func (r *Relay) waitDrained() {
	r.mu.Lock()
	for len(r.inflight) > 0 {
		r.drained.Wait()
	}
	r.mu.Unlock()
}

// maintainLeases heartbeats, renews the partitions held, takes a fair share
// of the free ones and gives back any above it. Partitions are given back
// only when nothing is in flight, so their rows are never published by two
// relays at once because of a hand-over.
func (r *Relay) maintainLeases(ctx context.Context) error {
	// Leases renewed now run until at least start+TTL on the database clock;
	// count from before the round trips, less a margin for clock rate.
	start := time.Now()
	live, err := r.store.Heartbeat(ctx, r.db, r.cfg.InstanceID, r.cfg.LeaseTTL)
	if err != nil {
		return err
	}
	held, err := r.store.Renew(ctx, r.db, r.cfg.InstanceID, r.cfg.LeaseTTL)
	if err != nil {
		return err
	}
	r.leaseUntil.Store(start.Add(r.cfg.LeaseTTL - r.cfg.LeaseTTL/10).UnixNano())
	live = max(live, 1)
	share := (r.cfg.Partitions + live - 1) / live
	switch {
	case len(held) < share:
		got, err := r.store.Acquire(ctx, r.db, r.cfg.InstanceID, share-len(held), r.cfg.LeaseTTL)
		held = append(held, got...)
		slices.Sort(held)
		if err != nil {
			r.setOwned(held)
			return err
		}
	case len(held) > share:
		extra := held[share:]
		held = held[:share]
		r.setOwned(held) // stop fetching them
		r.waitDrained()
		if err := r.store.Release(ctx, r.db, r.cfg.InstanceID, extra); err != nil {
			return err
		}
		r.log.Info("released partitions to other relays", "released", len(extra), "held", len(held), "relays", live)
	}
	r.setOwned(held)
	return nil
}

func (r *Relay) setOwned(held []int64) {
	if len(held) != len(r.owned) {
		r.log.Debug("partitions held", "count", len(held), "of", r.cfg.Partitions)
	}
	r.owned = held
	r.allOwned = len(held) == r.cfg.Partitions
	r.stats.partitions.Store(int64(len(held)))
	// Forget held-back keys of partitions now elsewhere: their new owner
	// reads the backoff from the table.
	r.mu.Lock()
	for k, b := range r.blocks {
		if !b.released && !r.allOwned && !slices.Contains(held, int64(outboxstore.KeyHash(&exactly.Message{Key: k})%int32(r.cfg.Partitions))) {
			delete(r.blocks, k)
		}
	}
	r.mu.Unlock()
}

// retain deletes sent rows older than Retention, in small batches.
func (r *Relay) retain(ctx context.Context) {
	every := min(max(r.cfg.Retention/4, time.Second), time.Minute)
	for {
		cutoff := time.Now().Add(-r.cfg.Retention).UnixMilli()
		for ctx.Err() == nil {
			n, err := r.store.DeleteSentBefore(ctx, r.db, cutoff, 5000)
			if err != nil {
				if ctx.Err() == nil {
					r.log.Warn("deleting old sent rows failed", "err", err)
				}
				break
			}
			if n < 5000 {
				break
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

func (r *Relay) backlog(ctx context.Context) {
	for {
		st, err := r.store.Backlog(ctx, r.db)
		if err == nil {
			r.cfg.Hooks.Backlog(st.Pending, st.OldestAge)
		} else if ctx.Err() == nil {
			r.log.Warn("reading the backlog failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(r.cfg.Hooks.BacklogInterval):
		}
	}
}
