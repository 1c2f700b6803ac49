package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// sqlTracer times every statement on the benchmark's pool while a row is
// measured, by kind, so the table can say where the relay's time goes in
// the database: how many round trips of each kind and how long each took
// (a query's time runs until its rows are closed, so it includes scanning
// and decoding them).
type sqlTracer struct {
	on    atomic.Bool
	mu    sync.Mutex
	kinds map[string]*sqlKind
}

type sqlKind struct {
	n     int
	total time.Duration
	durs  []time.Duration
}

type traceKey struct{}

type traceStart struct {
	sql   string
	start time.Time
}

func (t *sqlTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	if !t.on.Load() {
		return ctx
	}
	return context.WithValue(ctx, traceKey{}, traceStart{sql: data.SQL, start: time.Now()})
}

func (t *sqlTracer) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryEndData) {
	s, ok := ctx.Value(traceKey{}).(traceStart)
	if !ok || !t.on.Load() {
		return
	}
	t.record(classify(s.sql), time.Since(s.start))
}

func (t *sqlTracer) record(kind string, d time.Duration) {
	t.mu.Lock()
	k := t.kinds[kind]
	if k == nil {
		k = &sqlKind{}
		t.kinds[kind] = k
	}
	k.n++
	k.total += d
	k.durs = append(k.durs, d)
	t.mu.Unlock()
}

// batchTrace times a pgx batch (the relay marks rows with one: BEGIN, SET
// LOCAL, the statement, COMMIT in a single round trip); the batch counts as
// one statement of the kind of its main query.
type batchTrace struct {
	start time.Time
	kind  string
}

func (t *sqlTracer) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	if !t.on.Load() {
		return ctx
	}
	return context.WithValue(ctx, traceKey{}, &batchTrace{start: time.Now(), kind: "other"})
}

func (t *sqlTracer) TraceBatchQuery(ctx context.Context, _ *pgx.Conn, data pgx.TraceBatchQueryData) {
	if b, ok := ctx.Value(traceKey{}).(*batchTrace); ok {
		switch k := classify(data.SQL); k {
		case "begin", "commit", "other":
		default:
			b.kind = k
		}
	}
}

func (t *sqlTracer) TraceBatchEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchEndData) {
	b, ok := ctx.Value(traceKey{}).(*batchTrace)
	if !ok || !t.on.Load() {
		return
	}
	t.record(b.kind, time.Since(b.start))
}

// classify names a statement by what it does for the relay or Watermill.
func classify(sql string) string {
	s := strings.TrimSpace(sql)
	switch {
	case strings.HasPrefix(s, "SELECT seq, id, topic") && strings.Contains(s, "status = 0 AND seq >"):
		return "fetch-next"
	case strings.HasPrefix(s, "SELECT seq, id, topic"):
		return "fetch"
	case strings.HasPrefix(s, "DELETE FROM") && strings.Contains(s, "WHERE seq IN (SELECT"):
		return "drain"
	case strings.HasPrefix(s, "DELETE FROM") && strings.Contains(s, "seq = ANY"):
		return "mark"
	case strings.Contains(s, "_leases") || strings.Contains(s, "_relays"):
		return "lease"
	case strings.Contains(s, "watermill_") && strings.Contains(s, "SELECT") && strings.Contains(s, "payload"):
		return "wm-select"
	case strings.Contains(s, "watermill_") && (strings.HasPrefix(s, "INSERT INTO") || strings.HasPrefix(s, "DELETE") || strings.HasPrefix(s, "UPDATE")):
		return "wm-ack"
	case strings.EqualFold(s, "begin") || strings.HasPrefix(strings.ToLower(s), "begin "):
		return "begin"
	case strings.EqualFold(s, "commit") || strings.EqualFold(s, "rollback"):
		return "commit"
	}
	return "other"
}

// start clears the counts and starts counting.
func (t *sqlTracer) start() {
	t.mu.Lock()
	t.kinds = map[string]*sqlKind{}
	t.mu.Unlock()
	t.on.Store(true)
}

// stop stops counting and describes what was counted, busiest kind first:
// count, mean and p99 per statement, and the share of the wall time the
// statements of that kind took together.
func (t *sqlTracer) stop(wall time.Duration) string {
	t.on.Store(false)
	t.mu.Lock()
	defer t.mu.Unlock()
	type kv struct {
		name string
		k    *sqlKind
	}
	var all []kv
	for name, k := range t.kinds {
		all = append(all, kv{name, k})
	}
	slices.SortFunc(all, func(a, b kv) int { return int(b.k.total - a.k.total) })
	var parts []string
	for _, e := range all {
		if e.name == "lease" || e.name == "other" {
			continue // start-up bookkeeping: a few statements
		}
		slices.Sort(e.k.durs)
		p99 := e.k.durs[min(len(e.k.durs)-1, int(0.99*float64(len(e.k.durs))))]
		parts = append(parts, fmt.Sprintf("%s %d× mean %s p99 %s (%.0f%% of wall)", e.name, e.k.n,
			fmtDur(e.k.total/time.Duration(e.k.n)), fmtDur(p99), 100*e.k.total.Seconds()/wall.Seconds()))
	}
	if len(parts) == 0 {
		return ""
	}
	return "SQL: " + strings.Join(parts, ", ")
}
