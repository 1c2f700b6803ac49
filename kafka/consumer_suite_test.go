package kafka_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
)

// suiteSession is the session timeout of the suite's consumers: how soon
// the group hands a crashed member's partitions to another.
const suiteSession = time.Second

// TestConsumerSuite holds the Consumer, in both its modes, to the contract
// every consumer keeps, on kfake with the SQL inbox on PostgreSQL.
func TestConsumerSuite(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"CommitAfterEffect", "DBOffsets"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			exactlytest.RunConsumerSuite(t, suiteHarness(t, mode == "DBOffsets"))
		})
	}
}

func suiteHarness(t *testing.T, dbOffsets bool) exactlytest.ConsumerHarness {
	testenv.Need(t, testenv.Postgres)
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.GroupMinSessionTimeout(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Close)
	seeds := cluster.ListenAddrs()
	admin, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(admin.Close)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(40)
	t.Cleanup(func() { db.Close() })
	var seq atomic.Int64
	return exactlytest.ConsumerHarness{
		DB: db,
		Setup: func(t *testing.T) exactlytest.ConsumerSource {
			n := seq.Add(1)
			topic := fmt.Sprintf("suite-%d-%d", time.Now().UnixNano(), n)
			if _, err := kadm.NewClient(admin).CreateTopic(t.Context(), 4, -1, nil, topic); err != nil {
				t.Fatalf("creating topic %s: %v", topic, err)
			}
			pcl, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(pcl.Close)
			pub, err := kafka.NewPublisher(pcl)
			if err != nil {
				t.Fatal(err)
			}
			offsets := ""
			if dbOffsets {
				offsets = fmt.Sprintf("suite_offsets_%d_%d", time.Now().UnixNano()%1e9, n)
				if err := kafka.MigrateOffsets(t.Context(), db, "postgres", offsets); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					db.Exec("DROP TABLE IF EXISTS " + offsets)
					db.Exec("DELETE FROM exactly_migrations WHERE scope = $1", "kafka_offsets:"+offsets)
				})
			}
			return exactlytest.ConsumerSource{
				Topic:     topic,
				Publisher: pub,
				PublishWithoutID: func(t *testing.T, payload []byte) {
					if err := pcl.ProduceSync(t.Context(), &kgo.Record{Topic: topic, Value: payload}).FirstErr(); err != nil {
						t.Fatalf("producing without an id: %v", err)
					}
				},
				New: func(t *testing.T, shared exactly.ConsumerConfig) exactlytest.TestConsumer {
					return suiteConsumer(t, seeds, topic, db, offsets, shared)
				},
			}
		},
		// Each key goes to one partition, whose records are handled in
		// order, one at a time.
		Ordering: exactlytest.OrderPerKey,
		NoID:     exactlytest.NoIDDerived,
		// A live member keeps its partitions (it heartbeats in the
		// background): Kafka takes no record back from it.
		AckDeadline: 0,
		Timeout:     60 * time.Second,
	}
}

// errCrashed is what a crashed consumer's clients see.
var errCrashed = errors.New("the process crashed")

// suiteConsumer is a consumer of topic whose client dials through sockets
// the suite can cut; with offsets set, a DB-offsets consumer storing them
// in that table.
func suiteConsumer(t *testing.T, seeds []string, topic string, db *sql.DB, offsets string, shared exactly.ConsumerConfig) exactlytest.TestConsumer {
	t.Helper()
	s := &kafkaSockets{}
	clientCtx, kill := context.WithCancelCause(context.Background())
	t.Cleanup(func() { kill(nil) })
	cfg := kafka.ConsumerConfig{
		ConsumerConfig: shared,
		Group:          "suite-" + topic,
		Topics:         []string{topic},
		SessionTimeout: suiteSession, HeartbeatInterval: 100 * time.Millisecond, RebalanceTimeout: 10 * time.Second,
		ClientOpts: []kgo.Opt{kgo.Dialer(s.dial), kgo.WithContext(clientCtx),
			kgo.FetchMaxWait(200 * time.Millisecond), kgo.RetryBackoffFn(func(int) time.Duration { return 50 * time.Millisecond })},
	}
	var (
		c   *kafka.Consumer
		err error
	)
	if offsets == "" {
		c, err = kafka.NewConsumer(seeds, cfg)
	} else {
		// The offsets live in a database of the consumer's own, on
		// connections that die with it. The suite's handler keeps its
		// inbox and effects on the suite's database, in a transaction of
		// their own: the offset's transaction is this mode's ack.
		pgcfg, err := pgx.ParseConfig(testenv.PostgresDSN())
		if err != nil {
			t.Fatal(err)
		}
		pgcfg.DialFunc = s.dial
		own := stdlib.OpenDB(*pgcfg)
		t.Cleanup(func() { own.Close() })
		h := cfg.Handler
		cfg.Handler = nil
		c, err = kafka.NewDBConsumer(seeds, kafka.DBConfig{ConsumerConfig: cfg, DB: own, Dialect: "postgres", OffsetsTable: offsets,
			TxHandler: func(ctx context.Context, _ *sql.Tx, m *exactly.Message) error { return h(ctx, m) }})
	}
	if err != nil {
		t.Fatalf("creating the consumer: %v", err)
	}
	return exactlytest.TestConsumer{
		Run:   c.Run,
		Stats: func() exactly.ConsumerStats { return c.Stats().ConsumerStats },
		// A killed process: its connections go without a goodbye (no
		// offset commit, no LeaveGroup, no transaction commit), so the
		// group gives its partitions away after the session timeout.
		Crash: func() {
			s.cut()
			kill(errCrashed)
		},
		// No LoseAcks: franz-go retries a lost offset commit, and a live
		// member that failed a commit keeps its position in memory, so
		// the record comes back only after a crash or a rebalance, which
		// Crash covers.
	}
}

// kafkaSockets is a dialer (for kgo.Dialer and pgx's DialFunc) that keeps
// the sockets it opens, so a test can cut them as a crash would; after the
// cut it dials no more.
type kafkaSockets struct {
	mu      sync.Mutex
	dead    bool
	refused time.Time // dials fail until then
	conns   []net.Conn
}

func (s *kafkaSockets) dial(ctx context.Context, network, host string) (net.Conn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead {
		return nil, errCrashed
	}
	if time.Now().Before(s.refused) {
		return nil, errors.New("the network is down")
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, host)
	if err != nil {
		return nil, err
	}
	s.conns = append(s.conns, c)
	return c, nil
}

func (s *kafkaSockets) cut() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dead = true
	for _, c := range s.conns {
		c.Close()
	}
}

// drop closes the open sockets and refuses to dial for d: a network cut
// the process outlives.
func (s *kafkaSockets) drop(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refused = time.Now().Add(d)
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}
