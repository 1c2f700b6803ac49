package nats

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"sync"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/pause"
)

// delivery is a message the consumer holds: fetched, not yet acknowledged
// or handed back.
type delivery struct {
	msg      jetstream.Msg
	signaled time.Time // last time the server heard about it; guarded by runner.mu
}

// runner is one Run: a fetch loop on Run's goroutine feeding Workers
// goroutines, and a keeper extending the AckWait of the held messages.
type runner struct {
	c      *Consumer
	ctx    context.Context // ends when Run's context ends or on a failure
	failed context.Context // ends only on a failure
	abort  func(error)     // ends ctx and failed with the failure
	cons   jetstream.Consumer
	// fetchEnded is closed once no pull request of this run is open.
	fetchEnded chan struct{}
	window     *window
	queues     []chan *delivery
	wg         sync.WaitGroup

	mu       sync.Mutex
	held     map[*delivery]struct{}
	stopKeep chan struct{}
}

func (r *runner) start() {
	r.queues = make([]chan *delivery, r.c.cfg.Workers)
	for i := range r.queues {
		// The window bounds the messages held, so dispatch never blocks.
		q := make(chan *delivery, r.window.size)
		r.queues[i] = q
		r.wg.Go(func() { r.work(q) })
	}
	r.stopKeep = make(chan struct{})
	r.wg.Go(r.keepAlive)
}

// finish waits for the workers to settle every held message.
func (r *runner) finish() {
	for _, q := range r.queues {
		close(q)
	}
	close(r.stopKeep)
	r.wg.Wait()
}

// fetchLoop pulls messages while the window has room, until the run ends
// or a failure no retry fixes.
func (r *runner) fetchLoop() error {
	backoff := exactly.RetryPolicy{InitialBackoff: 100 * time.Millisecond, MaxBackoff: 5 * time.Second}
	failures := 0
	conn := r.c.js.Conn()
	for {
		n, ok := r.window.acquire(r.ctx)
		if !ok {
			return context.Cause(r.ctx)
		}
		// A pull request sent while disconnected waits in the reconnect
		// buffer with its unsubscription, and the server could deliver to
		// it in between, stranding messages until AckWait.
		for wait := 1; !conn.IsConnected() && !conn.IsClosed() && r.ctx.Err() == nil; wait++ {
			pause.For(r.ctx, backoff.Backoff(wait))
		}
		got, err := r.fetch(n)
		r.window.release(n - got)
		if r.ctx.Err() != nil {
			return context.Cause(r.ctx)
		}
		if err == nil {
			failures = 0
			continue
		}
		if err := r.fatal(err); err != nil {
			r.abort(err)
			return err
		}
		failures++
		wait := backoff.Backoff(failures)
		r.c.log.Warn("fetching messages failed; retrying", "err", err, "failures", failures, "retry_in", wait)
		pause.For(r.ctx, wait)
	}
}

// fetch runs one pull request for up to n messages and dispatches what
// arrives. It returns how many arrived.
//
// The pull is not cut short when Run's context ends: the library would
// drop the messages it received and had not passed on yet, and the server
// would redeliver them only after AckWait. It ends by itself within
// fetchWait, and dispatch hands back what it brings. Only a failure (the
// connection closed) cuts it short, when nothing can be handed back anyway.
func (r *runner) fetch(n int) (int, error) {
	ctx, cancel := context.WithTimeout(r.failed, fetchWait)
	defer cancel()
	batch, err := r.cons.Fetch(n, jetstream.FetchContext(ctx))
	if err != nil {
		return 0, err
	}
	got := 0
	for m := range batch.Messages() {
		got++
		r.dispatch(m)
	}
	err = batch.Error()
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return got, nil // the pull expired, or Run failed: the caller knows
	}
	return got, err
}

// fatal returns the error Run should end with, or nil when err is worth
// retrying.
func (r *runner) fatal(err error) error {
	name, stream := r.c.cfg.Durable, r.c.cfg.Stream
	switch {
	case errors.Is(err, natsgo.ErrConnectionClosed), errors.Is(err, jetstream.ErrConnectionClosed):
		return errConnClosed(err)
	case errors.Is(err, jetstream.ErrConsumerDeleted), errors.Is(err, jetstream.ErrConsumerNotFound):
		return fmt.Errorf("nats: consumer %q on stream %q was deleted; Run again to create it (it then starts from its DeliverPolicy): %w", name, stream, err)
	case errors.Is(err, jetstream.ErrStreamNotFound):
		return fmt.Errorf("nats: stream %q of consumer %q was deleted: %w", stream, name, err)
	case errors.Is(err, jetstream.ErrBadRequest):
		return fmt.Errorf("nats: the server refused the pull request of consumer %q on stream %q (does its configuration allow Batch %d?): %w", name, stream, r.window.size, err)
	case errors.Is(err, natsgo.ErrNoResponders):
		// Nothing answers pulls for the consumer: it is gone, or the
		// server is still starting. Only the first is for good.
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		defer cancel()
		if _, infoErr := r.cons.Info(ctx); errors.Is(infoErr, jetstream.ErrConsumerNotFound) || errors.Is(infoErr, jetstream.ErrStreamNotFound) {
			return r.fatal(infoErr)
		}
	}
	return nil
}

