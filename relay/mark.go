package relay

import (
	"context"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/relaycore"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

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
func (r *Relay) plan(res *relaycore.Outcome, now time.Time) markPlan {
	var p markPlan
	rows := rowsOf(&res.Batch)
	if res.Outage != nil {
		// No verdict on any message: each key waits InitialBackoff behind
		// its first row, and no attempt is counted.
		p.retry = true
		heldBack := map[string]bool{}
		for i := range rows {
			row := &rows[i]
			r.order.failed(row.Msg.Key)
			if key := row.Msg.Key; key != "" && !heldBack[key] && !r.order.heldBehind(key, row.Seq) {
				heldBack[key] = true
				r.order.hold(row, now.Add(r.cfg.InitialBackoff))
			}
		}
		return p
	}
	j := relaycore.NewJudge(r.cfg.MaxAttempts, r.backoff, now)
	for i := range rows {
		row := &rows[i]
		key := row.Msg.Key
		err := res.Errs[i]
		if err != nil {
			r.order.failed(key)
		}
		v := j.Of(key, row.Attempts, err, key != "" && r.order.heldBehind(key, row.Seq))
		switch v.Kind {
		case relaycore.Behind:
			// Left pending, to be published again after the earlier one.
			if err == nil {
				r.tally.Republished.Add(1)
			}
			p.retry = true
		case relaycore.Confirmed:
			p.sent = append(p.sent, row.Seq)
			p.sentMsgs = append(p.sentMsgs, &row.Msg)
			r.order.done(key, row.Seq)
		case relaycore.Retry, relaycore.Park:
			p.retry = true
			f := outboxstore.Failure{Seq: row.Seq, Attempts: v.Attempt, Err: err.Error(), Dead: v.Kind == relaycore.Park}
			if f.Dead {
				r.order.done(key, row.Seq)
			} else {
				f.NextAttemptAt = v.Next.UnixMilli()
				if key != "" {
					r.order.hold(row, v.Next)
				}
			}
			p.fails = append(p.fails, f)
			p.calls = append(p.calls, hookCall{&row.Msg, v.Attempt, err, f.Dead, time.UnixMilli(f.NextAttemptAt)})
		}
	}
	return p
}

// mark records the outcome of the batches of group, published in that
// order: one statement removes (or marks sent) every confirmed row, one
// transaction records the failures. The outcomes that wait when a mark
// ends are recorded together by the next one, which keeps marking off the
// critical path at low rates (one message per batch) as well as high ones.
func (r *Relay) mark(ctx context.Context, group []relaycore.Outcome) {
	now := time.Now()
	plans := make([]markPlan, len(group))
	var sent []int64
	var fails []outboxstore.Failure
	retry := false
	r.mu.Lock()
	for i := range group {
		plans[i] = r.plan(&group[i], now)
		sent = append(sent, plans[i].sent...)
		fails = append(fails, plans[i].fails...)
		retry = retry || plans[i].retry || group[i].Outage != nil
	}
	r.mu.Unlock()

	if err := r.markSent(ctx, sent, now.UnixMilli()); err != nil {
		// Not marked: the rows stay pending and go out again with the same
		// ids. At-least-once, never lost.
		r.log.Error("marking rows sent failed; they will be published again", "err", err, "rows", len(sent))
		retry = true
	} else {
		for i, p := range plans {
			r.tally.Confirmed(p.sentMsgs, group[i].Took)
		}
	}
	if err := r.recordFailures(ctx, fails, now.UnixMilli()); err != nil {
		r.log.Error("recording failed publishes failed; they will be retried", "err", err, "rows", len(fails))
	}
	for _, p := range plans {
		for _, c := range p.calls {
			if c.dead {
				r.tally.Parked(c.msg, c.attempt, c.err)
			} else {
				r.tally.Retrying(c.msg, c.attempt, c.next, c.err, now)
			}
		}
	}

	r.mu.Lock()
	if retry {
		r.order.rescan = true // rows left pending lie below the cursor
	}
	for i := range group {
		r.release(rowsOf(&group[i].Batch))
	}
	// A paused key's next row waits for the key's rows in flight.
	wake := retry || r.cfg.StrictOrder || len(r.order.paused) > 0
	r.mu.Unlock()
	if wake {
		r.Wake() // re-read: rows held back can go now
	}
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
