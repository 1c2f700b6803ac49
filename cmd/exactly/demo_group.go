package main

import (
	"context"
	"database/sql"
	"fmt"
	mrand "math/rand/v2"
	"sync"
	"sync/atomic"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
)

// deliveries counts what the consumer group's handlers receive, per id.
type deliveries struct {
	mu    sync.Mutex
	count map[string]int
	total atomic.Int64
}

func (d *deliveries) add(id string) {
	d.total.Add(1)
	d.mu.Lock()
	d.count[id]++
	d.mu.Unlock()
}

func (d *deliveries) distinct() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.count)
}

// group runs the consumer group: demoGroupSize member slots, each running
// one member incarnation after the other. Cancelling an incarnation makes
// it leave the group (context.Cause says why: errCrashed, errRebalanced);
// its slot then starts the next, which joins.
type group struct {
	ctx     context.Context
	run     func(ctx context.Context, crash func(), name string) error
	wg      sync.WaitGroup
	mu      sync.Mutex
	cancels [demoGroupSize]context.CancelCauseFunc
	err     atomic.Pointer[error]
}

func (g *group) start() {
	for i := range demoGroupSize {
		g.wg.Go(func() {
			for n := 1; g.ctx.Err() == nil; n++ {
				ctx, cancel := context.WithCancelCause(g.ctx)
				g.mu.Lock()
				g.cancels[i] = cancel
				g.mu.Unlock()
				err := g.run(ctx, func() { cancel(errCrashed) }, fmt.Sprintf("member-%d.%d", i+1, n))
				cancel(nil)
				if err != nil && g.ctx.Err() == nil {
					g.err.CompareAndSwap(nil, &err)
					return
				}
			}
		})
	}
}

// bounce makes member slot i leave the group and join again.
func (g *group) bounce(i int) {
	g.mu.Lock()
	c := g.cancels[i]
	g.mu.Unlock()
	if c != nil {
		c(errRebalanced)
	}
}

// startGroup starts the consumer group, whose members apply the promotions
// until ctx ends.
func (r *demoRun) startGroup(ctx context.Context) *group {
	g := &group{ctx: ctx, run: r.member}
	bounce := mrand.New(mrand.NewPCG(r.o.seed, 2))
	var bounceMu sync.Mutex
	r.f.rebalanceFn = func() {
		bounceMu.Lock()
		i := bounce.IntN(demoGroupSize)
		bounceMu.Unlock()
		g.bounce(i)
	}
	g.start()
	return g
}

// member runs one incarnation of a member of the group until ctx ends;
// crash makes it leave as if it had crashed.
func (r *demoRun) member(ctx context.Context, crash func(), name string) error {
	db, f := r.db, r.f
	spec := memberSpec{name: name, deadLettered: func(*exactly.Message, error) { r.deadLettered.Add(1) }}
	// crashed reports an injected crash: the member dies, the delivery
	// stays unacknowledged and comes again.
	crashed := func() error {
		f.consumerCrashes.Add(1)
		crash()
		return errCrashed
	}
	switch {
	case r.claims != nil:
		spec.txHandler = func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
			r.got.add(m.ID)
			fresh, err := r.claims.Claim(ctx, tx, m)
			if err != nil {
				return err
			}
			if !fresh {
				r.claimDuplicates.Add(1) // a re-send: the offset advances, nothing else
				return nil
			}
			if err := db.applyPromotion(ctx, tx, m, name, 0); err != nil {
				return err
			}
			if f.applied() {
				return crashed() // the effect and the offset roll back together
			}
			return nil
		}
	default:
		// apply runs the effect through the inbox and reports what became of it.
		apply := func(ctx context.Context, m *exactly.Message) (inbox.Outcome, error) {
			if r.sqlIn != nil {
				return r.sqlIn.Handle(ctx, db.db, m, func(ctx context.Context, tx *sql.Tx) error {
					return db.applyPromotion(ctx, tx, m, name, 0)
				})
			}
			return db.applyThroughRedis(ctx, r.redisIn, r.attempts, m, name)
		}
		spec.handler = func(ctx context.Context, m *exactly.Message) error {
			r.got.add(m.ID)
			out, err := apply(ctx, m)
			if err != nil {
				return err
			}
			if out == inbox.Processed && f.applied() {
				return crashed() // the effect is committed, the offset or ack is not
			}
			return nil
		}
	}
	return r.broker.member(ctx, spec)
}
