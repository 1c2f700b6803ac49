package chaos

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/pause"
	"github.com/exactlyonce/exactly/internal/pginstance"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/outbox"
)

// Names shared with chaos/cmd/worker.
const (
	natsStream   = "CHAOS"
	natsSubject  = "chaos.orders"
	cdcSubject   = "chaos.cdc"
	kafkaTopic   = "chaos"
	kafkaDLQ     = "chaos.dlq"
	outboxNATS   = "chaos_outbox_nats"
	outboxKafka  = "chaos_outbox_kafka"
	outboxCDC    = "chaos_outbox_cdc"
	inboxTable   = "chaos_inbox"
	offsetsTable = "chaos_kafka_offsets"

	outboxSQS    = "chaos_outbox_sqs"
	outboxPubsub = "chaos_outbox_pubsub"
	// sqsQueue is the FIFO queue of the SQS pipeline (the messages' Topic),
	// sqsDLQ its consumer's dead-letter queue.
	sqsQueue = "chaos-orders.fifo"
	sqsDLQ   = "chaos-orders-dlq.fifo"
	// The Pub/Sub pipeline's project, topic (the messages' Topic), ordered
	// subscription and dead-letter topic; the audit subscriptions are read by
	// the checker only.
	pubsubProject  = "chaos"
	pubsubTopic    = "chaos-orders"
	pubsubSub      = "chaos-orders-consumer"
	pubsubDLQ      = "chaos-orders.dlq"
	pubsubAudit    = "chaos-orders-audit"
	pubsubDLQAudit = "chaos-orders-dlq-audit"
)

// A pipeline is one path from the outbox to an effect.
type pipeline struct {
	Name   string
	Outbox string // outbox table the producer writes its messages to
	Broker string // "nats", "kafka", "sqs" or "pubsub"
	// Subject is the NATS subject (the Kafka topic is always "chaos").
	Subject string
	// Relay is the relay role: relay-nats and relay-kafka poll the outbox
	// table, relay-cdc reads it from a logical replication slot.
	Relay string
	Role  string // consumer role of chaos/cmd/worker
	Group string // Kafka group or NATS durable
	// Exact: every message must be applied exactly once. A non-exact
	// pipeline (Redis inbox) may apply a message twice only inside one of
	// its documented windows, which the checker must be able to name.
	Exact bool
	// BrokerOrder: per key, the first copies on the broker must follow the
	// sequence.
	BrokerOrder bool
	// EffectOrder: per key, the first applications must follow the
	// sequence (see the package documentation for where it is promised).
	EffectOrder bool
	// Args are extra worker flags of the consumer.
	Args []string
	// Churn: extra members may join and leave its consumer group.
	Churn bool
	// Cover: every fault kind of CoverFaults hits this pipeline at least
	// once in every run (faults are added to the random schedule where it
	// missed it).
	Cover bool
}

