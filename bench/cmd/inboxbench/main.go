// Command inboxbench measures what the idempotent consumer (package inbox)
// costs: a handler that inserts one effect row per message, run without
// dedup, through the SQL inbox and through the Redis inbox, per message and
// in batches, beside the ceilings that bound it (bare INSERTs, SET NX),
// against PostgreSQL and Redis, and prints one markdown table.
//
// Every row gets a fresh schema and fresh Redis keys, runs alone (rows never
// overlap) and removes what it created. Rows run in rounds, one run of each
// per round, so that a row and its baseline see the same moments of a shared
// machine; each reports its median run and its ratio to its baseline as the
// median of the same-round ratios.
package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"github.com/exactlyonce/exactly/bench/internal/cpumeter"
	"github.com/exactlyonce/exactly/bench/internal/report"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/exactlyonce/exactly"
)

// config is what the flags set.
type config struct {
	pgDSN      string
	redisAddr  string
	n          int
	workers    int
	batch      int
	payload    int
	repeat     int
	redeliver  int
	timeout    time.Duration
	profileDir string
}

// row is one line of the table.
type row struct {
	id   string // stable name, used by -rows
	num  string // its number in the table
	name string
	run  func(ctx context.Context, b *bench, rc *rowCtx) (result, error)
	// base is the row this one is compared with: its baseline (the same
	// handler without dedup) or the ceiling that bounds it.
	base string
	// redisOnly rows touch Redis alone: no schema is set up for them, and
	// -redis-only runs just them, without PostgreSQL.
	redisOnly bool
}

// result is what one run of a row measured.
type result struct {
	msgs    int
	elapsed time.Duration
	note    string
	err     error
}

func (r result) rate() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.msgs) / r.elapsed.Seconds()
}

// bench holds what every row shares.
type bench struct {
	cfg  config
	pool *pgxpool.Pool
	rdb  *redis.Client
	// rdbOld is a second client whose hook refuses SET with NX and GET as
	// Redis before 7.0 does, so that the inbox falls back to its Lua
	// scripts: the Redis inbox as it was before it used native commands.
	rdbOld     *redis.Client
	old        *oldServer
	log        *slog.Logger
	msgs       []*exactly.Message
	pgBackends cpumeter.Backends
	results    map[string]result
	runs       map[string][]result // one per round, in order
}

var rows = []row{
	// Grouped so that each row runs right after the row it is compared with.
	{id: "insert", num: "C1", name: "ceiling: bare INSERT, autocommit, one per message", run: runInsert},
	{id: "tx", num: "1", name: "baseline: BEGIN; INSERT effect; COMMIT per message, no dedup", run: runTx, base: "insert"},
	{id: "sql", num: "2", name: "SQL inbox per message: HandlePgx (claim + INSERT effect in one tx)", run: runSQLInbox, base: "tx"},
	{id: "redis-tx", num: "4", name: "Redis inbox per message: Handle around BEGIN; INSERT effect; COMMIT", run: runRedisTx, base: "tx"},
	{id: "insert-batch", num: "C2", name: "ceiling: bare multi-row INSERT of -batch rows, autocommit", run: runInsertBatch},
	{id: "tx-batch", num: "3b", name: "baseline batched: BEGIN; INSERT -batch effects; COMMIT, no dedup", run: runTxBatch, base: "insert-batch"},
	{id: "claim-floor", num: "3f", name: "floor batched: row 3b's tx plus one multi-row INSERT of the ids into a table with a unique key on them, nothing else", run: runClaimFloor, base: "tx-batch"},
	{id: "claim-shape", num: "3s", name: "diagnostic: row 3f into a table of the inbox's shape (consumer, id, processed_at; primary key and second index as the inbox's), plain INSERT", run: runClaimShape, base: "claim-floor"},
	{id: "sql-batch", num: "3", name: "SQL inbox batched: HandleBatchPgx of -batch (claim + same INSERT in one tx)", run: runSQLInboxBatch, base: "claim-floor"},
	{id: "redis-batch-tx", num: "5t", name: "Redis inbox batched: HandleBatch of -batch around the row-3b transaction", run: runRedisBatchTx, base: "tx-batch"},
	{id: "setnx", num: "C3", name: "ceiling: SET key val NX EX 3600, one round trip per message (go-redis)", run: runSetNX, redisOnly: true},
	{id: "redis-mem", num: "4m", name: "Redis inbox per message: Handle, effect = in-memory counter", run: runRedisMem, base: "setnx", redisOnly: true},
	{id: "redis-mem-lua", num: "4l", name: "row 4m on the Lua fallback (client refuses SET NX GET, as Redis < 7.0): the inbox before native commands", run: runRedisMemLua, base: "redis-mem", redisOnly: true},
	{id: "setnx-pipe", num: "C4", name: "ceiling: SET NX EX 3600 in pipelines of -batch (go-redis)", run: runSetNXPipe, redisOnly: true},
	{id: "redis-floor", num: "5f", name: "floor batched: the inbox's two writes per message as two pipelines of -batch (SET NX PX GET, then SET PX GET), nothing else (go-redis)", run: runRedisFloor, base: "setnx-pipe", redisOnly: true},
	{id: "redis-batch", num: "5", name: "Redis inbox batched: HandleBatch of -batch, effect = in-memory counter", run: runRedisBatchMem, base: "redis-floor", redisOnly: true},
	{id: "redis-batch-lua", num: "5l", name: "row 5 on the Lua fallback (client refuses SET NX GET, as Redis < 7.0): the inbox before native commands", run: runRedisBatchMemLua, base: "redis-batch", redisOnly: true},
}

