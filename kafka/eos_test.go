package kafka_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/pkg/kversion"

	"github.com/exactlyonce/exactly/kafka"
)

// The EOS test runs some processor instances as child processes: this test
// binary, re-run with eosChildEnv set, killed with SIGKILL. The package's
// TestMain belongs to the crash test, so the child mode is entered from
// init, before any test machinery starts.
const eosChildEnv = "EXACTLY_KAFKA_EOS_CHILD"

func init() {
	if os.Getenv(eosChildEnv) != "" {
		os.Exit(eosChild())
	}
}

// eosSettings are the processor settings of every instance of the EOS
// test, child or in-process.
func eosConfig(seeds []string, group, in, instance string) kafka.ProcessorConfig {
	return kafka.ProcessorConfig{
		Seeds: seeds, Group: group, Topics: []string{in}, InstanceID: instance,
		ClientOpts: append(fastClientOpts(),
			kgo.SessionTimeout(2*time.Second), kgo.HeartbeatInterval(150*time.Millisecond),
			kgo.RebalanceTimeout(4*time.Second),
			kgo.RequestRetries(3)), // so that a lost EndTxn answer can exhaust the client's retries
		CommitInterval:     100 * time.Millisecond,
		MaxBatchRecords:    2000,
		MaxPollRecords:     1000,
		TransactionTimeout: 8 * time.Second,
	}
}

// eosChild is one processor instance copying X_IN to X_OUT, aborting
// about X_ABORT_ODDS of its transactions, until SIGTERM.
func eosChild() int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	fmt.Println("ready") // SIGTERM is handled from here on: the parent waits for this line
	env := os.Getenv
	cfg := eosConfig(strings.Split(env("X_SEEDS"), ","), env("X_GROUP"), env("X_IN"), env("X_INSTANCE"))
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	p, err := kafka.NewProcessor(cfg, copyTo(env("X_OUT")))
	if err != nil {
		fmt.Fprintln(os.Stderr, "eos child:", err)
		return 3
	}
	odds, _ := strconv.ParseFloat(env("X_ABORT_ODDS"), 64)
	kafka.SetProcessorAbortHook(p, func() bool { return rand.Float64() < odds })
	if err := p.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "eos child:", err)
		return 4
	}
	return 0
}

// eosRun is the state of one EOS test run.
type eosRun struct {
	t       *testing.T
	ec      *eosCluster
	group   string
	in, out string
	n       int64

	committed atomic.Int64 // the group's committed offsets, summed
	finished  chan struct{}
	finish    func()

	mu     sync.Mutex
	counts map[string]int // what happened, by kind
}

func (r *eosRun) count(kind string, n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.counts[kind] += n
}

func (r *eosRun) progress() float64 { return float64(r.committed.Load()) / float64(r.n) }

