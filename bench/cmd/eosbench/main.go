// Command eosbench measures what Kafka transactions cost kafka.Processor:
// consume-transform-produce throughput with transactions committed every
// 10, 100 and 500 ms, against an at-least-once baseline that runs the same
// loop without transactions (produce, flush, then commit the offsets every
// 100 ms), and prints one markdown table.
//
// The broker is kfake, franz-go's in-process Kafka-protocol cluster, in
// this process: it is not a real cluster (no disk, no replication, no
// network), so the figures compare the modes with each other and say
// nothing about a real cluster's absolute throughput.
//
// Every run gets a fresh consumer group and a fresh output topic and copies
// the same seeded input topic. A run is timed from the first record handed
// to the transform until every input record is committed (for the
// Processor: its outputs are visible to read_committed consumers), so it
// includes the wait for the last commit, up to one interval. Rows run in rounds, one run of each per
// round, so that a row and the baseline see the same moments of a shared
// machine; each row reports its median run and its ratio to the baseline as
// the median of the same-round ratios.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/bench/internal/report"
	"github.com/exactlyonce/exactly/kafka"
)

type config struct {
	records    int
	partitions int
	payload    int
	rounds     int
	poll       int
	timeout    time.Duration
	rows       string
	cpuProfile string
}

// row is one line of the table.
type row struct {
	name string
	// txn: the Processor with this commit interval and batch limit;
	// otherwise the at-least-once baseline.
	txn      bool
	interval time.Duration
	batch    int
	target   float64 // minimum ratio to the baseline, 0 for none
}

type result struct {
	elapsed time.Duration
	cpu     time.Duration // this process's CPU time (client and kfake) during the run
	commits int64
	aborts  int64
	err     error
}

func main() {
	var cfg config
	flag.IntVar(&cfg.records, "records", 3_000_000, "input records")
	flag.IntVar(&cfg.partitions, "partitions", 6, "partitions of the input and output topics")
	flag.IntVar(&cfg.payload, "payload", 100, "payload bytes per record")
	flag.IntVar(&cfg.rounds, "rounds", 5, "runs of every row, in rounds")
	flag.IntVar(&cfg.poll, "poll", 500, "MaxPollRecords of every row")
	flag.DurationVar(&cfg.timeout, "timeout", 5*time.Minute, "limit of one run")
	flag.StringVar(&cfg.rows, "rows", "", "comma-separated row numbers to run (default all; row 1, the baseline, always runs)")
	flag.StringVar(&cfg.cpuProfile, "cpuprofile", "", "write a CPU profile of the whole run to this file")
	flag.Parse()
	if err := run(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "eosbench:", err)
		os.Exit(1)
	}
}

