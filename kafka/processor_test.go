package kafka_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kversion"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/kafka"
)

// eosCluster is a kfake cluster for the processor tests: three brokers,
// short group session timeouts, and an admin client.
type eosCluster struct {
	c     *kfake.Cluster
	net   *netFaults // between the brokers and every client
	admin *kadm.Client
	seeds []string
}

func newEOSCluster(t *testing.T, opts ...kfake.Opt) *eosCluster {
	t.Helper()
	nf := &netFaults{}
	c, err := kfake.NewCluster(append([]kfake.Opt{kfake.NumBrokers(3), kfake.GroupMinSessionTimeout(500 * time.Millisecond),
		kfake.ListenFn(nf.Listen)}, opts...)...)
	if err != nil {
		t.Fatalf("starting kfake: %v", err)
	}
	t.Cleanup(c.Close)
	ec := &eosCluster{c: c, net: nf, seeds: c.ListenAddrs()}
	cl, err := kgo.NewClient(kgo.SeedBrokers(ec.seeds...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	ec.admin = kadm.NewClient(cl)
	return ec
}

func (ec *eosCluster) createTopic(t *testing.T, partitions int32, name string) {
	t.Helper()
	if _, err := ec.admin.CreateTopic(t.Context(), partitions, -1, nil, name); err != nil {
		t.Fatalf("creating topic %s: %v", name, err)
	}
}

// seedInts writes the integers 0..n-1 to topic: integer i to partition
// i % partitions, with key "p<partition>", so the integers of a key are
// increasing in offset order.
func (ec *eosCluster) seedInts(t *testing.T, topic string, partitions, n int) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(ec.seeds...), kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.ProducerLinger(5*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	const chunk = 5000
	for lo := 0; lo < n; lo += chunk {
		recs := make([]*kgo.Record, 0, chunk)
		for i := lo; i < min(lo+chunk, n); i++ {
			part := int32(i % partitions)
			recs = append(recs, &kgo.Record{Topic: topic, Partition: part, Key: []byte("p" + strconv.Itoa(int(part))), Value: []byte(strconv.Itoa(i))})
		}
		if err := cl.ProduceSync(t.Context(), recs...).FirstErr(); err != nil {
			t.Fatalf("seeding %s: %v", topic, err)
		}
	}
}

// read returns the records of topic, read from the start with the given
// isolation, once it has at least want of them and no more arrive.
func (ec *eosCluster) read(t *testing.T, topic string, committed bool, want int, timeout time.Duration) []*kgo.Record {
	t.Helper()
	iso := kgo.ReadUncommitted()
	if committed {
		iso = kgo.ReadCommitted()
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(ec.seeds...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(iso),
		kgo.FetchMaxWait(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	deadline := time.Now().Add(timeout)
	var out []*kgo.Record
	quiet := 0
	for time.Now().Before(deadline) && (len(out) < want || quiet < 3) {
		ctx, cancel := context.WithTimeout(t.Context(), 400*time.Millisecond)
		fs := cl.PollFetches(ctx)
		cancel()
		fs.EachError(func(topic string, p int32, err error) {
			if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
				t.Logf("reading %s/%d: %v", topic, p, err)
			}
		})
		n := 0
		fs.EachRecord(func(r *kgo.Record) { out = append(out, r); n++ })
		if n == 0 {
			quiet++
		} else {
			quiet = 0
		}
	}
	return out
}

// checkCopied asserts that recs hold every integer 0..n-1 exactly once,
// in increasing order per key (per input partition).
func checkCopied(t *testing.T, recs []*kgo.Record, n int) {
	t.Helper()
	seen := make([]int, n)
	last := map[string]int{}
	disorder, bad := 0, 0
	for _, r := range recs {
		v, err := strconv.Atoi(string(r.Value))
		if err != nil || v < 0 || v >= n {
			bad++
			continue
		}
		seen[v]++
		k := string(r.Key) + "@" + strconv.Itoa(int(r.Partition))
		if prev, ok := last[k]; ok && v <= prev {
			disorder++
		}
		last[k] = v
	}
	var missing, dup []int
	for v, c := range seen {
		switch {
		case c == 0:
			missing = append(missing, v)
		case c > 1:
			dup = append(dup, v)
		}
	}
	if len(missing) > 0 || len(dup) > 0 || disorder > 0 || bad > 0 {
		t.Errorf("read_committed output: %d records for %d integers: %d missing (first %v), %d duplicated (first %v), %d out of order, %d malformed",
			len(recs), n, len(missing), head(missing), len(dup), head(dup), disorder, bad)
	}
}

func head(s []int) []int { return s[:min(len(s), 10)] }

// copyTo returns a ProcessFunc that copies each record's key and value to
// topic out.
func copyTo(out string) kafka.ProcessFunc {
	return func(_ context.Context, rec *kgo.Record) ([]exactly.Message, error) {
		return []exactly.Message{{Topic: out, Key: string(rec.Key), Payload: rec.Value}}, nil
	}
}

// testLogger logs warnings and errors to the test's output.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// fastClientOpts keep the tests from waiting out franz-go's production
// timeouts and backoffs.
func fastClientOpts() []kgo.Opt {
	return []kgo.Opt{
		kgo.SessionTimeout(3 * time.Second), kgo.HeartbeatInterval(200 * time.Millisecond),
		kgo.RebalanceTimeout(5 * time.Second), kgo.FetchMaxWait(100 * time.Millisecond),
		kgo.RetryBackoffFn(func(int) time.Duration { return 20 * time.Millisecond }),
		kgo.MetadataMinAge(50 * time.Millisecond),
	}
}

func processorConfig(ec *eosCluster, group, instance string, topics ...string) kafka.ProcessorConfig {
	return kafka.ProcessorConfig{
		Seeds: ec.seeds, Group: group, Topics: topics, InstanceID: instance,
		ClientOpts:         fastClientOpts(),
		TransactionTimeout: 10 * time.Second,
		Retry:              exactly.RetryPolicy{MaxAttempts: 3, InitialBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond},
	}
}

// runProcessor runs p until the returned stop is called or the test ends,
// and returns Run's error from stop.
func runProcessor(t *testing.T, p *kafka.Processor) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-done:
			case <-time.After(30 * time.Second):
				err = errors.New("Run did not return within 30s of its context ending")
			}
		})
		return err
	}
	t.Cleanup(func() { stop() })
	return stop
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestProcessorConfigErrors(t *testing.T) {
	t.Parallel()
	ok := kafka.ProcessorConfig{Seeds: []string{"127.0.0.1:9092"}, Group: "g", Topics: []string{"in"}, InstanceID: "a"}
	fn := copyTo("out")
	if _, err := kafka.NewProcessor(ok, nil); err == nil || !strings.Contains(err.Error(), "ProcessFunc is nil") {
		t.Errorf("nil ProcessFunc: got %v", err)
	}
	p, err := kafka.NewProcessor(ok, fn)
	if err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	if got := p.TransactionalID(); got != "g-a" {
		t.Errorf("TransactionalID = %q, want g-a", got)
	}
	for _, tc := range []struct {
		name string
		edit func(*kafka.ProcessorConfig)
		want string
	}{
		{"no seeds", func(c *kafka.ProcessorConfig) { c.Seeds = nil }, "Seeds is required"},
		{"no group", func(c *kafka.ProcessorConfig) { c.Group = "" }, "Group is required"},
		{"no topics", func(c *kafka.ProcessorConfig) { c.Topics = nil }, "Topics is required"},
		{"no instance", func(c *kafka.ProcessorConfig) { c.InstanceID = "" }, "InstanceID is required"},
		{"instance with a space", func(c *kafka.ProcessorConfig) { c.InstanceID = "pod 1" }, "InstanceID"},
		{"prefix with a slash", func(c *kafka.ProcessorConfig) { c.TransactionalIDPrefix = "a/b" }, "TransactionalIDPrefix"},
		{"bad topic", func(c *kafka.ProcessorConfig) { c.Topics = []string{"in put"} }, "Topics"},
		{"negative interval", func(c *kafka.ProcessorConfig) { c.CommitInterval = -time.Second }, "must not be negative"},
		{"timeout below interval", func(c *kafka.ProcessorConfig) {
			c.CommitInterval = 2 * time.Second
			c.TransactionTimeout = 3 * time.Second
		}, "TransactionTimeout"},
		{"bad retry", func(c *kafka.ProcessorConfig) { c.Retry.MaxAttempts = -1 }, "Retry"},
		{"negative session timeout", func(c *kafka.ProcessorConfig) { c.SessionTimeout = -time.Second }, "SessionTimeout"},
		{"heartbeat past session", func(c *kafka.ProcessorConfig) {
			c.SessionTimeout = 6 * time.Second
			c.HeartbeatInterval = 6 * time.Second
		}, "HeartbeatInterval"},
		{"tiny rebalance timeout", func(c *kafka.ProcessorConfig) { c.RebalanceTimeout = time.Millisecond }, "RebalanceTimeout"},
	} {
		cfg := ok
		tc.edit(&cfg)
		if _, err := kafka.NewProcessor(cfg, fn); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error mentioning %q", tc.name, err, tc.want)
		}
	}
}

