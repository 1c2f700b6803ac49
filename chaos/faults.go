package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/exactlyonce/exactly/internal/pause"
)

// The kinds of fault.
const (
	FaultKill         = "kill"          // SIGKILL of the producer, a relay or a consumer, restarted after a moment
	FaultKillBurst    = "kill-burst"    // 3-4 SIGKILLs of a Kafka group's consumer inside one session timeout, each restarted 0-300 ms later
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
var AllFaults = []string{FaultKill, FaultKillBurst, FaultPause, FaultChurn, FaultLatency, FaultDrop, FaultBlackhole,
	FaultPGRestart, FaultNATSRestart, FaultKfakeRestart}

// processFaults hit one worker; the others hit a service or the network.
// The two lanes run side by side, so a process fault can meet a network
// fault or a restart.
var processFaults = []string{FaultKill, FaultKillBurst, FaultPause, FaultChurn}

// kafkaSession is the session timeout of the Kafka consumers (the workers'
// kafkaSessionTimeout): a kill burst fits inside it.
const kafkaSession = 3 * time.Second

// burstRecovery bounds the wait, after a kill burst, for the group to apply
// every message written before the burst ended: a group wedged by its
// crashed members, or holding some partitions still, fails the run here,
// long before the drain would.
const burstRecovery = 60 * time.Second

// fault is one scheduled fault: everything random about it is drawn from
// the seed when the schedule is made.
type fault struct {
	kind   string
	target string          // worker role, pipeline, proxy or service
	d      time.Duration   // how long it lasts
	gap    time.Duration   // quiet time after it
	mode   int             // variant (restart mode)
	steps  []time.Duration // kill-burst: for each kill, the restart delay, then the time it runs
}

// schedule draws the two lanes of faults from the seed.
func (h *harness) schedule() (procLane, infraLane []fault) {
	rng := rand.New(rand.NewPCG(h.opts.Seed, 0x6368616f73))
	var kinds []string
	for _, k := range h.opts.Kinds {
		if k == FaultChurn && !h.hasChurn() || k == FaultKillBurst && len(h.kafkaPipelines()) == 0 {
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
	var services []string // the proxies, in a stable order
	for _, s := range []string{"pg", "nats", "redis", "kafka", "sqs", "pubsub"} {
		if h.proxies.byName[s] != nil {
			services = append(services, s)
		}
	}
	ms := func(lo, hi int) time.Duration { return time.Duration(lo+rng.IntN(hi-lo+1)) * time.Millisecond }
	for _, k := range kinds {
		f := fault{kind: k, gap: max(ms(1000, 3000), h.opts.MinGap), mode: rng.IntN(2)}
		switch k {
		case FaultKill:
			f.target, f.d = targets[rng.IntN(len(targets))], ms(300, 2000)
		case FaultKillBurst:
			kp := h.kafkaPipelines()
			if len(kp) == 0 {
				continue
			}
			f.target = kp[rng.IntN(len(kp))]
			for range 3 + rng.IntN(2) {
				f.steps = append(f.steps, ms(0, 300), ms(200, 450))
			}
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
	// Cover: a pipeline marked so gets every kind of CoverFaults at least
	// once; where the draw missed it, a fault is added at a random place of
	// its lane.
	for _, p := range h.pipelines {
		if !p.Cover {
			continue
		}
		for _, k := range CoverFaults {
			if !slices.Contains(h.opts.Kinds, k) || slices.ContainsFunc(append(slices.Clone(procLane), infraLane...), func(f fault) bool {
				return f.kind == k && slices.Contains(h.pipelinesHit(f), p.Name)
			}) {
				continue
			}
			f := fault{kind: k, gap: max(ms(1000, 3000), h.opts.MinGap), mode: rng.IntN(2)}
			lane := &infraLane
			switch k {
			case FaultKill, FaultPause:
				var mine []string
				for _, t := range targets {
					if t == p.Name || t == p.Relay {
						mine = append(mine, t)
					}
				}
				if len(mine) == 0 {
					continue // Options.Targets leaves it out
				}
				f.target, f.d = mine[rng.IntN(len(mine))], ms(300, 2000)
				if k == FaultPause {
					f.d = ms(4000, 8000)
				}
				lane = &procLane
			case FaultChurn:
				if h.extras[p.Name] == nil {
					continue
				}
				f.target, f.d, lane = p.Name, ms(4000, 9000), &procLane
			case FaultLatency:
				f.target, f.d = p.Broker, ms(3000, 6000)
			case FaultDrop:
				f.target, f.d = p.Broker, ms(300, 2000)
			case FaultBlackhole:
				f.target, f.d = p.Broker, ms(2000, 6000)
			}
			*lane = slices.Insert(*lane, rng.IntN(len(*lane)+1), f)
		}
	}
	return procLane, infraLane
}

// CoverFaults are the kinds every pipeline marked Cover (sqs-sql,
// pubsub-sql) meets at least once per run: kill and pause of its relay or
// consumer, an extra member of its consumer group, and each network fault on
// the proxy of its broker.
var CoverFaults = []string{FaultKill, FaultPause, FaultChurn, FaultLatency, FaultDrop, FaultBlackhole}

// pipelinesHit names the pipelines of the run a fault hits: a process
// fault on a pipeline's relay or consumer, a network fault on the proxy of
// its broker (or of PostgreSQL, which every pipeline uses, or Redis, its
// inbox), a restart of its broker or of PostgreSQL. A fault of the producer
// hits none.
func (h *harness) pipelinesHit(f fault) []string {
	var out []string
	for _, p := range h.pipelines {
		var hit bool
		switch f.kind {
		case FaultKill, FaultPause:
			hit = f.target == p.Name || f.target == p.Relay || p.Relay == "relay-kafka" && f.target == "relay-kafka-2"
		case FaultKillBurst, FaultChurn:
			hit = f.target == p.Name
		case FaultLatency, FaultDrop, FaultBlackhole:
			hit = f.target == "pg" || f.target == p.Broker || f.target == "redis" && p.Role == "consumer-redis-inbox"
		case FaultPGRestart:
			hit = true
		case FaultNATSRestart:
			hit = p.Broker == "nats"
		case FaultKfakeRestart:
			hit = p.Broker == "kafka"
		}
		if hit {
			out = append(out, p.Name)
		}
	}
	return out
}

func (h *harness) hasChurn() bool { return len(h.extras) > 0 }

// kafkaPipelines are the pipelines of the run with a Kafka consumer group.
func (h *harness) kafkaPipelines() []string {
	var out []string
	for _, p := range h.pipelines {
		if p.Broker == "kafka" {
			out = append(out, p.Name)
		}
	}
	slices.Sort(out)
	return out
}

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
				pause.For(ctx, f.gap)
			}
		})
	}
	wg.Wait()
}