// Pipelines lists every pipeline the suite knows, by name.
var Pipelines = map[string]pipeline{
	"nats-sql": {Name: "nats-sql", Outbox: outboxNATS, Broker: "nats", Subject: natsSubject, Relay: "relay-nats",
		Role: "consumer-sql-inbox", Group: "chaos-sql", Exact: true, BrokerOrder: true, Churn: true},
	"kafka-db": {Name: "kafka-db", Outbox: outboxKafka, Broker: "kafka", Relay: "relay-kafka",
		Role: "consumer-kafka-dboffsets", Group: "chaos-db", Exact: true, BrokerOrder: true, EffectOrder: true, Churn: true},
	"kafka-redis": {Name: "kafka-redis", Outbox: outboxKafka, Broker: "kafka", Relay: "relay-kafka",
		Role: "consumer-redis-inbox", Group: "chaos-redis", BrokerOrder: true, EffectOrder: true, Churn: true},
	// The DB-offsets mode on its own: exact per broker record, so every copy
	// the relay published is applied again. Not a default pipeline: it shows
	// why the id claim of kafka-db is needed.
	"kafka-db-noclaim": {Name: "kafka-db-noclaim", Outbox: outboxKafka, Broker: "kafka", Relay: "relay-kafka",
		Role: "consumer-kafka-dboffsets", Group: "chaos-db-noclaim", Args: []string{"-dedup=false"}, Exact: true, BrokerOrder: true, EffectOrder: true},
	"kafka-broken": {Name: "kafka-broken", Outbox: outboxKafka, Broker: "kafka", Relay: "relay-kafka",
		Role: "consumer-kafka-broken", Group: "chaos-broken", Exact: true, BrokerOrder: true, EffectOrder: true},
	// The CDC relay publishes first copies in commit order only while
	// nothing fails: a retried message goes out again after the ones of its
	// key the broker already took, and within the stream's duplicate window
	// NATS drops those re-sends, so the broker's first copies of a key may be
	// out of sequence (pgcdc has no strict-order mode). Reported, not gated.
	"nats-cdc": {Name: "nats-cdc", Outbox: outboxCDC, Broker: "nats", Subject: cdcSubject, Relay: "relay-cdc",
		Role: "consumer-sql-inbox", Group: "chaos-cdc", Exact: true, Churn: true},
	// SQS: the polling relay publishes through the sqs Publisher to a FIFO
	// queue on fauxqs (MessageGroupId the key, MessageDeduplicationId the
	// id); the sqs Consumer applies with the SQL inbox. A FIFO queue keeps
	// each group's order and hands out one group's messages one at a time,
	// so both orders are promised.
	"sqs-sql": {Name: "sqs-sql", Outbox: outboxSQS, Broker: "sqs", Relay: "relay-sqs",
		Role: "consumer-sqs", Group: "chaos-sqs", Exact: true, BrokerOrder: true, EffectOrder: true, Churn: true, Cover: true},
	// Pub/Sub: the polling relay publishes through the pubsub Publisher
	// (ordering key the key) to pstest; the pubsub Consumer pulls from a
	// subscription with message ordering and applies with the SQL inbox.
	"pubsub-sql": {Name: "pubsub-sql", Outbox: outboxPubsub, Broker: "pubsub", Relay: "relay-pubsub",
		Role: "consumer-pubsub", Group: "chaos-pubsub", Exact: true, BrokerOrder: true, EffectOrder: true, Churn: true, Cover: true},
}

// DefaultPipelines are the ones a run checks unless told otherwise.
var DefaultPipelines = []string{"nats-sql", "nats-cdc", "kafka-db", "kafka-redis", "sqs-sql", "pubsub-sql"}

// Options configure one run. Zero values take the defaults.
type Options struct {
	// Seed makes the fault schedule reproducible. 0: a random seed (the
	// report says which).
	Seed uint64
	// Pipelines to run, by name (see Pipelines). Default DefaultPipelines.
	Pipelines []string
	// Kinds of fault to inject. Default AllFaults.
	Kinds []string
	// PerKind is the least number of faults of each kind. Default 2.
	PerKind int
	// Extra faults of random kinds on top. Default 0.
	Extra int
	// MinGap is the least quiet time after each fault (otherwise 1–3 s),
	// so that a restarted consumer is back at work before the next one.
	MinGap time.Duration
	// Targets limits kill and pause to these roles ("relay-nats",
	// "relay-kafka" or a pipeline name). Default: every relay and consumer.
	Targets []string
	// Keys and Rate shape the producer: orders per second over all keys.
	// Defaults 16 and 40.
	Keys int
	Rate float64
	// Drain bounds the wait, after the faults, for every written message
	// to be applied. Default 3 minutes.
	Drain time.Duration
	// Worker is a prebuilt chaos/cmd/worker binary; empty builds one.
	Worker string
	// WorkerRace builds the workers with the race detector.
	WorkerRace bool
	// Dir keeps the run's files (logs, data) there; empty: a temporary
	// directory, removed after a run without problems.
	Dir string
	// Log receives progress lines. Default: discarded.
	Log io.Writer
}

