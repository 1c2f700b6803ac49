package relay

import (
	"context"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/relaycore"
)

// defaultPipelineDepth is how many batches a PipelinedPublisher holds at
// once unless Config.PipelineDepth says otherwise.
// Its batches may share keys: it hands a key's messages to the broker in
// the order of the calls and, after a failure, fails the key's later
// messages unsent until the relay resumes the key (keyOrder.pausing), so a
// key's confirmed messages stay a prefix of its messages. Measured on
// pstest (bench row 8, 2,000-row batches over 1,000 keys): 1 batch out at
// a time reaches a quarter of the library's own rate, 16 about all of it.
// Any other Publisher gets one batch at a time: the Publisher contract
// does not ask publishers to take concurrent calls, and with the default
// BatchSize consecutive batches usually share keys anyway (measured: no
// gain from two at once on disjoint keys at 2000 rows and 1,000 keys; +7%
// at 500 rows, less than the larger batch gives).
const defaultPipelineDepth = 16

// batch is the relay's record of a batch the engine publishes
// (relaycore.Batch.Ref).
type batch struct {
	rows []outboxstore.Row
	gen  uint64 // the read that returned the rows
}

// newBatch is the batch of rows for the engine; resume lists the rows (by
// index) that resume their paused key (see keyOrder.pausing).
func newBatch(rows []outboxstore.Row, gen uint64, resume []int) relaycore.Batch {
	msgs := make([]*exactly.Message, len(rows))
	for i := range rows {
		msgs[i] = &rows[i].Msg
	}
	return relaycore.Batch{Msgs: msgs, Resume: resume, Ref: batch{rows: rows, gen: gen}}
}

func rowsOf(b *relaycore.Batch) []outboxstore.Row { return b.Ref.(batch).rows }

// engine is the publish stage reading from the relay's fetch loop (see
// relaycore.Engine), with the relay as its Source.
func (r *Relay) engine() *relaycore.Engine {
	e := &relaycore.Engine{
		Publisher: r.cfg.Publisher, Backoff: r.backoff, Log: r.log,
	}
	if r.pipe != nil {
		e.Pipe, e.Depth = r.pipe, r.cfg.PipelineDepth
	}
	if r.afterPublish != nil {
		e.AfterPublish = func(o *relaycore.Outcome) { r.afterPublish(rowsOf(&o.Batch)) }
	}
	return e
}

// source is the relay as the engine's relaycore.Source: the fetch loop
// feeds the engine, the mark stage records what it published.
type source struct{ r *Relay }

// Publishable reports whether b may still be published: no earlier batch
// was handed back (fence), and the partitions' lease has not run out. It
// hands b back when not.
func (s source) Publishable(b *relaycore.Batch) bool {
	r := s.r
	if r.beforeLeaseCheck != nil {
		r.beforeLeaseCheck()
	}
	r.mu.Lock()
	fenced := b.Ref.(batch).gen <= r.fence
	r.mu.Unlock()
	if fenced {
		// Read before an earlier batch was handed back: it may hold later
		// messages of that batch's keys. Published now, they would overtake
		// them.
		r.handBack(b)
		return false
	}
	if time.Now().UnixNano() > r.leaseUntil.Load() {
		// This relay stalled past its lease (a pause, a hung call): the rows
		// may be another relay's now. Leave them to their owner, and the
		// batches read after them too (see fence).
		r.log.Warn("lease expired before the batch was published; handing it back", "messages", len(b.Msgs))
		r.mu.Lock()
		r.fence, r.fencing = r.order.fetchGen, true
		r.order.rescan = true
		r.unresume(b)
		r.release(rowsOf(b))
		r.mu.Unlock()
		return false
	}
	return true
}

func (s source) HandBack(b *relaycore.Batch) { s.r.handBack(b) }

// Record records the outcomes in the table (see mark).
func (s source) Record(ctx context.Context, outs []relaycore.Outcome) { s.r.mark(ctx, outs) }
