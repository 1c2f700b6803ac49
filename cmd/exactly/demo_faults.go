package main

import (
	"context"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/exactlyonce/exactly"
)

// faults are the duplicate causes the demo injects, and its dice.
type faults struct {
	lostAcks, relayCrashes, relayStarts, consumerCrashes, rebalances atomic.Int64

	mu  sync.Mutex
	rnd *mrand.Rand
	// fresh counts effects applied (not duplicates); the consumer-side
	// faults fire at fixed counts, so every run has them mid-stream.
	fresh        atomic.Int64
	crashAt      []int64
	rebalanceAt  []int64
	rebalanceFn  func()
	rebalancesWG sync.WaitGroup
}

func newFaults(seed uint64, orders int) *faults {
	at := func(fracs ...float64) []int64 {
		out := make([]int64, len(fracs))
		for i, fr := range fracs {
			out[i] = max(1, int64(fr*float64(orders)))
		}
		return out
	}
	return &faults{rnd: mrand.New(mrand.NewPCG(seed, 1)), crashAt: at(0.1, 0.4, 0.7), rebalanceAt: at(0.2, 0.5, 0.8)}
}

func (f *faults) roll() float64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rnd.Float64()
}

// applied is called after a member applied an effect, before it
// acknowledges the delivery. It starts the rebalances that are due, and
// reports whether the member crashes now: at the fixed points, or on a rare
// roll of the dice.
func (f *faults) applied() (crash bool) {
	n := f.fresh.Add(1)
	if slices.Contains(f.rebalanceAt, n) {
		f.rebalances.Add(1)
		f.rebalancesWG.Go(f.rebalanceFn)
	}
	return slices.Contains(f.crashAt, n) || f.roll() < 0.0004
}

// faultyPublisher wraps the broker's publisher and injects the producing
// side's duplicate causes, always after the broker confirmed the batch.
type faultyPublisher struct {
	inner     exactly.Publisher
	f         *faults
	crash     chan struct{} // tells the relay's supervisor to kill it
	published atomic.Int64  // records confirmed by the broker, re-sends included
	calls     atomic.Int64
}

func (p *faultyPublisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	if err := p.inner.Publish(ctx, msgs); err != nil {
		return err
	}
	return p.confirmed(ctx, msgs)
}

// forRelay is the publisher the relay is given: p, or, when the broker's
// publisher is an exactly.PipelinedPublisher, p with its Send and Resume,
// so the relay overlaps its batches as it does outside the demo and the
// faults hit the outcome of each Send.
func (p *faultyPublisher) forRelay() exactly.Publisher {
	if pp, ok := p.inner.(exactly.PipelinedPublisher); ok {
		return &faultyPipeline{faultyPublisher: p, pipe: pp}
	}
	return p
}

type faultyPipeline struct {
	*faultyPublisher
	pipe exactly.PipelinedPublisher
}

func (p *faultyPipeline) Send(ctx context.Context, msgs []*exactly.Message) func() error {
	wait := p.pipe.Send(ctx, msgs)
	return func() error {
		if err := wait(); err != nil {
			return err
		}
		return p.confirmed(ctx, msgs)
	}
}

func (p *faultyPipeline) Resume(ctx context.Context, m *exactly.Message) { p.pipe.Resume(ctx, m) }

// confirmed counts msgs, which the broker confirmed, and injects this
// call's fault, if any.
func (p *faultyPublisher) confirmed(ctx context.Context, msgs []*exactly.Message) error {
	p.published.Add(int64(len(msgs)))
	// Random faults, plus fixed ones from the first calls on, so every
	// kind happens in every run, however short: a lost ack makes the next
	// call a re-send, which the next fault then hits.
	n := p.calls.Add(1)
	switch x := p.f.roll(); {
	case x < 0.02 || n == 2 || n == 15:
		// The relay dies after the broker confirmed, before it marks the
		// rows sent: the next relay publishes them again, same ids.
		p.f.relayCrashes.Add(1)
		select {
		case p.crash <- struct{}{}:
		default:
		}
		<-ctx.Done()
		return fmt.Errorf("relay killed after the broker confirmed: %w", ctx.Err())
	case x < 0.06 || n == 1 || n == 9:
		// The acknowledgement is lost on the way back (a timeout after the
		// broker accepted): the relay publishes the batch again.
		p.f.lostAcks.Add(1)
		return errors.New("publish acknowledgement lost (injected timeout)")
	}
	return nil
}

var (
	errCrashed    = errors.New("member crashed (injected) after the effect, before acknowledging")
	errRebalanced = errors.New("member left the group (injected rebalance)")
)
