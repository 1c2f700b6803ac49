package relay

import (
	"context"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
)

// publishDepth is how many Publish calls may run at once. Above 1, a batch
// starts while an earlier one awaits its acks only when the two share no
// key, so every key's messages are still handed to the broker in order.
// It is 1: the Publisher contract does not ask publishers to take
// concurrent calls, and with the default BatchSize consecutive batches
// usually share keys anyway (measured: no gain at 2000 rows and 1,000 keys;
// +7% at 500 rows, less than the larger batch gives).
const publishDepth = 1

// defaultPipelineDepth is how many batches a PipelinedPublisher holds at
// once unless Config.PipelineDepth says otherwise.
// Its batches may share keys: it hands a key's messages to the broker in
// the order of the calls and, after a failure, fails the key's later
// messages unsent until the relay resumes the key (keyOrder.pausing), so a
// key's confirmed messages stay a prefix of its messages. Measured on
// pstest (bench row 8, 2,000-row batches over 1,000 keys): 1 batch out at
// a time reaches a quarter of the library's own rate, 16 about all of it.
const defaultPipelineDepth = 16

// publishing is a batch handed to the Publisher and not yet finished.
type publishing struct {
	rows []outboxstore.Row
	keys map[string]struct{}
	done chan result
}

// publishLoop publishes batches, up to publishDepth at once when their keys
// are disjoint (up to Config.PipelineDepth, keys shared or not, to a
// PipelinedPublisher, which takes them in order), and hands their outcomes
// to the mark stage in batch order.
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
		depth := r.cfg.PipelineDepth
		var keys map[string]struct{}
		if r.pipe == nil {
			depth = publishDepth
			keys = make(map[string]struct{}, len(b.rows))
			for i := range b.rows {
				if k := b.rows[i].Msg.Key; k != "" {
					keys[k] = struct{}{}
				}
			}
		}
		for len(queue) > 0 && (len(queue) >= depth || outages > 0 || (r.pipe == nil && sharesKey(queue, keys))) {
			pass(<-queue[0].done)
		}
		if ctx.Err() != nil {
			r.handBack(b)
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
			r.handBack(b)
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
			r.unresume(b)
			r.release(b.rows)
			r.mu.Unlock()
			continue
		}
		p := &publishing{rows: b.rows, keys: keys, done: make(chan result, 1)}
		queue = append(queue, p)
		if r.pipe == nil {
			go func() { p.done <- r.publish(stopCtx, p.rows) }()
			continue
		}
		// Handed over here, in batch order; only the outcome is awaited
		// apart.
		wait := r.send(stopCtx, b.rows, b.resume)
		go func() { p.done <- wait() }()
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
	msgs := messagesOf(rows)
	start := time.Now()
	return outcome(rows, r.cfg.Publisher.Publish(ctx, msgs), start)
}

// send hands one batch to the PipelinedPublisher, after resuming the keys
// of the rows at resume, and returns the wait for its outcome.
func (r *Relay) send(ctx context.Context, rows []outboxstore.Row, resume []int) func() result {
	msgs := messagesOf(rows)
	start := time.Now()
	for _, i := range resume {
		r.pipe.Resume(ctx, msgs[i])
	}
	wait := r.pipe.Send(ctx, msgs)
	return func() result { return outcome(rows, wait(), start) }
}

func messagesOf(rows []outboxstore.Row) []*exactly.Message {
	msgs := make([]*exactly.Message, len(rows))
	for i := range rows {
		msgs[i] = &rows[i].Msg
	}
	return msgs
}

// outcome sorts out what the Publisher said of rows.
func outcome(rows []outboxstore.Row, err error, start time.Time) result {
	res := result{rows: rows, took: time.Since(start)}
	res.errs, res.err = exactly.Verdicts(err, len(rows))
	res.outage = res.err != nil
	return res
}