// TestProcessorCopiesWithDeadLetters: one processor copies 600 integers;
// a panic is retried, inputs that keep failing and an invalid output go to
// the dead-letter topic, and read_committed output holds everything else
// once, with ids derived from the inputs.
func TestProcessorCopiesWithDeadLetters(t *testing.T) {
	t.Parallel()
	ec := newEOSCluster(t)
	ec.createTopic(t, 3, "in")
	ec.createTopic(t, 3, "out")
	ec.createTopic(t, 1, "in.dlq")
	const n = 600
	ec.seedInts(t, "in", 3, n)

	var panicked atomic.Bool
	fn := func(ctx context.Context, rec *kgo.Record) ([]exactly.Message, error) {
		v, _ := strconv.Atoi(string(rec.Value))
		switch {
		case v == 7 && panicked.CompareAndSwap(false, true):
			panic("first attempt at 7")
		case v%100 == 50:
			return nil, fmt.Errorf("cannot process %d", v)
		case v == 99:
			return []exactly.Message{{Topic: "bad topic!", Payload: rec.Value}}, nil
		}
		return copyTo("out")(ctx, rec)
	}
	cfg := processorConfig(ec, "copy", "a", "in")
	cfg.Logger = slog.New(slog.DiscardHandler)
	p, err := kafka.NewProcessor(cfg, fn)
	if err != nil {
		t.Fatal(err)
	}
	stop := runProcessor(t, p)
	waitFor(t, 30*time.Second, "all input processed", func() bool { return p.Stats().Processed == n })
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	dead := map[int]bool{99: true}
	for v := 50; v < n; v += 100 {
		dead[v] = true
	}
	out := ec.read(t, "out", true, n-len(dead), 20*time.Second)
	seen := map[int]int{}
	for _, r := range out {
		v, _ := strconv.Atoi(string(r.Value))
		seen[v]++
		var id string
		for _, h := range r.Headers {
			if h.Key == exactly.HeaderID {
				id = string(h.Value)
			}
		}
		want := kafka.OutputID("kafka:in/"+strconv.Itoa(int(r.Key[1]-'0'))+"/"+strconv.Itoa(v/3), 0)
		if id != want {
			t.Errorf("output of %d has id %q, want %q (derived from the input's position)", v, id, want)
			break
		}
	}
	for v := range n {
		want := 1
		if dead[v] {
			want = 0
		}
		if seen[v] != want {
			t.Errorf("integer %d is in the output %d times, want %d", v, seen[v], want)
		}
	}
	dlq := ec.read(t, "in.dlq", true, len(dead), 20*time.Second)
	if len(dlq) != len(dead) {
		t.Fatalf("dead-letter topic holds %d records, want %d", len(dlq), len(dead))
	}
	for _, r := range dlq {
		v, _ := strconv.Atoi(string(r.Value))
		hs := map[string]string{}
		for _, h := range r.Headers {
			hs[h.Key] = string(h.Value)
		}
		wantAttempts := "3"
		if v == 99 {
			wantAttempts = "1" // an invalid output is not retried
		}
		if !dead[v] || hs[exactly.HeaderDeadTopic] != "in" || hs[exactly.HeaderDeadAttempts] != wantAttempts || hs[exactly.HeaderDeadReason] == "" {
			t.Errorf("dead letter %d has headers %v", v, hs)
		}
	}
	st := p.Stats()
	if st.Processed != n || st.DeadLettered != int64(len(dead)) || st.Outputs != int64(n-len(dead)) || st.Commits == 0 {
		t.Errorf("stats %+v, want Processed %d, DeadLettered %d, Outputs %d", st, n, len(dead), n-len(dead))
	}
	if !panicked.Load() {
		t.Error("the panic was never raised")
	}
}