func run(cfg config) error {
	ctx := context.Background()
	if cfg.cpuProfile != "" {
		f, err := os.Create(cfg.cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	cluster, err := kfake.NewCluster(kfake.NumBrokers(3), kfake.SeedTopics(int32(cfg.partitions), "in"))
	if err != nil {
		return err
	}
	defer cluster.Close()
	seeds := cluster.ListenAddrs()
	adminCl, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	if err != nil {
		return err
	}
	defer adminCl.Close()
	admin := kadm.NewClient(adminCl)
	if err := seed(ctx, seeds, cfg); err != nil {
		return err
	}

	// The batch limit of the interval rows is out of reach, so the
	// interval alone ends a transaction; the last two rows show the
	// default limit and a small one.
	rows := []row{
		{name: "at-least-once baseline: produce, flush, commit offsets every 100 ms", interval: 100 * time.Millisecond},
		{name: "Processor, transactions every 10 ms", txn: true, interval: 10 * time.Millisecond, batch: 1 << 30},
		{name: "Processor, transactions every 100 ms", txn: true, interval: 100 * time.Millisecond, batch: 1 << 30, target: 0.90},
		{name: "Processor, transactions every 500 ms", txn: true, interval: 500 * time.Millisecond, batch: 1 << 30},
		{name: "Processor, defaults (100 ms, MaxBatchRecords 50,000)", txn: true},
		{name: "Processor, 100 ms, MaxBatchRecords 5,000 (commits bound by count)", txn: true, interval: 100 * time.Millisecond, batch: 5000},
	}
	if cfg.rows != "" {
		keep := []row{rows[0]}
		for i, r := range rows[1:] {
			if slices.Contains(strings.Split(cfg.rows, ","), strconv.Itoa(i+2)) {
				keep = append(keep, r)
			}
		}
		rows = keep
	}
	rates := make([][]float64, len(rows))
	commits := make([][]int64, len(rows))
	cpus := make([][]float64, len(rows))
	var notes []string
	seq := 0
	for round := range cfg.rounds {
		for i, r := range rows {
			seq++
			out := fmt.Sprintf("out-%d", seq)
			if _, err := admin.CreateTopic(ctx, int32(cfg.partitions), -1, nil, out); err != nil {
				return fmt.Errorf("creating %s: %w", out, err)
			}
			group := fmt.Sprintf("g-%d", seq)
			fmt.Fprintf(os.Stderr, "round %d: %s ... ", round+1, r.name)
			rctx, cancel := context.WithTimeout(ctx, cfg.timeout)
			cpu0 := cpuTime()
			var res result
			if r.txn {
				res = runProcessor(rctx, seeds, group, out, r, cfg)
			} else {
				res = runBaseline(rctx, seeds, group, out, r, cfg)
			}
			cancel()
			res.cpu = cpuTime() - cpu0
			if res.err != nil {
				return fmt.Errorf("%s, round %d: %w", r.name, round+1, res.err)
			}
			if n, err := stored(ctx, admin, out); err != nil || n < int64(cfg.records) {
				return fmt.Errorf("%s, round %d: the output holds %d records, want at least %d (%v)", r.name, round+1, n, cfg.records, err)
			}
			if _, err := admin.DeleteTopics(ctx, out); err != nil { // kfake holds everything in memory
				return fmt.Errorf("deleting %s: %w", out, err)
			}
			rate := float64(cfg.records) / res.elapsed.Seconds()
			fmt.Fprintf(os.Stderr, "%s, %.0f records/s, %d commits, %d aborts\n", res.elapsed.Round(time.Millisecond), rate, res.commits, res.aborts)
			rates[i] = append(rates[i], rate)
			commits[i] = append(commits[i], res.commits)
			cpus[i] = append(cpus[i], float64(res.cpu.Microseconds())/float64(cfg.records))
		}
		notes = append(notes, "load avg "+report.LoadAvg()+" after round "+strconv.Itoa(round+1))
	}

	fmt.Printf("records=%d partitions=%d payload=%dB poll=%d rounds=%d; kfake (in-process, 3 brokers, no disk): not a real cluster; %s, %d CPUs; %s\n\n",
		cfg.records, cfg.partitions, cfg.payload, cfg.poll, cfg.rounds, runtime.Version(), runtime.NumCPU(), strings.Join(notes, ", "))
	fmt.Println("| # | row | records/s (median) | runs | vs baseline (same-round) | commits/run | CPU µs/record | target |")
	fmt.Println("|---|---|---:|---|---|---:|---:|---|")
	for i, r := range rows {
		med := median(rates[i])
		runs := make([]string, len(rates[i]))
		for j, v := range rates[i] {
			runs[j] = fmt.Sprintf("%.0f", v)
		}
		vs, target := "1.00×", ""
		if i > 0 {
			lo, m, hi, ok := report.PairedRatio(rates[i], rates[0], 1)
			if ok {
				vs = fmt.Sprintf("%.2f× (%.2f–%.2f)", m, lo, hi)
			}
			if r.target > 0 {
				verdict := "MISSED"
				if ok && m >= r.target {
					verdict = "MET"
				}
				target = fmt.Sprintf("≥ %.2f×: %s", r.target, verdict)
			}
		}
		fmt.Printf("| %d | %s | %s | %s | %s | %d | %.2f | %s |\n", i+1, r.name, group3(med), strings.Join(runs, ", "), vs, median64(commits[i]), median(cpus[i]), target)
	}
	return nil
}

// seed writes records integers with a payload of the chosen size.
func seed(ctx context.Context, seeds []string, cfg config) error {
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ProducerLinger(5*time.Millisecond))
	if err != nil {
		return err
	}
	defer cl.Close()
	pad := strings.Repeat("x", max(0, cfg.payload-8))
	const chunk = 10_000
	for lo := 0; lo < cfg.records; lo += chunk {
		recs := make([]*kgo.Record, 0, chunk)
		for i := lo; i < min(lo+chunk, cfg.records); i++ {
			recs = append(recs, &kgo.Record{Topic: "in", Key: []byte("k" + strconv.Itoa(i%1000)), Value: []byte(fmt.Sprintf("%08d", i) + pad)})
		}
		if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
			return fmt.Errorf("seeding: %w", err)
		}
	}
	return nil
}

// transform is the work of every row: one output per input, the same key
// and payload, as an exactly.Message.
func transform(out string) func(context.Context, *kgo.Record) ([]exactly.Message, error) {
	return func(_ context.Context, rec *kgo.Record) ([]exactly.Message, error) {
		return []exactly.Message{{Topic: out, Key: string(rec.Key), Payload: rec.Value}}, nil
	}
}

func clientOpts() []kgo.Opt {
	return []kgo.Opt{kgo.FetchMaxWait(100 * time.Millisecond)}
}

