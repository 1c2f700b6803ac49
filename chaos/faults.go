package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// The kinds of fault.
const (
	FaultKill         = "kill"          // SIGKILL of the producer, a relay or a consumer, restarted after a moment
	FaultPause        = "pause"         // SIGSTOP, then SIGCONT after longer than every session, lease and ack timeout
	FaultChurn        = "churn"         // an extra member joins a consumer group, then leaves
	FaultLatency      = "net-latency"   // latency on every connection to one service
	FaultDrop         = "net-drop"      // every connection to one service closed, new ones refused for a moment
	FaultBlackhole    = "net-blackhole" // no byte gets through to one service, then the connections close
	FaultPGRestart    = "pg-restart"    // PostgreSQL stopped (fast or immediate, i.e. crash) and started
	FaultNATSRestart  = "nats-restart"  // nats-server stopped and started on its store
	FaultKfakeRestart = "kfake-restart" // kfake killed (SIGKILL or SIGTERM) and started from its data dir
)

// AllFaults lists every kind.
var AllFaults = []string{FaultKill, FaultPause, FaultChurn, FaultLatency, FaultDrop, FaultBlackhole,
	FaultPGRestart, FaultNATSRestart, FaultKfakeRestart}

// processFaults hit one worker; the others hit a service or the network.
// The two lanes run side by side, so a process fault can meet a network
// fault or a restart.
var processFaults = []string{FaultKill, FaultPause, FaultChurn}

// fault is one scheduled fault: everything random about it is drawn from
// the seed when the schedule is made.
type fault struct {
	kind   string
	target string        // worker role, pipeline, proxy or service
	d      time.Duration // how long it lasts
	gap    time.Duration // quiet time after it
	mode   int           // variant (restart mode)
}

// schedule draws the two lanes of faults from the seed.
func (h *harness) schedule() (procLane, infraLane []fault) {
	rng := rand.New(rand.NewPCG(h.opts.Seed, 0x6368616f73))
	var kinds []string
	for _, k := range h.opts.Kinds {
		if k == FaultChurn && !h.hasChurn() {
			continue
		}
		for range h.opts.PerKind {
			kinds = append(kinds, k)
		}
	}
	for range h.opts.Extra {
		kinds = append(kinds, h.opts.Kinds[rng.IntN(len(h.opts.Kinds))])
	}
	rng.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
	targets := h.targets()
	var churn []string
	for _, p := range sortedKeys(h.extras) {
		churn = append(churn, p)
	}
	services := []string{"pg", "nats", "redis", "kafka"}
	ms := func(lo, hi int) time.Duration { return time.Duration(lo+rng.IntN(hi-lo+1)) * time.Millisecond }
	for _, k := range kinds {
		f := fault{kind: k, gap: max(ms(1000, 3000), h.opts.MinGap), mode: rng.IntN(2)}
		switch k {
		case FaultKill:
			f.target, f.d = targets[rng.IntN(len(targets))], ms(300, 2000)
		case FaultPause:
			f.target, f.d = targets[rng.IntN(len(targets))], ms(4000, 8000)
		case FaultChurn:
			if len(churn) == 0 {
				continue
			}
			f.target, f.d = churn[rng.IntN(len(churn))], ms(4000, 9000)
		case FaultLatency:
			f.target, f.d = services[rng.IntN(len(services))], ms(3000, 6000)
		case FaultDrop:
			f.target, f.d = services[rng.IntN(len(services))], ms(300, 2000)
		case FaultBlackhole:
			f.target, f.d = services[rng.IntN(len(services))], ms(2000, 6000)
		case FaultPGRestart:
			f.target = "pg"
		case FaultNATSRestart:
			f.target = "nats"
		case FaultKfakeRestart:
			f.target = "kfake"
		}
		if slices.Contains(processFaults, k) {
			procLane = append(procLane, f)
		} else {
			infraLane = append(infraLane, f)
		}
	}
	return procLane, infraLane
}