// dispatch hands a fetched message to its worker, which hands it back to
// the server if the run is ending.
func (r *runner) dispatch(m jetstream.Msg) {
	r.c.stats.Received.Add(1)
	d := &delivery{msg: m}
	r.mu.Lock()
	d.signaled = time.Now()
	r.held[d] = struct{}{}
	r.mu.Unlock()
	r.queues[r.worker(m)] <- d
}

// worker picks the worker of a message: by key, or by subject when it has
// none, so each key's messages are handled in order by one worker.
func (r *runner) worker(m jetstream.Msg) int {
	if len(r.queues) == 1 {
		return 0
	}
	key := m.Headers().Get(exactly.HeaderKey)
	if key == "" {
		key = "\x00" + m.Subject()
	}
	h := fnv.New32a()
	h.Write([]byte(key))
	return int(h.Sum32() % uint32(len(r.queues)))
}

func (r *runner) work(q <-chan *delivery) {
	conn := r.c.js.Conn()
	for d := range q {
		if conn.IsClosed() {
			// The status event that ends the run comes asynchronously;
			// a handler must not run for a message that cannot be acked.
			r.abort(errConnClosed(natsgo.ErrConnectionClosed))
		}
		if r.ctx.Err() != nil {
			r.handBack(d, context.Cause(r.ctx).Error())
			continue
		}
		r.handle(d)
	}
}

// handle runs the policy for one delivery, then acknowledges it, or hands
// it back when the run ended first.
func (r *runner) handle(d *delivery) {
	c := r.c
	msg, md, decodeErr := c.decode(d.msg)
	first := 1
	if md != nil {
		if md.NumDelivered > 1 {
			c.stats.Redeliveries.Add(1)
		}
		first = int(min(md.NumDelivered, uint64(c.policy.Retry.MaxAttempts)))
	}
	h := c.cfg.Handler
	if decodeErr != nil {
		// Never handled: straight to the dead-letter destination, through
		// the same policy (hooks, stats, confirmation) as a failed handler.
		h = func(context.Context, *exactly.Message) error { return decodeErr }
		first = c.policy.Retry.MaxAttempts
	}
	ctx := context.WithValue(r.ctx, metadataKey{}, md)
	if _, err := c.policy.Process(ctx, h, msg, first, &c.stats); err != nil {
		r.handBack(d, err.Error())
		return
	}
	r.ack(d, msg)
}

// ack acknowledges a handled or dead-lettered message and waits for the
// server to confirm it, even when the run is ending.
func (r *runner) ack(d *delivery, msg *exactly.Message) {
	defer r.settled(d)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), r.c.ackTimeout)
	defer cancel()
	err := d.msg.DoubleAck(ctx)
	if err == nil {
		return
	}
	r.c.policy.AckFailed(msg, err, &r.c.stats)
	r.c.log.Warn("acknowledgement not confirmed; unless it reached the server, the message is redelivered after AckWait and the inbox must absorb the copy",
		"id", msg.ID, "subject", msg.Topic, "err", err)
}

// handBack returns a message to the server (Nak) for prompt redelivery,
// once no pull request of the run is open. A Nak while one is open makes
// the server redeliver the message into it at once: back to this consumer,
// which would hand it back again, each round adding a delivery (and so an
// attempt) until the pull ends. Handed back after, messages go ahead of
// the stream's new ones, each key's in order. If the Nak is lost, the
// server redelivers the message after AckWait.
func (r *runner) handBack(d *delivery, why string) {
	defer r.settled(d)
	<-r.fetchEnded
	if err := d.msg.Nak(); err != nil {
		r.c.log.Debug("could not hand a message back; it is redelivered after AckWait", "subject", d.msg.Subject(), "why", why, "err", err)
	}
}

func (r *runner) settled(d *delivery) {
	r.mu.Lock()
	delete(r.held, d)
	r.mu.Unlock()
	r.window.release(1)
}

// keepAlive tells the server that the held messages are in progress, so it
// does not redeliver a message that is queued or being handled.
func (r *runner) keepAlive() {
	ackWait := r.c.cfg.AckWait
	tick := time.NewTicker(ackWait / 6)
	defer tick.Stop()
	var due []*delivery
	for {
		select {
		case <-r.stopKeep:
			return
		case now := <-tick.C:
			due = due[:0]
			r.mu.Lock()
			for d := range r.held {
				if now.Sub(d.signaled) >= ackWait/3 {
					d.signaled = now
					due = append(due, d)
				}
			}
			r.mu.Unlock()
			for _, d := range due {
				if err := d.msg.InProgress(); err != nil && !errors.Is(err, jetstream.ErrMsgAlreadyAckd) {
					r.c.log.Debug("could not extend AckWait", "subject", d.msg.Subject(), "err", err)
				}
			}
		}
	}
}
