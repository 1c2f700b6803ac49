package relaycore

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/pause"
)

// Batch is what a source hands the engine to publish: messages in the
// order the broker must take them.
type Batch struct {
	Msgs []*exactly.Message
	// Resume lists (by index) the messages whose paused key the engine
	// resumes before it sends the batch to a PipelinedPublisher.
	Resume []int
	// Ref is the source's own record of the batch (its rows, its entries).
	Ref any
}

// Outcome is what the broker said of one batch.
type Outcome struct {
	Batch
	// Errs has one entry per message (nil: confirmed); with Outage they
	// tell nothing.
	Errs []error
	// Outage is set when the publisher failed as a whole, with no verdict
	// per message: nothing may be assumed confirmed.
	Outage error
	Took   time.Duration
}

// Source is the side of a relay that reads the outbox (a table, a
// replication slot) and records what became of each batch. It feeds the
// engine through a channel it closes when it stops.
type Source interface {
	// Publishable reports whether b, just taken from the channel, may go to
	// the broker now (the polling relay: its partitions' lease has not run
	// out, no earlier batch was handed back). When it may not, the source
	// has taken b back itself.
	Publishable(b *Batch) bool
	// HandBack takes back a batch that will not be published because the
	// relay stops.
	HandBack(b *Batch)
	// Record records the outcomes of published batches, in the order the
	// batches were handed to the broker. The outcomes that wait when one
	// call ends come in the next call together.
	Record(ctx context.Context, outs []Outcome)
}

// Engine is the publish stage of a relay, whatever its source: it hands
// the source's batches to the broker in their order, keeps up to Depth of
// them out at once when the publisher takes overlapping batches
// (exactly.PipelinedPublisher), gives each message its verdict
// (exactly.Verdicts), backs off after an outage, and passes the outcomes
// back to the source in the same order.
type Engine struct {
	// Publisher takes the batches one at a time, unless Pipe is set.
	Publisher exactly.Publisher
	// Pipe, when set, takes up to Depth batches at once. Only a source that
	// resumes paused keys (Batch.Resume) may set it.
	Pipe  exactly.PipelinedPublisher
	Depth int
	// Publish, when set, replaces Publisher: it publishes b and gives the
	// per-message errors or the outage (the CDC relay's exactly-once sink).
	Publish func(ctx context.Context, b *Batch) (errs []error, outage error)
	Backoff func(attempt int) time.Duration
	Log     *slog.Logger
	// AfterPublish, when set (tests only), runs after the broker gave its
	// verdicts on a batch and before the source records them: the crash
	// window.
	AfterPublish func(*Outcome)
}

// maxRecordGroup bounds how many outcomes one Source.Record takes.
const maxRecordGroup = 64

// Run publishes the batches of in until in is closed, and returns once
// every outcome is recorded. After ctx ends it publishes nothing more:
// what it takes from in then is handed back. Publishing, and recording,
// use stopCtx, which outlives ctx by the relay's shutdown grace.
func (e *Engine) Run(ctx, stopCtx context.Context, in <-chan Batch, src Source) {
	depth := 1
	if e.Pipe != nil {
		depth = max(e.Depth, 1)
	}
	outs := make(chan Outcome, 8) // publishing seldom waits for recording
	var rec sync.WaitGroup
	rec.Go(func() { record(stopCtx, outs, src) })

	outages := 0 // consecutive whole-batch failures
	var queue []chan Outcome
	// pass hands the outcome of the oldest batch to the recording.
	pass := func(o Outcome) {
		queue = queue[1:]
		if o.Outage != nil {
			outages++
			wait := e.Backoff(outages)
			e.Log.Warn("publisher failed for the whole batch; retrying", "err", o.Outage, "messages", len(o.Msgs), "in", wait)
			outs <- o
			pause.For(ctx, wait)
			return
		}
		outages = 0
		if e.AfterPublish != nil {
			e.AfterPublish(&o)
		}
		outs <- o
	}
	defer func() {
		for len(queue) > 0 {
			pass(<-queue[0])
		}
		close(outs)
		rec.Wait()
	}()
	for {
		var oldest chan Outcome
		if len(queue) > 0 {
			oldest = queue[0]
		}
		var b Batch
		select {
		case o := <-oldest:
			pass(o)
			continue
		case next, ok := <-in:
			if !ok {
				return
			}
			b = next
		}
		for len(queue) > 0 && (len(queue) >= depth || outages > 0) {
			pass(<-queue[0])
		}
		if ctx.Err() != nil {
			src.HandBack(&b)
			continue
		}
		if !src.Publishable(&b) {
			continue
		}
		done := make(chan Outcome, 1)
		queue = append(queue, done)
		if e.Pipe == nil {
			go func() { done <- e.publish(stopCtx, b) }()
			continue
		}
		// Handed over here, in batch order; only the outcome is awaited
		// apart.
		wait := e.send(stopCtx, b)
		go func() { done <- wait() }()
	}
}

// record hands the outcomes to the source, those that wait together.
func record(ctx context.Context, outs <-chan Outcome, src Source) {
	for o := range outs {
		group := []Outcome{o}
	more:
		for len(group) < maxRecordGroup {
			select {
			case o, ok := <-outs:
				if !ok {
					break more
				}
				group = append(group, o)
			default:
				break more
			}
		}
		src.Record(ctx, group)
	}
}

// publish hands one batch to the publisher and sorts out the outcome.
func (e *Engine) publish(ctx context.Context, b Batch) Outcome {
	start := time.Now()
	o := Outcome{Batch: b}
	if e.Publish != nil {
		o.Errs, o.Outage = e.Publish(ctx, &b)
	} else {
		o.Errs, o.Outage = exactly.Verdicts(e.Publisher.Publish(ctx, b.Msgs), len(b.Msgs))
	}
	o.Took = time.Since(start)
	return o
}

// send resumes the keys of b.Resume, hands b to the PipelinedPublisher and
// returns the wait for its outcome.
func (e *Engine) send(ctx context.Context, b Batch) func() Outcome {
	start := time.Now()
	for _, i := range b.Resume {
		e.Pipe.Resume(ctx, b.Msgs[i])
	}
	wait := e.Pipe.Send(ctx, b.Msgs)
	return func() Outcome {
		o := Outcome{Batch: b}
		o.Errs, o.Outage = exactly.Verdicts(wait(), len(b.Msgs))
		o.Took = time.Since(start)
		return o
	}
}
