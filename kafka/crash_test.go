package kafka_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
)

// The crash test runs consumer-group members as child processes (this test
// binary, re-run with crashChildEnv set) and kills them with SIGKILL right
// after a record's effect committed and before its offset was committed.
const crashChildEnv = "EXACTLY_KAFKA_CRASH_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(crashChildEnv) != "" {
		os.Exit(crashChild())
	}
	os.Exit(m.Run())
}

// crashChild is one member: commit-after-effect mode, SQL inbox in the
// effect's transaction. It runs until SIGTERM.
func crashChild() int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "crash child:", err); return 3 }
	env := os.Getenv
	db, err := sql.Open("pgx", env("X_DSN"))
	if err != nil {
		return fail(err)
	}
	defer db.Close()
	in, err := inbox.NewSQL(inbox.Config{Dialect: "postgres", Table: env("X_INBOX"), Consumer: env("X_GROUP")})
	if err != nil {
		return fail(err)
	}
	effects, deliveries := env("X_EFFECTS"), env("X_DELIVERIES")
	handler := in.Handler(db, func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+effects+" (id, member) VALUES ($1, $2)", m.ID, strconv.Itoa(os.Getpid()))
		return err
	})
	counted := func(ctx context.Context, m *exactly.Message) error {
		// Every delivery, outside the effect's transaction: shows the
		// redeliveries the inbox absorbed.
		if _, err := db.ExecContext(ctx, "INSERT INTO "+deliveries+" (id) VALUES ($1)", m.ID); err != nil {
			return err
		}
		return handler(ctx, m)
	}
	c, err := kafka.NewConsumer([]string{env("X_SEEDS")}, kafka.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: counted,
			Workers: 16, // every partition at once
			Logger:  slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		},
		Group: env("X_GROUP"), Topics: []string{env("X_TOPIC")}, MaxPollRecords: 50,
		// A member killed during a join holds the group's rebalance until
		// the rebalance timeout (60 s by default): keep it short.
		ClientOpts: []kgo.Opt{kgo.SessionTimeout(6 * time.Second), kgo.HeartbeatInterval(200 * time.Millisecond),
			kgo.RebalanceTimeout(10 * time.Second)},
	})
	if err != nil {
		return fail(err)
	}
	odds, _ := strconv.ParseFloat(env("X_ODDS"), 64)
	kafka.SetAfterHandle(c, func(string, int32, int64) { testenv.KillSelf(odds) })
	if err := c.Run(ctx); err != nil {
		return fail(err)
	}
	return 0
}

// TestCommitAfterEffectCrashes: two members of a group, each killed many
// times between a record's committed effect and its offset commit, and
// restarted (every restart rebalances the group). The inbox absorbs every
// redelivery: each record's effect is applied exactly once.
func TestCommitAfterEffectCrashes(t *testing.T) {
	f := newConsumerFixture(t, 4, 800)
	suffix := time.Now().UnixNano() % 1e9
	inboxTable, deliveries := fmt.Sprintf("inbox_%d", suffix), fmt.Sprintf("deliveries_%d", suffix)
	in, err := inbox.NewSQL(inbox.Config{Dialect: "postgres", Table: inboxTable, Consumer: "g"})
	if err != nil {
		t.Fatal(err)
	}
	if err := in.Migrate(t.Context(), f.db); err != nil {
		t.Fatal(err)
	}
	if _, err := f.db.Exec("CREATE TABLE " + deliveries + " (id text NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.db.Exec("DROP TABLE IF EXISTS " + inboxTable)
		f.db.Exec("DROP TABLE IF EXISTS " + deliveries)
		f.db.Exec("DELETE FROM exactly_migrations WHERE scope = $1", "inbox:"+inboxTable)
	})

	var mu sync.Mutex
	kills := 0
	var running sync.WaitGroup
	stopAll := make(chan struct{})
	member := func(name string) {
		defer running.Done()
		for round := 0; ; round++ {
			odds := "0.02"
			if round >= 6 {
				odds = "0" // let it finish
			}
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), crashChildEnv+"=1", "X_DSN=postgres://postgres@127.0.0.1:5432/test?sslmode=disable",
				"X_INBOX="+inboxTable, "X_GROUP=g-"+f.topic, "X_EFFECTS="+f.effectsTable, "X_DELIVERIES="+deliveries,
				"X_SEEDS="+f.tc.c.ListenAddrs()[0], "X_TOPIC="+f.topic, "X_ODDS="+odds)
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Error(err)
				return
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			var err error
			select {
			case err = <-exited:
			case <-stopAll:
				cmd.Process.Signal(syscall.SIGTERM)
				<-exited
				return
			}
			var exit *exec.ExitError
			if errors.As(err, &exit) && exit.Sys().(syscall.WaitStatus).Signal() == syscall.SIGKILL {
				mu.Lock()
				kills++
				mu.Unlock()
				continue
			}
			t.Errorf("member %s exited: %v", name, err)
			return
		}
	}
	running.Add(2)
	go member("a")
	go member("b")
	f.waitEffects(t, len(f.ids), 120*time.Second)
	close(stopAll)
	running.Wait()
	f.checkOnce(t)

	var delivered, distinct int
	if err := f.db.QueryRow("SELECT count(*), count(DISTINCT id) FROM "+deliveries).Scan(&delivered, &distinct); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d kills after the effect and before the offset commit; %d deliveries of %d records, every effect once", kills, delivered, distinct)
	if kills == 0 || delivered == distinct {
		t.Errorf("no redelivery happened (kills %d, deliveries %d, records %d): the test proved nothing", kills, delivered, distinct)
	}
}
