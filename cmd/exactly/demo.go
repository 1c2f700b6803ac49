package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"

	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/outbox"
)

// The consumer-side strategies of the demo.
const (
	inboxSQL      = "sql"   // commit offsets after the effect; the SQL inbox absorbs redeliveries
	inboxRedis    = "redis" // the same with the Redis inbox
	offsetsKafka  = "kafka" // offsets committed to Kafka after the effect (with an inbox)
	offsetsDB     = "db"    // offsets stored in the effect's transaction, with the id claimed there too (inbox.SQL.Claim)
	demoGroupSize = 3
)

// The demo's brokers.
const (
	demoKafka  = "kafka"
	demoNATS   = "nats"
	demoPubsub = "pubsub"
	demoSQS    = "sqs"
)

const demoOffsetsTable = "kafka_offsets"

type demoOptions struct {
	orders  int
	writers int
	timeout time.Duration
	seed    uint64
	verbose bool

	db      string // "" for the embedded SQLite
	broker  string // kafka, nats, pubsub or sqs; "" picks it from the address given
	kafka   string // "" for the in-process kfake
	nats    string
	pubsub  string // the emulator's host:port; "" for PUBSUB_EMULATOR_HOST, or the in-process pstest
	sqs     string // the SQS endpoint (an emulator's, or AWS's)
	redis   string
	relay   string // poll or cdc
	inbox   string // sql or redis
	offsets string // kafka or db
	keep    bool   // leave the database's tables for a look with the console
}

func demoCmd() *cobra.Command {
	o := demoOptions{}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run an order service, the relay and a consumer group with faults injected, and prove nothing was lost or applied twice",
		Long: `demo runs, in one process, an order service that writes orders and their
order.created events through the transactional outbox, the relay that
publishes them, and a consumer group of three members that applies a
promotion per order through the inbox. While it runs it injects the faults
that make brokers deliver twice: publish acknowledgements lost after the
broker accepted, relay crashes after the broker confirmed and before the rows
were marked sent, consumer crashes after the effect and before the offset
commit or the ack, and rebalances (members leaving and joining; on Pub/Sub,
a subscriber leaving the subscription and another taking over its
messages). On Pub/Sub some publish answers are also lost on the wire after
the server stored the message, and the client library sends it again. On
SQS some SendMessageBatch answers are lost after SQS stored the batch (the
relay sends it again and the FIFO queue's deduplication drops the copies),
and some deletes after the effect committed are lost, so SQS delivers the
message again once its visibility timeout has passed. At
the end it reads the database and prints what was written, published,
delivered and applied. It
exits 1 if any order's promotion was lost or applied twice (with the Redis
inbox: applied twice in a way its documented limits do not explain; each
double application is listed with the window that let it happen), if a
fault kind was never injected, or if nothing progressed for --timeout.

By default it needs no server: SQLite in a temporary directory and an
in-process Kafka-protocol broker (franz-go's kfake). The flags point it at
real services and pick the strategy:

  --db postgres://... | mysql://...   the database (a schema or database of the run's own, dropped at the end)
  --kafka host:port,...               a real Kafka (topics of the run's own, deleted at the end)
  --nats nats://host:4222             NATS JetStream instead of Kafka
  --broker pubsub                     Google Cloud Pub/Sub instead of Kafka: an in-process pstest
                                      server, or the emulator PUBSUB_EMULATOR_HOST names
  --pubsub host:8085                  a Pub/Sub emulator (topics and subscriptions of the run's own,
                                      deleted at the end)
  --sqs http://host:4566              Amazon SQS FIFO queues instead of Kafka, at this endpoint: an
                                      emulator (dummy credentials), or https://sqs.REGION.amazonaws.com
                                      with the standard AWS credential chain (queues of the run's own,
                                      deleted at the end)
  --redis redis://host:6379           the Redis inbox instead of the SQL one
  --offsets db                        Kafka offsets stored in the effect's transaction, and each id
                                      claimed in it too (inbox.SQL.Claim), for the relay's re-sends
  --relay poll|cdc                    the outbox source
  --timeout 60s                       stop when nothing progressed for this long (a slow machine
                                      only makes the run longer)
  --keep                              leave the run's tables (schema, database or SQLite file) in
                                      place and print the exactly console command that shows them`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			return runDemo(cmd.Context(), cmd.OutOrStdout(), o)
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.orders, "orders", 10000, "orders to write")
	f.IntVar(&o.writers, "writers", 4, "concurrent order-service writers")
	f.DurationVar(&o.timeout, "timeout", 60*time.Second, "give up when nothing progressed for this long (no order written, delivered for the first time or applied, no outbox row sent once all are applied); the run itself may take longer")
	f.Uint64Var(&o.seed, "seed", 0, "seed for the fault schedule (0 picks one and prints it)")
	f.BoolVar(&o.verbose, "verbose", false, "log the relay's and the consumers' warnings")
	f.StringVar(&o.db, "db", "", "database: postgres://... or mysql://...; default an embedded SQLite")
	f.StringVar(&o.kafka, "kafka", "", "comma-separated Kafka seed brokers; default an in-process Kafka (kfake)")
	f.StringVar(&o.nats, "nats", "", "NATS URL (nats://host:4222): use JetStream instead of Kafka")
	f.StringVar(&o.broker, "broker", "", "broker: kafka, nats, pubsub or sqs (default nats when --nats is given, pubsub when --pubsub is, sqs when --sqs is, else kafka)")
	f.StringVar(&o.pubsub, "pubsub", "", "Pub/Sub emulator address (host:port): use Pub/Sub instead of Kafka; with --broker pubsub the default is PUBSUB_EMULATOR_HOST, else an in-process Pub/Sub (pstest)")
	f.StringVar(&o.sqs, "sqs", "", "SQS endpoint (http://host:4566 for an emulator, https://sqs.REGION.amazonaws.com for AWS): use SQS FIFO queues instead of Kafka")
	f.StringVar(&o.redis, "redis", "", "Redis address (redis://host:6379/0 or host:port) for the Redis inbox")
	f.StringVar(&o.relay, "relay", sourcePoll, "outbox source of the relay: poll or cdc")
	f.StringVar(&o.inbox, "inbox", "", "inbox: sql or redis (default redis when --redis is given, else sql)")
	f.BoolVar(&o.keep, "keep", false, "keep the run's tables (its schema, database or SQLite file) when it ends, and print the `exactly console` command that shows them; topics, queues and a CDC slot are removed as always")
	f.StringVar(&o.offsets, "offsets", offsetsKafka, "Kafka consumer positions: kafka (committed after the effect, with the inbox) or db (stored in the effect's transaction, where the SQL inbox's Claim also records each id, for the relay's re-sends)")
	return cmd
}

