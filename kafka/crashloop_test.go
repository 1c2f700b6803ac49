package kafka_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
)

// The crash-loop tests run a group's members as child processes (this test
// binary, re-run with loopChildEnv set to the consumer kind) the way a
// crash-looping orchestrator does: each member is killed with SIGKILL
// several times within one session timeout and restarted 0-300 ms later,
// then left alone. Every message must then be applied exactly once within
// loopBound. Each member keeps its InstanceID across its restarts.
const loopChildEnv = "EXACTLY_KAFKA_LOOP_CHILD"

const (
	loopSession   = 4 * time.Second
	loopRebalance = 6 * time.Second
	// loopBound: from the last kill to the last message applied.
	loopBound   = 5 * loopSession
	loopMembers = 3
	loopKills   = 4 // per member, all within loopSession
	loopParts   = 8
	loopN       = 800
)

func init() {
	if kind := os.Getenv(loopChildEnv); kind != "" {
		os.Exit(loopChild(kind))
	}
}

func loopMembership() (session, rebalance time.Duration) { return loopSession, loopRebalance }

// loopChild is one member of kind "consumer" (commit-after-effect with the
// SQL inbox), "db" (offsets in the database) or "processor" (Kafka
// transactions), until SIGTERM.
func loopChild(kind string) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	fmt.Println("ready") // SIGTERM is handled from here on: the parent waits for this line
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "crash-loop child:", err); return 3 }
	env := os.Getenv
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("pid", os.Getpid())
	session, rebalance := loopMembership()
	retry := exactly.RetryPolicy{MaxAttempts: 1000, InitialBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
	fast := []kgo.Opt{kgo.FetchMaxWait(100 * time.Millisecond), kgo.RetryBackoffFn(func(int) time.Duration { return 50 * time.Millisecond })}
	seeds := []string{env("X_SEEDS")}
	ccfg := kafka.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{Retry: retry, Logger: log, Workers: 16},
		Group:          env("X_GROUP"), Topics: []string{env("X_TOPIC")}, MaxPollRecords: 50,
		InstanceID: env("X_INSTANCE"), SessionTimeout: session, RebalanceTimeout: rebalance,
		ClientOpts: fast,
	}
	if kind == "processor" {
		out := env("X_OUT")
		p, err := kafka.NewProcessor(kafka.ProcessorConfig{
			Seeds: seeds, Group: ccfg.Group, Topics: ccfg.Topics, InstanceID: ccfg.InstanceID,
			StaticMembership: true, SessionTimeout: session, RebalanceTimeout: rebalance,
			ClientOpts: fast, TransactionTimeout: 10 * time.Second, Retry: retry, Logger: log,
		}, func(ctx context.Context, rec *kgo.Record) ([]exactly.Message, error) {
			in := kafka.DecodeRecord(rec)
			time.Sleep(time.Millisecond)
			return []exactly.Message{{Topic: out, Key: in.Key, Payload: []byte(in.ID)}}, nil
		})
		if err != nil {
			return fail(err)
		}
		if err := p.Run(ctx); err != nil {
			return fail(err)
		}
		return 0
	}
	db, err := sql.Open("pgx", env("X_DSN"))
	if err != nil {
		return fail(err)
	}
	defer db.Close()
	effects := env("X_EFFECTS")
	effect := func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
		time.Sleep(time.Millisecond)
		_, err := tx.ExecContext(ctx, "INSERT INTO "+effects+" (id, member) VALUES ($1, $2)", m.ID, env("X_INSTANCE"))
		return err
	}
	var c *kafka.Consumer
	switch kind {
	case "consumer":
		in, err := inbox.NewSQL(inbox.Config{Dialect: "postgres", Table: env("X_INBOX"), Consumer: ccfg.Group})
		if err != nil {
			return fail(err)
		}
		ccfg.Handler = in.Handler(db, effect)
		c, err = kafka.NewConsumer(seeds, ccfg)
		if err != nil {
			return fail(err)
		}
	case "db":
		c, err = kafka.NewDBConsumer(seeds, kafka.DBConfig{ConsumerConfig: ccfg, TxHandler: effect, DB: db, Dialect: "postgres", OffsetsTable: env("X_OFFSETS")})
		if err != nil {
			return fail(err)
		}
	default:
		return fail(fmt.Errorf("unknown kind %q", kind))
	}
	if err := c.Run(ctx); err != nil {
		return fail(err)
	}
	return 0
}

// loopFixture is the cluster, the input topic and the tables of one test.
type loopFixture struct {
	seeds   []string
	admin   *kadm.Client
	topic   string
	out     string // processor output
	group   string
	db      *sql.DB
	effects string
	inbox   string
	offsets string
	ids     []string
}

