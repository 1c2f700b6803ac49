package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/exactlyonce/exactly"
)

// latencyProbe records, per message id, when its transaction committed and
// when the broker acknowledged it. The two are joined only at the end, so
// the order in which they are recorded does not matter.
type latencyProbe struct {
	mu        sync.Mutex
	committed map[string]time.Time
	handed    map[string]time.Time // handed to the broker publisher (first time)
	acked     map[string]time.Time
	dupAcks   int
}

func newLatencyProbe() *latencyProbe {
	return &latencyProbe{committed: map[string]time.Time{}, handed: map[string]time.Time{}, acked: map[string]time.Time{}}
}

// hand records that the relay (or forwarder) handed the messages to the
// broker publisher: what comes before is reading the table, what comes
// after is the broker round trip.
func (p *latencyProbe) hand(at time.Time, ids ...string) {
	p.mu.Lock()
	for _, id := range ids {
		if _, ok := p.handed[id]; !ok {
			p.handed[id] = at
		}
	}
	p.mu.Unlock()
}

// commit records when the transaction of message id committed. A second
// call for the same id keeps the first time: the floor row records the
// commit itself, before it publishes, and produce's own record comes later.
func (p *latencyProbe) commit(id string, at time.Time) {
	p.mu.Lock()
	if _, ok := p.committed[id]; !ok {
		p.committed[id] = at
	}
	p.mu.Unlock()
}

// recording wraps the broker publisher of a relay: the messages of each
// Publish call are handed when it starts and acknowledged, those it
// confirmed, when it returns.
func (p *latencyProbe) recording(inner exactly.Publisher) exactly.Publisher {
	return exactly.PublisherFunc(func(ctx context.Context, msgs []*exactly.Message) error {
		handed := time.Now()
		all := make([]string, len(msgs))
		for i, m := range msgs {
			all[i] = m.ID
		}
		p.hand(handed, all...)
		err := inner.Publish(ctx, msgs)
		now := time.Now()
		errs := exactly.PerMessage(err, len(msgs))
		ids := make([]string, 0, len(msgs))
		for i, m := range msgs {
			if errs[i] == nil {
				ids = append(ids, m.ID)
			}
		}
		p.ack(now, ids...)
		return err
	})
}

func (p *latencyProbe) ack(at time.Time, ids ...string) {
	p.mu.Lock()
	for _, id := range ids {
		if _, ok := p.acked[id]; ok {
			p.dupAcks++ // a re-publish: the first ack is the one that counts
			continue
		}
		p.acked[id] = at
	}
	p.mu.Unlock()
}

// waitAcked waits until every committed message is acknowledged.
func (p *latencyProbe) waitAcked(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		p.mu.Lock()
		missing := 0
		for id := range p.committed {
			if _, ok := p.acked[id]; !ok {
				missing++
			}
		}
		p.mu.Unlock()
		if missing == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d committed messages were not acknowledged within %s", missing, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// percentiles returns p50, p99 and the max of commit → ack.
func (p *latencyProbe) percentiles() (p50, p99, worst time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return spread(p.committed, p.acked)
}

// split returns p50 and p99 of commit → handed and of handed → ack.
func (p *latencyProbe) split() (read, broker [2]time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r50, r99, _ := spread(p.committed, p.handed)
	b50, b99, _ := spread(p.handed, p.acked)
	return [2]time.Duration{r50, r99}, [2]time.Duration{b50, b99}
}

// spread returns p50, p99 and the max of to[id] - from[id] over the ids in
// both. A message confirmed before its COMMIT returned to the writer (the
// CDC relay can read the commit from the WAL first) counts as 0.
func spread(from, to map[string]time.Time) (p50, p99, worst time.Duration) {
	lat := make([]time.Duration, 0, len(from))
	for id, f := range from {
		if t, ok := to[id]; ok {
			lat = append(lat, max(0, t.Sub(f)))
		}
	}
	if len(lat) == 0 {
		return 0, 0, 0
	}
	slices.Sort(lat)
	at := func(q float64) time.Duration { return lat[min(len(lat)-1, int(q*float64(len(lat))))] }
	return at(0.50), at(0.99), lat[len(lat)-1]
}

// producers is how many connections write the latency rows' transactions:
// one commit (with its fsync) takes longer than the 1 ms between messages at
// 1,000 msgs/s, so one writer alone cannot keep the pace.
const producers = 8

// produce sends one message per transaction at a steady rate (an open-loop
// schedule: a late send does not push the next ones back) and records each
// commit time. send runs the whole transaction and returns the id. It
// returns how many it sent and the time from the first send to the last
// commit.
func (b *bench) produce(ctx context.Context, probe *latencyProbe, send func(ctx context.Context, i int) (string, error)) (int, time.Duration, error) {
	total := int(float64(b.cfg.latRate) * b.cfg.latFor.Seconds())
	interval := time.Second / time.Duration(b.cfg.latRate)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := make(chan int, producers)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	sent := 0
	for range producers {
		wg.Go(func() {
			for i := range next {
				id, err := send(ctx, i)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					cancel()
					continue
				}
				probe.commit(id, time.Now())
				mu.Lock()
				sent++
				mu.Unlock()
			}
		})
	}
	start := time.Now()
dispatch:
	for i := range total {
		if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
			select {
			case <-ctx.Done():
				break dispatch
			case <-time.After(d):
			}
		}
		select {
		case next <- i:
		case <-ctx.Done():
			break dispatch
		}
	}
	close(next)
	wg.Wait()
	took := time.Since(start)
	if firstErr != nil {
		return sent, took, firstErr
	}
	return sent, took, ctx.Err()
}

// producerPool is a pool of its own for the application side of the latency
// rows, so that the relay and the writers never wait for each other's
// connections.
func (b *bench) producerPool(ctx context.Context) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(b.cfg.pgDSN)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = producers
	cfg.AfterConnect = b.trackBackend
	return pgxpool.NewWithConfig(ctx, cfg)
}

// latencyResult summarizes a latency row.
func latencyResult(probe *latencyProbe, sent int, took time.Duration, note string) result {
	p50, p99, worst := probe.percentiles()
	read, broker := probe.split()
	if probe.dupAcks > 0 {
		note += fmt.Sprintf("; %d re-published", probe.dupAcks)
	}
	return result{msgs: sent, elapsed: took, p50: p50, p99: p99, note: fmt.Sprintf(
		"max %s; commit → handed to publisher p50 %s / p99 %s, → PubAck p50 %s / p99 %s; %s",
		fmtDur(worst), fmtDur(read[0]), fmtDur(read[1]), fmtDur(broker[0]), fmtDur(broker[1]), note)}
}
