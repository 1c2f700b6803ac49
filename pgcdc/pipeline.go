package pgcdc

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/relaycore"
)

// dispatcher owns the messages between the stream and their confirmation.
// It is the relay's relaycore.Source: it forms batches (per-key order,
// backoff) that the engine publishes one at a time, sorts out the
// outcomes, and hands confirmed and parked messages to the writer.
type dispatcher struct {
	r       *Relay
	ordered bool // exactly-once mode: batches are stream-order prefixes

	in       chan *entry
	out      chan relaycore.Batch   // to the engine
	results  chan relaycore.Outcome // from the engine: at most one batch is out
	writes   chan writeJob
	pending  []*entry
	removed  int
	keyUntil map[string]time.Time // keys held back by a failure
	failures int                  // exactly-once mode: consecutive failed transactions
	pause    time.Time            // no batch before this (exactly-once failure)
}

// errHandedBack is the outage of a batch the engine handed back unsent (the
// relay stops): handle leaves its messages pending, as after an outage.
var errHandedBack = errors.New("handed back unsent")

func newDispatcher(r *Relay) *dispatcher {
	return &dispatcher{
		r: r, ordered: r.cfg.ExactlyOnce != nil,
		in: make(chan *entry, 4096), out: make(chan relaycore.Batch), results: make(chan relaycore.Outcome, 1),
		writes: make(chan writeJob, 64), keyUntil: map[string]time.Time{},
	}
}

func entriesOf(b *relaycore.Batch) []*entry { return b.Ref.([]*entry) }

// Publishable is always true: the slot has one reader.
func (d *dispatcher) Publishable(*relaycore.Batch) bool { return true }

func (d *dispatcher) HandBack(b *relaycore.Batch) {
	d.results <- relaycore.Outcome{Batch: *b, Outage: errHandedBack}
}

// Record passes the outcomes to run, which handles them between the
// messages it takes from the stream.
func (d *dispatcher) Record(_ context.Context, outs []relaycore.Outcome) {
	for _, o := range outs {
		d.results <- o
	}
}

// run takes the stream's messages and forms the batches the engine
// publishes, one at a time, until ctx ends; then it waits for the batch
// out, if any.
func (d *dispatcher) run(ctx, stopCtx context.Context) {
	defer close(d.writes)
	defer close(d.out)
	inflight := false
	var ready relaycore.Batch // formed, not yet taken by the engine
	for {
		var timer <-chan time.Time
		if !inflight && ready.Msgs == nil {
			if ctx.Err() != nil {
				return
			}
			batch, wait := d.form(time.Now())
			if len(batch) > 0 {
				msgs := make([]*exactly.Message, len(batch))
				for i, e := range batch {
					msgs[i] = &e.msg
				}
				ready = relaycore.Batch{Msgs: msgs, Ref: batch}
			} else if wait > 0 {
				timer = time.After(wait)
			}
		}
		var out chan<- relaycore.Batch
		if ready.Msgs != nil {
			select {
			case d.out <- ready: // the engine waits for it: the usual case
				inflight, ready = true, relaycore.Batch{}
				continue
			default:
			}
			out = d.out
		}
		select {
		case out <- ready:
			inflight, ready = true, relaycore.Batch{}
		case e := <-d.in:
			// A batch the engine did not take at once (it backs off after an
			// outage) is formed again with what arrives meanwhile, as the
			// batch after the backoff always was.
			ready = relaycore.Batch{}
			d.take(stopCtx, e)
			for more := true; more; {
				select {
				case e := <-d.in:
					d.take(stopCtx, e)
				default:
					more = false
				}
			}
		case res := <-d.results:
			inflight = false
			d.handle(stopCtx, res)
		case <-timer:
		case <-ctx.Done():
			if inflight {
				d.handle(stopCtx, <-d.results)
			}
			return
		}
	}
}

// take adds a message from the stream to the pending ones, or parks it when
// it could not be decoded.
func (d *dispatcher) take(ctx context.Context, e *entry) {
	if e.inKafka {
		d.write(ctx, []*entry{e}, nil)
		return
	}
	if e.bad == nil {
		d.pending = append(d.pending, e)
		return
	}
	d.r.tally.Unreadable(&e.msg, e.bad) // logged when decoded
	d.write(ctx, nil, []park{{e, e.bad}})
}