func (h *harness) apply(ctx context.Context, f fault) error {
	h.countFault(f.kind)
	h.mu.Lock()
	for _, p := range h.pipelinesHit(f) {
		if h.hits[p] == nil {
			h.hits[p] = map[string]int{}
		}
		h.hits[p][f.kind]++
	}
	h.mu.Unlock()
	switch f.kind {
	case FaultKill:
		p := h.workerByRole(f.target)
		name := p.kill()
		h.mu.Lock()
		h.killed[name] = true
		h.mu.Unlock()
		h.logf("kill -9 %s, restart in %s", name, f.d)
		pause.For(ctx, f.d)
		return p.start(context.WithoutCancel(ctx), nil)
	case FaultKillBurst:
		return h.killBurst(ctx, f)
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
		pause.For(ctx, f.d)
		p.resume()
		return nil
	case FaultChurn:
		p := h.extras[f.target]
		if err := p.start(ctx, nil); err != nil {
			return err
		}
		h.logf("%s joins group of %s for %s", p.current(), f.target, f.d)
		pause.For(ctx, f.d)
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

// killBurst kills the consumer of one Kafka pipeline several times inside
// one session timeout, as a crash-looping orchestrator would, each time
// restarting it after a moment; then it waits for the group to apply
// every message written until the burst ended, and records a problem when
// it has not within burstRecovery.
func (h *harness) killBurst(ctx context.Context, f fault) error {
	p := h.consumers[f.target]
	var first, last time.Time
	var names []string
	for i := 0; i+1 < len(f.steps); i += 2 {
		name := p.kill()
		last = time.Now()
		if first.IsZero() {
			first = last
		}
		h.mu.Lock()
		h.killed[name] = true
		h.mu.Unlock()
		names = append(names, name)
		pause.For(ctx, f.steps[i])
		if err := p.start(context.WithoutCancel(ctx), nil); err != nil {
			return err
		}
		if i+2 < len(f.steps) {
			pause.For(ctx, f.steps[i+1])
		}
	}
	span := last.Sub(first)
	h.logf("kill-burst on %s: kill -9 %s within %s, each restarted", f.target, strings.Join(names, ", "), span.Round(time.Millisecond))
	if span >= kafkaSession {
		h.problem("kill-burst on %s: %d kills took %s, not inside one session timeout (%s)", f.target, len(names), span, kafkaSession)
	}
	took, err := h.awaitCaughtUp(ctx, f.target, burstRecovery)
	if err != nil {
		h.problem("kill-burst on %s: %v", f.target, err)
		return nil
	}
	h.logf("kill-burst on %s: every message written before the burst ended applied %s after it", f.target, took.Round(time.Millisecond))
	return nil
}

// awaitCaughtUp waits until pipeline applied every message written so far
// (ids are UUIDv7, ordered by time: every id up to the highest written
// now); it fails after bound.
func (h *harness) awaitCaughtUp(ctx context.Context, pipeline string, bound time.Duration) (time.Duration, error) {
	since := time.Now()
	var outbox string
	for _, p := range h.pipelines {
		if p.Name == pipeline {
			outbox = p.Outbox
		}
	}
	var upTo string
	var missing int64 = -1
	var lastErr error
	for time.Since(since) < bound && ctx.Err() == nil {
		err := h.query(ctx, func(conn *pgx.Conn, qctx context.Context) error {
			if upTo == "" {
				if err := conn.QueryRow(qctx, "SELECT coalesce(max(msg_id), '') FROM chaos_written WHERE outbox = $1", outbox).Scan(&upTo); err != nil {
					return err
				}
			}
			return conn.QueryRow(qctx, `SELECT count(*) FROM chaos_written w WHERE w.outbox = $1 AND w.msg_id <= $2
				AND NOT EXISTS (SELECT 1 FROM chaos_effects e WHERE e.pipeline = $3 AND e.msg_id = w.msg_id)`, outbox, upTo, pipeline).Scan(&missing)
		})
		if err == nil && missing == 0 {
			return time.Since(since), nil
		}
		lastErr = err
		pause.For(ctx, 200*time.Millisecond)
	}
	if missing < 0 {
		return 0, fmt.Errorf("could not count what the group applied within %s of the burst: %v", bound, lastErr)
	}
	return 0, fmt.Errorf("%d messages written before the burst ended still not applied %s after it: the group did not recover", missing, bound)
}

// query runs fn on a connection of its own to the run's database.
func (h *harness) query(ctx context.Context, fn func(conn *pgx.Conn, qctx context.Context) error) error {
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(qctx, h.pg.DSN("test"))
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return fn(conn, qctx)
}
