package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/exactlyonce/exactly/relay"
)

// superviseRelay runs the relay until ctx ends, starting a new one
// whenever the fault injector kills it. With --keep the polling relay keeps
// the sent rows, so the console finds each message by its id afterwards.
func (r *demoRun) superviseRelay(ctx context.Context) {
	var retention time.Duration
	if r.o.keep {
		retention = 7 * 24 * time.Hour
	}
	for i := 1; ctx.Err() == nil; i++ {
		rl, err := newRelayRunner(r.o.relay, relay.Config{
			Outbox: r.ob, DB: r.db.db, Publisher: r.pub.forRelay(), BatchSize: 200, PollInterval: 20 * time.Millisecond,
			InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
			ShutdownTimeout: 50 * time.Millisecond, LeaseTTL: 2 * time.Second, Partitions: 8, Retention: retention,
			InstanceID: fmt.Sprintf("demo-relay-%d", i), Logger: r.log,
		}, cdcSettings{DSN: r.o.db, Slot: r.slot})
		if err != nil {
			r.fail(&r.relayErr, err)
			return
		}
		r.f.relayStarts.Add(1)
		rctx, kill := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- rl.Run(rctx) }()
		var runErr error
		stopped := false
		select {
		case <-r.pub.crash:
		case <-ctx.Done():
		case runErr = <-done:
			stopped = true
		}
		kill()
		if !stopped {
			runErr = <-done
		}
		if stopped && ctx.Err() == nil {
			if runErr == nil {
				runErr = errors.New("the relay stopped by itself")
			}
			r.fail(&r.relayErr, runErr)
			return
		}
	}
}

// startWriters starts the order service's writers, which place the orders
// until all are written or ctx ends.
func (r *demoRun) startWriters(ctx context.Context, writers *sync.WaitGroup) {
	var next atomic.Int64
	for range r.o.writers {
		writers.Go(func() {
			for ctx.Err() == nil {
				n := next.Add(1)
				if n > int64(r.o.orders) {
					return
				}
				if err := r.db.placeOrder(ctx, r.ob, r.broker.topic(), n); err != nil {
					if ctx.Err() == nil {
						r.fail(&r.writeErr, err)
					}
					return
				}
				r.written.Add(1)
			}
		})
	}
}

// watch prints the progress until every order's promotion is applied and
// the outbox is empty (finished), or nothing progressed for --timeout, or
// ctx ended. It returns when the run last progressed.
//
// --timeout bounds a stall, not the run: any order written, delivered for
// the first time or applied, or any outbox row sent once all are applied,
// is progress. Re-sends and redeliveries are not.
func (r *demoRun) watch(ctx context.Context) (finished bool, lastProgress time.Time) {
	o, f := r.o, r.f
	tty := isTerminal(r.out)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var lastLine time.Time
	var applied int64
	progress := func() string {
		return fmt.Sprintf("  %5.1fs  written %d  published %d  delivered %d  applied %d  |  faults: %d lost acks, %d relay crashes, %d consumer crashes, %d rebalances",
			time.Since(r.start).Seconds(), r.written.Load(), r.pub.published.Load(), r.got.total.Load(), applied,
			f.lostAcks.Load(), f.relayCrashes.Load(), f.consumerCrashes.Load(), f.rebalances.Load())
	}
	stalled := false
	var mark [4]int64 // written, distinct deliveries, applied, -pending
	lastProgress = time.Now()
	for !finished && !stalled && ctx.Err() == nil {
		select {
		case <-ctx.Done():
			continue
		case <-tick.C:
		}
		if n, err := r.db.applied(ctx); err == nil {
			applied = n
		}
		now := [4]int64{r.written.Load(), int64(r.got.distinct()), applied, mark[3]}
		if now[0] == int64(o.orders) && applied == int64(o.orders) {
			if st, err := r.ob.Status(ctx, r.db.db); err == nil {
				now[3] = -st.Pending
				finished = st.Pending == 0
			}
		}
		if now != mark {
			mark, lastProgress = now, time.Now()
		} else if time.Since(lastProgress) > o.timeout {
			stalled = true
		}
		if tty {
			fmt.Fprintf(r.out, "\r%-150s", progress())
		} else if time.Since(lastLine) > 5*time.Second || finished {
			fmt.Fprintln(r.out, progress())
			lastLine = time.Now()
		}
	}
	if tty {
		fmt.Fprintln(r.out)
	}
	return finished, lastProgress
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
