// Command worker is one process of the chaos suite: a producer, a relay, a
// consumer or the kfake broker, chosen by -role. The orchestrator
// (package chaos) builds it once per run, starts it with its settings in
// CHAOS_* environment variables, and kills, pauses and restarts it.
//
// Every consumer records each delivery in chaos_deliveries (outside the
// effect's transaction) and each application of the effect as a new row of
// chaos_effects (a serial id per application, so a double application is
// visible, never absorbed by a key). Events the checker needs to explain a
// double application of a non-exact pipeline are printed on stdout as
// "CHAOS-EVENT <kind> <message id>" lines.
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/redis/go-redis/v9"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pubsub"
	"github.com/exactlyonce/exactly/relay"
	"github.com/exactlyonce/exactly/sqs"
)

// Names shared with the orchestrator (package chaos keeps the same values).
const (
	natsStream   = "CHAOS"
	natsSubject  = "chaos.orders"
	cdcSubject   = "chaos.cdc"
	outboxCDC    = "chaos_outbox_cdc"
	kafkaTopic   = "chaos"
	kafkaDLQ     = "chaos.dlq"
	kafkaParts   = 4
	outboxNATS   = "chaos_outbox_nats"
	outboxKafka  = "chaos_outbox_kafka"
	inboxTable   = "chaos_inbox"
	offsetsTable = "chaos_kafka_offsets"
	outboxSQS    = "chaos_outbox_sqs"
	outboxPubsub = "chaos_outbox_pubsub"
	sqsQueue     = "chaos-orders.fifo"
	pubsubTopic  = "chaos-orders"
	pubsubSub    = "chaos-orders-consumer"
)