// demoRun is one run of the demo: what its stages share.
type demoRun struct {
	o     demoOptions
	out   io.Writer
	start time.Time
	log   *slog.Logger
	id    string // names the run's schema, topics, stream, slot and keys

	db     *demoDB
	ob     *outbox.Outbox
	broker demoBroker
	slot   string // the cdc relay's
	keepDB bool   // the run ended with --keep: the database's tables stay
	// cleanups undo the set-up, last first.
	cleanups []func() error

	// The consumer side: one of these, by strategy.
	sqlIn           *inbox.SQL   // the SQL inbox
	redisIn         *inbox.Redis // the Redis inbox
	attempts        *attemptLog  // the Redis inbox's runs
	claims          *inbox.SQL   // offsets in the database: ids claimed in the effect's transaction
	claimDuplicates atomic.Int64

	f            *faults
	pub          *faultyPublisher
	got          *deliveries
	deadLettered atomic.Int64
	written      atomic.Int64

	// The work's failures; each stops the run.
	stopWork           context.CancelFunc
	writeErr, relayErr atomic.Pointer[error]
}

func runDemo(ctx context.Context, out io.Writer, o demoOptions) (err error) {
	if err := o.validate(); err != nil {
		return err
	}
	if o.seed == 0 {
		o.seed = mrand.Uint64()
	}
	logLevel := slog.LevelError + 4
	if o.verbose {
		logLevel = slog.LevelWarn
	}
	r := &demoRun{o: o, out: out, start: time.Now(), id: newRunID(),
		log: slog.New(slog.NewTextHandler(logOutput, &slog.HandlerOptions{Level: logLevel}))}
	defer func() {
		if cerr := r.cleanup(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	r.f = newFaults(o.seed, o.orders)
	if err := r.setup(ctx); err != nil {
		return err
	}
	fmt.Fprintf(out, "exactly demo: %d orders; %s outbox -> %s relay -> %s -> consumer group of %d -> %s; seed %d\n",
		o.orders, r.db.label, o.relay, r.broker.label(), demoGroupSize, o.strategy(), o.seed)

	r.pub = &faultyPublisher{inner: r.broker.publisher(), f: r.f, crash: make(chan struct{}, 1)}
	r.got = &deliveries{count: map[string]int{}}
	workCtx, stopWork := context.WithCancel(ctx)
	defer stopWork()
	r.stopWork = stopWork
	var relayDone, writers sync.WaitGroup
	relayDone.Go(func() { r.superviseRelay(workCtx) })
	g := r.startGroup(workCtx)
	r.startWriters(workCtx, &writers)
	finished, lastProgress := r.watch(workCtx)
	stopWork()
	writers.Wait()
	relayDone.Wait()
	r.f.rebalancesWG.Wait()
	g.wg.Wait()
	for _, p := range []*atomic.Pointer[error]{&r.writeErr, &r.relayErr, &g.err} {
		if e := p.Load(); e != nil {
			return fmt.Errorf("the demo could not run: %w", *e)
		}
	}
	if !finished && ctx.Err() != nil {
		return &exitError{130, "interrupted"}
	}
	err = r.verdict(context.WithoutCancel(ctx), finished, lastProgress)
	if o.keep {
		r.keepDB = true
		r.printKept()
	}
	return err
}

// fail records a failure of the work and stops the run.
func (r *demoRun) fail(p *atomic.Pointer[error], err error) {
	p.CompareAndSwap(nil, &err)
	r.stopWork()
}

// cleanup removes what the set-up created, last first, and returns the
// first failure.
func (r *demoRun) cleanup() error {
	var err error
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		if cerr := r.cleanups[i](); cerr != nil && err == nil {
			err = cerr
		}
	}
	r.cleanups = nil
	return err
}

func (r *demoRun) onCleanup(fn func() error) { r.cleanups = append(r.cleanups, fn) }

func newRunID() string {
	const digits = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 8)
	rand.Read(b)
	for i := range b {
		b[i] = digits[int(b[i])%len(digits)]
	}
	return string(b)
}

func envDefault(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