// harness is the state of one run.
type harness struct {
	opts Options
	dir  string
	log  io.Writer
	t0   time.Time

	pg     *pginstance.Instance
	natsP  *proc
	redisP *proc
	kfakeP *proc
	sqsP   *proc // fauxqs, when a pipeline uses SQS
	psP    *proc // pstest, when a pipeline uses Pub/Sub

	proxies                            *proxies
	pgVia, natsVia, redisVia, kafkaVia string
	natsAddr, redisAddr, kafkaAddr     string
	sqsAddr, sqsVia, sqsQueueURL       string
	sqsDLQURL                          string
	psAddr, psVia                      string

	worker    string
	pipelines []pipeline
	producer  *proc
	relays    map[string]*proc // "relay-nats", "relay-kafka", "relay-kafka-2"
	consumers map[string]*proc // by pipeline name
	extras    map[string]*proc // churn members, by pipeline name

	events events

	mu       sync.Mutex
	problems []string
	faults   map[string]int
	hits     map[string]map[string]int // pipeline -> fault kind -> faults that hit it
	killed   map[string]bool           // incarnations ended by SIGKILL
	paused   map[string]bool           // incarnations paused at least once
}

func (h *harness) logf(format string, args ...any) {
	fmt.Fprintf(h.log, "[%6.1fs] %s\n", time.Since(h.t0).Seconds(), fmt.Sprintf(format, args...))
}

// problem records something that makes the run fail whatever the checker
// finds (a worker that exited by itself, a fault that could not be healed).
func (h *harness) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	h.mu.Lock()
	h.problems = append(h.problems, msg)
	h.mu.Unlock()
	h.logf("PROBLEM: %s", msg)
}

func (h *harness) countFault(kind string) {
	h.mu.Lock()
	h.faults[kind]++
	h.mu.Unlock()
}

// Run runs the whole pipeline as separate processes against private
// PostgreSQL, NATS, Redis and kfake servers, injects the faults, waits for
// every message to be applied, stops everything and checks. The error is
// for a run that could not be carried out; what the checker found is in
// the Report (Report.OK).
func Run(ctx context.Context, opts Options) (*Report, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	if err := checkBinaries(opts.Pipelines); err != nil {
		return nil, err
	}
	h := &harness{opts: opts, log: opts.Log, t0: time.Now(), relays: map[string]*proc{}, consumers: map[string]*proc{},
		extras: map[string]*proc{}, faults: map[string]int{}, hits: map[string]map[string]int{}, killed: map[string]bool{}, paused: map[string]bool{}}
	keep := opts.Dir != ""
	if keep {
		h.dir = opts.Dir
	} else {
		d, err := os.MkdirTemp("", "exactly-chaos-")
		if err != nil {
			return nil, err
		}
		h.dir = d
	}
	if err := os.MkdirAll(filepath.Join(h.dir, "logs"), 0o755); err != nil {
		return nil, err
	}
	// PostgreSQL runs as its own user and must reach its directory inside.
	if err := os.Chmod(h.dir, 0o755); err != nil {
		return nil, err
	}
	for _, name := range opts.Pipelines {
		h.pipelines = append(h.pipelines, Pipelines[name])
	}
	h.logf("seed %d, pipelines %s, files in %s", opts.Seed, strings.Join(opts.Pipelines, ","), h.dir)

	rep, err := h.run(ctx)
	h.teardown()
	if err == nil && rep.OK() && !keep {
		_ = os.RemoveAll(h.dir)
	} else if rep != nil {
		rep.Dir = h.dir
	}
	return rep, err
}

