package chaos_test

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/exactlyonce/exactly/chaos"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// options reads CHAOS_SEED (to replay a run) and skips, or fails under CI,
// when a service binary is missing.
func options(t *testing.T) chaos.Options {
	t.Helper()
	for _, b := range []string{"/usr/sbin/nats-server", "/usr/bin/redis-server"} {
		if _, err := os.Stat(b); err != nil {
			if testenv.InCI() {
				t.Fatalf("the chaos suite needs %s: %v", b, err)
			}
			t.Skipf("the chaos suite needs %s: %v", b, err)
		}
	}
	var o chaos.Options
	if s := os.Getenv("CHAOS_SEED"); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("CHAOS_SEED: %v", err)
		}
		o.Seed = seed
	}
	o.Log = testWriter{t}
	o.WorkerRace = os.Getenv("CHAOS_WORKER_RACE") == "1"
	return o
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestChaos is the bounded run: every pipeline, at least three faults of
// every kind (and each of CoverFaults on the SQS and Pub/Sub pipelines),
// then the checker. Replay a run with CHAOS_SEED=<seed>.
func TestChaos(t *testing.T) {
	o := options(t)
	if _, err := exec.LookPath("node"); err != nil && os.Getenv("CHAOS_NODE") == "" {
		if testenv.InCI() {
			t.Fatalf("the chaos suite's SQS pipeline runs fauxqs under Node.js: %v", err)
		}
		t.Skipf("the chaos suite's SQS pipeline runs fauxqs under Node.js: %v", err)
	}
	o.PerKind, o.Extra = 3, 3
	rep, err := chaos.Run(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	rep.Print(&b)
	t.Log("\n" + b.String())
	for _, k := range chaos.AllFaults {
		if rep.Faults[k] < 3 {
			t.Errorf("only %d faults of kind %s: the run proved less than it should", rep.Faults[k], k)
		}
	}
	for _, p := range rep.Pipelines {
		if p.Written == 0 || p.Applied == 0 {
			t.Errorf("%s: nothing written or applied", p.Name)
		}
		if !chaos.Pipelines[p.Name].Cover {
			continue
		}
		for _, k := range chaos.CoverFaults {
			if p.Faults[k] == 0 {
				t.Errorf("%s: no fault of kind %s hit it", p.Name, k)
			}
		}
	}
	if !rep.OK() {
		t.Fatalf("the checker failed the run (replay with CHAOS_SEED=%d)", rep.Seed)
	}
}

// TestChaosSeesBrokenConsumer runs a Kafka consumer with the inbox left
// out (offsets committed after the effect, no dedup) and kills it a few
// times: the checker must report messages applied twice, or it could not
// see them in the real runs either.
func TestChaosSeesBrokenConsumer(t *testing.T) {
	o := options(t)
	o.Pipelines = []string{"kafka-broken"}
	o.Kinds = []string{chaos.FaultKill}
	o.Targets = []string{"kafka-broken"}
	o.PerKind = 6
	o.MinGap = 6 * time.Second // rejoining the group takes seconds: kill it at work, not while it joins
	o.Rate = 80
	o.Drain = time.Minute
	rep, err := chaos.Run(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	// Its report fails by design, which keeps the run's files: remove them.
	t.Cleanup(func() { os.RemoveAll(rep.Dir) })
	var b strings.Builder
	rep.Print(&b)
	t.Log("\n" + b.String())
	p := rep.Pipelines[0]
	if p.Written == 0 {
		t.Fatal("nothing was written")
	}
	if p.Twice == 0 {
		t.Fatalf("the checker saw no double application of a consumer without dedup killed %d times: it cannot be trusted", rep.Faults[chaos.FaultKill])
	}
	if p.Lost != 0 {
		t.Errorf("%d messages lost: the broken consumer only lacks dedup, it must still apply everything", p.Lost)
	}
	if rep.OK() {
		t.Fatal("the report is OK for a broken consumer")
	}
	t.Logf("the checker caught the broken consumer: %d lost, %d applied twice", p.Lost, p.Twice)
}
