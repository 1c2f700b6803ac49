package pgcdc_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/pgcdc"
)

// The crash tests run the relay in a child process (this test binary,
// re-run with crashChildEnv set) and kill it with SIGKILL: from inside, at
// the worst moment (the broker confirmed a batch; nothing is recorded or
// confirmed to PostgreSQL yet), or from outside at a random moment.
const crashChildEnv = "EXACTLY_PGCDC_CRASH_CHILD"

// crashChild runs a relay from the environment until the outbox table is
// empty. It exits 0 when done, 3 on error; SIGKILL ends it otherwise.
func crashChild() int {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "crash child:", err); return 3 }
	dsn, table := os.Getenv("EXACTLY_CRASH_DSN"), os.Getenv("EXACTLY_CRASH_TABLE")
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return fail(err)
	}
	defer pool.Close()
	cfg := pgcdc.Config{
		DSN: dsn, Slot: os.Getenv("EXACTLY_CRASH_SLOT"), Table: table, BatchSize: 40,
		InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		StatusInterval: 50 * time.Millisecond, HeartbeatInterval: 100 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel()})),
	}
	seeds := []string{os.Getenv("EXACTLY_CRASH_SEEDS")}
	if os.Getenv("EXACTLY_CRASH_EOS") != "" {
		cfg.ExactlyOnce = &kafka.CDCExactlyOnce{Seeds: seeds, TransactionTimeout: 10 * time.Second}
	} else {
		pub, err := kafka.NewClientPublisher(seeds)
		if err != nil {
			return fail(err)
		}
		defer pub.Close()
		cfg.Publisher = pub
	}
	r, err := pgcdc.New(cfg)
	if err != nil {
		return fail(err)
	}
	odds, _ := strconv.ParseFloat(os.Getenv("EXACTLY_CRASH_ODDS"), 64)
	pgcdc.SetAfterPublish(r, func() { testenv.KillSelf(odds) })
	err = testenv.RunUntil(ctx, r.Run, func(ctx context.Context) bool {
		var n int
		return pool.QueryRow(ctx, "SELECT count(*) FROM "+table).Scan(&n) == nil && n == 0
	})
	if err != nil {
		return fail(err)
	}
	return 0
}

// crashRun enqueues 2,000 messages on 20 keys and runs relay children until
// the table is drained, killing them along the way. It returns what the
// topic holds, read with the given isolation level.
func crashRun(t *testing.T, eos bool) ([]*exactly.Message, []exactly.Message) {
	f := setup(t)
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(4, "crash.orders"))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	seeds := cluster.ListenAddrs()
	// The slot exists before the messages are written: they come from the
	// WAL stream (the first start's backlog of rows pending before the slot
	// existed is at least once, not exactly once).
	_, stop := start(t, f.config(&exactlytest.Recorder{}))
	f.waitStreaming()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	msgs := keyed("crash.orders", 20, 100)
	for i := 0; i < len(msgs); i += 100 {
		f.enqueue(true, msgs[i:i+100]...)
	}

	insideKills, outsideKills := 0, 0
	const killRounds = 24
	for round := 0; ; round++ {
		if round > 100 {
			t.Fatal("the relay did not finish within 100 restarts")
		}
		odds := "0.3"
		outside := round%3 == 2
		if round >= killRounds {
			odds = "0" // let it finish
		}
		env := append(os.Environ(), crashChildEnv+"=1", "EXACTLY_CRASH_DSN="+f.dsn, "EXACTLY_CRASH_TABLE="+f.ob.Table(),
			"EXACTLY_CRASH_SLOT="+f.slot, "EXACTLY_CRASH_SEEDS="+seeds[0], "EXACTLY_CRASH_ODDS="+odds)
		if eos {
			env = append(env, "EXACTLY_CRASH_EOS=1")
		}
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = env
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var killedOutside atomic.Bool
		if outside && round < killRounds {
			go func(p *os.Process) {
				time.Sleep(time.Duration(50+rand.IntN(300)) * time.Millisecond)
				killedOutside.Store(true)
				p.Signal(syscall.SIGKILL)
			}(cmd.Process)
		}
		hung := time.AfterFunc(60*time.Second, func() { cmd.Process.Signal(syscall.SIGQUIT) })
		err := cmd.Wait()
		hung.Stop()
		var exit *exec.ExitError
		switch {
		case err == nil:
			t.Logf("relay finished after %d runs: %d kills after the broker confirm, %d from outside", round+1, insideKills, outsideKills)
		case errors.As(err, &exit) && exit.Sys().(syscall.WaitStatus).Signal() == syscall.SIGKILL:
			if killedOutside.Load() {
				outsideKills++
			} else {
				insideKills++
			}
			continue
		default:
			t.Fatalf("relay child failed: %v", err)
		}
		break
	}
	if insideKills == 0 {
		t.Fatal("no kill happened between the broker confirm and the LSN confirm: the test proved nothing")
	}

	if !eos {
		// Every child has finished: read every copy, to the topic's end.
		return msgs, testenv.Messages(testenv.ReadTopic(t, seeds, "crash.orders", 30*time.Second))
	}
	opts := []kgo.Opt{kgo.SeedBrokers(seeds...), kgo.ConsumeTopics("crash.orders"), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart())}
	if eos {
		opts = append(opts, kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var got []exactly.Message
	ids := map[string]bool{}
	deadline := time.Now().Add(30 * time.Second)
	quiet := 0
	for time.Now().Before(deadline) && (len(ids) < len(msgs) || quiet < 2) {
		fctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		fs := cl.PollFetches(fctx)
		cancel()
		n := 0
		fs.EachRecord(func(r *kgo.Record) {
			n++
			m := exactly.Message{Key: string(r.Key), Payload: r.Value, Topic: r.Topic}
			for _, h := range r.Headers {
				if h.Key == exactly.HeaderID {
					m.ID = string(h.Value)
				}
			}
			ids[m.ID] = true
			got = append(got, m)
		})
		if n == 0 && len(ids) >= len(msgs) {
			quiet++
		}
	}
	return msgs, got
}

// TestCrashBetweenBrokerConfirmAndLSNConfirm: at least once, never lost,
// copies carry the same id, and the last copies are in key order.
func TestCrashBetweenBrokerConfirmAndLSNConfirm(t *testing.T) {
	t.Parallel()
	msgs, got := crashRun(t, false)
	exactlytest.CheckExactlyOnceDedup(t, msgs, got)
	exactlytest.CheckLastDeliveryOrder(t, got)
	t.Logf("%d messages, %d records on the topic (%d copies from the crashes, same ids)", len(msgs), len(got), len(got)-len(msgs))
	if len(got) == len(msgs) {
		t.Error("no copies at all although the relay was killed after broker confirms: the crash window was not hit")
	}
}

// TestCrashExactlyOnceKafka: in the exactly-once Kafka mode, the same kills
// leave every message exactly once in read_committed output, in key order.
func TestCrashExactlyOnceKafka(t *testing.T) {
	t.Parallel()
	msgs, got := crashRun(t, true)
	exactlytest.CheckExactlyOnce(t, msgs, got)
	exactlytest.CheckKeyOrder(t, got)
	t.Logf("%d messages, %d records in read_committed output", len(msgs), len(got))
}