// TestProcessorAbortsRewind: every second transaction is aborted; the
// processor rewinds to the committed offsets and the read_committed output
// is still exactly once, while read_uncommitted shows the aborted copies.
func TestProcessorAbortsRewind(t *testing.T) {
	t.Parallel()
	ec := newEOSCluster(t)
	ec.createTopic(t, 4, "in")
	ec.createTopic(t, 4, "out")
	const n = 4000
	ec.seedInts(t, "in", 4, n)
	cfg := processorConfig(ec, "abort", "a", "in")
	cfg.MaxBatchRecords = 300
	cfg.Logger = testLogger(t)
	p, err := kafka.NewProcessor(cfg, copyTo("out"))
	if err != nil {
		t.Fatal(err)
	}
	var ends atomic.Int64
	kafka.SetProcessorAbortHook(p, func() bool { return ends.Add(1)%2 == 0 })
	stop := runProcessor(t, p)
	waitFor(t, 60*time.Second, "all input processed", func() bool { return p.Stats().Processed == n })
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	checkCopied(t, ec.read(t, "out", true, n, 20*time.Second), n)
	all := ec.read(t, "out", false, n, 20*time.Second)
	st := p.Stats()
	if st.Aborts == 0 || len(all) <= n {
		t.Errorf("aborts %d, %d records written for %d integers: the aborts did not happen", st.Aborts, len(all), n)
	}
	t.Logf("stats %+v; %d records written, %d visible", st, len(all), n)
}

