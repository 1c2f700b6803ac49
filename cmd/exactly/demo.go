package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/spf13/cobra"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
	"github.com/exactlyonce/exactly/relay"
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
                                      only makes the run longer)`,
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
	f.StringVar(&o.offsets, "offsets", offsetsKafka, "Kafka consumer positions: kafka (committed after the effect, with the inbox) or db (stored in the effect's transaction, where the SQL inbox's Claim also records each id, for the relay's re-sends)")
	return cmd
}

// validate checks the options and fills in the derived defaults.
func (o *demoOptions) validate() error {
	switch {
	case o.orders < 100 || o.orders > 1_000_000:
		return fmt.Errorf("--orders %d: want 100 to 1000000 (fewer leaves no room for the faults)", o.orders)
	case o.writers < 1 || o.writers > 64:
		return fmt.Errorf("--writers %d: want 1 to 64", o.writers)
	case o.timeout <= 0:
		return fmt.Errorf("--timeout must be positive, got %s", o.timeout)
	}
	var given []string // the brokers' addresses given
	implied := demoKafka
	for _, b := range []struct{ name, addr string }{{demoKafka, o.kafka}, {demoNATS, o.nats}, {demoPubsub, o.pubsub}, {demoSQS, o.sqs}} {
		if b.addr != "" {
			given, implied = append(given, "--"+b.name), b.name
		}
	}
	if len(given) > 1 {
		return fmt.Errorf("%s both given: the demo uses one broker", strings.Join(given, " and "))
	}
	if o.broker == "" {
		o.broker = implied
	}
	switch o.broker {
	case demoKafka, demoNATS, demoPubsub, demoSQS:
		if len(given) == 1 && implied != o.broker {
			return fmt.Errorf("--broker %s and %s both given: the demo uses one broker", o.broker, given[0])
		}
	default:
		return fmt.Errorf("--broker: unknown broker %q (want kafka, nats, pubsub or sqs)", o.broker)
	}
	switch {
	case o.broker == demoNATS && o.nats == "":
		return errors.New("--broker nats needs --nats nats://host:4222")
	case o.broker == demoSQS && o.sqs == "":
		return errors.New("--broker sqs needs --sqs ENDPOINT (http://host:4566 for an emulator, https://sqs.REGION.amazonaws.com for AWS)")
	case o.sqs != "":
		if err := checkSQSEndpoint(o.sqs); err != nil {
			return err
		}
	case o.kafka != "" && len(splitList(o.kafka)) == 0:
		return fmt.Errorf("--kafka %q: want host:port[,host:port...]", o.kafka)
	case o.broker == demoPubsub:
		if addr, from := pubsubEmulator(o.pubsub); addr != "" {
			if err := checkEmulatorAddr(from, addr); err != nil {
				return err
			}
		}
	}
	dialect := ""
	switch {
	case o.db == "":
		dialect = outbox.SQLite
	case strings.HasPrefix(o.db, "postgres://"), strings.HasPrefix(o.db, "postgresql://"):
		dialect = outbox.Postgres
	case strings.HasPrefix(o.db, "mysql://"):
		dialect = outbox.MySQL
	default:
		return fmt.Errorf("--db: unrecognised database DSN (want postgres://... or mysql://...; leave it out for the embedded SQLite): %s", hide.String(o.db))
	}
	if err := checkSource(o.relay, dialect); err != nil {
		return fmt.Errorf("--relay: %w", err)
	}
	if o.inbox == "" {
		o.inbox = inboxSQL
		if o.redis != "" {
			o.inbox = inboxRedis
		}
	}
	switch o.inbox {
	case inboxSQL:
	case inboxRedis:
		if o.redis == "" {
			return errors.New("--inbox redis needs --redis redis://host:6379")
		}
	default:
		return fmt.Errorf("--inbox: unknown inbox %q (want sql or redis)", o.inbox)
	}
	switch o.offsets {
	case offsetsKafka:
	case offsetsDB:
		switch o.broker {
		case demoNATS:
			return errors.New("--offsets db is for Kafka; NATS tracks its consumers' positions itself")
		case demoPubsub:
			return errors.New("--offsets db is for Kafka; Pub/Sub tracks what each subscription acknowledged itself")
		case demoSQS:
			return errors.New("--offsets db is for Kafka; SQS keeps a message until its consumer deletes it")
		}
		if o.redis != "" || o.inbox != inboxSQL {
			return errors.New("--offsets db claims each id in the effect's transaction with the SQL inbox, which --redis and --inbox would replace; leave them out")
		}
	default:
		return fmt.Errorf("--offsets: unknown value %q (want kafka or db)", o.offsets)
	}
	return nil
}

// strategy describes the consumer side in a few words.
func (o *demoOptions) strategy() string {
	switch {
	case o.offsets == offsetsDB:
		return "offsets and id claims stored in the effect's transaction"
	case o.inbox == inboxRedis:
		return "Redis inbox"
	}
	return "SQL inbox"
}

// deliveries counts what the consumer group's handlers receive, per id.
type deliveries struct {
	mu    sync.Mutex
	count map[string]int
	total atomic.Int64
}

func (d *deliveries) add(id string) {
	d.total.Add(1)
	d.mu.Lock()
	d.count[id]++
	d.mu.Unlock()
}

func (d *deliveries) distinct() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.count)
}

// attemptLog records the runs of the effect under the Redis inbox, and
// what the inbox reported about each message, so that the verdict can tell
// a double application that a documented limit of the Redis store accounts
// for from one that nothing explains. Each promotion row carries the number
// of the run that wrote it. Only the runs that failed or outlived their
// lease are kept (a run that committed in time needs no explaining), so
// the log stays small however many orders the run has.
type attemptLog struct {
	mu           sync.Mutex
	n            int64              // runs begun
	kept         map[int64]*attempt // the runs that failed or outlived their lease
	leaseExpired map[string]int     // by message ID: Hooks.LeaseExpired reports
	markFailed   map[string]int     // by message ID: Hooks.MarkFailed reports
}

// attempt is one run of the effect.
type attempt struct {
	n          int64
	member     string
	start, end time.Time
	deadline   time.Time // when its lease ran out: the handler's context deadline
	err        error     // what the effect returned; nil when it committed
	left       error     // why the member was leaving when it returned (errCrashed, errRebalanced), or nil
}

// leaseOut reports whether the run ended after its lease.
func (a *attempt) leaseOut() bool { return !a.deadline.IsZero() && !a.end.Before(a.deadline) }

func newAttemptLog() *attemptLog {
	return &attemptLog{kept: map[int64]*attempt{}, leaseExpired: map[string]int{}, markFailed: map[string]int{}}
}

func (l *attemptLog) begin(ctx context.Context, member string) *attempt {
	a := &attempt{member: member, start: time.Now()}
	a.deadline, _ = ctx.Deadline()
	l.mu.Lock()
	l.n++
	a.n = l.n
	l.mu.Unlock()
	return a
}

func (l *attemptLog) finish(a *attempt, err, left error) {
	a.end, a.err, a.left = time.Now(), err, left
	if err != nil || a.leaseOut() {
		l.mu.Lock()
		l.kept[a.n] = a
		l.mu.Unlock()
	}
}

func (l *attemptLog) hooks() inbox.Hooks {
	return inbox.Hooks{
		LeaseExpired: func(m *exactly.Message, _ bool) {
			l.mu.Lock()
			l.leaseExpired[m.ID]++
			l.mu.Unlock()
		},
		MarkFailed: func(m *exactly.Message, _ error) {
			l.mu.Lock()
			l.markFailed[m.ID]++
			l.mu.Unlock()
		},
	}
}

// doubleApplication is an order applied more than once, and what let it happen.
type doubleApplication struct {
	order     string
	times     int
	explained bool
	why       string
}

// explain accounts for the orders applied more than once. An order is
// explained when each of its applications but the last is followed by a
// window that the Redis store documents: the run's effect committed but
// its handler returned an error (the effect and the done marker are not
// atomic, and a failed run releases its lease for a retry), its lease ran
// out while it ran (another runner could take the message), or its done
// marker could not be written. The runs are in the order they started.
func (l *attemptLog) explain(apps []application) []doubleApplication {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []doubleApplication
	for i := 0; i < len(apps); {
		j := i
		for j < len(apps) && apps[j].order == apps[i].order {
			j++
		}
		d := doubleApplication{order: apps[i].order, times: j - i, explained: true}
		var whys []string
		for _, app := range apps[i : j-1] {
			why, ok := l.why(app)
			whys = append(whys, why)
			d.explained = d.explained && ok
		}
		d.why = strings.Join(whys, "; ")
		out = append(out, d)
		i = j
	}
	return out
}

// why says what let another run apply the effect again after app's.
func (l *attemptLog) why(app application) (string, bool) {
	if app.attempt < 1 || app.attempt > l.n {
		return fmt.Sprintf("a promotion by %s of no recorded run: unexplained", app.member), false
	}
	run := fmt.Sprintf("run %d (%s)", app.attempt, app.member)
	a := l.kept[app.attempt]
	if a != nil {
		run = fmt.Sprintf("run %d (%s, %s after the claim)", a.n, a.member, a.end.Sub(a.start).Round(time.Millisecond))
	}
	switch {
	case a != nil && a.err != nil:
		cause := ""
		switch {
		case a.leaseOut():
			cause = " as its lease ran out"
		case a.left != nil:
			cause = fmt.Sprintf(" as its member stopped (%v)", a.left)
		}
		return fmt.Sprintf("%s committed, yet its commit returned %q%s: the inbox released the lease and a retry applied it again", run, a.err, cause), true
	case a != nil && a.leaseOut(), l.leaseExpired[app.event] > 0:
		return fmt.Sprintf("%s outlived its lease, so another runner took the message", run), true
	case l.markFailed[app.event] > 0:
		return fmt.Sprintf("%s could not write its done marker", run), true
	}
	return fmt.Sprintf("%s committed within its lease and was marked done: unexplained", run), false
}

// faults are the duplicate causes the demo injects, and its dice.
type faults struct {
	lostAcks, relayCrashes, relayStarts, consumerCrashes, rebalances atomic.Int64

	mu  sync.Mutex
	rnd *mrand.Rand
	// fresh counts effects applied (not duplicates); the consumer-side
	// faults fire at fixed counts, so every run has them mid-stream.
	fresh        atomic.Int64
	crashAt      []int64
	rebalanceAt  []int64
	rebalanceFn  func()
	rebalancesWG sync.WaitGroup
}

func newFaults(seed uint64, orders int) *faults {
	at := func(fracs ...float64) []int64 {
		out := make([]int64, len(fracs))
		for i, fr := range fracs {
			out[i] = max(1, int64(fr*float64(orders)))
		}
		return out
	}
	return &faults{rnd: mrand.New(mrand.NewPCG(seed, 1)), crashAt: at(0.1, 0.4, 0.7), rebalanceAt: at(0.2, 0.5, 0.8)}
}

func (f *faults) roll() float64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rnd.Float64()
}

// applied is called after a member applied an effect, before it
// acknowledges the delivery. It starts the rebalances that are due, and
// reports whether the member crashes now: at the fixed points, or on a rare
// roll of the dice.
func (f *faults) applied() (crash bool) {
	n := f.fresh.Add(1)
	if slices.Contains(f.rebalanceAt, n) {
		f.rebalances.Add(1)
		f.rebalancesWG.Go(f.rebalanceFn)
	}
	return slices.Contains(f.crashAt, n) || f.roll() < 0.0004
}

// faultyPublisher wraps the broker's publisher and injects the producing
// side's duplicate causes, always after the broker confirmed the batch.
type faultyPublisher struct {
	inner     exactly.Publisher
	f         *faults
	crash     chan struct{} // tells the relay's supervisor to kill it
	published atomic.Int64  // records confirmed by the broker, re-sends included
	calls     atomic.Int64
}

func (p *faultyPublisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	if err := p.inner.Publish(ctx, msgs); err != nil {
		return err
	}
	p.published.Add(int64(len(msgs)))
	// Random faults, plus fixed ones from the first calls on, so every
	// kind happens in every run, however short: a lost ack makes the next
	// call a re-send, which the next fault then hits.
	n := p.calls.Add(1)
	switch x := p.f.roll(); {
	case x < 0.02 || n == 2 || n == 15:
		// The relay dies after the broker confirmed, before it marks the
		// rows sent: the next relay publishes them again, same ids.
		p.f.relayCrashes.Add(1)
		select {
		case p.crash <- struct{}{}:
		default:
		}
		<-ctx.Done()
		return fmt.Errorf("relay killed after the broker confirmed: %w", ctx.Err())
	case x < 0.06 || n == 1 || n == 9:
		// The acknowledgement is lost on the way back (a timeout after the
		// broker accepted): the relay publishes the batch again.
		p.f.lostAcks.Add(1)
		return errors.New("publish acknowledgement lost (injected timeout)")
	}
	return nil
}

var (
	errCrashed    = errors.New("member crashed (injected) after the effect, before acknowledging")
	errRebalanced = errors.New("member left the group (injected rebalance)")
)

// group runs the consumer group: demoGroupSize member slots, each running
// one member incarnation after the other. Cancelling an incarnation makes
// it leave the group (context.Cause says why: errCrashed, errRebalanced);
// its slot then starts the next, which joins.
type group struct {
	ctx     context.Context
	run     func(ctx context.Context, crash func(), name string) error
	wg      sync.WaitGroup
	mu      sync.Mutex
	cancels [demoGroupSize]context.CancelCauseFunc
	err     atomic.Pointer[error]
}

func (g *group) start() {
	for i := range demoGroupSize {
		g.wg.Go(func() {
			for n := 1; g.ctx.Err() == nil; n++ {
				ctx, cancel := context.WithCancelCause(g.ctx)
				g.mu.Lock()
				g.cancels[i] = cancel
				g.mu.Unlock()
				err := g.run(ctx, func() { cancel(errCrashed) }, fmt.Sprintf("member-%d.%d", i+1, n))
				cancel(nil)
				if err != nil && g.ctx.Err() == nil {
					g.err.CompareAndSwap(nil, &err)
					return
				}
			}
		})
	}
}

// bounce makes member slot i leave the group and join again.
func (g *group) bounce(i int) {
	g.mu.Lock()
	c := g.cancels[i]
	g.mu.Unlock()
	if c != nil {
		c(errRebalanced)
	}
}

func newRunID() string {
	const digits = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 8)
	rand.Read(b)
	for i := range b {
		b[i] = digits[int(b[i])%len(digits)]
	}
	return string(b)
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
	return r.verdict(context.WithoutCancel(ctx), finished, lastProgress)
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

// setup creates the run's database namespace, outbox, broker topics or
// stream, and the consumer side of its strategy.
func (r *demoRun) setup(ctx context.Context) error {
	o := r.o
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	db, err := openDemoDB(ctx, o.db, r.id)
	if err != nil {
		return err
	}
	r.db = db
	r.onCleanup(func() error {
		if err := db.close(); err != nil {
			return fmt.Errorf("removing the demo's tables: %w", err)
		}
		return nil
	})
	if r.ob, err = outbox.New(outbox.Config{Dialect: db.dialect, Table: db.table("outbox")}); err != nil {
		return err
	}
	if err := r.ob.Migrate(ctx, db.db); err != nil {
		return fmt.Errorf("migrating the outbox: %w", err)
	}
	// The cdc relay streams the run's own slot, dropped with its
	// publication when the demo ends (after the relay stopped).
	r.slot = "exactly_demo_" + r.id
	if o.relay == sourceCDC {
		r.onCleanup(func() error {
			dctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			err := pgcdc.DropSlot(dctx, o.db, r.slot)
			db.db.ExecContext(dctx, "DROP PUBLICATION IF EXISTS "+r.slot)
			if err != nil && !errors.Is(err, pgcdc.ErrSlotLost) {
				return fmt.Errorf("removing the demo's replication slot %s: %w", r.slot, err)
			}
			return nil
		})
	}

	var kb *kafkaBroker
	switch o.broker {
	case demoNATS:
		if r.broker, err = newNATSBroker(ctx, o.nats, r.id, r.log); err != nil {
			return err
		}
	case demoPubsub:
		addr, from := pubsubEmulator(o.pubsub)
		if r.broker, err = newPubsubBroker(ctx, addr, from, r.id, r.f, r.log); err != nil {
			return err
		}
	case demoSQS:
		if r.broker, err = newSQSBroker(ctx, o.sqs, r.id, r.f, r.log); err != nil {
			return err
		}
	default:
		if kb, err = newKafkaBroker(ctx, splitList(o.kafka), r.id, r.log); err != nil {
			return err
		}
		r.broker = kb
	}
	r.onCleanup(func() error { r.broker.close(); return nil })

	// The consumer side: the effect, and what makes it apply once.
	switch {
	case o.offsets == offsetsDB:
		if err := kafka.MigrateOffsets(ctx, db.db, db.dialect, db.table(demoOffsetsTable)); err != nil {
			return fmt.Errorf("migrating the offsets table: %w", err)
		}
		kb.offsets = db
		// The stored offsets make redeliveries harmless, but a re-send by
		// the relay is a new record at a new offset: the message id is
		// claimed in the same transaction to absorb those.
		if r.claims, err = inbox.NewSQL(inbox.Config{Dialect: db.dialect, Table: db.table("inbox"), Consumer: "promotions"}); err != nil {
			return err
		}
		if err := r.claims.Migrate(ctx, db.db); err != nil {
			return fmt.Errorf("migrating the inbox: %w", err)
		}
	case o.inbox == inboxRedis:
		rc, err := openRedis(ctx, o.redis)
		if err != nil {
			return err
		}
		r.onCleanup(rc.Close)
		prefix := "exactly:demo:" + r.id + ":"
		r.onCleanup(func() error { deleteRedisKeys(rc, prefix); return nil })
		r.attempts = newAttemptLog()
		if r.redisIn, err = inbox.NewRedis(rc, inbox.RedisConfig{Prefix: prefix, Consumer: "promotions",
			Lease: 10 * time.Second, TTL: 10 * time.Minute, Hooks: r.attempts.hooks()}); err != nil {
			return err
		}
	default:
		if r.sqlIn, err = inbox.NewSQL(inbox.Config{Dialect: db.dialect, Table: db.table("inbox"), Consumer: "promotions"}); err != nil {
			return err
		}
		if err := r.sqlIn.Migrate(ctx, db.db); err != nil {
			return fmt.Errorf("migrating the inbox: %w", err)
		}
	}
	return nil
}

// fail records a failure of the work and stops the run.
func (r *demoRun) fail(p *atomic.Pointer[error], err error) {
	p.CompareAndSwap(nil, &err)
	r.stopWork()
}

// superviseRelay runs the relay until ctx ends, starting a new one
// whenever the fault injector kills it.
func (r *demoRun) superviseRelay(ctx context.Context) {
	for i := 1; ctx.Err() == nil; i++ {
		rl, err := newRelayRunner(r.o.relay, relay.Config{
			Outbox: r.ob, DB: r.db.db, Publisher: r.pub, BatchSize: 200, PollInterval: 20 * time.Millisecond,
			InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
			ShutdownTimeout: 50 * time.Millisecond, LeaseTTL: 2 * time.Second, Partitions: 8,
			InstanceID: fmt.Sprintf("demo-relay-%d", i), Logger: r.log,
		}, cdcSettings{DSN: r.o.db, Slot: r.slot})
		if err != nil {
			r.fail(&r.relayErr, err)
			return
		}
		r.f.relayStarts.Add(1)
		rctx, kill := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- rl.Run(rctx) }()
		var runErr error
		stopped := false
		select {
		case <-r.pub.crash:
		case <-ctx.Done():
		case runErr = <-done:
			stopped = true
		}
		kill()
		if !stopped {
			runErr = <-done
		}
		if stopped && ctx.Err() == nil {
			if runErr == nil {
				runErr = errors.New("the relay stopped by itself")
			}
			r.fail(&r.relayErr, runErr)
			return
		}
	}
}

// startGroup starts the consumer group, whose members apply the promotions
// until ctx ends.
func (r *demoRun) startGroup(ctx context.Context) *group {
	g := &group{ctx: ctx, run: r.member}
	bounce := mrand.New(mrand.NewPCG(r.o.seed, 2))
	var bounceMu sync.Mutex
	r.f.rebalanceFn = func() {
		bounceMu.Lock()
		i := bounce.IntN(demoGroupSize)
		bounceMu.Unlock()
		g.bounce(i)
	}
	g.start()
	return g
}

// member runs one incarnation of a member of the group until ctx ends;
// crash makes it leave as if it had crashed.
func (r *demoRun) member(ctx context.Context, crash func(), name string) error {
	db, f := r.db, r.f
	spec := memberSpec{name: name, deadLettered: func(*exactly.Message, error) { r.deadLettered.Add(1) }}
	// crashed reports an injected crash: the member dies, the delivery
	// stays unacknowledged and comes again.
	crashed := func() error {
		f.consumerCrashes.Add(1)
		crash()
		return errCrashed
	}
	switch {
	case r.claims != nil:
		spec.txHandler = func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
			r.got.add(m.ID)
			fresh, err := r.claims.Claim(ctx, tx, m)
			if err != nil {
				return err
			}
			if !fresh {
				r.claimDuplicates.Add(1) // a re-send: the offset advances, nothing else
				return nil
			}
			if err := db.applyPromotion(ctx, tx, m, name, 0); err != nil {
				return err
			}
			if f.applied() {
				return crashed() // the effect and the offset roll back together
			}
			return nil
		}
	default:
		// apply runs the effect through the inbox and reports what became of it.
		apply := func(ctx context.Context, m *exactly.Message) (inbox.Outcome, error) {
			if r.sqlIn != nil {
				return r.sqlIn.Handle(ctx, db.db, m, func(ctx context.Context, tx *sql.Tx) error {
					return db.applyPromotion(ctx, tx, m, name, 0)
				})
			}
			return db.applyThroughRedis(ctx, r.redisIn, r.attempts, m, name)
		}
		spec.handler = func(ctx context.Context, m *exactly.Message) error {
			r.got.add(m.ID)
			out, err := apply(ctx, m)
			if err != nil {
				return err
			}
			if out == inbox.Processed && f.applied() {
				return crashed() // the effect is committed, the offset or ack is not
			}
			return nil
		}
	}
	return r.broker.member(ctx, spec)
}

// startWriters starts the order service's writers, which place the orders
// until all are written or ctx ends.
func (r *demoRun) startWriters(ctx context.Context, writers *sync.WaitGroup) {
	var next atomic.Int64
	for range r.o.writers {
		writers.Go(func() {
			for ctx.Err() == nil {
				n := next.Add(1)
				if n > int64(r.o.orders) {
					return
				}
				if err := r.db.placeOrder(ctx, r.ob, r.broker.topic(), n); err != nil {
					if ctx.Err() == nil {
						r.fail(&r.writeErr, err)
					}
					return
				}
				r.written.Add(1)
			}
		})
	}
}

// watch prints the progress until every order's promotion is applied and
// the outbox is empty (finished), or nothing progressed for --timeout, or
// ctx ended. It returns when the run last progressed.
//
// --timeout bounds a stall, not the run: any order written, delivered for
// the first time or applied, or any outbox row sent once all are applied,
// is progress. Re-sends and redeliveries are not.
func (r *demoRun) watch(ctx context.Context) (finished bool, lastProgress time.Time) {
	o, f := r.o, r.f
	tty := isTerminal(r.out)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var lastLine time.Time
	var applied int64
	progress := func() string {
		return fmt.Sprintf("  %5.1fs  written %d  published %d  delivered %d  applied %d  |  faults: %d lost acks, %d relay crashes, %d consumer crashes, %d rebalances",
			time.Since(r.start).Seconds(), r.written.Load(), r.pub.published.Load(), r.got.total.Load(), applied,
			f.lostAcks.Load(), f.relayCrashes.Load(), f.consumerCrashes.Load(), f.rebalances.Load())
	}
	stalled := false
	var mark [4]int64 // written, distinct deliveries, applied, -pending
	lastProgress = time.Now()
	for !finished && !stalled && ctx.Err() == nil {
		select {
		case <-ctx.Done():
			continue
		case <-tick.C:
		}
		if n, err := r.db.applied(ctx); err == nil {
			applied = n
		}
		now := [4]int64{r.written.Load(), int64(r.got.distinct()), applied, mark[3]}
		if now[0] == int64(o.orders) && applied == int64(o.orders) {
			if st, err := r.ob.Status(ctx, r.db.db); err == nil {
				now[3] = -st.Pending
				finished = st.Pending == 0
			}
		}
		if now != mark {
			mark, lastProgress = now, time.Now()
		} else if time.Since(lastProgress) > o.timeout {
			stalled = true
		}
		if tty {
			fmt.Fprintf(r.out, "\r%-150s", progress())
		} else if time.Since(lastLine) > 5*time.Second || finished {
			fmt.Fprintln(r.out, progress())
			lastLine = time.Now()
		}
	}
	if tty {
		fmt.Fprintln(r.out)
	}
	return finished, lastProgress
}

// verdict reads the database once everything stopped, prints the table and
// returns an *exitError when a promise was broken.
func (r *demoRun) verdict(ctx context.Context, finished bool, lastProgress time.Time) error {
	o, f, db, out := r.o, r.f, r.db, r.out
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	v, err := db.verify(ctx)
	if err != nil {
		return err
	}
	st, err := r.ob.Status(ctx, db.db)
	if err != nil {
		return err
	}
	onBroker, err := r.broker.stored(ctx)
	if err != nil {
		return fmt.Errorf("counting the records on %s: %w", r.broker.topic(), err)
	}
	// The SQL inbox and the stored offsets are exact; the Redis inbox is
	// not, and a double application is explained when the recorded runs
	// show one of its documented windows.
	exact := r.attempts == nil
	var doubles []doubleApplication
	var explained int64
	if !exact && v.appliedTwice > 0 {
		apps, err := db.appliedTwice(ctx)
		if err != nil {
			return err
		}
		doubles = r.attempts.explain(apps)
		for _, d := range doubles {
			if d.explained {
				explained++
			}
		}
	}
	total := r.got.total.Load()
	distinct := int64(r.got.distinct())
	absorbed := r.claimDuplicates.Load()
	absorbedBy := "re-sends, by the id's claim; redeliveries never pass the stored offset"
	switch {
	case r.sqlIn != nil:
		absorbed, absorbedBy = r.sqlIn.Stats().Duplicates, "by the SQL inbox: the id's claim commits with the effect"
	case r.redisIn != nil:
		absorbed, absorbedBy = r.redisIn.Stats().Duplicates, "by the Redis inbox: done marker after the effect"
	}
	published := r.pub.published.Load()

	fmt.Fprintln(out)
	row := func(name string, val any, note string) { fmt.Fprintf(out, "  %-24s %15v   %s\n", name, val, note) }
	row("orders written", v.orders, "each with its order.created event, in one transaction")
	row("events published", published, fmt.Sprintf("confirmed by the broker; %d re-sends of events already published", published-v.orders))
	storedNote := "re-sends included"
	switch o.broker {
	case demoNATS:
		storedNote = "the stream dropped re-sends within its duplicate window"
	case demoPubsub:
		storedNote = "re-sends included, and the client library's own after a lost answer"
	case demoSQS:
		storedNote = "distinct SQS message ids: the FIFO queue dropped re-sends within its deduplication window"
	}
	row("records on the broker", onBroker, storedNote)
	dupNote := "re-sends, redeliveries after crashes and rebalances"
	if o.broker == demoSQS && onBroker == v.orders {
		dupNote = "redeliveries after lost deletes, crashes and rebalances (the FIFO queue dropped the re-sends)"
	}
	row("deliveries", total, fmt.Sprintf("%d duplicates: %s", total-distinct, dupNote))
	row("duplicates absorbed", absorbed, absorbedBy)
	row("effects applied", v.applied, "one promotion per order")
	if finished {
		row("lost", v.lost, "must be 0")
	} else {
		row("lost", v.lost, "must be 0; the run stalled and was stopped, so some may still be on the way")
	}
	if exact {
		row("applied twice", v.appliedTwice, "must be 0")
	} else {
		row("applied twice", v.appliedTwice, "must be 0 but for the Redis inbox's documented limits:")
		row("  explained by them", explained, "a run outlived its lease, or its effect committed and yet failed, or its marker was not written")
	}
	const listed = 10
	for i, d := range doubles {
		if i == listed {
			fmt.Fprintf(out, "    ... and %d more\n", len(doubles)-listed)
			break
		}
		verdict := "explained"
		if !d.explained {
			verdict = "NOT EXPLAINED"
		}
		fmt.Fprintf(out, "    %s applied %d times, %s: %s\n", d.order, d.times, verdict, d.why)
	}
	pointsNote := "applied / owed: must be equal"
	if v.appliedTwice > 0 {
		pointsNote = "applied / owed: the difference is what the double applications credited"
	}
	row("customer points", fmt.Sprintf("%d/%d", v.pointsGot, v.pointsWant), pointsNote)
	row("outbox pending / dead", fmt.Sprintf("%d/%d", st.Pending, st.Dead), "must be 0/0")
	row("dead-lettered", r.deadLettered.Load(), "must be 0")
	fmt.Fprintln(out)
	fmt.Fprintln(out, "  faults injected")
	crashNote := "consumer crash after the effect, before the offset commit"
	rebalanceNote := "rebalance (a member left the group, another joined)"
	switch {
	case o.broker == demoPubsub:
		crashNote = "consumer crash after the effect, before the ack"
		rebalanceNote = "rebalance (a subscriber left, another took over)"
	case o.broker == demoNATS:
		crashNote = "consumer crash after the effect, before the ack"
	case o.broker == demoSQS:
		crashNote = "consumer crash after the effect, before the delete"
		rebalanceNote = "rebalance (a consumer left the queue, another joined)"
	case o.offsets == offsetsDB:
		crashNote = "consumer crash after the effect, before the commit"
	}
	frow := func(name string, n int64) { fmt.Fprintf(out, "    %-58s %7d\n", name, n) }
	frow("publish ack lost (a timeout after the broker accepted)", f.lostAcks.Load())
	if pb, ok := r.broker.(*pubsubBroker); ok {
		frow("  of which on the wire, sent again by the client library", pb.lostWire.Load())
	}
	sb, onSQS := r.broker.(*sqsBroker)
	if onSQS {
		frow("  of which SendMessageBatch answers lost after SQS stored", sb.lostWire.Load())
	}
	frow("relay crash after the broker confirmed, before mark-sent", f.relayCrashes.Load())
	frow(crashNote, f.consumerCrashes.Load())
	if onSQS {
		frow("delete lost after the effect (redelivered once visible)", sb.lostDeletes.Load())
	}
	frow(rebalanceNote, f.rebalances.Load())
	fmt.Fprintf(out, "\ntook %s\n", time.Since(r.start).Round(time.Millisecond))

	var problems []string
	if !finished {
		problems = append(problems, fmt.Sprintf("nothing progressed for %s (the last progress was %s into the run), with %d of %d orders written and %d applied",
			o.timeout, lastProgress.Sub(r.start).Round(time.Second), r.written.Load(), o.orders, v.applied))
	}
	for _, c := range []struct {
		bad  bool
		what string
	}{
		{v.lost > 0 && finished, fmt.Sprintf("%d lost", v.lost)},
		{v.lost > 0 && !finished, fmt.Sprintf("%d not applied by then", v.lost)},
		{exact && v.appliedTwice > 0, fmt.Sprintf("%d applied twice", v.appliedTwice)},
		{!exact && v.appliedTwice > explained, fmt.Sprintf("%d applied twice outside the Redis inbox's documented limits", v.appliedTwice-explained)},
		{v.strangers > 0, fmt.Sprintf("%d promotions of unknown events", v.strangers)},
		{v.appliedTwice == 0 && v.pointsGot != v.pointsWant, fmt.Sprintf("customer points %d, owed %d", v.pointsGot, v.pointsWant)},
		{v.pointsGot != v.pointsPromoted, fmt.Sprintf("customer points %d, while the promotions credit %d", v.pointsGot, v.pointsPromoted)},
		{st.Pending > 0 || st.Dead > 0, fmt.Sprintf("outbox still holds %d pending and %d dead", st.Pending, st.Dead)},
		{r.deadLettered.Load() > 0, fmt.Sprintf("%d dead-lettered", r.deadLettered.Load())},
	} {
		if c.bad {
			problems = append(problems, c.what)
		}
	}
	if len(problems) > 0 {
		return &exitError{1, "FAILED: " + strings.Join(problems, "; ")}
	}
	if f.lostAcks.Load() == 0 || f.relayCrashes.Load() == 0 || f.consumerCrashes.Load() == 0 || f.rebalances.Load() == 0 ||
		(onSQS && (sb.lostWire.Load() == 0 || sb.lostDeletes.Load() == 0)) {
		return &exitError{1, "a fault kind was never injected: the run proved less than it should"}
	}
	switch {
	case exact:
		fmt.Fprintln(out, "OK: every order's promotion applied exactly once, through every fault")
	case v.appliedTwice == 0:
		fmt.Fprintln(out, "OK: every order's promotion applied once, through every fault. The Redis inbox promises one run at a time")
		fmt.Fprintln(out, "and a done marker for its TTL, not exactly once: a run that outlives its lease, an effect that commits and")
		fmt.Fprintln(out, "yet fails, or a marker not written would apply again (none did here)")
	default:
		fmt.Fprintf(out, "OK: every order's promotion applied, through every fault; %d applied twice, each in a window the Redis\n", v.appliedTwice)
		fmt.Fprintln(out, "inbox documents (listed above): it promises one run at a time and a done marker for its TTL, not exactly once.")
		fmt.Fprintln(out, "For exactly once, keep the effect in the database and use the SQL inbox")
	}
	return nil
}

// applyThroughRedis applies m's promotion through the Redis inbox, in a
// transaction of its own, and records the run in attempts. ctx is the
// member's: it ends when the member leaves the group.
//
// The transaction does not end with the member: a commit cut short by it
// may still complete at the server (pgx gives up on the reply, the server
// commits), and the inbox, told that the effect failed, would release the
// lease so that the redelivery applies it again. The Redis inbox cannot
// share the effect's transaction, so the effect must know its own outcome:
// it runs to its end, bounded by the lease alone, after which a second
// runner may take the message anyway (the limit the Redis store documents).
func (d *demoDB) applyThroughRedis(ctx context.Context, in *inbox.Redis, attempts *attemptLog, m *exactly.Message, member string) (inbox.Outcome, error) {
	return in.Handle(ctx, m, func(hctx context.Context, m *exactly.Message) error {
		tctx, cancel := context.WithoutCancel(hctx), context.CancelFunc(func() {})
		if deadline, ok := hctx.Deadline(); ok {
			tctx, cancel = context.WithDeadline(tctx, deadline)
		}
		defer cancel()
		a := attempts.begin(tctx, member)
		err := d.inTx(tctx, func(tx *sql.Tx) error { return d.applyPromotion(tctx, tx, m, member, a.n) })
		var left error
		if ctx.Err() != nil {
			left = context.Cause(ctx)
		}
		attempts.finish(a, err, left)
		return err
	})
}

// inTx runs fn in a transaction of its own and commits it.
func (d *demoDB) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}

// openRedis connects to redis://... or host:port and pings it.
func openRedis(ctx context.Context, addr string) (*redis.Client, error) {
	var opts *redis.Options
	if strings.Contains(addr, "://") {
		var err error
		if opts, err = redis.ParseURL(addr); err != nil {
			return nil, fmt.Errorf("--redis: invalid URL %s: %s", hide.String(addr), scrub(err, addr))
		}
	} else {
		opts = &redis.Options{Addr: addr}
	}
	opts.DialTimeout = 5 * time.Second
	opts.MaxRetries = 1
	rc := redis.NewClient(opts)
	if err := rc.Ping(ctx).Err(); err != nil {
		rc.Close()
		return nil, fmt.Errorf("--redis: cannot reach Redis at %s: %s", hide.String(addr), scrub(err, addr))
	}
	return rc, nil
}

// deleteRedisKeys removes the run's inbox markers.
func deleteRedisKeys(rc *redis.Client, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	iter := rc.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	var keys []string
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
		if len(keys) == 500 {
			rc.Unlink(ctx, keys...)
			keys = keys[:0]
		}
	}
	if len(keys) > 0 {
		rc.Unlink(ctx, keys...)
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func envDefault(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