func (h *harness) hasChurn() bool { return len(h.extras) > 0 }

// targets are the roles kill and pause may hit.
func (h *harness) targets() []string {
	var all []string
	all = append(all, sortedKeys(h.relays)...)
	all = append(all, sortedKeys(h.consumers)...)
	all = append(all, "producer")
	if len(h.opts.Targets) == 0 {
		return all
	}
	var out []string
	for _, t := range all {
		if slices.Contains(h.opts.Targets, t) {
			out = append(out, t)
		}
	}
	return out
}

func (h *harness) workerByRole(role string) *proc {
	if role == "producer" {
		return h.producer
	}
	if p, ok := h.relays[role]; ok {
		return p
	}
	return h.consumers[role]
}

// inject runs both lanes to their end; every fault is healed (process
// resumed or restarted, toxic removed, server up) before it returns.
func (h *harness) inject(ctx context.Context) {
	procLane, infraLane := h.schedule()
	var wg sync.WaitGroup
	for _, lane := range [][]fault{procLane, infraLane} {
		wg.Go(func() {
			for _, f := range lane {
				if ctx.Err() != nil {
					return
				}
				if err := h.apply(ctx, f); err != nil {
					h.problem("fault %s on %s: %v", f.kind, f.target, err)
				}
				sleep(ctx, f.gap)
			}
		})
	}
	wg.Wait()
}

func (h *harness) apply(ctx context.Context, f fault) error {
	h.countFault(f.kind)
	switch f.kind {
	case FaultKill:
		p := h.workerByRole(f.target)
		name := p.kill()
		h.mu.Lock()
		h.killed[name] = true
		h.mu.Unlock()
		h.logf("kill -9 %s, restart in %s", name, f.d)
		sleep(ctx, f.d)
		return p.start(context.WithoutCancel(ctx), nil)
	case FaultPause:
		p := h.workerByRole(f.target)
		name, err := p.pause()
		if err != nil {
			return err
		}
		h.mu.Lock()
		h.paused[name] = true
		h.mu.Unlock()
		h.logf("SIGSTOP %s for %s", name, f.d)
		sleep(ctx, f.d)
		p.resume()
		return nil
	case FaultChurn:
		p := h.extras[f.target]
		if err := p.start(ctx, nil); err != nil {
			return err
		}
		h.logf("%s joins group of %s for %s", p.current(), f.target, f.d)
		sleep(ctx, f.d)
		p.stop()
		return nil
	case FaultLatency:
		h.logf("latency 100-300ms to %s for %s", f.target, f.d)
		return h.proxies.byName[f.target].latency(ctx, 200, 100, f.d)
	case FaultDrop:
		h.logf("connections to %s dropped, refused for %s", f.target, f.d)
		return h.proxies.byName[f.target].drop(ctx, f.d)
	case FaultBlackhole:
		h.logf("connections to %s black-holed for %s", f.target, f.d)
		return h.proxies.byName[f.target].blackhole(ctx, f.d)
	case FaultPGRestart:
		mode := []string{"fast", "immediate"}[f.mode]
		h.logf("PostgreSQL restart (%s)", mode)
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		return h.pg.Restart(rctx, mode)
	case FaultNATSRestart:
		h.logf("nats-server restart")
		h.natsP.stop()
		return h.startService(context.WithoutCancel(ctx), h.natsP, h.natsAddr)
	case FaultKfakeRestart:
		how := []string{"SIGTERM", "SIGKILL"}[f.mode]
		h.logf("kfake restart (%s)", how)
		if f.mode == 1 {
			h.kfakeP.kill()
		} else {
			h.kfakeP.stop()
		}
		return h.startService(context.WithoutCancel(ctx), h.kfakeP, h.kafkaAddr)
	}
	return fmt.Errorf("unknown fault kind %q", f.kind)
}