// TestProcessorAmbiguousCommit: a commit the broker applied but whose
// answer never reaches the processor (the retries run out), and one it
// applied but answered with UNKNOWN_SERVER_ERROR (which the session would
// report as an abort). Neither is reported as committed or rewound
// blindly: the processor replaces its session and resumes from the
// broker's offsets, and the output stays exactly once.
func TestProcessorAmbiguousCommit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		drops   int
		reply   *kerr.Error
		classic bool // Kafka 3.9 protocol: no KIP-890 epoch bump per transaction
	}{
		{"response lost", 4, nil, false},
		{"response lost/kafka 3.9", 4, nil, true},
		{"unknown server error", 1, kerr.UnknownServerError, false},
		{"unknown server error/kafka 3.9", 1, kerr.UnknownServerError, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var opts []kfake.Opt
			if tc.classic {
				opts = append(opts, kfake.MaxVersions(kversion.V3_9_0()))
			}
			ec := newEOSCluster(t, opts...)
			ec.createTopic(t, 2, "in")
			ec.createTopic(t, 2, "out")
			const n = 3000
			ec.seedInts(t, "in", 2, n)
			cfg := processorConfig(ec, "ambiguous", "a", "in")
			cfg.ClientOpts = append(cfg.ClientOpts, kgo.RequestRetries(2))
			cfg.MaxBatchRecords = 200
			cfg.Logger = testLogger(t)
			var calls atomic.Int64
			p, err := kafka.NewProcessor(cfg, func(ctx context.Context, rec *kgo.Record) ([]exactly.Message, error) {
				if calls.Add(1) == 1000 {
					ec.net.armEndTxn(tc.drops, tc.reply)
				}
				return copyTo("out")(ctx, rec)
			})
			if err != nil {
				t.Fatal(err)
			}
			stop := runProcessor(t, p)
			waitFor(t, 60*time.Second, "all input committed", func() bool { return committedTotal(t, ec, "ambiguous", "in") == n })
			if err := stop(); err != nil {
				t.Fatalf("Run: %v", err)
			}
			checkCopied(t, ec.read(t, "out", true, n, 20*time.Second), n)
			if ec.net.lost.Load()+ec.net.rewritten.Load() == 0 {
				t.Error("no EndTxn answer was lost or rewritten: the test proved nothing")
			}
			if st := p.Stats(); st.Restarts == 0 {
				t.Errorf("stats %+v: the ambiguous commit did not make the processor replace its session", st)
			}
		})
	}
}