func main() {
	role := flag.String("role", "", "producer | relay-poll | relay-cdc | consumer-sql-inbox | consumer-redis-inbox | consumer-kafka-dboffsets | consumer-kafka-broken | consumer-sqs | consumer-pubsub | kfaked")
	broker := flag.String("broker", "nats", "relay: nats, kafka, sqs or pubsub")
	table := flag.String("table", "", "relay: outbox table")
	keys := flag.Int("keys", 16, "producer: keys written concurrently")
	rate := flag.Float64("rate", 40, "producer: orders per second over all keys")
	outboxes := flag.String("outboxes", outboxNATS+","+outboxKafka, "producer: outbox tables each order writes a message to")
	pipeline := flag.String("pipeline", "", "consumer: pipeline name recorded with each effect")
	dedup := flag.Bool("dedup", true, "DB-offsets consumer: also claim the message id in the effect's transaction")
	subject := flag.String("subject", natsSubject, "NATS consumer: subject")
	group := flag.String("group", "", "consumer: Kafka group or NATS durable")
	port := flag.Int("port", 0, "kfaked: port")
	dataDir := flag.String("data-dir", "", "kfaked: data directory")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	w := &worker{name: envOr("CHAOS_NAME", *role), log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	var err error
	switch *role {
	case "producer":
		err = w.producer(ctx, *keys, *rate, strings.Split(*outboxes, ","))
	case "relay-poll":
		err = w.relayPoll(ctx, *broker, *table)
	case "relay-cdc":
		err = w.relayCDC(ctx)
	case "consumer-sql-inbox":
		err = w.natsSQLInbox(ctx, *pipeline, *group, *subject)
	case "consumer-redis-inbox":
		err = w.kafkaRedisInbox(ctx, *pipeline, *group)
	case "consumer-kafka-dboffsets":
		err = w.kafkaDBOffsets(ctx, *pipeline, *group, *dedup)
	case "consumer-kafka-broken":
		err = w.kafkaBroken(ctx, *pipeline, *group)
	case "consumer-sqs":
		err = w.sqsSQLInbox(ctx, *pipeline)
	case "consumer-pubsub":
		err = w.pubsubSQLInbox(ctx, *pipeline)
	case "kfaked":
		err = kfaked(ctx, *port, *dataDir)
	default:
		err = fmt.Errorf("unknown -role %q", *role)
	}
	if err != nil && ctx.Err() == nil {
		fmt.Fprintf(os.Stderr, "worker %s: %v\n", w.name, err)
		os.Exit(3)
	}
}

type worker struct {
	name  string
	log   *slog.Logger
	outMu sync.Mutex
}

// event reports what the checker needs to explain a double application.
func (w *worker) event(kind, id string) {
	w.outMu.Lock()
	defer w.outMu.Unlock()
	fmt.Fprintf(os.Stdout, "CHAOS-EVENT %s %s\n", kind, id)
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// payload is the body of every message: the order it announces.
type payload struct {
	Key string `json:"key"`
	Seq int64  `json:"seq"`
}

// --- producer ---

// producer writes orders: per key, sequence numbers 1, 2, 3, ... each in
// one transaction with its outbox messages and the chaos_written rows that
// tell the checker what must arrive. A commit whose outcome is unknown (the
// connection dropped) is resolved by looking for the row before going on,
// so a key never skips nor repeats a sequence number.
func (w *worker) producer(ctx context.Context, keys int, rate float64, tables []string) error {
	pool, err := pgxpool.New(ctx, os.Getenv("CHAOS_PG"))
	if err != nil {
		return err
	}
	defer pool.Close()
	obs := make([]*outbox.Outbox, len(tables))
	for i, t := range tables {
		if obs[i], err = outbox.New(outbox.Config{Dialect: outbox.Postgres, Table: t}); err != nil {
			return err
		}
	}
	interval := time.Duration(float64(time.Second) * float64(keys) / rate)
	var wg sync.WaitGroup
	for k := range keys {
		key := fmt.Sprintf("k%02d", k)
		wg.Go(func() {
			seq := w.retry(ctx, func(ctx context.Context) (int64, error) {
				var max int64
				err := pool.QueryRow(ctx, "SELECT coalesce(max(seq), 0) FROM chaos_orders WHERE key = $1", key).Scan(&max)
				return max + 1, err
			})
			tick := time.NewTicker(interval)
			defer tick.Stop()
			for ctx.Err() == nil {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				if err := w.writeOrder(ctx, pool, obs, tables, key, seq); err == nil {
					seq++
					continue
				}
				// Unknown outcome: the row tells whether it committed.
				exists := w.retry(ctx, func(ctx context.Context) (int64, error) {
					var n int64
					err := pool.QueryRow(ctx, "SELECT count(*) FROM chaos_orders WHERE key = $1 AND seq = $2", key, seq).Scan(&n)
					return n, err
				})
				if exists == 1 {
					seq++
				}
			}
		})
	}
	wg.Wait()
	return nil
}

func (w *worker) writeOrder(ctx context.Context, pool *pgxpool.Pool, obs []*outbox.Outbox, tables []string, key string, seq int64) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	tx, err := pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "INSERT INTO chaos_orders (key, seq) VALUES ($1, $2)", key, seq); err != nil {
		return err
	}
	body, _ := json.Marshal(payload{Key: key, Seq: seq})
	for i, ob := range obs {
		topic := kafkaTopic
		switch tables[i] {
		case outboxNATS:
			topic = natsSubject
		case outboxCDC:
			topic = cdcSubject
		case outboxSQS:
			topic = sqsQueue
		case outboxPubsub:
			topic = pubsubTopic
		}
		m := &exactly.Message{Topic: topic, Key: key, Payload: body}
		if err := ob.Enqueue(ctx, tx, m); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO chaos_written (outbox, msg_id, key, seq) VALUES ($1, $2, $3, $4)", tables[i], m.ID, key, seq); err != nil {
			return err
		}
	}
	return tx.Commit(ctx)
}

