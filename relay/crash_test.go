package relay_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// The crash test runs the relay in a child process (this test binary, re-run
// with crashChildEnv set) and kills it with SIGKILL, either from inside at
// the worst moment (the broker confirmed a batch, the rows are not yet
// marked sent) or from outside at a random moment.
const crashChildEnv = "EXACTLY_RELAY_CRASH_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(crashChildEnv) != "" {
		os.Exit(crashChild())
	}
	os.Exit(m.Run())
}

// crashChild runs a relay from the environment until the outbox is empty.
// It exits 0 when done, 3 on error; SIGKILL ends it otherwise.
func crashChild() int {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "crash child:", err); return 3 }
	pool, err := pgxpool.New(ctx, os.Getenv("EXACTLY_CRASH_DSN"))
	if err != nil {
		return fail(err)
	}
	defer pool.Close()
	ob, err := outbox.New(outbox.Config{Dialect: "postgres", Table: os.Getenv("EXACTLY_CRASH_TABLE")})
	if err != nil {
		return fail(err)
	}
	pub, err := kafka.NewClientPublisher([]string{os.Getenv("EXACTLY_CRASH_SEEDS")})
	if err != nil {
		return fail(err)
	}
	defer pub.Close()
	r, err := relay.New(relay.Config{
		Outbox: ob, DB: pool, Publisher: pub, BatchSize: 40, Partitions: 4,
		PollInterval: 20 * time.Millisecond, LeaseTTL: time.Second,
		InstanceID: "crash-child-" + strconv.Itoa(os.Getpid()),
		Logger:     slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return fail(err)
	}
	killOdds, _ := strconv.ParseFloat(os.Getenv("EXACTLY_CRASH_ODDS"), 64)
	relay.SetAfterPublish(r, func([]outboxstore.Row) { testenv.KillSelf(killOdds) })
	err = testenv.RunUntil(ctx, r.Run, func(ctx context.Context) bool {
		st, err := ob.Status(ctx, pool)
		return err == nil && st.Pending == 0
	})
	if err != nil {
		return fail(err)
	}
	return 0
}

// TestCrashBetweenConfirmAndMarkSent kills the relay process (SIGKILL) many
// times, half of them right after the broker confirmed a batch and before the
// rows were marked sent. Afterwards every message is on the Kafka topic at
// least once, the copies carry the same id, and nothing is lost.
func TestCrashBetweenConfirmAndMarkSent(t *testing.T) {
	ctx := context.Background()
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(4, "crash.orders"))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	seeds := cluster.ListenAddrs()

	pool, ob := pgOutbox(t)
	table := ob.Table()

	const keys, perKey = 20, 100
	var msgs []*exactly.Message
	for n := range perKey {
		for k := range keys {
			msgs = append(msgs, &exactly.Message{Topic: "crash.orders", Key: fmt.Sprintf("k%02d", k),
				Payload: fmt.Appendf(nil, "k%02d:%d", k, n)})
		}
	}
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Enqueue(ctx, tx, msgs...); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	insideKills, outsideKills := 0, 0
	for round := 0; ; round++ {
		if round > 200 {
			t.Fatal("the relay did not finish within 200 restarts")
		}
		odds := "0.15"
		outside := round%2 == 1
		if outside || round >= 60 {
			odds = "0" // let it finish eventually
		}
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashChildEnv+"=1", "EXACTLY_CRASH_DSN="+testenv.PostgresDSN(),
			"EXACTLY_CRASH_TABLE="+table, "EXACTLY_CRASH_SEEDS="+seeds[0], "EXACTLY_CRASH_ODDS="+odds)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if outside && round < 60 {
			go func(p *os.Process) {
				time.Sleep(time.Duration(50+rand.IntN(250)) * time.Millisecond)
				p.Signal(syscall.SIGKILL)
			}(cmd.Process)
		}
		err := cmd.Wait()
		var exit *exec.ExitError
		switch {
		case err == nil:
			t.Logf("relay finished after %d rounds: %d kills after confirm, %d kills from outside", round+1, insideKills, outsideKills)
		case errors.As(err, &exit) && exit.Sys().(syscall.WaitStatus).Signal() == syscall.SIGKILL:
			if outside {
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
		t.Fatal("no kill happened between the broker confirm and mark-sent: the test proved nothing")
	}

	// Read the topic back to its end: every id at least once, copies
	// identical, the last copies in order.
	got := testenv.Messages(testenv.ReadTopic(t, seeds, "crash.orders", 30*time.Second))
	exactlytest.CheckExactlyOnceDedup(t, msgs, got)
	exactlytest.CheckLastDeliveryOrder(t, got)
	t.Logf("%d messages, %d records on the topic (%d duplicates from the crashes, same ids)", len(msgs), len(got), len(got)-len(msgs))
	if len(got) == len(msgs) {
		t.Error("no duplicates at all although the relay was killed after broker confirms: the crash window was not hit")
	}
}