func main() {
	var cfg config
	var only string
	var redisOnly bool
	flag.StringVar(&cfg.pgDSN, "pg", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable", "PostgreSQL DSN")
	flag.StringVar(&cfg.redisAddr, "redis", "127.0.0.1:6379", "Redis address")
	flag.IntVar(&cfg.n, "n", 20000, "messages per row")
	flag.IntVar(&cfg.workers, "workers", 8, "concurrent handlers (goroutines, each with its own connection when it needs one)")
	flag.IntVar(&cfg.batch, "batch", 100, "messages per batch in the batched rows")
	flag.IntVar(&cfg.payload, "payload", 200, "payload bytes, stored in each effect row")
	flag.IntVar(&cfg.repeat, "repeat", 5, "rounds; every row runs once per round and reports its median")
	flag.IntVar(&cfg.redeliver, "redeliver", 1000, "after each inbox row, deliver this many of its messages again (untimed) and check that none is applied twice")
	flag.DurationVar(&cfg.timeout, "row-timeout", 3*time.Minute, "give up on a row after this long")
	flag.StringVar(&cfg.profileDir, "cpuprofile", "", "write a CPU profile of each row's timed section (last round) to `DIR`/<row>.pprof")
	flag.StringVar(&only, "rows", "all", "rows to run, comma-separated ids or numbers: "+rowIDs())
	flag.BoolVar(&redisOnly, "redis-only", false, "run only the rows that use Redis alone (of those -rows selects), without connecting to PostgreSQL")
	flag.Parse()

	if err := validate(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "inboxbench:", err)
		os.Exit(2)
	}
	selected, err := selectRows(only)
	if err != nil {
		fmt.Fprintln(os.Stderr, "inboxbench:", err)
		os.Exit(2)
	}
	if redisOnly {
		selected = slices.DeleteFunc(selected, func(r row) bool { return !r.redisOnly })
		if len(selected) == 0 {
			fmt.Fprintln(os.Stderr, "inboxbench: -redis-only leaves no row of -rows to run")
			os.Exit(2)
		}
	}
	if cfg.profileDir != "" {
		if err := os.MkdirAll(cfg.profileDir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "inboxbench:", err)
			os.Exit(1)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, cfg, selected, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "inboxbench:", err)
		os.Exit(1)
	}
}

func validate(cfg config) error {
	switch {
	case cfg.n <= 0:
		return fmt.Errorf("-n must be positive, got %d", cfg.n)
	case cfg.workers <= 0 || cfg.workers > 256:
		return fmt.Errorf("-workers must be in 1..256, got %d", cfg.workers)
	case cfg.batch <= 0 || cfg.batch > 10000:
		return fmt.Errorf("-batch must be in 1..10000, got %d", cfg.batch)
	case cfg.payload < 0:
		return fmt.Errorf("-payload must not be negative, got %d", cfg.payload)
	case cfg.repeat <= 0:
		return fmt.Errorf("-repeat must be positive, got %d", cfg.repeat)
	case cfg.redeliver < 0:
		return fmt.Errorf("-redeliver must not be negative, got %d", cfg.redeliver)
	}
	return nil
}

func rowIDs() string {
	var ids []string
	for _, r := range rows {
		ids = append(ids, r.id)
	}
	return strings.Join(ids, ",")
}

// selectRows accepts "all", row ids and row numbers. A row's baseline is
// not added: without it the ratio column says so.
func selectRows(spec string) ([]row, error) {
	if spec == "" || spec == "all" {
		return rows, nil
	}
	want := map[string]bool{}
	for _, s := range strings.Split(spec, ",") {
		s = strings.TrimSpace(s)
		found := false
		for _, r := range rows {
			if strings.EqualFold(s, r.id) || strings.EqualFold(s, r.num) {
				want[r.id], found = true, true
			}
		}
		if !found {
			return nil, fmt.Errorf("unknown row %q in -rows; want all or some of %s", s, rowIDs())
		}
	}
	var out []row
	for _, r := range rows {
		if want[r.id] {
			out = append(out, r)
		}
	}
	return out, nil
}