// monitor follows the group's committed offsets until every input record
// is committed.
func (r *eosRun) monitor() {
	defer r.finish()
	for {
		if c := committedTotal(r.t, r.ec, r.group, r.in); c >= 0 {
			r.committed.Store(c)
			if c >= r.n {
				return
			}
		}
		select {
		case <-r.t.Context().Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// waitProgress waits until the committed fraction reaches at, or the run
// finished.
func (r *eosRun) waitProgress(at float64) {
	for r.progress() < at {
		select {
		case <-r.finished:
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// instance is a running processor: a child process or an in-process one.
type instance struct {
	cmd    *exec.Cmd
	ready  chan struct{} // closed when a child handles SIGTERM
	exited chan error
	proc   *kafka.Processor
	stop   func() error
}

func (r *eosRun) startChild(name string) *instance {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), eosChildEnv+"=1", "X_SEEDS="+strings.Join(r.ec.seeds, ","), "X_GROUP="+r.group,
		"X_IN="+r.in, "X_OUT="+r.out, "X_INSTANCE="+name, "X_ABORT_ODDS=0.33")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		r.t.Errorf("starting instance %s: %v", name, err)
		return nil
	}
	if err := cmd.Start(); err != nil {
		r.t.Errorf("starting instance %s: %v", name, err)
		return nil
	}
	in := &instance{cmd: cmd, ready: make(chan struct{}), exited: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(out)
		if sc.Scan() && sc.Text() == "ready" {
			close(in.ready)
		}
		io.Copy(io.Discard, out)
		in.exited <- cmd.Wait()
	}()
	return in
}

func (r *eosRun) startInProcess(name string) *instance {
	cfg := eosConfig(r.ec.seeds, r.group, r.in, name)
	cfg.Logger = slog.New(slog.NewTextHandler(r.t.Output(), &slog.HandlerOptions{Level: slog.LevelError}))
	p, err := kafka.NewProcessor(cfg, copyTo(r.out))
	if err != nil {
		r.t.Errorf("instance %s: %v", name, err)
		return nil
	}
	kafka.SetProcessorAbortHook(p, func() bool { return rand.Float64() < 0.33 })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	return &instance{proc: p, exited: done, stop: func() error { cancel(); return <-done }}
}

// kill ends an instance without letting it end its transaction: SIGKILL
// for a child, an abrupt client close for an in-process one.
func (r *eosRun) kill(name string, in *instance) {
	if in.cmd != nil {
		in.cmd.Process.Kill()
		<-in.exited
		r.count("instances killed with SIGKILL", 1)
		return
	}
	kafka.CrashProcessor(in.proc)
	select {
	case <-in.exited:
	case <-time.After(30 * time.Second):
		r.t.Errorf("instance %s: Run did not return after its client was closed", name)
	}
	r.count("instances closed abruptly in-process", 1)
}

// shutdown stops an instance gracefully.
func (r *eosRun) shutdown(name string, in *instance) {
	if in.cmd != nil {
		// A SIGTERM before the child installed its handler would kill it
		// like SIGKILL: wait until it says it handles the signal.
		select {
		case <-in.ready:
		case err := <-in.exited:
			r.t.Errorf("instance %s exited before it was ready: %v", name, err)
			return
		case <-time.After(30 * time.Second):
			in.cmd.Process.Kill()
			r.t.Errorf("instance %s not ready within 30s", name)
			return
		}
		in.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-in.exited:
			if err != nil {
				r.t.Errorf("instance %s exited: %v", name, err)
			}
		case <-time.After(30 * time.Second):
			in.cmd.Process.Kill()
			r.t.Errorf("instance %s did not stop within 30s of SIGTERM", name)
		}
		return
	}
	if err := in.stop(); err != nil {
		r.t.Errorf("instance %s: Run: %v", name, err)
	}
}

// runSlot runs the instance with one InstanceID through its rounds: each
// round starts it and, at the round's progress, kills it; after the last
// round it runs until the input is done.
func (r *eosRun) runSlot(name string, killAt []float64, inProcess []bool) {
	for i := 0; ; i++ {
		last := i >= len(killAt)
		var in *instance
		if !last && inProcess[i] {
			in = r.startInProcess(name)
		} else {
			in = r.startChild(name)
		}
		if in == nil {
			return
		}
		if last {
			<-r.finished
			r.shutdown(name, in)
			return
		}
		r.waitProgress(killAt[i])
		select {
		case err := <-in.exited:
			r.t.Errorf("instance %s ended by itself: %v", name, err)
			return
		default:
		}
		r.kill(name, in)
	}
}

// joiner makes an extra member join the group and leave it again.
func (r *eosRun) joiner(joinAt, leaveAt float64) {
	r.waitProgress(joinAt)
	in := r.startInProcess("joiner")
	if in == nil {
		return
	}
	r.count("members joined and left", 1)
	r.waitProgress(leaveAt)
	r.shutdown("joiner", in)
}

// injectFaults installs one broker fault every 150-400ms until the run is
// nearly done.
func (r *eosRun) injectFaults(handles map[string][]*kfake.FaultHandle, hmu *sync.Mutex) {
	pick := func(errs ...*kerr.Error) *kerr.Error { return errs[rand.IntN(len(errs))] }
	fault := func(kind string, f kfake.Fault) {
		h := r.ec.c.Fault(f)
		hmu.Lock()
		handles[kind] = append(handles[kind], h)
		hmu.Unlock()
		r.count("faults installed: "+kind, 1)
	}
	firstKinds, round := rand.Perm(7), 0
	endTxnArms := 0
	for r.progress() < 0.97 {
		select {
		case <-r.finished:
			return
		case <-time.After(time.Duration(150+rand.IntN(250)) * time.Millisecond):
		}
		// The first seven rounds take every kind once, in a random order,
		// so each fault bites in every run; the rest are random.
		kind := rand.IntN(7)
		if round < len(firstKinds) {
			kind = firstKinds[round]
		}
		round++
		switch kind {
		case 0:
			fault("EndTxn error", kfake.Fault{Keys: []kmsg.Key{kmsg.EndTxn},
				Err: pick(kerr.UnknownServerError, kerr.CoordinatorNotAvailable, kerr.NotCoordinator, kerr.ConcurrentTransactions, kerr.CoordinatorLoadInProgress)})
		case 1:
			fault("TxnOffsetCommit error", kfake.Fault{Keys: []kmsg.Key{kmsg.TxnOffsetCommit},
				Err: pick(kerr.UnknownServerError, kerr.CoordinatorLoadInProgress, kerr.IllegalGeneration, kerr.RequestTimedOut, kerr.NotCoordinator)})
		case 2:
			fault("AddPartitionsToTxn error", kfake.Fault{Keys: []kmsg.Key{kmsg.AddPartitionsToTxn},
				Err: pick(kerr.UnknownServerError, kerr.CoordinatorNotAvailable, kerr.ConcurrentTransactions, kerr.NotCoordinator)})
		case 3:
			// A committed EndTxn whose answer is lost (the client's three
			// retries run out when more than three are lost) or comes
			// back as UNKNOWN_SERVER_ERROR.
			// Armed faults lose the answer and garble it in turn, the
			// first one loses it.
			var reply *kerr.Error
			if endTxnArms%2 == 1 {
				reply = kerr.UnknownServerError
			}
			if applied, ok := r.ec.net.armEndTxn(1+rand.IntN(5), reply); ok {
				endTxnArms++
				go func() {
					select {
					case ok := <-applied:
						if ok {
							r.count("EndTxn commits applied with the answer lost or garbled", 1)
						}
					case <-r.finished:
					}
				}()
			}
		case 4:
			r.ec.c.RehashCoordinators()
			r.count("coordinator moves", 1)
		case 5:
			r.ec.net.delay(1+rand.IntN(5), 300*time.Millisecond)
		case 6:
			fault("Produce error", kfake.Fault{Keys: []kmsg.Key{kmsg.Produce},
				Err: pick(kerr.NotLeaderForPartition, kerr.NotEnoughReplicas, kerr.RequestTimedOut)})
		}
	}
}

// TestEOSTransactionalCopier ports the idea of Kafka's own EOS system test
// (TransactionalMessageCopier): 100,000 unique integers in a 6-partition
// topic are copied by three processor instances to an output topic while
// the instances are hard-killed and restarted at different points of
// progress, a member joins and leaves, the broker fails and delays
// transactional requests, answers a committed EndTxn with silence or an
// error, moves its coordinators, and a third of the transactions are
// aborted on purpose. A read_committed reader then sees every integer
// exactly once, in order per input partition, and a read_uncommitted
// reader sees the aborted copies the faults left behind.
//
// The broker speaks the Kafka 3.9 protocol, before KIP-890: partitions
// join a transaction through AddPartitionsToTxn, which is faulted too.
// TestProcessorAmbiguousCommit covers the newer protocol.
func TestEOSTransactionalCopier(t *testing.T) {
	t.Parallel()
	start := time.Now()
	ec := newEOSCluster(t, kfake.MaxVersions(kversion.V3_9_0()))
	r := &eosRun{t: t, ec: ec, group: "copier", in: "eos-in", out: "eos-out", n: 100_000,
		finished: make(chan struct{}), counts: map[string]int{}}
	r.finish = sync.OnceFunc(func() { close(r.finished) })
	ec.createTopic(t, 6, r.in)
	ec.createTopic(t, 6, r.out)
	ec.createTopic(t, 1, r.in+".dlq")
	ec.seedInts(t, r.in, 6, int(r.n))
	t.Logf("seeded %d integers in %s", r.n, time.Since(start).Round(time.Millisecond))

	go r.monitor()
	handles := map[string][]*kfake.FaultHandle{}
	var hmu sync.Mutex
	var wg sync.WaitGroup
	wg.Go(func() { r.injectFaults(handles, &hmu) })
	wg.Go(func() { r.joiner(0.45, 0.58) })
	// Each instance is killed at its own points of progress, by SIGKILL
	// (a child process) or by an abrupt close (in-process).
	wg.Go(func() { r.runSlot("p0", []float64{0.06, 0.38, 0.70}, []bool{false, true, false}) })
	wg.Go(func() { r.runSlot("p1", []float64{0.18, 0.50, 0.82}, []bool{true, false, false}) })
	wg.Go(func() { r.runSlot("p2", []float64{0.28, 0.62}, []bool{false, true}) })

	select {
	case <-r.finished:
	case <-time.After(150 * time.Second):
		t.Errorf("the input was not fully committed within 150s: %.1f%% done", 100*r.progress())
		r.finish() // let the slots stop
	}
	wg.Wait()
	copied := time.Since(start)

	hmu.Lock()
	hits := map[string]int{}
	for kind, hs := range handles {
		for _, h := range hs {
			hits[kind] += h.Hits()
			h.Remove()
		}
	}
	hmu.Unlock()

	visible := ec.read(t, r.out, true, int(r.n), 60*time.Second)
	checkCopied(t, visible, int(r.n))
	written := ec.read(t, r.out, false, int(r.n), 60*time.Second)
	if dlq := ec.read(t, r.in+".dlq", false, 0, 5*time.Second); len(dlq) > 0 {
		t.Errorf("%d records were dead-lettered; the copy function never fails", len(dlq))
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	for kind, n := range hits {
		r.counts["faults that answered a request: "+kind] = n
	}
	r.counts["requests delayed"] = int(ec.net.delayed.Load())
	r.counts["EndTxn answers lost"] = int(ec.net.lost.Load())
	r.counts["EndTxn answers turned into UNKNOWN_SERVER_ERROR"] = int(ec.net.rewritten.Load())
	var report []string
	for _, k := range slices.Sorted(maps.Keys(r.counts)) {
		report = append(report, fmt.Sprintf("%s: %d", k, r.counts[k]))
	}
	t.Logf("copied %d integers in %s; %d records written to %s, %d visible to read_committed (%d aborted copies)\n  %s",
		r.n, copied.Round(time.Millisecond), len(written), r.out, len(visible), len(written)-len(visible), strings.Join(report, "\n  "))
	if len(written) <= int(r.n) {
		t.Errorf("read_uncommitted sees %d records for %d integers: no aborted copy was written, the faults did not bite", len(written), r.n)
	}
	for _, kind := range []string{"instances killed with SIGKILL", "instances closed abruptly in-process", "members joined and left",
		"coordinator moves", "requests delayed", "EndTxn commits applied with the answer lost or garbled", "EndTxn answers lost",
		"faults that answered a request: EndTxn error", "faults that answered a request: TxnOffsetCommit error",
		"faults that answered a request: AddPartitionsToTxn error"} {
		if r.counts[kind] == 0 {
			t.Errorf("%s: none happened; the test did not exercise it", kind)
		}
	}
}
