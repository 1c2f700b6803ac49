package relay

import (
	"context"
	"errors"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/relaycore"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// fullReadEvery bounds how long a pending row below the cursor (a late
// commit, a retry that came due) can wait while the pipeline never empties.
const fullReadEvery = 500 * time.Millisecond

// fetchLoop reads pending rows and feeds the publisher until ctx ends.
func (r *Relay) fetchLoop(ctx context.Context, pubCh chan<- relaycore.Batch) {
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
			Parked: r.parkedAtFetch,
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
		ready, wait, busy, resume := r.order.admit(rows, now, read)
		r.mu.Unlock()
		if len(ready) > 0 {
			b := newBatch(ready, read.gen, resume)
			select {
			case pubCh <- b:
			case <-ctx.Done():
				r.handBack(&b)
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

// release forgets rows that left the pipeline. Called with r.mu held.
func (r *Relay) release(rows []outboxstore.Row) {
	r.order.release(rows)
	r.drained.Broadcast()
}

// handBack returns a batch that was admitted but will not be published
// now.
func (r *Relay) handBack(b *relaycore.Batch) {
	r.mu.Lock()
	r.order.rescan = true
	r.unresume(b)
	r.release(rowsOf(b))
	r.mu.Unlock()
}

// unresume marks paused again the keys b was to resume: it was not sent.
// Called with r.mu held.
func (r *Relay) unresume(b *relaycore.Batch) {
	for _, i := range b.Resume {
		r.order.failed(b.Msgs[i].Key)
	}
}

// parkedAtFetch counts, logs and reports as dead the rows the store parked
// while reading because they cannot be published as stored (headers a
// plain-SQL writer stored that are not a JSON object of strings): they
// never reach the Publisher, and are re-drivable like any dead message.
func (r *Relay) parkedAtFetch(rows []outboxstore.Row) {
	for i := range rows {
		r.tally.Parked(&rows[i].Msg, rows[i].Attempts, exactly.Unpublishable(errors.New(outboxstore.ParkedReason(rows[i].Bad))))
	}
}