func run(ctx context.Context, cfg config, selected []row, out io.Writer) error {
	b := &bench{
		cfg:     cfg,
		log:     slog.New(slog.NewTextHandler(os.Stderr, nil)),
		results: map[string]result{},
		runs:    map[string][]result{},
	}
	if slices.ContainsFunc(selected, func(r row) bool { return !r.redisOnly }) {
		pcfg, err := pgxpool.ParseConfig(cfg.pgDSN)
		if err != nil {
			return fmt.Errorf("-pg: %w", err)
		}
		pcfg.MaxConns = int32(cfg.workers) + 1
		pcfg.AfterConnect = func(_ context.Context, c *pgx.Conn) error {
			b.pgBackends.Add(int(c.PgConn().PID()))
			return nil
		}
		pool, err := pgxpool.NewWithConfig(ctx, pcfg)
		if err != nil {
			return err
		}
		defer pool.Close()
		if err := pool.Ping(ctx); err != nil {
			return fmt.Errorf("PostgreSQL at %s: %w", cfg.pgDSN, err)
		}
		b.pool = pool
	}
	ropts := &redis.Options{Addr: cfg.redisAddr, PoolSize: cfg.workers + 2, MinIdleConns: cfg.workers}
	b.rdb = redis.NewClient(ropts)
	defer b.rdb.Close()
	if err := b.rdb.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("Redis at %s: %w", cfg.redisAddr, err)
	}
	if v, err := b.rdb.Info(ctx, "server").Result(); err == nil {
		for _, l := range strings.Split(v, "\n") {
			if strings.HasPrefix(l, "redis_version:") {
				b.log.Info("Redis", "version", strings.TrimSpace(strings.TrimPrefix(l, "redis_version:")))
			}
		}
	}
	if slices.ContainsFunc(selected, func(r row) bool { return strings.HasSuffix(r.id, "-lua") }) {
		b.rdbOld = redis.NewClient(ropts)
		defer b.rdbOld.Close()
		b.old = &oldServer{}
		b.rdbOld.AddHook(b.old)
		if err := b.rdbOld.Ping(ctx).Err(); err != nil {
			return fmt.Errorf("Redis at %s: %w", cfg.redisAddr, err)
		}
	}
	// Leftovers of an interrupted run.
	if err := b.cleanupRedis(ctx, keyRoot+"*"); err != nil {
		return err
	}

	b.msgs = makeMessages(cfg.n, cfg.payload)
	started := time.Now()
	failed := map[string]error{}
	for round := range cfg.repeat {
		for _, r := range selected {
			if ctx.Err() != nil || failed[r.id] != nil {
				continue
			}
			res, err := b.runOnce(ctx, r, round)
			if err != nil {
				failed[r.id] = err
				continue
			}
			b.runs[r.id] = append(b.runs[r.id], res)
		}
	}
	for _, r := range selected {
		if err := failed[r.id]; err != nil {
			b.results[r.id] = result{err: err}
			continue
		}
		if len(b.runs[r.id]) > 0 {
			b.results[r.id] = median(b.runs[r.id])
		}
	}
	b.log.Info("all rows done", "took", time.Since(started).Round(time.Second))
	printTable(out, b, selected)
	return ctx.Err()
}

// makeMessages builds the messages every row handles: UUIDv7 ids (as the
// outbox assigns them), 1,000 keys, a random payload.
func makeMessages(n, payload int) []*exactly.Message {
	msgs := make([]*exactly.Message, n)
	for i := range msgs {
		p := make([]byte, payload)
		_, _ = rand.Read(p)
		msgs[i] = &exactly.Message{
			ID:        exactly.NewID(),
			Topic:     "orders",
			Key:       fmt.Sprintf("order-%d", i%1000),
			Payload:   p,
			CreatedAt: time.Now(),
		}
	}
	return msgs
}

// runOnce runs a row once, with its own schema and key prefix, and removes
// them afterwards.
func (b *bench) runOnce(ctx context.Context, r row, round int) (result, error) {
	load := report.LoadAvg()
	b.log.Info("row start", "row", r.num, "id", r.id, "round", fmt.Sprintf("%d of %d", round+1, b.cfg.repeat), "loadavg", load)
	rctx, cancel := context.WithTimeout(ctx, b.cfg.timeout)
	defer cancel()
	rc := &rowCtx{
		id:      r.id,
		noPG:    r.redisOnly,
		schema:  "exactly_inboxbench_" + strings.ReplaceAll(r.id, "-", "_"),
		prefix:  fmt.Sprintf("%s%s:r%d:", keyRoot, r.id, round),
		profile: b.cfg.profileDir != "" && round == b.cfg.repeat-1,
	}
	if err := b.setup(rctx, rc); err != nil {
		return result{}, fmt.Errorf("setup: %w", err)
	}
	res, err := r.run(rctx, b, rc)
	if cerr := b.cleanup(context.WithoutCancel(ctx), rc); cerr != nil && err == nil {
		err = fmt.Errorf("cleanup: %w", cerr)
	}
	if err != nil {
		b.log.Error("row failed", "row", r.num, "id", r.id, "err", err)
		return res, err
	}
	res.note = "load avg " + load + " at start; " + res.note
	b.log.Info("row done", "row", r.num, "id", r.id, "msgs", res.msgs, "elapsed", res.elapsed.Round(time.Millisecond),
		"msgs_per_s", int(res.rate()), "notes", res.note)
	return res, nil
}