func newLoopFixture(t *testing.T, kind string) *loopFixture {
	t.Helper()
	if kind != "processor" {
		testenv.Need(t, testenv.Postgres)
	}
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.GroupMinSessionTimeout(500*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	suffix := time.Now().UnixNano() % 1e9
	f := &loopFixture{seeds: c.ListenAddrs(), topic: fmt.Sprintf("loop-%d", suffix), group: fmt.Sprintf("loop-%s-%d", kind, suffix)}
	f.out = f.topic + ".out"
	cl, err := kgo.NewClient(kgo.SeedBrokers(f.seeds...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	f.admin = kadm.NewClient(cl)
	for _, topic := range []string{f.topic, f.out, f.topic + ".dlq"} {
		if _, err := f.admin.CreateTopic(t.Context(), loopParts, -1, nil, topic); err != nil {
			t.Fatal(err)
		}
	}
	if kind == "processor" {
		return f
	}
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	f.db = db
	f.effects, f.inbox, f.offsets = fmt.Sprintf("loop_effects_%d", suffix), fmt.Sprintf("loop_inbox_%d", suffix), fmt.Sprintf("loop_offsets_%d", suffix)
	if _, err := db.Exec("CREATE TABLE " + f.effects + " (id text NOT NULL, member text NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	in, err := inbox.NewSQL(inbox.Config{Dialect: "postgres", Table: f.inbox, Consumer: f.group})
	if err != nil {
		t.Fatal(err)
	}
	if err := in.Migrate(t.Context(), db); err != nil {
		t.Fatal(err)
	}
	if err := kafka.MigrateOffsets(t.Context(), db, "postgres", f.offsets); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, table := range []string{f.effects, f.inbox, f.offsets} {
			db.Exec("DROP TABLE IF EXISTS " + table)
		}
		db.Exec("DELETE FROM exactly_migrations WHERE scope IN ($1, $2)", "inbox:"+f.inbox, "kafka_offsets:"+f.offsets)
	})
	return f
}

// publish writes n messages with fresh ids over about d.
func (f *loopFixture) publish(t *testing.T, n int, d time.Duration) {
	pub, err := kafka.NewClientPublisher(f.seeds)
	if err != nil {
		t.Error(err)
		return
	}
	defer pub.Close()
	const batch = 50
	for i := 0; i < n; i += batch {
		var msgs []*exactly.Message
		for j := i; j < min(i+batch, n); j++ {
			m := &exactly.Message{ID: exactly.NewID(), Topic: f.topic, Key: fmt.Sprintf("k%02d", j%40), Payload: fmt.Appendf(nil, "%d", j)}
			msgs = append(msgs, m)
		}
		if err := pub.Publish(context.Background(), msgs); err != nil {
			t.Error(err)
			return
		}
		for _, m := range msgs {
			f.ids = append(f.ids, m.ID)
		}
		if d > 0 {
			time.Sleep(d / time.Duration(n/batch))
		}
	}
}

// applied counts the applications of every id: effect rows, or copies in
// the processor's read_committed output.
func (f *loopFixture) applied(t *testing.T, kind string, out *outputCounter) map[string]int {
	if kind == "processor" {
		return out.snapshot()
	}
	rows, err := f.db.Query("SELECT id, count(*) FROM " + f.effects + " GROUP BY id")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	got := map[string]int{}
	for rows.Next() {
		var id string
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			t.Fatal(err)
		}
		got[id] = n
	}
	return got
}

// outputCounter reads a topic read_committed from its start and counts
// each payload (the input id).
type outputCounter struct {
	mu   sync.Mutex
	seen map[string]int
	last time.Time // when the last record was read
}

func countOutput(t *testing.T, seeds []string, topic string) *outputCounter {
	oc := &outputCounter{seen: map[string]int{}, last: time.Now()}
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumeTopics(topic), kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			fs := cl.PollFetches(ctx)
			oc.mu.Lock()
			fs.EachRecord(func(r *kgo.Record) {
				oc.seen[string(r.Value)]++
				oc.last = time.Now()
			})
			oc.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-done; cl.Close() })
	return oc
}

func (oc *outputCounter) snapshot() map[string]int {
	oc.mu.Lock()
	defer oc.mu.Unlock()
	out := make(map[string]int, len(oc.seen))
	for k, v := range oc.seen {
		out[k] = v
	}
	return out
}

func (oc *outputCounter) quietFor() time.Duration {
	oc.mu.Lock()
	defer oc.mu.Unlock()
	return time.Since(oc.last)
}

// loopMember is one slot of the group: a child process, killed and
// restarted by the test, under one InstanceID.
type loopMember struct {
	t        *testing.T
	env      []string
	instance string
	cmd      *exec.Cmd
	exited   chan error
	ready    chan struct{} // closed when the child handles SIGTERM
}

func (m *loopMember) start() {
	m.t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), m.env...)
	cmd.Env = append(cmd.Env, "X_INSTANCE="+m.instance)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		m.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		m.t.Fatal(err)
	}
	m.cmd, m.exited, m.ready = cmd, make(chan error, 1), make(chan struct{})
	go func(ready chan struct{}) {
		line := make([]byte, 6)
		if _, err := io.ReadFull(stdout, line); err == nil && string(line) == "ready\n" {
			close(ready)
		}
		io.Copy(io.Discard, stdout)
		m.exited <- cmd.Wait()
	}(m.ready)
}

