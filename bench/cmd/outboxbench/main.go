// Command outboxbench measures the outbox relay against its ceilings (a raw
// SQL drain, a raw JetStream publish, a raw Pub/Sub publish loop to pstest
// in this process) and against Watermill's SQL forwarder, on the same
// PostgreSQL and NATS, in one run, and prints one markdown table.
//
// Every row creates its own schema and stream, fills them the same way,
// runs alone (rows never overlap) and drops what it created.
package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"github.com/exactlyonce/exactly/bench/internal/cpumeter"
	"github.com/exactlyonce/exactly/bench/internal/report"
	"github.com/exactlyonce/exactly/internal/pginstance"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"time"

	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
)

// config is what the flags set.
type config struct {
	pgDSN   string
	natsURL string
	// sqsEndpoint is the SQS emulator of the SQS rows.
	sqsEndpoint string
	n           int
	payload     int
	keys        int
	batch       int
	headers     bool
	latRate     int
	latFor      time.Duration
	wmPoll      time.Duration
	timeout     time.Duration
	repeat      int
	profileDir  string
	// relayAsyncCommit runs the relay's connections with
	// synchronous_commit=off: a what-if for the mark stage.
	relayAsyncCommit bool
}

// row is one line of the table.
type row struct {
	id      string // stable name, used by -rows and by the ratio column
	num     string // the row number of the brief (1..6)
	name    string
	run     func(ctx context.Context, b *bench) (result, error)
	latency bool
	repeat  bool // a short drain: run in -repeat rounds, report the median
}

// result is what a row measured.
type result struct {
	msgs     int
	elapsed  time.Duration
	p50, p99 time.Duration
	note     string
	err      error
}

func (r result) rate() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.msgs) / r.elapsed.Seconds()
}

// bench holds what every row shares: the configuration and the connections.
type bench struct {
	cfg     config
	pool    *pgxpool.Pool
	log     *slog.Logger // progress, to stderr
	quiet   *slog.Logger // for the relay: warnings only
	results map[string]result
	runs    map[string][]result // the rounds of the short drains, in order
	// pgBackends are the server pids of every connection the benchmark
	// opens, for the CPU meter.
	pgBackends cpumeter.Backends
	// sqlTrace times the statements on the pool during a measured section.
	sqlTrace sqlTracer
	// ps is the run's pstest server, started by the first Pub/Sub row.
	ps *pubsubFake
	// sqs is the client of the SQS emulator, made by the first SQS row.
	sqs *awssqs.Client
}

var rows = []row{
	{id: "sql", repeat: true, num: "1", name: "ceiling: raw SQL drain (DELETE … SKIP LOCKED RETURNING, pgx)", run: runSQLCeiling},
	{id: "nats", repeat: true, num: "2", name: "ceiling: raw JetStream async publish (Nats-Msg-Id)", run: runNATSCeiling},
	{id: "pub-nats", repeat: true, num: "2b", name: "diagnostic: nats publisher alone, Send of -batch msgs, 16 out at once, no database", run: runPublisherAlone},
	{id: "relay-null", repeat: true, num: "3", name: "exactly relay → null publisher", run: runRelayNull},
	{id: "relay-nats", repeat: true, num: "4", name: "exactly relay → JetStream (nats publisher)", run: runRelayNATS},
	{id: "wm-default", num: "5a", name: "Watermill forwarder → JetStream, default Postgres schema", run: runWatermillDefault},
	{id: "wm-queue", num: "5b", name: "Watermill forwarder → JetStream, queue schema", run: runWatermillQueue},
	{id: "lat-relay", num: "6a", name: "latency: exactly relay (LISTEN/NOTIFY) → JetStream", run: runLatencyRelay, latency: true},
	{id: "lat-floor", num: "6f", name: "latency floor: the writer commits, then publishes the message to JetStream itself", run: runLatencyFloor, latency: true},
	{id: "lat-cdc", num: "6c", name: "latency: exactly CDC relay (pgcdc, logical replication) → JetStream", run: runLatencyCDC, latency: true},
	{id: "lat-wm", num: "6b", name: "latency: Watermill forwarder (default schema, 10 ms poll) → JetStream", run: runLatencyWatermill, latency: true},
	{id: "pubsub", repeat: true, num: "7", name: "ceiling: raw Pub/Sub publish loop to pstest (client library, ordering keys)", run: runPubsubCeiling},
	{id: "pub-pubsub", repeat: true, num: "7b", name: "diagnostic: pubsub publisher alone, Send of -batch msgs, 16 out at once, no database", run: runPubsubPublisherAlone},
	{id: "relay-pubsub", repeat: true, num: "8", name: "exactly relay → Pub/Sub, pstest (pubsub publisher)", run: runRelayPubsub},
	{id: "sqs", repeat: true, num: "9", name: "ceiling: raw SendMessageBatch loop to an SQS FIFO queue, emulator", run: runSQSCeiling},
	{id: "relay-sqs", repeat: true, num: "10", name: "exactly relay → SQS FIFO, emulator (sqs publisher)", run: runRelaySQS},
}

