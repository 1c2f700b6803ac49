package kafka_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
)

// consumerFixture is a topic on kfake holding n messages, a PostgreSQL
// database with an effects table (no unique constraint: a double effect
// shows as two rows) and an offsets table of the test's own.
type consumerFixture struct {
	tc           *testCluster
	topic        string
	db           *sql.DB
	effectsTable string
	offsets      string
	ids          []string
}

func newConsumerFixture(t *testing.T, partitions, n int) *consumerFixture {
	t.Helper()
	testenv.Need(t, testenv.Postgres)
	tc := newCluster(t)
	f := &consumerFixture{tc: tc, topic: fmt.Sprintf("orders-%d", time.Now().UnixNano())}
	if _, err := tc.admin.CreateTopic(t.Context(), int32(partitions), -1, nil, f.topic); err != nil {
		t.Fatal(err)
	}
	if _, err := tc.admin.CreateTopic(t.Context(), 1, -1, nil, f.topic+".dlq"); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	f.db = db
	suffix := time.Now().UnixNano() % 1e9
	f.effectsTable = fmt.Sprintf("effects_%d", suffix)
	f.offsets = fmt.Sprintf("offsets_%d", suffix)
	if _, err := db.Exec("CREATE TABLE " + f.effectsTable + " (id text NOT NULL, member text NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	if err := kafka.MigrateOffsets(t.Context(), db, "postgres", f.offsets); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.Exec("DROP TABLE IF EXISTS " + f.effectsTable)
		db.Exec("DROP TABLE IF EXISTS " + f.offsets)
		db.Exec("DELETE FROM exactly_migrations WHERE scope = $1", "kafka_offsets:"+f.offsets)
	})

	pub := tc.publisher(t)
	var msgs []*exactly.Message
	for i := range n {
		m := &exactly.Message{ID: exactly.NewID(), Topic: f.topic, Key: fmt.Sprintf("k%02d", i%30), Payload: fmt.Appendf(nil, "%d", i)}
		msgs = append(msgs, m)
		f.ids = append(f.ids, m.ID)
	}
	for i := 0; i < len(msgs); i += 500 {
		if err := pub.Publish(t.Context(), msgs[i:min(i+500, len(msgs))]); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// config is the configuration of a DB-offsets consumer of the fixture's
// topic in group, running h; its ConsumerConfig, with a Handler, is that of
// a commit-after-effect consumer.
func (f *consumerFixture) config(t *testing.T, group string, h kafka.TxHandler) kafka.DBConfig {
	return kafka.DBConfig{
		ConsumerConfig: kafka.ConsumerConfig{
			ConsumerConfig: exactly.ConsumerConfig{
				Retry:   exactly.RetryPolicy{MaxAttempts: 3, InitialBackoff: time.Millisecond, MaxBackoff: 10 * time.Millisecond},
				Logger:  slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
				Workers: 8, // every partition at once
			},
			Group: group, Topics: []string{f.topic}, MaxPollRecords: 100,
			ClientOpts: []kgo.Opt{kgo.SessionTimeout(6 * time.Second), kgo.HeartbeatInterval(200 * time.Millisecond),
				kgo.RebalanceTimeout(10 * time.Second)},
		},
		TxHandler: h,
		DB:        f.db, Dialect: "postgres", OffsetsTable: f.offsets,
	}
}

func (f *consumerFixture) seeds() []string { return f.tc.c.ListenAddrs() }

// effectHandler records one effect row per handling, in the transaction.
func (f *consumerFixture) effectHandler(member string) kafka.TxHandler {
	return func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+f.effectsTable+" (id, member) VALUES ($1, $2)", m.ID, member)
		return err
	}
}

// effects counts effect rows per id.
func (f *consumerFixture) effects(t *testing.T) map[string]int {
	t.Helper()
	rows, err := f.db.Query("SELECT id, count(*) FROM " + f.effectsTable + " GROUP BY id")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var id string
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			t.Fatal(err)
		}
		out[id] = n
	}
	return out
}

// checkOnce fails unless every message has exactly one effect.
func (f *consumerFixture) checkOnce(t *testing.T) {
	t.Helper()
	got := f.effects(t)
	lost, twice := 0, 0
	for _, id := range f.ids {
		switch got[id] {
		case 0:
			lost++
		case 1:
		default:
			twice++
		}
	}
	if lost > 0 || twice > 0 || len(got) != len(f.ids) {
		t.Fatalf("of %d messages: %d lost, %d applied twice, %d effects for unknown ids", len(f.ids), lost, twice, len(got)-len(f.ids)+lost)
	}
}