func (o *Options) defaults() error {
	if o.Seed == 0 {
		o.Seed = rand.Uint64()%1_000_000 + 1
	}
	if len(o.Pipelines) == 0 {
		o.Pipelines = DefaultPipelines
	}
	for _, p := range o.Pipelines {
		if _, ok := Pipelines[p]; !ok {
			return fmt.Errorf("chaos: unknown pipeline %q", p)
		}
	}
	if len(o.Kinds) == 0 {
		o.Kinds = AllFaults
	}
	for _, k := range o.Kinds {
		if !slices.Contains(AllFaults, k) {
			return fmt.Errorf("chaos: unknown fault kind %q (known: %s)", k, strings.Join(AllFaults, ", "))
		}
	}
	if o.PerKind == 0 {
		o.PerKind = 2
	}
	if o.Keys == 0 {
		o.Keys = 16
	}
	if o.Rate == 0 {
		o.Rate = 40
	}
	if o.Drain == 0 {
		o.Drain = 3 * time.Minute
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	return nil
}

func (h *harness) run(ctx context.Context) (*Report, error) {
	var err error
	h.worker = h.opts.Worker
	if h.worker == "" {
		h.logf("building the workers")
		if h.worker, err = buildWorker(ctx, h.dir, h.opts.WorkerRace); err != nil {
			return nil, err
		}
	}
	if err := h.startServices(ctx); err != nil {
		return nil, err
	}
	if err := h.setup(ctx); err != nil {
		return nil, err
	}
	if err := h.startWorkers(ctx); err != nil {
		return nil, err
	}
	h.logf("warming up")
	pause.For(ctx, 5*time.Second)

	h.logf("injecting faults")
	h.inject(ctx)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	h.logf("faults done; producing a little longer")
	pause.For(ctx, 3*time.Second)
	h.producer.stop()

	h.logf("draining")
	drained := h.drain(ctx)
	for _, p := range h.relays {
		p.stop()
	}
	for _, p := range h.consumers {
		p.stop()
	}
	if !drained {
		h.problem("not every written message was applied within %s of the end of the faults", h.opts.Drain)
	}
	h.logf("checking")
	rep, err := h.check(ctx)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	rep.Problems = append(rep.Problems, h.problems...)
	rep.Faults = h.faults
	for i := range rep.Pipelines {
		rep.Pipelines[i].Faults = h.hits[rep.Pipelines[i].Name]
	}
	h.mu.Unlock()
	rep.Seed = h.opts.Seed
	rep.Took = time.Since(h.t0)
	return rep, nil
}

func (h *harness) startServices(ctx context.Context) error {
	h.logf("starting PostgreSQL, NATS, Redis and kfake")
	var err error
	h.pg, err = pginstance.Start(ctx, pginstance.Options{Dir: filepath.Join(h.dir, "pg"),
		Settings: map[string]string{"max_connections": "300"}})
	if err != nil {
		return err
	}
	natsPort, err := freePort()
	if err != nil {
		return err
	}
	h.natsAddr = "127.0.0.1:" + itoa(natsPort)
	h.natsP = &proc{h: h, role: "nats-server", path: natsServerBin,
		args: []string{"-a", "127.0.0.1", "-p", itoa(natsPort), "-js", "-sd", filepath.Join(h.dir, "nats")}}
	if err := h.startService(ctx, h.natsP, h.natsAddr); err != nil {
		return err
	}
	redisPort, err := freePort()
	if err != nil {
		return err
	}
	h.redisAddr = "127.0.0.1:" + itoa(redisPort)
	h.redisP = &proc{h: h, role: "redis-server", path: redisServerBin,
		args: []string{"--bind", "127.0.0.1", "--port", itoa(redisPort), "--save", "", "--appendonly", "no"}}
	if err := h.startService(ctx, h.redisP, h.redisAddr); err != nil {
		return err
	}
	kport, err := freePort()
	if err != nil {
		return err
	}
	h.kafkaAddr = "127.0.0.1:" + itoa(kport)
	h.kfakeP = &proc{h: h, role: "kfaked", path: h.worker,
		args: []string{"-role", "kfaked", "-port", itoa(kport), "-data-dir", filepath.Join(h.dir, "kfake")}}
	if err := h.startService(ctx, h.kfakeP, h.kafkaAddr); err != nil {
		return err
	}

	type upstream struct {
		name, addr string
		via        *string
	}
	ups := []upstream{{"pg", h.pg.Addr(), &h.pgVia}, {"nats", h.natsAddr, &h.natsVia}, {"redis", h.redisAddr, &h.redisVia}, {"kafka", h.kafkaAddr, &h.kafkaVia}}
	if h.uses("sqs") {
		if err := h.startFauxqs(ctx); err != nil {
			return err
		}
		ups = append(ups, upstream{"sqs", h.sqsAddr, &h.sqsVia})
	}
	if h.uses("pubsub") {
		port, err := freePort()
		if err != nil {
			return err
		}
		h.psAddr = "127.0.0.1:" + itoa(port)
		h.psP = &proc{h: h, role: "pstest", path: filepath.Join(filepath.Dir(h.worker), "pstest"), args: []string{"-port", itoa(port)}}
		if err := h.startService(ctx, h.psP, h.psAddr); err != nil {
			return err
		}
		ups = append(ups, upstream{"pubsub", h.psAddr, &h.psVia})
	}

	h.proxies = newProxies()
	for _, p := range ups {
		if *p.via, err = h.proxies.add(p.name, p.addr); err != nil {
			return err
		}
	}
	return nil
}

// uses reports whether a pipeline of the run goes through broker.
func (h *harness) uses(broker string) bool {
	return slices.ContainsFunc(h.pipelines, func(p pipeline) bool { return p.Broker == broker })
}

// startFauxqs starts the SQS emulator (fauxqs, under Node.js) on a free
// port, installing it first with scripts/aws-emulator when it is missing.
// It keeps its queues in memory, so the suite never restarts it.
func (h *harness) startFauxqs(ctx context.Context) error {
	app, err := fauxqsApp(ctx)
	if err != nil {
		return err
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	h.sqsAddr = "127.0.0.1:" + itoa(port)
	h.sqsP = &proc{h: h, role: "fauxqs", path: nodeBin(), args: []string{filepath.Join(repoRoot(), "scripts", "fauxqs", "server.mjs"), app, itoa(port)}}
	return h.startService(ctx, h.sqsP, h.sqsAddr)
}

// startService starts a server process and waits until addr accepts
// connections.
func (h *harness) startService(ctx context.Context, p *proc, addr string) error {
	if err := p.start(ctx, nil); err != nil {
		return err
	}
	return waitTCP(ctx, addr, 60*time.Second)
}

const schema = `
CREATE TABLE chaos_orders (key text NOT NULL, seq bigint NOT NULL, PRIMARY KEY (key, seq));
CREATE TABLE chaos_written (outbox text NOT NULL, msg_id text PRIMARY KEY, key text NOT NULL, seq bigint NOT NULL);
-- One row per application of an effect: a double application is two rows.
CREATE TABLE chaos_effects (id bigserial PRIMARY KEY, pipeline text NOT NULL, msg_id text NOT NULL,
	key text NOT NULL, seq bigint NOT NULL, worker text NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX ON chaos_effects (pipeline, msg_id);
-- id: the order of the deliveries (per key, the order the consumer received them).
CREATE TABLE chaos_deliveries (id bigserial PRIMARY KEY, pipeline text NOT NULL, msg_id text NOT NULL, worker text NOT NULL);
`

func (h *harness) setup(ctx context.Context) error {
	pool, err := pgxpool.New(ctx, h.pg.DSN("test"))
	if err != nil {
		return err
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, schema); err != nil {
		return fmt.Errorf("chaos schema: %w", err)
	}
	for _, t := range []string{outboxNATS, outboxKafka, outboxCDC, outboxSQS, outboxPubsub} {
		ob, err := outbox.New(outbox.Config{Dialect: outbox.Postgres, Table: t})
		if err != nil {
			return err
		}
		if err := ob.Migrate(ctx, pool); err != nil {
			return err
		}
	}
	in, err := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Table: inboxTable, Consumer: "chaos"})
	if err != nil {
		return err
	}
	if err := in.Migrate(ctx, pool); err != nil {
		return err
	}
	if err := kafka.MigrateOffsets(ctx, pool, "postgres", offsetsTable); err != nil {
		return err
	}
	nc, err := natsgo.Connect("nats://" + h.natsAddr)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	if _, err = js.CreateStream(ctx, jetstream.StreamConfig{Name: natsStream, Subjects: []string{"chaos.>"},
		Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute}); err != nil {
		return err
	}
	if h.uses("sqs") {
		if err := h.setupSQS(ctx); err != nil {
			return fmt.Errorf("SQS queues: %w", err)
		}
	}
	if h.uses("pubsub") {
		if err := h.setupPubsub(ctx); err != nil {
			return fmt.Errorf("Pub/Sub topics: %w", err)
		}
	}
	return nil
}