func main() {
	var cfg config
	var only string
	flag.StringVar(&cfg.pgDSN, "pg", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable", "PostgreSQL DSN, or \"private\": start a server of the run's own (wal_level=logical, which row 6c needs; otherwise as this machine's: fsync on, autovacuum off)")
	flag.StringVar(&cfg.natsURL, "nats", "nats://127.0.0.1:4222", "NATS URL (JetStream enabled)")
	flag.StringVar(&cfg.sqsEndpoint, "sqs", os.Getenv("EXACTLY_TEST_SQS_ENDPOINT"), "SQS emulator endpoint of rows 9 and 10 (default EXACTLY_TEST_SQS_ENDPOINT), e.g. http://127.0.0.1:4566")
	flag.IntVar(&cfg.n, "n", 100000, "messages per drain row")
	flag.IntVar(&cfg.payload, "payload", 200, "payload size in bytes")
	flag.IntVar(&cfg.keys, "keys", 1000, "number of distinct ordering keys")
	flag.IntVar(&cfg.batch, "batch", 2000, "batch size of the relay (its default) and of the raw SQL drain")
	flag.BoolVar(&cfg.headers, "headers", true, "give every message a W3C traceparent header (stored as JSON in the outbox)")
	flag.IntVar(&cfg.latRate, "lat-rate", 1000, "messages per second in the latency rows")
	flag.DurationVar(&cfg.latFor, "lat-duration", 10*time.Second, "how long the latency rows produce")
	flag.DurationVar(&cfg.wmPoll, "wm-poll", 10*time.Millisecond, "Watermill subscriber poll interval in the latency row")
	flag.DurationVar(&cfg.timeout, "row-timeout", 3*time.Minute, "give up on a row after this long")
	flag.IntVar(&cfg.repeat, "repeat", 3, "rounds of the short drain rows (1-4, 7-10), one run of each per round; the median is reported")
	flag.BoolVar(&cfg.relayAsyncCommit, "relay-async-commit", false, "what-if: run the relay's own connections with synchronous_commit=off (its mark transactions stop waiting for the WAL flush)")
	flag.StringVar(&cfg.profileDir, "cpuprofile", "", "write a CPU profile of each row's timed section to `DIR`/<row>.pprof")
	flag.StringVar(&only, "rows", "all", "rows to run, comma-separated ids or numbers: "+rowIDs())
	flag.Parse()

	if err := validate(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "outboxbench:", err)
		os.Exit(2)
	}
	selected, err := selectRows(only)
	if err != nil {
		fmt.Fprintln(os.Stderr, "outboxbench:", err)
		os.Exit(2)
	}
	if cfg.profileDir != "" {
		if err := os.MkdirAll(cfg.profileDir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "outboxbench:", err)
			os.Exit(1)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, cfg, selected, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "outboxbench:", err)
		os.Exit(1)
	}
}