func (f *consumerFixture) waitEffects(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var have int
		if err := f.db.QueryRow("SELECT count(DISTINCT id) FROM " + f.effectsTable).Scan(&have); err != nil {
			t.Fatal(err)
		}
		if have >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s, %d of %d messages applied", timeout, have, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runConsumer runs c until stop is called (or the test ends).
func runConsumer(t *testing.T, c *kafka.Consumer) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// TestDBOffsetsCommitFails: the database connection of a DB-offsets
// consumer drops while a record's transaction commits, and stays away for
// a while: the record and the ones after it in its partition are applied
// once when it is back, none skipped, and the failed commit is an
// AckFailure.
func TestDBOffsetsCommitFails(t *testing.T) {
	t.Parallel()
	f := newConsumerFixture(t, 3, 300)
	s := &kafkaSockets{}
	pgcfg, err := pgx.ParseConfig(testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	pgcfg.DialFunc = s.dial
	own := stdlib.OpenDB(*pgcfg)
	t.Cleanup(func() { own.Close() })
	victim := f.ids[100]
	var dropped atomic.Bool
	cfg := f.config(t, "g-"+f.topic, func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
		if err := f.effectHandler("a")(ctx, tx, m); err != nil {
			return err
		}
		if m.ID == victim && dropped.CompareAndSwap(false, true) {
			s.drop(time.Second) // the commit that follows fails, and so do reconnects for a second
		}
		return nil
	})
	cfg.DB = own
	// Retries outlast the outage: a handler that cannot begin its
	// transaction fails like any other.
	cfg.Retry = exactly.RetryPolicy{MaxAttempts: 50, InitialBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond}
	c, err := kafka.NewDBConsumer(f.seeds(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop := runConsumer(t, c)
	f.waitEffects(t, len(f.ids), 60*time.Second)
	stop()
	if !dropped.Load() {
		t.Fatal("the victim was never handled")
	}
	f.checkOnce(t)
	if st := c.Stats(); st.AckFailures < 1 {
		t.Errorf("Stats = %+v, want the failed commit counted in AckFailures", st)
	}
}

// TestDBOffsetsRebalanceAndRestart: three members come and go while 3,000
// records are consumed; effects and offsets commit together, so every
// record is applied exactly once without any dedup table.
func TestDBOffsetsRebalanceAndRestart(t *testing.T) {
	t.Parallel()
	f := newConsumerFixture(t, 6, 3000)
	group := "g-" + f.topic
	start := func(name string) func() {
		c, err := kafka.NewDBConsumer(f.seeds(), f.config(t, group, f.effectHandler(name)))
		if err != nil {
			t.Fatal(err)
		}
		return runConsumer(t, c)
	}
	stopA := start("a")
	f.waitEffects(t, 300, 30*time.Second)
	stopB := start("b") // rebalance mid-stream
	f.waitEffects(t, 1000, 30*time.Second)
	stopA() // a leaves: its partitions move to b, then c
	stopC := start("c")
	f.waitEffects(t, 2000, 30*time.Second)
	stopB()
	stopA2 := start("a2")
	f.waitEffects(t, len(f.ids), 60*time.Second)
	stopC()
	stopA2()
	f.checkOnce(t)

	// The stored offsets are the end of every partition.
	ends, err := f.tc.admin.ListEndOffsets(t.Context(), f.topic)
	if err != nil {
		t.Fatal(err)
	}
	ends.Each(func(o kadm.ListedOffset) {
		var next int64
		if err := f.db.QueryRow("SELECT next_offset FROM "+f.offsets+" WHERE consumer_group=$1 AND topic=$2 AND part=$3",
			group, o.Topic, o.Partition).Scan(&next); err != nil {
			t.Fatalf("partition %d: %v", o.Partition, err)
		}
		if next != o.Offset {
			t.Errorf("partition %d: stored next offset %d, end offset %d", o.Partition, next, o.Offset)
		}
	})
}

// TestDBOffsetsZombieIsFenced: member a is stuck inside its handler (a GC
// pause, a slow call) when it is thrown out of the group, and b takes its
// partitions and applies the records. When a wakes up, its compare-and-set
// on the offset fails and its transaction, effect included, rolls back.
// One effect per record.
func TestDBOffsetsZombieIsFenced(t *testing.T) {
	t.Parallel()
	f := newConsumerFixture(t, 2, 200)
	group := "g-" + f.topic
	release := make(chan struct{})
	var stuck atomic.Int32
	zombieHandler := func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
		if err := f.effectHandler("zombie")(ctx, tx, m); err != nil {
			return err
		}
		if stuck.Add(1) == 1 {
			<-release
		}
		return nil
	}
	za, err := kafka.NewDBConsumer(f.seeds(), f.config(t, group, zombieHandler))
	if err != nil {
		t.Fatal(err)
	}
	runConsumer(t, za)
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for stuck.Load() < 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if stuck.Load() < 1 {
		t.Fatal("the first member never got a record")
	}
	kafka.LeaveGroup(za) // a is out of the group, still inside its handler

	b, err := kafka.NewDBConsumer(f.seeds(), f.config(t, group, f.effectHandler("b")))
	if err != nil {
		t.Fatal(err)
	}
	runConsumer(t, b)
	f.waitEffects(t, len(f.ids), 60*time.Second) // b applies everything (a's stuck effect is uncommitted)
	close(release)                               // the zombie wakes up and tries to commit
	deadline = time.Now().Add(20 * time.Second)
	for za.Stats().Fenced == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if za.Stats().Fenced == 0 {
		t.Fatal("the zombie was never fenced")
	}
	f.checkOnce(t)
	t.Logf("zombie fenced %d times; b handled %d, a handled %d", za.Stats().Fenced, b.Stats().Handled, za.Stats().Handled)
}

// TestDBOffsetsDeadLetter: a record whose handler always fails is retried,
// then dead-lettered with the reason; the offset moves past it and the
// other records are applied once.
func TestDBOffsetsDeadLetter(t *testing.T) {
	t.Parallel()
	f := newConsumerFixture(t, 3, 300)
	poison := f.ids[42]
	var attempts atomic.Int32
	h := func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
		if m.ID == poison {
			attempts.Add(1)
			if attempts.Load()%2 == 0 {
				panic("poisoned payload")
			}
			return errors.New("cannot apply")
		}
		return f.effectHandler("a")(ctx, tx, m)
	}
	c, err := kafka.NewDBConsumer(f.seeds(), f.config(t, "g-"+f.topic, h))
	if err != nil {
		t.Fatal(err)
	}
	stop := runConsumer(t, c)
	f.waitEffects(t, len(f.ids)-1, 30*time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for c.Stats().DeadLettered == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	if attempts.Load() != 3 {
		t.Errorf("poison handled %d times, want 3 (MaxAttempts)", attempts.Load())
	}
	got := f.effects(t)
	if got[poison] != 0 || len(got) != len(f.ids)-1 {
		t.Fatalf("effects: poison %d, total %d", got[poison], len(got))
	}
	// The dead letter is on <topic>.dlq with the reason.
	cl := f.tc.client(t, kgo.ConsumeTopics(f.topic+".dlq"), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	fs := cl.PollFetches(ctx)
	var found bool
	fs.EachRecord(func(r *kgo.Record) {
		for _, h := range r.Headers {
			if h.Key == exactly.HeaderDeadReason && string(h.Value) != "" {
				found = true
			}
		}
	})
	if !found {
		t.Fatalf("no dead letter with a reason on %s.dlq (fetch errors: %v)", f.topic, fs.Errors())
	}
}

func TestConsumerConfigErrors(t *testing.T) {
	t.Parallel()
	h := func(context.Context, *exactly.Message) error { return nil }
	seeds := []string{"127.0.0.1:1"}
	shared := exactly.ConsumerConfig{Handler: h}
	if _, err := kafka.NewConsumer(nil, kafka.ConsumerConfig{ConsumerConfig: shared, Group: "g", Topics: []string{"t"}}); err == nil || !strings.Contains(err.Error(), "seed") {
		t.Errorf("no seeds: got %v", err)
	}
	for name, cfg := range map[string]kafka.ConsumerConfig{
		"Group":          {ConsumerConfig: shared, Topics: []string{"t"}},
		"Topics":         {ConsumerConfig: shared, Group: "g"},
		"Handler":        {Group: "g", Topics: []string{"t"}},
		"MaxPollRecords": {ConsumerConfig: shared, Group: "g", Topics: []string{"t"}, MaxPollRecords: -1},
		"Workers":        {ConsumerConfig: exactly.ConsumerConfig{Handler: h, Workers: -1}, Group: "g", Topics: []string{"t"}},
	} {
		var field *exactly.ConfigError
		if _, err := kafka.NewConsumer(seeds, cfg); err == nil || !errors.As(err, &field) || field.Field != name {
			t.Errorf("missing %s: got %v, want a *exactly.ConfigError naming it", name, err)
		}
	}
	for name, edit := range map[string]func(*kafka.ConsumerConfig){
		"InstanceID":        func(c *kafka.ConsumerConfig) { c.InstanceID = "pod 1" },
		"SessionTimeout":    func(c *kafka.ConsumerConfig) { c.SessionTimeout = -time.Second },
		"RebalanceTimeout":  func(c *kafka.ConsumerConfig) { c.RebalanceTimeout = time.Millisecond },
		"HeartbeatInterval": func(c *kafka.ConsumerConfig) { c.SessionTimeout, c.HeartbeatInterval = 6*time.Second, 10*time.Second },
	} {
		cfg := kafka.ConsumerConfig{ConsumerConfig: shared, Group: "g", Topics: []string{"t"}}
		edit(&cfg)
		if _, err := kafka.NewConsumer(seeds, cfg); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("bad %s: got %v", name, err)
		}
	}
	txh := func(context.Context, *sql.Tx, *exactly.Message) error { return nil }
	if _, err := kafka.NewDBConsumer(seeds, kafka.DBConfig{ConsumerConfig: kafka.ConsumerConfig{Group: "g", Topics: []string{"t"}},
		Dialect: "oracle", DB: &sql.DB{}, TxHandler: txh}); err == nil {
		t.Error("unknown dialect accepted")
	}
	for name, cfg := range map[string]kafka.DBConfig{
		"TxHandler": {ConsumerConfig: kafka.ConsumerConfig{Group: "g", Topics: []string{"t"}}, Dialect: "postgres", DB: &sql.DB{}},
		"Handler":   {ConsumerConfig: kafka.ConsumerConfig{ConsumerConfig: shared, Group: "g", Topics: []string{"t"}}, Dialect: "postgres", DB: &sql.DB{}, TxHandler: txh},
	} {
		var field *exactly.ConfigError
		if _, err := kafka.NewDBConsumer(seeds, cfg); err == nil || !errors.As(err, &field) || field.Field != name {
			t.Errorf("DBConfig %s: got %v, want a *exactly.ConfigError naming it", name, err)
		}
	}
}

// TestConsumerCommitsOffsetsToKafka: the commit-after-effect consumer really
// commits its position to the group. A consumer stopped after handling
// everything leaves the group's committed offsets at the end of every
// partition, and the next member of the group is handed only the records
// published after that, not the whole topic again.
func TestConsumerCommitsOffsetsToKafka(t *testing.T) {
	t.Parallel()
	f := newConsumerFixture(t, 3, 600)
	group := "g-" + f.topic
	var mu sync.Mutex
	seen := map[string]int{}
	handler := func(_ context.Context, m *exactly.Message) error {
		mu.Lock()
		seen[m.ID]++
		mu.Unlock()
		return nil
	}
	waitSeen := func(n int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			mu.Lock()
			got := len(seen)
			mu.Unlock()
			if got >= n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("handled %d distinct messages, want %d", got, n)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	cfg := f.config(t, group, nil).ConsumerConfig
	cfg.Handler = handler
	c, err := kafka.NewConsumer(f.seeds(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop := runConsumer(t, c)
	waitSeen(len(f.ids))
	stop()

	committed, err := f.tc.admin.FetchOffsets(t.Context(), group)
	if err != nil {
		t.Fatal(err)
	}
	ends, err := f.tc.admin.ListEndOffsets(t.Context(), f.topic)
	if err != nil {
		t.Fatal(err)
	}
	ends.Each(func(o kadm.ListedOffset) {
		got, ok := committed.Lookup(o.Topic, o.Partition)
		if !ok || got.At != o.Offset {
			t.Errorf("partition %d: committed offset %v (present %v), end offset %d", o.Partition, got.At, ok, o.Offset)
		}
	})

	// The next member starts from the committed offsets.
	mu.Lock()
	clear(seen)
	mu.Unlock()
	more := make([]*exactly.Message, 30)
	for i := range more {
		more[i] = &exactly.Message{ID: exactly.NewID(), Topic: f.topic, Key: fmt.Sprintf("k%02d", i), Payload: []byte("late")}
	}
	if err := f.tc.publisher(t).Publish(t.Context(), more); err != nil {
		t.Fatal(err)
	}
	c2, err := kafka.NewConsumer(f.seeds(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop2 := runConsumer(t, c2)
	waitSeen(len(more))
	time.Sleep(300 * time.Millisecond) // anything older would arrive with them
	stop2()
	mu.Lock()
	defer mu.Unlock()
	for _, m := range more {
		if seen[m.ID] != 1 {
			t.Errorf("late message %s handled %d times", m.ID, seen[m.ID])
		}
	}
	if len(seen) != len(more) {
		t.Errorf("the restarted group handled %d messages, want only the %d published after the commit", len(seen), len(more))
	}
}