// form picks the next batch. It returns how long until something held back
// is due when nothing can go now.
func (d *dispatcher) form(now time.Time) ([]*entry, time.Duration) {
	if d.removed > 1024 && d.removed > len(d.pending)/2 {
		kept := d.pending[:0]
		for _, e := range d.pending {
			if !e.removed {
				kept = append(kept, e)
			}
		}
		clear(d.pending[len(kept):])
		d.pending, d.removed = kept, 0
	}
	if now.Before(d.pause) {
		return nil, d.pause.Sub(now)
	}
	max := d.r.cfg.BatchSize
	var batch []*entry
	var wait time.Duration
	due := func(t time.Time) {
		if w := t.Sub(now); w > 0 && (wait == 0 || w < wait) {
			wait = w
		}
	}
	var skipped map[string]bool
	for _, e := range d.pending {
		if len(batch) == max {
			break
		}
		if e.removed {
			continue
		}
		if d.ordered {
			batch = append(batch, e)
			continue
		}
		if key := e.msg.Key; key != "" {
			if skipped[key] {
				continue
			}
			if until, ok := d.keyUntil[key]; ok {
				if now.Before(until) {
					if skipped == nil {
						skipped = map[string]bool{}
					}
					skipped[key] = true
					due(until)
					continue
				}
				delete(d.keyUntil, key)
				d.r.stats.blockedKeys.Store(int64(len(d.keyUntil)))
			}
		} else if now.Before(e.until) {
			due(e.until)
			continue
		}
		batch = append(batch, e)
	}
	return batch, wait
}

func (d *dispatcher) remove(e *entry) {
	e.removed = true
	d.removed++
}

// handle sorts out the outcome of a batch, in batch order. After an
// outage the batch's messages stay pending, and the engine backs off.
func (d *dispatcher) handle(ctx context.Context, res relaycore.Outcome) {
	if res.Outage != nil {
		return
	}
	r := d.r
	now := time.Now()
	batch := entriesOf(&res.Batch)
	var confirmed []*entry
	var parks []park
	if d.ordered {
		d.handleOrdered(now, batch, res.Errs, &confirmed, &parks)
	} else {
		j := relaycore.NewJudge(r.cfg.MaxAttempts, r.backoff, now)
		for i, e := range batch {
			key, err := e.msg.Key, res.Errs[i]
			v := j.Of(key, e.attempts, err, false)
			switch v.Kind {
			case relaycore.Behind:
				// Published again after the earlier message of its key.
				if err == nil {
					r.tally.Republished.Add(1)
				}
			case relaycore.Confirmed:
				confirmed = append(confirmed, e)
				d.remove(e)
			case relaycore.Park:
				e.attempts = v.Attempt
				parks = append(parks, park{e, err})
				d.remove(e)
			case relaycore.Retry:
				e.attempts = v.Attempt
				if key != "" {
					d.keyUntil[key] = v.Next
				} else {
					e.until = v.Next
				}
				r.tally.Retrying(&e.msg, e.attempts, v.Next, err, now)
			}
		}
		r.stats.blockedKeys.Store(int64(len(d.keyUntil)))
	}
	if msgs := res.Msgs; len(confirmed) > 0 {
		if len(confirmed) < len(batch) {
			msgs = make([]*exactly.Message, len(confirmed))
			for i, e := range confirmed {
				msgs[i] = &e.msg
			}
		}
		r.tally.Confirmed(msgs, res.Took)
	}
	for _, p := range parks {
		r.tally.Parked(&p.e.msg, p.e.attempts, p.err)
	}
	d.write(ctx, confirmed, parks)
}

// handleOrdered is handle for the exactly-once mode, where a batch is one
// Kafka transaction: all confirmed, or none.
func (d *dispatcher) handleOrdered(now time.Time, batch []*entry, errs []error, confirmed *[]*entry, parks *[]park) {
	r := d.r
	failed := false
	for _, err := range errs {
		if err != nil {
			failed = true
		}
	}
	if !failed {
		d.failures = 0
		for _, e := range batch {
			*confirmed = append(*confirmed, e)
			d.remove(e)
		}
		return
	}
	for i, e := range batch {
		err := errs[i]
		if err == nil {
			continue // aborted with the transaction: not its fault
		}
		e.attempts++
		if relaycore.Parks(e.attempts, r.cfg.MaxAttempts, err) {
			*parks = append(*parks, park{e, err})
			d.remove(e)
			continue
		}
		r.tally.FailedOnce(&e.msg, e.attempts, err) // the transaction's failure is logged below
	}
	d.failures++
	wait := r.backoff(d.failures)
	if len(*parks) > 0 {
		wait = 0 // the rest of the batch can go again at once
	}
	d.pause = now.Add(wait)
	r.log.Warn("transaction failed; retrying the batch", "err", firstErr(errs), "messages", len(batch), "parked", len(*parks), "in", wait)
}