// workerProc describes a worker role with the addresses of the proxies.
func (h *harness) workerProc(role string, args ...string) *proc {
	return &proc{h: h, role: role, path: h.worker, args: args, env: []string{
		"CHAOS_PG=postgres://postgres@" + h.pgVia + "/test?sslmode=disable&connect_timeout=5",
		"CHAOS_NATS=nats://" + h.natsVia,
		"CHAOS_REDIS=" + h.redisVia,
		"CHAOS_KAFKA=" + h.kafkaAddr,
		"CHAOS_KAFKA_VIA=" + h.kafkaVia,
		"CHAOS_SQS=http://" + h.sqsVia,
		"CHAOS_SQS_QUEUE=" + h.sqsQueueURL,
		"CHAOS_SQS_DLQ=" + h.sqsDLQURL,
		"CHAOS_PUBSUB=" + h.psVia,
	}}
}

func (h *harness) startWorkers(ctx context.Context) error {
	var outboxes []string
	for _, p := range h.pipelines {
		if !slices.Contains(outboxes, p.Outbox) {
			outboxes = append(outboxes, p.Outbox)
			if p.Relay == "relay-cdc" {
				h.relays[p.Relay] = h.workerProc(p.Relay, "-role", "relay-cdc")
			} else {
				h.relays[p.Relay] = h.workerProc(p.Relay, "-role", "relay-poll", "-broker", p.Broker, "-table", p.Outbox)
				if p.Relay == "relay-kafka" {
					// Two relays share the Kafka outbox's partitions, so a
					// kill or a pause moves partitions to the other one in
					// the middle of its backlog.
					h.relays["relay-kafka-2"] = h.workerProc("relay-kafka-2", "-role", "relay-poll", "-broker", p.Broker, "-table", p.Outbox)
				}
			}
		}
		args := append([]string{"-role", p.Role, "-pipeline", p.Name, "-group", p.Group}, p.Args...)
		if p.Subject != "" {
			args = append(args, "-subject", p.Subject)
		}
		h.consumers[p.Name] = h.workerProc(p.Name, args...)
		if p.Churn {
			h.extras[p.Name] = h.workerProc(p.Name+"-extra", args...)
		}
	}
	h.producer = h.workerProc("producer", "-role", "producer", "-outboxes", strings.Join(outboxes, ","),
		"-keys", itoa(h.opts.Keys), "-rate", fmt.Sprint(h.opts.Rate))
	for _, p := range h.allWorkers() {
		if err := p.start(ctx, nil); err != nil {
			return err
		}
	}
	h.logf("workers started: %d relays, %d consumers, 1 producer", len(h.relays), len(h.consumers))
	return h.producer.start(ctx, nil)
}