func validate(cfg config) error {
	switch {
	case cfg.n <= 0:
		return fmt.Errorf("-n must be positive, got %d", cfg.n)
	case cfg.payload < 0:
		return fmt.Errorf("-payload must not be negative, got %d", cfg.payload)
	case cfg.keys <= 0:
		return fmt.Errorf("-keys must be positive, got %d", cfg.keys)
	case cfg.batch <= 0 || cfg.batch > 10000:
		return fmt.Errorf("-batch must be in 1..10000, got %d", cfg.batch)
	case cfg.latRate <= 0:
		return fmt.Errorf("-lat-rate must be positive, got %d", cfg.latRate)
	case cfg.latFor <= 0:
		return fmt.Errorf("-lat-duration must be positive, got %s", cfg.latFor)
	case cfg.repeat <= 0:
		return fmt.Errorf("-repeat must be positive, got %d", cfg.repeat)
	case cfg.wmPoll <= 0:
		return fmt.Errorf("-wm-poll must be positive, got %s", cfg.wmPoll)
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

// selectRows accepts "all", row ids ("relay-nats") and row numbers ("4",
// "5" for both Watermill rows, "6" for every latency row, "6a").
func selectRows(spec string) ([]row, error) {
	if spec == "" || spec == "all" {
		return rows, nil
	}
	want := map[string]bool{}
	for _, s := range strings.Split(spec, ",") {
		s = strings.TrimSpace(s)
		found := false
		for _, r := range rows {
			if s == r.id || s == r.num || s == strings.TrimRight(r.num, "abcf") {
				want[r.id] = true
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("unknown row %q in -rows; want all or some of %s (or numbers 1-10)", s, rowIDs())
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

// privatePG is the server -pg private starts: wal_level=logical (the CDC
// row needs it) and otherwise the settings of this machine's PostgreSQL
// (fsync and full-page writes on, autovacuum off, 128 MB shared buffers),
// so the latency rows wait for the same WAL flushes.
var privatePG = map[string]string{
	"fsync":            "on",
	"full_page_writes": "on",
	"autovacuum":       "off",
	"shared_buffers":   "128MB",
	"max_wal_size":     "1GB",
}

func run(ctx context.Context, cfg config, selected []row, out io.Writer) error {
	if cfg.pgDSN == "private" {
		in, err := pginstance.Start(ctx, pginstance.Options{Settings: privatePG})
		if err != nil {
			return fmt.Errorf("-pg private: %w", err)
		}
		defer in.Remove()
		cfg.pgDSN = in.DSN("test")
		slog.Info("private PostgreSQL started", "dsn", cfg.pgDSN, "dir", in.Dir)
	}
	pcfg, err := pgxpool.ParseConfig(cfg.pgDSN)
	if err != nil {
		return fmt.Errorf("-pg: %w", err)
	}
	pcfg.MaxConns = 8
	b := &bench{
		cfg:     cfg,
		log:     slog.New(slog.NewTextHandler(os.Stderr, nil)),
		quiet:   slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		results: map[string]result{},
		runs:    map[string][]result{},
	}
	pcfg.AfterConnect = b.trackBackend
	pcfg.ConnConfig.Tracer = &b.sqlTrace
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := pool.Ping(ctx); err != nil {
		return fmt.Errorf("PostgreSQL at %s: %w", cfg.pgDSN, err)
	}
	b.pool = pool
	defer func() {
		if b.ps != nil {
			b.ps.close()
		}
	}()
	if needsNATS(selected) {
		nc, err := nats.Connect(cfg.natsURL)
		if err != nil {
			return fmt.Errorf("NATS at %s: %w", cfg.natsURL, err)
		}
		nc.Close()
	}

	started := time.Now()
	// The short drains run in rounds, one run of each per round, so a row
	// and its ceiling see the same moments of a shared machine; their ratio
	// is then taken round by round.
	var short, long []row
	for _, r := range selected {
		if r.repeat {
			short = append(short, r)
		} else {
			long = append(long, r)
		}
	}
	failed := map[string]error{}
	for round := range cfg.repeat {
		for _, r := range short {
			if ctx.Err() != nil || failed[r.id] != nil {
				continue
			}
			res, err := b.runOnce(ctx, r, fmt.Sprintf("round %d of %d", round+1, cfg.repeat))
			if err != nil {
				failed[r.id] = err
				continue
			}
			b.runs[r.id] = append(b.runs[r.id], res)
		}
	}
	for _, r := range short {
		if err := failed[r.id]; err != nil {
			b.results[r.id] = result{err: err}
			continue
		}
		b.results[r.id] = median(b.runs[r.id])
	}
	for _, r := range long {
		if ctx.Err() != nil {
			break
		}
		res, err := b.runOnce(ctx, r, "")
		if err != nil {
			res.err = err
		}
		b.results[r.id] = res
	}
	b.log.Info("all rows done", "took", time.Since(started).Round(time.Second))
	printTable(out, b, selected)
	return ctx.Err()
}

// runOnce runs a row once and notes the load average at its start.
func (b *bench) runOnce(ctx context.Context, r row, round string) (result, error) {
	load := report.LoadAvg()
	b.log.Info("row start", "row", r.num, "id", r.id, "round", round, "loadavg", load)
	rctx, cancel := context.WithTimeout(ctx, b.cfg.timeout)
	defer cancel()
	res, err := r.run(rctx, b)
	if err != nil {
		b.log.Error("row failed", "row", r.num, "id", r.id, "err", err)
		return res, err
	}
	res.note = "load avg " + load + " at start; " + res.note
	b.log.Info("row done", "row", r.num, "id", r.id, "msgs", res.msgs, "elapsed", res.elapsed.Round(time.Millisecond),
		"msgs_per_s", int(res.rate()), "p50", res.p50, "p99", res.p99, "notes", res.note)
	return res, nil
}

// median returns the run with the median rate, noting the range.
func median(all []result) result {
	if len(all) == 1 {
		return all[0]
	}
	sorted := slices.Clone(all)
	slices.SortFunc(sorted, func(x, y result) int { return cmp.Compare(x.rate(), y.rate()) })
	med := sorted[len(sorted)/2]
	med.note = fmt.Sprintf("median of %d runs (%s–%s msgs/s); %s", len(sorted),
		fmtRate(sorted[0].rate()), fmtRate(sorted[len(sorted)-1].rate()), med.note)
	return med
}

// trackBackend records the server pid of each new connection.
func (b *bench) trackBackend(ctx context.Context, conn *pgx.Conn) error {
	b.pgBackends.Add(int(conn.PgConn().PID()))
	return nil
}

func needsNATS(selected []row) bool {
	return slices.ContainsFunc(selected, func(r row) bool {
		switch r.id {
		case "sql", "relay-null", "pubsub", "pub-pubsub", "relay-pubsub", "sqs", "relay-sqs":
			return false
		}
		return true
	})
}

// printTable writes the one markdown table: throughput, the ratio to the
// ceiling that bounds the row, latency and the verdict on each target.
func printTable(w io.Writer, b *bench, selected []row) {
	cfg := b.cfg
	fmt.Fprintf(w, "n=%d payload=%dB keys=%d batch=%d headers=%v repeat=%d relay-async-commit=%v; latency rows: %d msgs/s for %s; %s, %d CPUs\n\n",
		cfg.n, cfg.payload, cfg.keys, cfg.batch, cfg.headers, cfg.repeat, cfg.relayAsyncCommit, cfg.latRate, cfg.latFor, runtime.Version(), runtime.NumCPU())
	fmt.Fprintln(w, "| # | row | msgs | time | msgs/s | vs ceiling | p50 | p99 | target | notes |")
	fmt.Fprintln(w, "|---|---|---:|---:|---:|---|---:|---:|---|---|")
	for _, r := range selected {
		res := b.results[r.id]
		if res.err != nil {
			fmt.Fprintf(w, "| %s | %s | | | | | | | | FAILED: %s |\n", r.num, r.name, report.OneLine(res.err.Error()))
			continue
		}
		p50, p99 := "", ""
		if r.latency {
			p50, p99 = fmtDur(res.p50), fmtDur(res.p99)
		}
		fmt.Fprintf(w, "| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s |\n",
			r.num, r.name, res.msgs, fmtDur(res.elapsed), fmtRate(res.rate()),
			ratioText(b, r.id), p50, p99, targetText(b, r.id), res.note)
	}
}

// ceilingOf names the row whose rate bounds row id.
var ceilingOf = map[string]string{
	"sql": "sql", "nats": "nats", "pub-nats": "nats",
	"relay-null": "sql",
	"relay-nats": "nats", "wm-default": "nats", "wm-queue": "nats",
	"pubsub": "pubsub", "pub-pubsub": "pubsub", "relay-pubsub": "pubsub",
	"sqs": "sqs", "relay-sqs": "sqs",
}

// ratioText compares a row with its ceiling: the median of the ratios of
// the runs made in the same round when both ran in rounds, else the ratio of
// the two results.
func ratioText(b *bench, id string) string {
	if id == "lat-relay" || id == "lat-cdc" || id == "lat-wm" {
		floor, ok := b.results["lat-floor"]
		if !ok || floor.err != nil || floor.p99 == 0 {
			return ""
		}
		return fmt.Sprintf("p99 %.2f× row 6f's", float64(b.results[id].p99)/float64(floor.p99))
	}
	c, ok := ceilingOf[id]
	if !ok {
		return ""
	}
	ceil, ok := b.results[c]
	if !ok || ceil.err != nil || ceil.rate() == 0 {
		return "(ceiling not run)"
	}
	if id == c {
		return "1.00× row " + rowNum(c)
	}
	lo, med, hi, ok := pairedRatio(b.runs[id], b.runs[c])
	if !ok {
		return fmt.Sprintf("%.2f× row %s", b.results[id].rate()/ceil.rate(), rowNum(c))
	}
	return fmt.Sprintf("%.2f× row %s (same-round ratios %.2f–%.2f)", med, rowNum(c), lo, hi)
}

func pairedRatio(a, b []result) (lo, med, hi float64, ok bool) {
	return report.PairedRatio(rates(a), rates(b), 2)
}

func rates(rs []result) []float64 {
	out := make([]float64, len(rs))
	for i, r := range rs {
		out[i] = r.rate()
	}
	return out
}

// ratioOf is the number ratioText shows.
func ratioOf(b *bench, id, c string) float64 {
	if _, med, _, ok := pairedRatio(b.runs[id], b.runs[c]); ok {
		return med
	}
	return b.results[id].rate() / b.results[c].rate()
}

func targetText(b *bench, id string) string {
	res := b.results[id]
	verdict := func(ok bool) string {
		if ok {
			return "MET"
		}
		return "MISSED"
	}
	switch id {
	case "relay-null":
		ceil, ok := b.results["sql"]
		if !ok || ceil.err != nil {
			return "≥ 0.80× row 1 (not run)"
		}
		return fmt.Sprintf("≥ 0.80× row 1: %s", verdict(ratioOf(b, "relay-null", "sql") >= 0.8))
	case "relay-nats":
		s := "≥ 40,000/s: " + verdict(res.rate() >= 40000)
		best := 0.0
		for _, w := range []string{"wm-default", "wm-queue"} {
			if r, ok := b.results[w]; ok && r.err == nil {
				best = max(best, r.rate())
			}
		}
		if best > 0 {
			s += fmt.Sprintf("; ≥ 10× Watermill best (%.1f×): %s; issue 18: ≥ 15× Watermill best: %s", res.rate()/best, verdict(res.rate() >= 10*best), verdict(res.rate() >= 15*best))
		} else {
			s += "; ≥ 10× Watermill (not run); issue 18: ≥ 15× Watermill (not run)"
		}
		if ceil, ok := b.results["nats"]; ok && ceil.err == nil {
			s += fmt.Sprintf("; issue 18: ≥ 0.85× row 2: %s", verdict(ratioOf(b, "relay-nats", "nats") >= 0.85))
		} else {
			s += "; issue 18: ≥ 0.85× row 2 (not run)"
		}
		return s
	case "lat-relay":
		s := "p99 ≤ 5 ms: " + verdict(res.p99 <= 5*time.Millisecond)
		if floor, ok := b.results["lat-floor"]; ok && floor.err == nil && floor.p99 > 0 {
			s += "; issue 18: p99 ≤ 2× row 6f's: " + verdict(res.p99 <= 2*floor.p99)
		} else {
			s += "; issue 18: p99 ≤ 2× row 6f's (6f not run)"
		}
		return s
	case "relay-pubsub":
		ceil, ok := b.results["pubsub"]
		if !ok || ceil.err != nil {
			return "≥ 0.80× row 7 (not run)"
		}
		return fmt.Sprintf("≥ 0.80× row 7: %s", verdict(ratioOf(b, "relay-pubsub", "pubsub") >= 0.8))
	case "relay-sqs":
		ceil, ok := b.results["sqs"]
		if !ok || ceil.err != nil {
			return "≥ 0.80× row 9 (not run)"
		}
		return fmt.Sprintf("≥ 0.80× row 9: %s", verdict(ratioOf(b, "relay-sqs", "sqs") >= 0.8))
	}
	return ""
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
	// thousands separators, for reading at a glance
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "0"
	case d < time.Millisecond:
		return fmt.Sprintf("%.0f µs", float64(d)/float64(time.Microsecond))
	case d < time.Second:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}