func firstErr(errs []error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// write hands confirmed and parked messages on: rows to delete and parks go
// to the writer, which finishes them once committed; the others are
// finished now.
func (d *dispatcher) write(ctx context.Context, confirmed []*entry, parks []park) {
	r := d.r
	var job writeJob
	var finished []*entry
	for _, e := range confirmed {
		if e.seq > 0 && !r.cfg.KeepRows {
			job.deletes = append(job.deletes, e)
		} else {
			finished = append(finished, e)
		}
	}
	job.parks = parks
	r.track.done(finished)
	if len(job.deletes) == 0 && len(job.parks) == 0 {
		return
	}
	select {
	case d.writes <- job:
	case <-ctx.Done():
	}
}

type park struct {
	e   *entry
	err error
}

type writeJob struct {
	deletes []*entry
	parks   []park
}

// writeLoop deletes published rows and records parked messages, merging
// the jobs that wait, and finishes their messages once committed. It
// retries a failing statement (PostgreSQL restarting) until ctx ends; what
// is not committed by then is not confirmed, and is decoded again after a
// restart.
func (r *Relay) writeLoop(ctx context.Context, jobs <-chan writeJob) {
	for job := range jobs {
	more:
		for len(job.deletes)+len(job.parks) < 10_000 {
			select {
			case j, ok := <-jobs:
				if !ok {
					break more
				}
				job.deletes = append(job.deletes, j.deletes...)
				job.parks = append(job.parks, j.parks...)
			default:
				break more
			}
		}
		seqs := make([]int64, len(job.deletes))
		for i, e := range job.deletes {
			seqs[i] = e.seq
		}
		ps := make([]outboxstore.Park, len(job.parks))
		var parkXids []uint32
		for i, p := range job.parks {
			seq := p.e.seq
			if p.e.src == srcDebezium || p.e.src == srcMessage {
				seq = 0
			}
			if seq > 0 {
				parkXids = append(parkXids, p.e.unit.xid)
			}
			ps[i] = outboxstore.Park{Seq: seq, Msg: &p.e.msg, Attempts: p.e.attempts, Err: p.err.Error()}
		}
		for attempt := 1; ; attempt++ {
			var err error
			if len(ps) > 0 {
				// A park looks its row up by seq: not before the row is
				// visible (rare: no need to try first).
				if err = r.waitVisible(ctx, parkXids); err == nil {
					err = r.store.ParkPgx(ctx, r.pool, ps, time.Now().UnixMilli())
				}
			}
			if err == nil {
				ps = nil
				err = r.deleteRows(ctx, job.deletes, seqs)
			}
			if err == nil {
				r.writeTrouble.Store(false)
				break
			}
			if ctx.Err() != nil {
				return
			}
			// Nothing here is confirmed until it is written. Let the stream
			// go meanwhile: a server shutting down waits for its WAL senders
			// to see every position confirmed, which would wait for us.
			r.writeTrouble.Store(true)
			wait := min(r.backoff(attempt), 10*time.Second)
			r.log.Error("recording published or parked messages failed; retrying", "err", err, "deletes", len(seqs), "parks", len(ps), "in", wait)
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				return
			}
		}
		all := job.deletes
		for _, p := range job.parks {
			all = append(all, p.e)
		}
		r.track.done(all)
	}
}

// deleteRows deletes the rows of published messages. Logical decoding hands
// out a commit as soon as its WAL is flushed, before other sessions see the
// transaction (with synchronous replication it waits for the standby in
// between): a DELETE then finds no row, and the row would stay pending for
// ever once the position is confirmed. So when fewer rows than asked were
// deleted, it waits until their transactions are visible and deletes again;
// a row missing then is gone indeed (deleted before a restart decoded it
// again, or by someone else).
func (r *Relay) deleteRows(ctx context.Context, es []*entry, seqs []int64) error {
	n, err := r.store.DeleteRowsPgx(ctx, r.pool, seqs)
	if err != nil || n >= int64(len(seqs)) {
		return err
	}
	xids := make([]uint32, len(es))
	for i, e := range es {
		xids[i] = e.unit.xid
	}
	if err := r.waitVisible(ctx, xids); err != nil {
		return err
	}
	_, err = r.store.DeleteRowsPgx(ctx, r.pool, seqs)
	return err
}

// visibleWarnAfter is how long the writer waits for decoded transactions
// to become visible before it says so.
const visibleWarnAfter = 10 * time.Second

// waitVisible waits until the transactions xids (0: none) are visible to
// other sessions, polling with a short backoff; one query when they are.
func (r *Relay) waitVisible(ctx context.Context, xids []uint32) error {
	slices.Sort(xids)
	xids = slices.Compact(xids)
	if len(xids) > 0 && xids[0] == 0 {
		xids = xids[1:]
	}
	start := time.Now()
	warned := false
	for wait := time.Millisecond; ; wait = min(2*wait, 100*time.Millisecond) {
		running, err := outboxstore.RunningXidsPgx(ctx, r.pool, xids)
		if err != nil || len(running) == 0 {
			return err
		}
		xids = running
		if !warned && time.Since(start) >= visibleWarnAfter {
			warned = true
			r.log.Warn("published messages wait for their transactions to become visible before their rows are deleted (committed in the WAL, not yet ended: a synchronous standby not answering?)",
				"transactions", len(running), "xid", running[0], "waited", time.Since(start).Round(time.Second))
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