func runProcessor(ctx context.Context, seeds []string, group, out string, r row, cfg config) result {
	fn := transform(out)
	var first atomic.Int64
	p, err := kafka.NewProcessor(kafka.ProcessorConfig{
		Seeds: seeds, ClientOpts: clientOpts(), Group: group, Topics: []string{"in"}, InstanceID: "bench",
		CommitInterval: r.interval, MaxBatchRecords: r.batch, MaxPollRecords: cfg.poll,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}, func(ctx context.Context, rec *kgo.Record) ([]exactly.Message, error) {
		if first.Load() == 0 {
			first.CompareAndSwap(0, time.Now().UnixNano())
		}
		return fn(ctx, rec)
	})
	if err != nil {
		return result{err: err}
	}
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- p.Run(rctx) }()
	defer func() { stop(); <-done }()
	for p.Stats().Processed < int64(cfg.records) {
		select {
		case err := <-done:
			done <- err
			return result{err: fmt.Errorf("Run returned early: %v", err)}
		case <-ctx.Done():
			return result{err: fmt.Errorf("timed out with %d of %d records committed", p.Stats().Processed, cfg.records)}
		case <-time.After(time.Millisecond):
		}
	}
	end := time.Now()
	st := p.Stats()
	return result{elapsed: end.Sub(time.Unix(0, first.Load())), commits: st.Commits, aborts: st.Aborts}
}

// runBaseline is the at-least-once loop: the Processor's shape (poll,
// process the partitions concurrently, produce asynchronously) without a
// transaction; every interval it flushes the outputs and then commits the
// polled offsets. A crash between the two would produce copies again.
func runBaseline(ctx context.Context, seeds []string, group, out string, r row, cfg config) result {
	fn := transform(out)
	cl, err := kgo.NewClient(append(clientOpts(), kgo.SeedBrokers(seeds...), kgo.ConsumerGroup(group), kgo.ConsumeTopics("in"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.DisableAutoCommit(),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()))...)
	if err != nil {
		return result{err: err}
	}
	defer cl.Close()
	var (
		start     time.Time
		deadline  time.Time
		done      int64
		commits   int64
		pending   int64
		produceMu sync.Mutex
		produceE  error
	)
	for done < int64(cfg.records) {
		pollCtx, cancel := ctx, context.CancelFunc(func() {})
		if !deadline.IsZero() {
			pollCtx, cancel = context.WithDeadline(ctx, deadline)
		}
		fs := cl.PollRecords(pollCtx, cfg.poll)
		cancel()
		if err := ctx.Err(); err != nil {
			return result{err: fmt.Errorf("timed out with %d of %d records committed", done, cfg.records)}
		}
		if n := fs.NumRecords(); n > 0 {
			if start.IsZero() {
				start = time.Now()
			}
			if deadline.IsZero() {
				deadline = time.Now().Add(r.interval)
			}
			var wg sync.WaitGroup
			fs.EachPartition(func(ftp kgo.FetchTopicPartition) {
				if len(ftp.Records) == 0 {
					return
				}
				wg.Go(func() {
					for _, rec := range ftp.Records {
						msgs, _ := fn(ctx, rec)
						for i := range msgs {
							cl.Produce(context.Background(), record(&msgs[i], rec, i), func(_ *kgo.Record, err error) {
								if err != nil {
									produceMu.Lock()
									produceE = errors.Join(produceE, err)
									produceMu.Unlock()
								}
							})
						}
					}
				})
			})
			wg.Wait()
			pending += int64(n)
		}
		if deadline.IsZero() || time.Now().Before(deadline) {
			continue
		}
		if err := cl.Flush(ctx); err != nil {
			return result{err: err}
		}
		produceMu.Lock()
		perr := produceE
		produceMu.Unlock()
		if perr != nil {
			return result{err: fmt.Errorf("producing: %w", perr)}
		}
		if err := cl.CommitUncommittedOffsets(ctx); err != nil {
			return result{err: fmt.Errorf("committing: %w", err)}
		}
		commits++
		done += pending
		pending = 0
		deadline = time.Time{}
	}
	return result{elapsed: time.Since(start), commits: commits}
}

// record builds the record the Processor would write for the i-th output
// of rec, with the same work: the input decoded, an output id derived from
// the input's (a UUIDv5), the exactly-id header.
func record(m *exactly.Message, rec *kgo.Record, i int) *kgo.Record {
	in := kafka.DecodeRecord(rec)
	id := uuid.NewSHA1(uuid.NameSpaceOID, []byte(in.ID+"\x00"+strconv.Itoa(i))).String()
	return &kgo.Record{Topic: m.Topic, Key: []byte(m.Key), Value: m.Payload,
		Headers: []kgo.RecordHeader{{Key: exactly.HeaderID, Value: []byte(id)}}}
}

// stored sums topic's end offsets (records plus transaction markers).
func stored(ctx context.Context, admin *kadm.Client, topic string) (int64, error) {
	offs, err := admin.ListEndOffsets(ctx, topic)
	if err != nil {
		return 0, err
	}
	var n int64
	offs.Each(func(o kadm.ListedOffset) { n += o.Offset })
	return n, nil
}

// cpuTime is the user plus system CPU time this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func median64(v []int64) int64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// group3 prints n with thousands separators.
func group3(f float64) string {
	s := strconv.FormatInt(int64(f+0.5), 10)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