// median returns the run with the median rate, noting the range.
func median(all []result) result {
	sorted := slices.Clone(all)
	slices.SortFunc(sorted, func(x, y result) int { return cmp.Compare(x.rate(), y.rate()) })
	med := sorted[len(sorted)/2]
	if len(sorted) > 1 {
		med.note = fmt.Sprintf("median of %d runs (%s–%s msgs/s); %s", len(sorted),
			fmtRate(sorted[0].rate()), fmtRate(sorted[len(sorted)-1].rate()), med.note)
	}
	return med
}

func pairedRatio(a, b []result) (lo, med, hi float64, ok bool) {
	return report.PairedRatio(rates(a), rates(b), 1)
}

func rates(rs []result) []float64 {
	out := make([]float64, len(rs))
	for i, r := range rs {
		out[i] = r.rate()
	}
	return out
}

// target is a goal the brief sets for a row, against its base.
type target struct {
	text string
	ok   func(ratio float64) bool
}

var targets = map[string]target{
	// Overhead is the extra time per message: base rate / row rate - 1.
	"sql":         {"overhead ≤ 15% (≥ 0.870× row 1)", func(r float64) bool { return 1/r-1 <= 0.15 }},
	"sql-batch":   {"≥ 0.90× row 3f", func(r float64) bool { return r >= 0.90 }},
	"redis-batch": {"≥ 0.90× row 5f", func(r float64) bool { return r >= 0.90 }},
}

func printTable(w io.Writer, b *bench, selected []row) {
	cfg := b.cfg
	fmt.Fprintf(w, "n=%d workers=%d batch=%d payload=%dB repeat=%d; %s, %d CPUs\n\n",
		cfg.n, cfg.workers, cfg.batch, cfg.payload, cfg.repeat, runtime.Version(), runtime.NumCPU())
	fmt.Fprintln(w, "| # | row | msgs | time | msgs/s | vs base row | target | notes |")
	fmt.Fprintln(w, "|---|---|---:|---:|---:|---|---|---|")
	for _, r := range selected {
		res, ok := b.results[r.id]
		if !ok {
			continue
		}
		if res.err != nil {
			fmt.Fprintf(w, "| %s | %s | | | | | | FAILED: %s |\n", r.num, r.name, report.OneLine(res.err.Error()))
			continue
		}
		ratio, verdict := "", ""
		if r.base != "" {
			lo, med, hi, ok := pairedRatio(b.runs[r.id], b.runs[r.base])
			switch {
			case !ok:
				ratio = "(row " + rowNum(r.base) + " not run)"
			case len(b.runs[r.id]) == 1:
				ratio = fmt.Sprintf("%.3f× row %s", med, rowNum(r.base))
			default:
				ratio = fmt.Sprintf("%.3f× row %s (same-round %.3f–%.3f)", med, rowNum(r.base), lo, hi)
			}
			if t, has := targets[r.id]; has {
				if !ok {
					verdict = t.text + ": not judged"
				} else {
					v := "MISSED"
					if t.ok(med) {
						v = "MET"
					}
					verdict = fmt.Sprintf("%s: %s", t.text, v)
					if strings.HasPrefix(t.text, "overhead") {
						verdict = fmt.Sprintf("%s (overhead %+.1f%%)", verdict, (1/med-1)*100)
					}
				}
			}
		}
		fmt.Fprintf(w, "| %s | %s | %d | %s | %s | %s | %s | %s |\n",
			r.num, r.name, res.msgs, fmtDur(res.elapsed), fmtRate(res.rate()), ratio, verdict, res.note)
	}
}

func rowNum(id string) string {
	for _, r := range rows {
		if r.id == id {
			return r.num
		}
	}
	return id
}

func fmtRate(v float64) string {
	s := fmt.Sprintf("%.0f", v)
	var sb strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			sb.WriteByte(',')
		}
		sb.WriteRune(c)
	}
	return sb.String()
}

func fmtDur(d time.Duration) string {
	switch {
	case d < time.Millisecond:
		return fmt.Sprintf("%.0f µs", float64(d)/float64(time.Microsecond))
	case d < time.Second:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}