// retry runs fn until it succeeds or ctx ends.
func (w *worker) retry(ctx context.Context, fn func(context.Context) (int64, error)) int64 {
	for {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		v, err := fn(qctx)
		cancel()
		if err == nil || ctx.Err() != nil {
			return v
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// --- relay ---

func (w *worker) relayPoll(ctx context.Context, broker, table string) error {
	pool, err := pgxpool.New(ctx, os.Getenv("CHAOS_PG"))
	if err != nil {
		return err
	}
	defer pool.Close()
	ob, err := outbox.New(outbox.Config{Dialect: outbox.Postgres, Table: table})
	if err != nil {
		return err
	}
	var pub exactly.Publisher
	switch broker {
	case "nats":
		nc, js, err := connectNATS()
		if err != nil {
			return err
		}
		defer nc.Close()
		if pub, err = nats.NewPublisher(js); err != nil {
			return err
		}
	case "kafka":
		p, err := kafka.NewClientPublisher(kafkaSeeds(), kafkaDialer())
		if err != nil {
			return err
		}
		defer p.Close()
		pub = p
	case "sqs":
		if pub, err = sqs.NewPublisher(sqsClient(), sqs.PublisherConfig{QueueURLs: map[string]string{sqsQueue: os.Getenv("CHAOS_SQS_QUEUE")}}); err != nil {
			return err
		}
	case "pubsub":
		client, err := pubsubClient(ctx)
		if err != nil {
			return err
		}
		defer client.Close()
		p, err := pubsub.NewPublisher(client, pubsub.PublisherConfig{})
		if err != nil {
			return err
		}
		defer p.Close()
		pub = p
	default:
		return fmt.Errorf("unknown -broker %q", broker)
	}
	r, err := relay.New(relay.Config{
		Outbox: ob, DB: pool, Publisher: pub,
		StrictOrder: true, BatchSize: 200, PollInterval: 200 * time.Millisecond,
		MaxAttempts: 1_000_000, InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second,
		Partitions: 8, LeaseTTL: 2 * time.Second, ShutdownTimeout: 5 * time.Second,
		InstanceID: w.name, Logger: w.log,
	})
	if err != nil {
		return err
	}
	return r.Run(ctx)
}

// --- consumers ---

// consumer holds what every consumer role shares: the database of effects
// and deliveries.
type consumer struct {
	*worker
	db       *sql.DB
	pipeline string
	recorded sync.Map // *exactly.Message -> true: delivery recorded (a few thousand per run)
}

func (w *worker) openConsumer(pipeline string) (*consumer, error) {
	if pipeline == "" {
		return nil, errors.New("-pipeline is required")
	}
	db, err := sql.Open("pgx", os.Getenv("CHAOS_PG"))
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(16)
	db.SetConnMaxIdleTime(10 * time.Second)
	return &consumer{worker: w, db: db, pipeline: pipeline}, nil
}

// delivered records one delivery, outside the effect's transaction. The
// consumers retry a failing handler with the same *exactly.Message, so a
// retry of one delivery is not counted as another delivery.
func (c *consumer) delivered(ctx context.Context, m *exactly.Message) error {
	if _, done := c.recorded.Load(m); done {
		return nil
	}
	_, err := c.db.ExecContext(ctx, "INSERT INTO chaos_deliveries (pipeline, msg_id, worker) VALUES ($1, $2, $3)", c.pipeline, m.ID, c.name)
	if err == nil {
		c.recorded.Store(m, true)
	}
	return err
}

// effect is the effect: one new row per application.
type execer interface {
	ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error)
}

func (c *consumer) effect(ctx context.Context, ex execer, m *exactly.Message) error {
	var p payload
	if err := json.Unmarshal(m.Payload, &p); err != nil {
		return fmt.Errorf("payload of %s: %w", m.ID, err)
	}
	_, err := ex.ExecContext(ctx, "INSERT INTO chaos_effects (pipeline, msg_id, key, seq, worker) VALUES ($1, $2, $3, $4, $5)",
		c.pipeline, m.ID, p.Key, p.Seq, c.name)
	return err
}

var retry = exactly.RetryPolicy{MaxAttempts: 1_000_000, InitialBackoff: 50 * time.Millisecond, MaxBackoff: time.Second}

// natsSQLInbox: NATS JetStream durable consumer, SQL inbox in the effect's
// transaction.
func (w *worker) natsSQLInbox(ctx context.Context, pipeline, durable, subject string) error {
	c, err := w.openConsumer(pipeline)
	if err != nil {
		return err
	}
	defer c.db.Close()
	in, err := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Table: inboxTable, Consumer: pipeline})
	if err != nil {
		return err
	}
	h := in.Handler(c.db, func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error { return c.effect(ctx, tx, m) })
	nc, js, err := connectNATS()
	if err != nil {
		return err
	}
	defer nc.Close()
	cons, err := nats.NewConsumer(js, nats.ConsumerConfig{
		Stream: natsStream, Durable: durable, FilterSubjects: []string{subject},
		AckWait: 3 * time.Second, Batch: 50,
		ConsumerConfig: exactly.ConsumerConfig{Workers: 4, Retry: retry, Logger: w.log,
			Handler: func(ctx context.Context, m *exactly.Message) error {
				if err := c.delivered(ctx, m); err != nil {
					return err
				}
				return h(ctx, m)
			},
		},
	})
	if err != nil {
		return err
	}
	return cons.Run(ctx)
}