// allWorkers are the relays and the consumers, in a stable order.
func (h *harness) allWorkers() []*proc {
	var out []*proc
	for _, k := range sortedKeys(h.relays) {
		out = append(out, h.relays[k])
	}
	for _, k := range sortedKeys(h.consumers) {
		out = append(out, h.consumers[k])
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// drain waits until every pipeline applied every written message.
func (h *harness) drain(ctx context.Context) bool {
	pool, err := pgxpool.New(ctx, h.pg.DSN("test"))
	if err != nil {
		h.problem("drain: %v", err)
		return false
	}
	defer pool.Close()
	deadline := time.Now().Add(h.opts.Drain)
	last := time.Now()
	for {
		missing := map[string]int64{}
		for _, p := range h.pipelines {
			var n int64
			err := pool.QueryRow(ctx, `SELECT count(*) FROM chaos_written w WHERE w.outbox = $1
				AND NOT EXISTS (SELECT 1 FROM chaos_effects e WHERE e.pipeline = $2 AND e.msg_id = w.msg_id)`, p.Outbox, p.Name).Scan(&n)
			if err != nil {
				n = -1
			}
			if n != 0 {
				missing[p.Name] = n
			}
		}
		if len(missing) == 0 {
			h.logf("drained")
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			h.logf("still missing after the drain: %v", missing)
			return false
		}
		if time.Since(last) > 10*time.Second {
			h.logf("waiting for: %v", missing)
			last = time.Now()
		}
		pause.For(ctx, time.Second)
	}
}

func (h *harness) teardown() {
	for _, m := range []map[string]*proc{h.relays, h.consumers, h.extras} {
		for _, p := range m {
			p.kill()
		}
	}
	if h.producer != nil {
		h.producer.kill()
	}
	if h.proxies != nil {
		h.proxies.closeAll()
	}
	for _, p := range []*proc{h.natsP, h.redisP, h.kfakeP, h.sqsP, h.psP} {
		if p != nil {
			p.stop()
		}
	}
	if h.pg != nil {
		if err := h.pg.Remove(); err != nil && !errors.Is(err, os.ErrNotExist) {
			h.logf("removing PostgreSQL: %v", err)
		}
	}
}
