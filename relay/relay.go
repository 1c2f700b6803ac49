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

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/ratelog"
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

	stats   counters
	running atomic.Bool
	failLog *ratelog.Limiter // warn-level lines about failed publishes

	// afterPublish, when set (tests only), runs after the broker confirmed a
	// batch and before the rows are marked sent: the crash window.
	afterPublish func(rows []outboxstore.Row)
	// beforeLeaseCheck, when set (tests only), runs when the publish stage
	// takes a batch, before it checks the lease.
	beforeLeaseCheck func()
}

// fullReadEvery bounds how long a pending row below the cursor (a late
// commit, a retry that came due) can wait while the pipeline never empties.
const fullReadEvery = 500 * time.Millisecond

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
	r := &Relay{
		cfg:     c,
		db:      db,
		closeDB: done,
		store:   store,
		log:     c.Logger.With("component", "relay", "table", store.Table.String(), "instance", c.InstanceID),
		wake:    make(chan struct{}, 1),
		order:   newKeyOrder(c.BatchSize, c.StrictOrder),
		failLog: ratelog.New(failureLogEvery),
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

type counters struct {
	published, republished, failed, dead, batches atomic.Int64
	partitions                                    atomic.Int64
}

// Stats returns the running totals.
func (r *Relay) Stats() Stats {
	st := Stats{
		Published: r.stats.published.Load(), Republished: r.stats.republished.Load(),
		Failed: r.stats.failed.Load(), Dead: r.stats.dead.Load(), Batches: r.stats.batches.Load(),
		Partitions: int(r.stats.partitions.Load()),
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

type batch struct {
	rows []outboxstore.Row
	gen  uint64 // the read that returned the rows
}

type result struct {
	rows []outboxstore.Row
	errs []error // per row; nil when confirmed
	took time.Duration
	// outage is set when the publisher failed as a whole (no per-message
	// verdict): the rows are handed back without counting an attempt.
	outage bool
	err    error // the whole-batch error, with outage
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
	for failures := 1; ; failures++ {
		err := r.store.CheckTables(ctx, r.db)
		if err == nil {
			err = r.store.EnsurePartitions(ctx, r.db, r.cfg.Partitions, r.cfg.LeaseTTL)
		}
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		if !sqldb.Transient(err) {
			return fmt.Errorf("relay: %w", err)
		}
		wait := min(r.backoff(failures), 5*time.Second)
		r.log.Warn("database not reachable at start; retrying", "err", err, "in", wait)
		r.sleep(ctx, wait, false)
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
	if r.cfg.Hooks.Backlog != nil || r.cfg.Hooks.Failing != nil {
		bg.Go(func() { r.backlog(bgCtx) })
	}

	pubCh := make(chan batch, 1)
	markCh := make(chan result, 8) // publishing seldom waits for marking
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
	if r.fatal != nil {
		return fmt.Errorf("relay: %w", r.fatal)
	}
	r.log.Info("relay stopped", "published", r.stats.published.Load())
	return nil
}

// fetchLoop reads pending rows and feeds the publisher until ctx ends.
func (r *Relay) fetchLoop(ctx context.Context, pubCh chan<- batch) {
	var nextLease, lastFull time.Time
	backlog := false // the last read returned a full batch
	leaseEvery := r.cfg.LeaseTTL / 3
	dbBackoff := r.cfg.InitialBackoff
	for ctx.Err() == nil {
		if time.Now().After(nextLease) {
			if err := r.maintainLeases(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				if errors.Is(err, outboxstore.ErrPartitionMismatch) {
					r.log.Error("relay stops: partition count changed under it", "err", err)
					r.fatal = err
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

		r.mu.Lock()
		// The wait, the fence check and the read's numbering happen under
		// one hold of the lock, so a fence is either set before this read
		// (which then waits) or covers it (gen <= fence: handed back).
		for r.fencing && len(r.order.inflight) > 0 && ctx.Err() == nil {
			// Batches read before a lease ran out are being handed back:
			// wait for them, so that this read sees their rows again.
			r.drained.Wait()
		}
		if r.fencing {
			// The rows handed back lie below the cursor: read from the
			// start, or the reads from the cursor would pass them by.
			r.order.cursor = 0
			r.fencing = false
		}
		now := time.Now()
		read := r.order.read(now, backlog, lastFull)
		if read.full {
			lastFull = now
		}
		q := outboxstore.FetchQuery{
			Limit: r.cfg.BatchSize, Partitions: r.cfg.Partitions, Owned: r.owned, AllOwned: r.allOwned,
			NowMillis: now.UnixMilli(), Exclude: read.exclude, After: read.after, Blocked: read.blocked,
		}
		r.mu.Unlock()

		rows, err := r.fetch(ctx, q)
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
		backlog = len(rows) == r.cfg.BatchSize

		r.mu.Lock()
		ready, wait, busy := r.order.admit(rows, now, read)
		r.mu.Unlock()
		if len(ready) > 0 {
			select {
			case pubCh <- batch{rows: ready, gen: read.gen}:
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
			// More is waiting (rows held back now are read again by the
			// next full read, which comes next).
		default:
			d := r.cfg.PollInterval
			if wait > 0 && wait < d {
				d = wait
			}
			r.sleep(ctx, d, true)
		}
	}
}

// release forgets rows that left the pipeline. Called with r.mu held.
func (r *Relay) release(rows []outboxstore.Row) {
	r.order.release(rows)
	r.drained.Broadcast()
}

// handBack returns rows that were admitted but will not be published now.
func (r *Relay) handBack(rows []outboxstore.Row) {
	r.mu.Lock()
	r.order.rescan = true
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

// publishDepth is how many Publish calls may run at once. Above 1, a batch
// starts while an earlier one awaits its acks only when the two share no
// key, so every key's messages are still handed to the broker in order.
// It is 1: the Publisher contract does not ask publishers to take
// concurrent calls, and with the default BatchSize consecutive batches
// usually share keys anyway (measured: no gain at 2000 rows and 1,000 keys;
// +7% at 500 rows, less than the larger batch gives).
const publishDepth = 1

// publishing is a batch handed to the Publisher and not yet finished.
type publishing struct {
	rows []outboxstore.Row
	keys map[string]struct{}
	done chan result
}

// publishLoop publishes batches, up to publishDepth at once when their keys
// are disjoint, and hands their outcomes to the mark stage in batch order.
// After ctx is cancelled it starts no new batch: queued rows are handed back
// and stay pending.
func (r *Relay) publishLoop(ctx, stopCtx context.Context, pubCh <-chan batch, markCh chan<- result) {
	defer close(markCh)
	outages := 0 // consecutive whole-batch failures
	var queue []*publishing
	// pass hands the outcome of the oldest batch on to the mark stage.
	pass := func(res result) {
		queue = queue[1:]
		if res.outage {
			outages++
			wait := r.backoff(outages)
			r.log.Warn("publisher failed for the whole batch; retrying", "err", res.err, "messages", len(res.rows), "in", wait)
			markCh <- res
			select {
			case <-time.After(wait):
			case <-ctx.Done():
			}
			return
		}
		outages = 0
		if r.afterPublish != nil {
			r.afterPublish(res.rows)
		}
		markCh <- res
	}
	defer func() {
		for len(queue) > 0 {
			pass(<-queue[0].done)
		}
	}()
	for {
		var oldest chan result
		if len(queue) > 0 {
			oldest = queue[0].done
		}
		var b batch
		select {
		case res := <-oldest:
			pass(res)
			continue
		case next, ok := <-pubCh:
			if !ok {
				return
			}
			b = next
		}
		keys := make(map[string]struct{}, len(b.rows))
		for i := range b.rows {
			if k := b.rows[i].Msg.Key; k != "" {
				keys[k] = struct{}{}
			}
		}
		for len(queue) > 0 && (len(queue) >= publishDepth || outages > 0 || sharesKey(queue, keys)) {
			pass(<-queue[0].done)
		}
		if ctx.Err() != nil {
			r.handBack(b.rows)
			continue
		}
		if r.beforeLeaseCheck != nil {
			r.beforeLeaseCheck()
		}
		r.mu.Lock()
		fenced := b.gen <= r.fence
		r.mu.Unlock()
		if fenced {
			// Read before an earlier batch was handed back: it may hold
			// later messages of that batch's keys. Published now, they would
			// overtake them.
			r.handBack(b.rows)
			continue
		}
		if time.Now().UnixNano() > r.leaseUntil.Load() {
			// This relay stalled past its lease (a pause, a hung call): the
			// rows may be another relay's now. Leave them to their owner,
			// and the batches read after them too (see fence).
			r.log.Warn("lease expired before the batch was published; handing it back", "messages", len(b.rows))
			r.mu.Lock()
			r.fence, r.fencing = r.order.fetchGen, true
			r.order.rescan = true
			r.release(b.rows)
			r.mu.Unlock()
			continue
		}
		p := &publishing{rows: b.rows, keys: keys, done: make(chan result, 1)}
		queue = append(queue, p)
		go func() { p.done <- r.publish(stopCtx, p.rows) }()
	}
}

func sharesKey(queue []*publishing, keys map[string]struct{}) bool {
	for _, p := range queue {
		small, large := p.keys, keys
		if len(small) > len(large) {
			small, large = large, small
		}
		for k := range small {
			if _, ok := large[k]; ok {
				return true
			}
		}
	}
	return false
}

// publish hands one batch to the Publisher and sorts out the outcome.
func (r *Relay) publish(ctx context.Context, rows []outboxstore.Row) result {
	msgs := make([]*exactly.Message, len(rows))
	for i := range rows {
		msgs[i] = &rows[i].Msg
	}
	start := time.Now()
	err := r.cfg.Publisher.Publish(ctx, msgs)
	res := result{rows: rows, took: time.Since(start)}
	res.errs, res.err = exactly.Verdicts(err, len(msgs))
	res.outage = res.err != nil
	return res
}

// markLoop records the outcome of each batch in the table, in batch order.
// The results waiting when it gets to them are recorded together: one
// statement marks all their confirmed rows, which keeps marking off the
// critical path at low rates (one message per batch) as well as high ones.
func (r *Relay) markLoop(ctx context.Context, markCh <-chan result) {
	for res := range markCh {
		group := []result{res}
	more:
		for len(group) < maxMarkGroup {
			select {
			case res, ok := <-markCh:
				if !ok {
					break more
				}
				group = append(group, res)
			default:
				break more
			}
		}
		r.mark(ctx, group)
	}
}

// maxMarkGroup bounds how many batches one mark records.
const maxMarkGroup = 64

type hookCall struct {
	msg     *exactly.Message
	attempt int
	err     error
	dead    bool
	next    time.Time // the next attempt, when not dead
}

// markPlan is what the outcome of one batch does to the table.
type markPlan struct {
	sent     []int64
	sentMsgs []*exactly.Message
	fails    []outboxstore.Failure
	calls    []hookCall
	retry    bool // something is left pending: the fetcher must look again
}

// plan decides the fate of each row of one batch, in batch order, and
// updates the held-back keys. Called with r.mu held, for the batches in the
// order they were published.
func (r *Relay) plan(res result, now time.Time) markPlan {
	var p markPlan
	heldBack := map[string]bool{} // keys with an earlier unconfirmed row in this batch
	for i := range res.rows {
		row := &res.rows[i]
		key := row.Msg.Key
		err := res.errs[i]
		if key != "" && (heldBack[key] || r.order.heldBehind(key, row.Seq)) {
			// An earlier message of this key is not confirmed: leave this one
			// pending so it is published again after that one.
			if err == nil {
				r.stats.republished.Add(1)
			}
			p.retry = true
			continue
		}
		if err == nil {
			p.sent = append(p.sent, row.Seq)
			p.sentMsgs = append(p.sentMsgs, &row.Msg)
			r.order.done(key, row.Seq)
			continue
		}
		p.retry = true
		if res.outage {
			if key != "" {
				heldBack[key] = true
				r.order.hold(row, now.Add(r.cfg.InitialBackoff))
			}
			continue
		}
		attempt := row.Attempts + 1
		f := outboxstore.Failure{Seq: row.Seq, Attempts: attempt, Err: err.Error()}
		if attempt >= r.cfg.MaxAttempts || errors.Is(err, exactly.ErrUnpublishable) {
			f.Dead = true
			r.order.done(key, row.Seq)
		} else {
			next := now.Add(r.backoff(attempt))
			f.NextAttemptAt = next.UnixMilli()
			if key != "" {
				heldBack[key] = true
				r.order.hold(row, next)
			}
		}
		p.fails = append(p.fails, f)
		p.calls = append(p.calls, hookCall{&row.Msg, attempt, err, f.Dead, time.UnixMilli(f.NextAttemptAt)})
	}
	return p
}

// mark records the outcome of the batches of group, published in that
// order: one statement removes (or marks sent) every confirmed row, one
// transaction records the failures.
func (r *Relay) mark(ctx context.Context, group []result) {
	now := time.Now()
	plans := make([]markPlan, len(group))
	var sent []int64
	var fails []outboxstore.Failure
	retry := false
	r.mu.Lock()
	for i, res := range group {
		plans[i] = r.plan(res, now)
		sent = append(sent, plans[i].sent...)
		fails = append(fails, plans[i].fails...)
		retry = retry || plans[i].retry || res.outage
	}
	r.mu.Unlock()

	if err := r.markSent(ctx, sent, now.UnixMilli()); err != nil {
		// Not marked: the rows stay pending and go out again with the same
		// ids. At-least-once, never lost.
		r.log.Error("marking rows sent failed; they will be published again", "err", err, "rows", len(sent))
		retry = true
	} else {
		r.stats.published.Add(int64(len(sent)))
		for i, p := range plans {
			if len(p.sent) == 0 {
				continue
			}
			r.stats.batches.Add(1)
			if h := r.cfg.Hooks.Published; h != nil {
				h(p.sentMsgs, group[i].took)
			}
		}
	}
	if err := r.recordFailures(ctx, fails, now.UnixMilli()); err != nil {
		r.log.Error("recording failed publishes failed; they will be retried", "err", err, "rows", len(fails))
	}
	for _, p := range plans {
		for _, c := range p.calls {
			if c.dead {
				r.stats.dead.Add(1)
				r.log.Warn("message parked as dead", "id", c.msg.ID, "topic", c.msg.Topic, "key", c.msg.Key, "attempts", c.attempt, "err", c.err)
				if h := r.cfg.Hooks.Dead; h != nil {
					h(c.msg, c.err)
				}
			} else {
				r.stats.failed.Add(1)
				r.logFailure(c, now)
				if h := r.cfg.Hooks.Failed; h != nil {
					h(c.msg, c.attempt, c.err)
				}
			}
		}
	}

	r.mu.Lock()
	if retry {
		r.order.rescan = true // rows left pending lie below the cursor
	}
	for _, res := range group {
		r.release(res.rows)
	}
	r.mu.Unlock()
	if retry || r.cfg.StrictOrder {
		r.Wake() // re-read: rows held back can go now
	}
}

// failureLogEvery is how often, at most, a failed publish is logged at warn
// level per topic; the first failure of a topic is logged at once, and each
// line counts the failures of the topic left out since the one before.
const failureLogEvery = time.Minute

// logFailure logs a failed publish that will be retried: at warn level,
// rate-limited per topic (a topic with no stream or no permission fails
// every message and every retry), and at debug level every time.
func (r *Relay) logFailure(c hookCall, now time.Time) {
	ok, suppressed := r.failLog.Allow(c.msg.Topic, now)
	if !ok {
		r.log.Debug("publish failed; will retry", "id", c.msg.ID, "topic", c.msg.Topic, "key", c.msg.Key, "attempt", c.attempt, "err", c.err)
		return
	}
	attrs := []any{"topic", c.msg.Topic, "key", c.msg.Key, "id", c.msg.ID, "attempt", c.attempt, "max_attempts", r.cfg.MaxAttempts,
		"next_attempt_in", c.next.Sub(now).Round(time.Millisecond), "err", c.err}
	if suppressed > 0 {
		attrs = append(attrs, "suppressed", suppressed)
	}
	msg := "publish failed; will retry"
	if c.msg.Key != "" {
		msg = "publish failed; the key's later messages wait for its retry"
	}
	r.log.Warn(msg, attrs...)
}

// fetch reads pending rows: through pgx on PostgreSQL, database/sql
// elsewhere.
func (r *Relay) fetch(ctx context.Context, q outboxstore.FetchQuery) (rows []outboxstore.Row, err error) {
	if r.store.D != sqldb.Postgres {
		return r.store.Fetch(ctx, r.db, q)
	}
	err = r.withPg(ctx, func(c outboxstore.PgxConn) error {
		rows, err = r.store.FetchPgx(ctx, c, q)
		return err
	})
	return rows, err
}

// markSent removes (or marks sent) the confirmed rows. On PostgreSQL the
// transaction commits with synchronous_commit off: see "Marking" in the
// package documentation.
func (r *Relay) markSent(ctx context.Context, seqs []int64, nowMillis int64) error {
	retain := r.cfg.Retention > 0
	if r.store.D != sqldb.Postgres {
		return r.store.MarkSent(ctx, r.db, seqs, retain, nowMillis)
	}
	if len(seqs) == 0 {
		return nil
	}
	return r.withPg(ctx, func(c outboxstore.PgxConn) error {
		return r.store.MarkSentPgx(ctx, c, seqs, retain, nowMillis, true)
	})
}

func (r *Relay) recordFailures(ctx context.Context, fs []outboxstore.Failure, nowMillis int64) error {
	if r.store.D != sqldb.Postgres {
		return r.store.RecordFailures(ctx, r.db, fs, nowMillis)
	}
	if len(fs) == 0 {
		return nil
	}
	return r.withPg(ctx, func(c outboxstore.PgxConn) error {
		return r.store.RecordFailuresPgx(ctx, c, fs, nowMillis)
	})
}

// withPg runs fn on pgx: the user's pool, or one connection of the *sql.DB
// (from the pgx driver, checked in New) unwrapped to its pgx.Conn.
func (r *Relay) withPg(ctx context.Context, fn func(outboxstore.PgxConn) error) error {
	if r.pgPool != nil {
		return fn(r.pgPool)
	}
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

func (r *Relay) backoff(attempt int) time.Duration {
	return exactly.RetryPolicy{InitialBackoff: r.cfg.InitialBackoff, MaxBackoff: r.cfg.MaxBackoff}.Backoff(attempt)
}

// waitDrained blocks until no batch is in flight.
func (r *Relay) waitDrained() {
	r.mu.Lock()
	for len(r.order.inflight) > 0 {
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
	live, parts, err := r.store.Heartbeat(ctx, r.db, r.cfg.InstanceID, r.cfg.LeaseTTL)
	if err != nil {
		return err
	}
	if parts != r.cfg.Partitions {
		// Another relay grew the table: the two counts map keys to
		// partitions differently, so this relay and the new ones could
		// publish the same key at once. Stop taking work.
		return fmt.Errorf("%w: %s now has %d partitions, this relay runs with %d; restart it with Partitions = %d",
			outboxstore.ErrPartitionMismatch, r.store.LeaseTable(), parts, r.cfg.Partitions, parts)
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
	if !slices.Equal(held, r.owned) {
		r.mu.Lock()
		r.order.rescan = true // rows of new partitions may lie below the cursor
		for _, p := range held {
			if !slices.Contains(r.owned, p) {
				r.order.cursorStale = true
				break
			}
		}
		r.mu.Unlock()
	}
	r.owned = held
	r.allOwned = len(held) == r.cfg.Partitions
	r.stats.partitions.Store(int64(len(held)))
	// Forget held-back keys of partitions now elsewhere: their new owner
	// reads the backoff from the table.
	r.mu.Lock()
	if !r.allOwned {
		r.order.forget(func(key string) bool {
			return !slices.Contains(held, int64(outboxstore.KeyHash(&exactly.Message{Key: key})%int32(r.cfg.Partitions)))
		})
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
			if h := r.cfg.Hooks.Backlog; h != nil {
				h(st.Pending, st.OldestAge)
			}
			if h := r.cfg.Hooks.Failing; h != nil {
				rs := r.Stats()
				h(FailingReport{Table: st.Failing, BlockedKeys: rs.BlockedKeys, OldestBlocked: rs.OldestBlocked})
			}
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