// kafkaSessionTimeout is the Kafka consumers' session timeout (the
// orchestrator's kafkaSession: its kill bursts fit inside it).
const kafkaSessionTimeout = 3 * time.Second

func (w *worker) kafkaConfig(group string) kafka.ConsumerConfig {
	cfg := kafka.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Retry: retry, Logger: w.log, Workers: 16, // every partition at once
			DeadLetterTopic: func(*exactly.Message) string { return kafkaDLQ },
		},
		Group: group, Topics: []string{kafkaTopic}, MaxPollRecords: 50,
		ClientOpts:     []kgo.Opt{kafkaDialer()},
		SessionTimeout: kafkaSessionTimeout, HeartbeatInterval: 300 * time.Millisecond, RebalanceTimeout: 10 * time.Second,
	}
	// A pipeline's consumer keeps its role as a static InstanceID across
	// its restarts (CHAOS_NAME is role#incarnation), as under an
	// orchestrator that restarts crashed pods: a restart replaces the
	// member it was. The churn member (role ...-extra) stays dynamic: it
	// joins, then leaves.
	if role, _, _ := strings.Cut(w.name, "#"); !strings.HasSuffix(role, "-extra") {
		cfg.InstanceID = role
	}
	return cfg
}

// kafkaDBOffsets: Kafka consumer group with the offsets in the effect's
// database transaction (compare-and-set, fenced); with dedup, the message
// id is claimed in that transaction too.
func (w *worker) kafkaDBOffsets(ctx context.Context, pipeline, group string, dedup bool) error {
	c, err := w.openConsumer(pipeline)
	if err != nil {
		return err
	}
	defer c.db.Close()
	// The stored offset makes each record apply once; a copy the relay
	// published again is another record with the same id, absorbed by
	// claiming the id in the same transaction (inbox.SQL.Claim).
	// (The table is migrated by the orchestrator before any worker starts.)
	claims, err := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Table: inboxTable, Consumer: pipeline})
	if err != nil {
		return err
	}
	cons, err := kafka.NewDBConsumer(kafkaSeeds(), kafka.DBConfig{ConsumerConfig: w.kafkaConfig(group), DB: c.db, Dialect: "postgres", OffsetsTable: offsetsTable,
		TxHandler: func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
			if err := c.delivered(ctx, m); err != nil {
				return err
			}
			if dedup {
				if fresh, err := claims.Claim(ctx, tx, m); err != nil || !fresh {
					return err // a copy: nothing to apply, the offset still advances
				}
			}
			return c.effect(ctx, tx, m)
		},
	})
	if err != nil {
		return err
	}
	return cons.Run(ctx)
}