// kill kills the member with SIGKILL and waits for it to be gone; it fails
// the test if the member had exited on its own.
func (m *loopMember) kill() {
	select {
	case err := <-m.exited:
		m.t.Errorf("member %s exited before its kill: %v", m.instance, err)
		return
	default:
	}
	m.cmd.Process.Kill()
	<-m.exited
}

func (m *loopMember) stop() {
	select {
	case err := <-m.exited:
		m.t.Errorf("member %s exited on its own: %v", m.instance, err)
		return
	default:
	}
	select {
	case <-m.ready:
	case <-time.After(30 * time.Second):
		m.t.Errorf("member %s did not start within 30s", m.instance)
	}
	m.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-m.exited:
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			m.t.Errorf("member %s: %v", m.instance, err)
		} else if err != nil {
			m.t.Errorf("member %s stopped with %v", m.instance, err)
		}
	case <-time.After(30 * time.Second):
		m.cmd.Process.Kill()
		<-m.exited
		m.t.Errorf("member %s did not stop within 30s of SIGTERM", m.instance)
	}
}

func TestCrashLoopConsumer(t *testing.T)   { testCrashLoop(t, "consumer") }
func TestCrashLoopDBConsumer(t *testing.T) { testCrashLoop(t, "db") }
func TestCrashLoopProcessor(t *testing.T)  { testCrashLoop(t, "processor") }

// testCrashLoop: loopMembers members, each killed loopKills times within
// one session timeout (restarted 0-300 ms after each kill) while messages
// are written, then left alone: every message is applied exactly once
// within loopBound of the last kill.
func testCrashLoop(t *testing.T, kind string) {
	f := newLoopFixture(t, kind)
	var out *outputCounter
	if kind == "processor" {
		out = countOutput(t, f.seeds, f.out)
	}
	env := []string{loopChildEnv + "=" + kind, "X_SEEDS=" + f.seeds[0], "X_GROUP=" + f.group, "X_TOPIC=" + f.topic, "X_OUT=" + f.out,
		"X_DSN=" + testenv.PostgresDSN(), "X_EFFECTS=" + f.effects, "X_INBOX=" + f.inbox, "X_OFFSETS=" + f.offsets}
	members := make([]*loopMember, loopMembers)
	for i := range members {
		members[i] = &loopMember{t: t, env: env, instance: fmt.Sprintf("member-%d", i)}
		members[i].start()
	}
	t.Cleanup(func() { // a failed test leaves no member running
		for _, m := range members {
			m.cmd.Process.Kill()
		}
	})
	published := make(chan struct{})
	go func() { defer close(published); f.publish(t, loopN, 3*time.Second) }()
	time.Sleep(1500 * time.Millisecond) // the group forms and works

	// The burst: every member is killed loopKills times inside one
	// session timeout, at the same time as the others.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var lastKill time.Time
	for _, m := range members {
		wg.Go(func() {
			first := time.Now()
			for k := range loopKills {
				time.Sleep(time.Duration(250+rand.IntN(400)) * time.Millisecond)
				m.kill()
				mu.Lock()
				lastKill = time.Now()
				mu.Unlock()
				if k == 0 {
					first = time.Now()
				}
				time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
				m.start()
			}
			if span := time.Since(first); span >= loopSession {
				t.Errorf("member %s: %d kills took %s, not within one session timeout (%s)", m.instance, loopKills, span, loopSession)
			}
		})
	}
	wg.Wait()
	<-published
	if t.Failed() {
		t.FailNow()
	}
	during := len(f.ids)
	// Written after the burst: only a group that recovered applies them.
	f.publish(t, loopN/2, 0)
	t.Logf("%d members killed %d times each within one session timeout (%s); %d messages written before and during the burst, %d after",
		loopMembers, loopKills, loopSession, during, len(f.ids)-during)

	// Left alone: everything applied within the bound.
	deadline := lastKill.Add(loopBound)
	var got map[string]int
	for {
		got = f.applied(t, kind, out)
		missing := 0
		for _, id := range f.ids {
			if got[id] == 0 {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			described, _ := f.admin.DescribeGroups(context.Background(), f.group)
			g := described[f.group]
			t.Fatalf("%d of %d messages not applied within %s (5 session timeouts) of the last kill; group %s with %d members",
				missing, len(f.ids), loopBound, g.State, len(g.Members))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("every message applied %s after the last kill (bound %s)", time.Since(lastKill).Round(time.Millisecond), loopBound)
	for _, m := range members {
		m.stop()
	}
	if kind == "processor" {
		for out.quietFor() < 2*time.Second { // read what the stops committed
			time.Sleep(100 * time.Millisecond)
		}
	}
	got = f.applied(t, kind, out)
	twice := 0
	for _, id := range f.ids {
		if got[id] > 1 {
			twice++
		}
	}
	if twice > 0 || len(got) != len(f.ids) {
		t.Fatalf("of %d messages: %d applied more than once, %d applications of unknown ids", len(f.ids), twice, len(got)-len(f.ids))
	}
}