// committedTotal sums the group's committed offsets on topic.
func committedTotal(t *testing.T, ec *eosCluster, group, topic string) int64 {
	offs, err := ec.admin.FetchOffsets(t.Context(), group)
	if err != nil {
		return -1
	}
	var total int64
	for _, o := range offs[topic] {
		if o.Err == nil {
			total += o.At
		}
	}
	return total
}

// TestProcessorZombieIsFenced: instance A stalls in the middle of a
// transaction; instance B starts with the same InstanceID, which fences A
// and aborts its transaction. A's Run ends with ErrFenced when it wakes,
// none of its output becomes visible although it was written, and B
// processes every record once.
func TestProcessorZombieIsFenced(t *testing.T) {
	t.Parallel()
	ec := newEOSCluster(t)
	ec.createTopic(t, 2, "in")
	ec.createTopic(t, 2, "out")
	const n = 400
	ec.seedInts(t, "in", 2, n)

	tagged := func(by string, fn kafka.ProcessFunc) kafka.ProcessFunc {
		return func(ctx context.Context, rec *kgo.Record) ([]exactly.Message, error) {
			out, err := fn(ctx, rec)
			for i := range out {
				out[i].Headers = map[string]string{"by": by}
			}
			return out, err
		}
	}
	stalled, release := make(chan struct{}), make(chan struct{})
	var seen atomic.Int64
	zombieFn := func(ctx context.Context, rec *kgo.Record) ([]exactly.Message, error) {
		if seen.Add(1) == 40 {
			time.Sleep(300 * time.Millisecond) // let the earlier outputs reach the broker
			close(stalled)
			<-release
		}
		return copyTo("out")(ctx, rec)
	}
	cfgA := processorConfig(ec, "zombie", "same", "in")
	cfgA.CommitInterval = 5 * time.Second // one transaction holds all of A's work
	cfgA.TransactionTimeout = 20 * time.Second
	cfgA.Logger = slog.New(slog.DiscardHandler)
	a, err := kafka.NewProcessor(cfgA, tagged("A", zombieFn))
	if err != nil {
		t.Fatal(err)
	}
	ctxA, cancelA := context.WithCancel(context.Background())
	defer cancelA()
	aDone := make(chan error, 1)
	go func() { aDone <- a.Run(ctxA) }()
	<-stalled

	cfgB := processorConfig(ec, "zombie", "same", "in")
	cfgB.Logger = testLogger(t)
	b, err := kafka.NewProcessor(cfgB, tagged("B", copyTo("out")))
	if err != nil {
		t.Fatal(err)
	}
	stopB := runProcessor(t, b)
	waitFor(t, 30*time.Second, "B's first commit", func() bool { return b.Stats().Commits > 0 })
	close(release)

	// A must end by itself, with ErrFenced, once it wakes.
	select {
	case err := <-aDone:
		if !errors.Is(err, kafka.ErrFenced) {
			t.Errorf("the zombie's Run returned %v, want ErrFenced", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the zombie's Run did not return within 30s of waking")
	}
	waitFor(t, 30*time.Second, "all input processed by B", func() bool { return b.Stats().Processed == n })
	if err := stopB(); err != nil {
		t.Fatalf("B's Run: %v", err)
	}

	by := func(recs []*kgo.Record) map[string]int {
		m := map[string]int{}
		for _, r := range recs {
			for _, h := range r.Headers {
				if h.Key == "by" {
					m[string(h.Value)]++
				}
			}
		}
		return m
	}
	visible := ec.read(t, "out", true, n, 20*time.Second)
	checkCopied(t, visible, n)
	if got := by(visible); got["A"] != 0 || got["B"] != n {
		t.Errorf("visible output by instance: %v, want only B's %d", got, n)
	}
	written := by(ec.read(t, "out", false, n, 20*time.Second))
	if written["A"] == 0 {
		t.Errorf("the zombie wrote nothing before it was fenced (%v): the test proved nothing", written)
	}
	t.Logf("the zombie wrote %d records, none visible; A stats %+v, B stats %+v", written["A"], a.Stats(), b.Stats())
}

// TestProcessorUnpublishableOutput: the output topic refuses batches over
// 64 KB (max.message.bytes, below the client's batch limit), and one
// input's output is 100 KB of random bytes. The broker
// refuses the whole batch that carries it; the processor aborts, produces
// that input's outputs on their own on the replay, and parks the input in
// the dead-letter topic once they are refused again. The inputs that only
// shared its batch are copied, not parked.
func TestProcessorUnpublishableOutput(t *testing.T) {
	t.Parallel()
	ec := newEOSCluster(t)
	ec.createTopic(t, 1, "in")
	limit := "65536"
	if _, err := ec.admin.CreateTopic(t.Context(), 1, -1, map[string]*string{"max.message.bytes": &limit}, "out"); err != nil {
		t.Fatal(err)
	}
	ec.createTopic(t, 1, "in.dlq")
	const n, big = 300, 123
	ec.seedInts(t, "in", 1, n)
	cfg := processorConfig(ec, "large", "a", "in")
	cfg.Logger = slog.New(slog.DiscardHandler)
	large := make([]byte, 100<<10)
	for i := range large {
		large[i] = byte(rand.IntN(256)) // incompressible
	}
	p, err := kafka.NewProcessor(cfg, func(ctx context.Context, rec *kgo.Record) ([]exactly.Message, error) {
		if string(rec.Value) == strconv.Itoa(big) {
			return []exactly.Message{{Topic: "out", Key: string(rec.Key), Payload: large}}, nil
		}
		return copyTo("out")(ctx, rec)
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := runProcessor(t, p)
	waitFor(t, 60*time.Second, "all input processed", func() bool { return p.Stats().Processed == n })
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	out := ec.read(t, "out", true, n-1, 20*time.Second)
	seen := map[string]int{}
	for _, r := range out {
		seen[string(r.Value)]++
	}
	if len(out) != n-1 {
		t.Errorf("the output holds %d records, want %d (all but the large one)", len(out), n-1)
	}
	for v := range n {
		want := 1
		if v == big {
			want = 0
		}
		if got := seen[strconv.Itoa(v)]; got != want {
			t.Errorf("integer %d is in the output %d times, want %d", v, got, want)
		}
	}
	dlq := ec.read(t, "in.dlq", true, 1, 20*time.Second)
	if len(dlq) != 1 || string(dlq[0].Value) != strconv.Itoa(big) {
		t.Fatalf("dead letters: %d records, want only input %d", len(dlq), big)
	}
	var reason string
	for _, h := range dlq[0].Headers {
		if h.Key == exactly.HeaderDeadReason {
			reason = string(h.Value)
		}
	}
	if !strings.Contains(strings.ToUpper(reason), "TOO_LARGE") && !strings.Contains(reason, "too large") {
		t.Errorf("dead-letter reason %q does not say the output was too large", reason)
	}
	if st := p.Stats(); st.Aborts < 2 || st.DeadLettered != 1 {
		t.Errorf("stats %+v: want at least two aborts (the batch, then the output alone) and one dead letter", st)
	}
}