// kafkaRedisInbox: Kafka consumer group committing offsets after the
// effect, Redis inbox; the effect is a row in PostgreSQL, outside any
// transaction shared with the inbox (the case the Redis store is for).
func (w *worker) kafkaRedisInbox(ctx context.Context, pipeline, group string) error {
	c, err := w.openConsumer(pipeline)
	if err != nil {
		return err
	}
	defer c.db.Close()
	rc := redis.NewClient(&redis.Options{Addr: os.Getenv("CHAOS_REDIS"), DialTimeout: 2 * time.Second,
		ReadTimeout: 2 * time.Second, WriteTimeout: 2 * time.Second, MaxRetries: -1})
	defer rc.Close()
	in, err := inbox.NewRedis(rc, inbox.RedisConfig{Consumer: pipeline, Prefix: "chaos:", Lease: 5 * time.Second, TTL: time.Hour,
		Hooks: inbox.Hooks{
			LeaseExpired: func(m *exactly.Message, overlapped bool) {
				if overlapped {
					w.event("overlapped", m.ID)
				}
			},
			MarkFailed: func(m *exactly.Message, _ error) { w.event("markfailed", m.ID) },
		}})
	if err != nil {
		return err
	}
	h := in.Handler(func(ctx context.Context, m *exactly.Message) error {
		err := c.effect(ctx, c.db, m)
		if err != nil {
			// The insert may have committed even though it failed here (a
			// connection lost during the commit): the retry then applies
			// it again. That is the non-atomic effect the Redis inbox
			// documents; say so, so the checker can tell it from a bug.
			w.event("effect-unknown", m.ID)
		}
		return err
	})
	cfg := w.kafkaConfig(group)
	cfg.Handler = func(ctx context.Context, m *exactly.Message) error {
		if err := c.delivered(ctx, m); err != nil {
			return err
		}
		return h(ctx, m)
	}
	cons, err := kafka.NewConsumer(kafkaSeeds(), cfg)
	if err != nil {
		return err
	}
	return cons.Run(ctx)
}

// kafkaBroken is the deliberately wrong consumer that proves the checker
// can see a fault: the same Kafka consumer as kafka-redis (offsets
// committed after the effect) with the inbox left out. Every kill between
// an effect and the next offset commit, and every copy the relay
// published, then applies a message twice. Its handler is slow (10 ms after
// each effect, like a handler that calls another service), so most kills
// land while a poll's effects are applied and its offsets not yet committed.
func (w *worker) kafkaBroken(ctx context.Context, pipeline, group string) error {
	c, err := w.openConsumer(pipeline)
	if err != nil {
		return err
	}
	defer c.db.Close()
	cfg := w.kafkaConfig(group)
	cfg.Handler = func(ctx context.Context, m *exactly.Message) error {
		if err := c.delivered(ctx, m); err != nil {
			return err
		}
		if err := c.effect(ctx, c.db, m); err != nil {
			return err
		}
		time.Sleep(10 * time.Millisecond)
		return nil
	}
	cons, err := kafka.NewConsumer(kafkaSeeds(), cfg)
	if err != nil {
		return err
	}
	return cons.Run(ctx)
}

// --- connections ---

func connectNATS() (*natsgo.Conn, jetstream.JetStream, error) {
	nc, err := natsgo.Connect(os.Getenv("CHAOS_NATS"), natsgo.MaxReconnects(-1), natsgo.ReconnectWait(200*time.Millisecond),
		natsgo.RetryOnFailedConnect(true), natsgo.Timeout(3*time.Second), natsgo.PingInterval(2*time.Second), natsgo.MaxPingsOutstanding(2))
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}

func kafkaSeeds() []string { return []string{os.Getenv("CHAOS_KAFKA")} }

// kafkaDialer sends every connection to the broker through the fault
// proxy: kfake advertises its own address, which clients would otherwise
// dial directly after the first metadata request.
func kafkaDialer() kgo.Opt {
	real, via := os.Getenv("CHAOS_KAFKA"), os.Getenv("CHAOS_KAFKA_VIA")
	d := &net.Dialer{Timeout: 3 * time.Second}
	return kgo.Dialer(func(ctx context.Context, network, host string) (net.Conn, error) {
		if via != "" && host == real {
			host = via
		}
		return d.DialContext(ctx, network, host)
	})
}

// --- kfaked ---

// kfaked runs a kfake cluster of one broker on a fixed port, persisting to
// dataDir with an fsync per write, so that it can be killed and restarted
// from its data directory.
func kfaked(ctx context.Context, port int, dataDir string) error {
	if port == 0 || dataDir == "" {
		return errors.New("kfaked needs -port and -data-dir")
	}
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.Ports(port), kfake.DataDir(dataDir), kfake.SyncWrites(),
		kfake.SeedTopics(kafkaParts, kafkaTopic, kafkaDLQ), kfake.GroupMinSessionTimeout(time.Second))
	if err != nil {
		return err
	}
	fmt.Println("READY", c.ListenAddrs()[0])
	<-ctx.Done()
	c.Close()
	return nil
}
