package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

const demoTopic = "order.created"

type demoOptions struct {
	orders  int
	writers int
	timeout time.Duration
	seed    uint64
	verbose bool
}

func demoCmd() *cobra.Command {
	var o demoOptions
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run an order service, the outbox relay and a consumer group on embedded SQLite and an in-process Kafka, with faults injected",
		Long: `demo runs an order service that writes orders and their order.created events
through the transactional outbox into SQLite, the polling relay that publishes
them to an in-process Kafka-protocol broker (franz-go's kfake), and a consumer
group of three members. While it runs it injects the faults that make brokers
deliver twice: lost publish acknowledgements, relay crashes between the broker's
confirm and the mark-sent, consumer-group rebalances. At the end it checks every
event: none lost, every copy carries its original's id. It exits 1 if any was
lost or altered.

This is the foundation demo (outbox + relay). Consumers count what they receive;
deduplicating effects with the inbox is not part of it yet.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDemo(cmd.Context(), cmd.OutOrStdout(), o)
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.orders, "orders", 10000, "orders to write")
	f.IntVar(&o.writers, "writers", 4, "concurrent order-service writers")
	f.DurationVar(&o.timeout, "timeout", 50*time.Second, "give up after this long")
	f.Uint64Var(&o.seed, "seed", 0, "seed for the fault schedule (0 picks one and prints it)")
	f.BoolVar(&o.verbose, "verbose", false, "log the relay's warnings")
	return cmd
}

// faultyPublisher wraps the Kafka publisher and injects the duplicate causes
// on the producing side, always after the broker confirmed the batch.
type faultyPublisher struct {
	inner     exactly.Publisher
	rnd       *rand.Rand
	mu        sync.Mutex
	crash     chan struct{} // tells the supervisor to kill the relay
	lostAcks  atomic.Int64
	crashes   atomic.Int64
	published atomic.Int64 // records confirmed by the broker, copies included
	calls     atomic.Int64
}

func (p *faultyPublisher) roll() float64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rnd.Float64()
}

func (p *faultyPublisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	err := p.inner.Publish(ctx, msgs)
	if err != nil {
		return err
	}
	p.published.Add(int64(len(msgs)))
	// Random faults, plus fixed ones early on so every kind happens in
	// every run, however short.
	n := p.calls.Add(1)
	switch x := p.roll(); {
	case x < 0.03 || n == 6 || n == 20:
		// The relay dies after the broker confirmed, before it marks the
		// rows sent: they go out again from the next relay.
		p.crashes.Add(1)
		select {
		case p.crash <- struct{}{}:
		default:
		}
		<-ctx.Done()
		return fmt.Errorf("relay killed after the broker confirmed: %w", ctx.Err())
	case x < 0.08 || n == 3 || n == 12:
		// The acknowledgement is lost on the way back (a timeout after the
		// broker accepted): the relay retries the batch.
		p.lostAcks.Add(1)
		return errors.New("publish acknowledgement lost (injected timeout)")
	}
	return nil
}

// deliveries counts what the consumer group receives, per message id.
type deliveries struct {
	mu       sync.Mutex
	count    map[string]int
	payload  map[string]string
	altered  int
	received atomic.Int64
}

func (d *deliveries) add(r *kgo.Record) {
	var id string
	for _, h := range r.Headers {
		if h.Key == exactly.HeaderID {
			id = string(h.Value)
		}
	}
	d.received.Add(1)
	d.mu.Lock()
	defer d.mu.Unlock()
	if prev, ok := d.payload[id]; ok && prev != string(r.Value) {
		d.altered++
	}
	d.payload[id] = string(r.Value)
	d.count[id]++
}

func (d *deliveries) distinct() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.count)
}

func runDemo(ctx context.Context, out io.Writer, o demoOptions) error {
	if o.orders <= 0 || o.writers <= 0 {
		return errors.New("--orders and --writers must be positive")
	}
	if o.seed == 0 {
		o.seed = rand.Uint64()
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	logLevel := slog.LevelError + 4
	if o.verbose {
		logLevel = slog.LevelWarn
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel}))
	fmt.Fprintf(out, "exactly demo: %d orders, SQLite outbox -> polling relay -> in-process Kafka (kfake) -> consumer group of 3; seed %d\n", o.orders, o.seed)

	// The database: SQLite in a temporary directory.
	dir, err := os.MkdirTemp("", "exactly-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	db, _, err := openDB("sqlite:" + filepath.Join(dir, "demo.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	ob, err := outbox.New(outbox.Config{Dialect: outbox.SQLite})
	if err != nil {
		return err
	}
	if err := ob.Migrate(ctx, db); err != nil {
		return err
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, amount_cents INTEGER NOT NULL, event_id TEXT NOT NULL)`); err != nil {
		return err
	}

	// The broker: kfake speaks the Kafka protocol in this process.
	cluster, err := kfake.NewCluster(kfake.NumBrokers(3), kfake.SeedTopics(6, demoTopic))
	if err != nil {
		return fmt.Errorf("starting the in-process Kafka: %w", err)
	}
	defer cluster.Close()
	seeds := cluster.ListenAddrs()
	kpub, err := kafka.NewClientPublisher(seeds)
	if err != nil {
		return err
	}
	defer kpub.Close()
	pub := &faultyPublisher{inner: kpub, rnd: rand.New(rand.NewPCG(o.seed, 1)), crash: make(chan struct{}, 1)}

	var wg sync.WaitGroup
	defer wg.Wait()
	workCtx, stopWork := context.WithCancel(ctx)
	defer stopWork()

	// The relay, restarted whenever the fault injector kills it.
	var relayStarts atomic.Int64
	wg.Go(func() {
		for i := 0; workCtx.Err() == nil; i++ {
			r, err := relay.New(relay.Config{
				Outbox: ob, DB: db, Publisher: pub, BatchSize: 200, PollInterval: 20 * time.Millisecond,
				InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
				ShutdownTimeout: 50 * time.Millisecond, LeaseTTL: 2 * time.Second,
				InstanceID: fmt.Sprintf("demo-relay-%d", i), Logger: logger,
			})
			if err != nil {
				logger.Error("relay", "err", err)
				return
			}
			relayStarts.Add(1)
			rctx, kill := context.WithCancel(workCtx)
			done := make(chan error, 1)
			go func() { done <- r.Run(rctx) }()
			select {
			case <-pub.crash:
			case <-workCtx.Done():
			}
			kill()
			if err := <-done; err != nil {
				logger.Error("relay", "err", err)
			}
		}
	})

	// The consumer group: three members; the injector makes members leave
	// and join, which rebalances partitions mid-stream.
	got := &deliveries{count: map[string]int{}, payload: map[string]string{}}
	var rebalances atomic.Int64
	member := func(mctx context.Context) {
		cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumerGroup("demo-promotions"),
			kgo.ConsumeTopics(demoTopic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
			kgo.OnPartitionsRevoked(func(context.Context, *kgo.Client, map[string][]int32) { rebalances.Add(1) }))
		if err != nil {
			logger.Error("consumer", "err", err)
			return
		}
		defer cl.Close()
		for mctx.Err() == nil {
			cl.PollFetches(mctx).EachRecord(got.add)
		}
	}
	var members sync.WaitGroup
	memberCancels := make([]context.CancelFunc, 3)
	for i := range memberCancels {
		mctx, c := context.WithCancel(workCtx)
		memberCancels[i] = c
		members.Go(func() { member(mctx) })
	}
	defer members.Wait()
	wg.Go(func() {
		rnd := rand.New(rand.NewPCG(o.seed, 2))
		for round := 0; round < 3; round++ {
			select {
			case <-workCtx.Done():
				return
			case <-time.After(time.Duration(500+rnd.IntN(1500)) * time.Millisecond):
			}
			i := rnd.IntN(len(memberCancels))
			memberCancels[i]() // leave
			mctx, c := context.WithCancel(workCtx)
			memberCancels[i] = c
			members.Go(func() { member(mctx) }) // and join again
		}
	})

	// The order service.
	var written atomic.Int64
	next := atomic.Int64{}
	var writeErr atomic.Value
	var writers sync.WaitGroup
	for w := range o.writers {
		writers.Go(func() {
			for workCtx.Err() == nil {
				n := next.Add(1)
				if n > int64(o.orders) {
					return
				}
				if err := placeOrder(workCtx, db, ob, n, w); err != nil {
					if workCtx.Err() == nil {
						writeErr.Store(err)
						stopWork()
					}
					return
				}
				written.Add(1)
			}
		})
	}

	// Progress until every order's event reached the consumers.
	tty := isTerminal(out)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	start := time.Now()
	lastLine := time.Time{}
	for {
		done := written.Load() == int64(o.orders) && got.distinct() >= o.orders
		if done || ctx.Err() != nil || writeErr.Load() != nil {
			break
		}
		<-tick.C
		if tty || time.Since(lastLine) > 5*time.Second {
			line := fmt.Sprintf("  %5.1fs  written %d  published %d  delivered %d  lost acks %d  relay crashes %d  rebalances %d",
				time.Since(start).Seconds(), written.Load(), pub.published.Load(), got.received.Load(), pub.lostAcks.Load(), pub.crashes.Load(), rebalances.Load())
			if tty {
				fmt.Fprintf(out, "\r%-110s", line)
			} else {
				fmt.Fprintln(out, line)
			}
			lastLine = time.Now()
		}
	}
	if tty {
		fmt.Fprintln(out)
	}
	writers.Wait()
	stopWork()
	wg.Wait() // the relay and the fault injector (which starts members) are done
	for _, c := range memberCancels {
		c()
	}
	members.Wait()
	if v := writeErr.Load(); v != nil {
		return fmt.Errorf("order service: %w", v.(error))
	}

	// Verify: every order in the database has its event, once or more, with
	// its id; records on the topic beyond the orders are copies.
	ids, err := orderEventIDs(context.Background(), db)
	if err != nil {
		return err
	}
	onTopic, err := topicRecords(context.Background(), seeds)
	if err != nil {
		return err
	}
	st, err := ob.Status(context.Background(), db)
	if err != nil {
		return err
	}
	got.mu.Lock()
	defer got.mu.Unlock()
	lost, dupIDs := 0, 0
	for _, id := range ids {
		switch n := got.count[id]; {
		case n == 0:
			lost++
		case n > 1:
			dupIDs++
		}
	}
	unknown := 0
	known := make(map[string]bool, len(ids))
	for _, id := range ids {
		known[id] = true
	}
	for id := range got.count {
		if !known[id] {
			unknown++
		}
	}

	fmt.Fprintln(out)
	row := func(name string, v any, note string) { fmt.Fprintf(out, "  %-27s %8v   %s\n", name, v, note) }
	row("orders written", written.Load(), "each with its order.created event, in one SQLite transaction")
	row("events in the outbox", len(ids), "")
	row("records on the topic", onTopic, fmt.Sprintf("%d copies of already published events", onTopic-int64(len(ids))))
	row("delivered to the group", got.received.Load(), "copies and rebalance redeliveries included")
	row("distinct events delivered", len(got.count), "")
	row("events delivered twice+", dupIDs, "each copy carries its original's id (the inbox absorbs them)")
	row("copies with other content", got.altered, "must be 0")
	row("unknown ids", unknown, "must be 0")
	row("still pending / dead", fmt.Sprintf("%d / %d", st.Pending, st.Dead), "must be 0 / 0")
	row("LOST", lost, "must be 0")
	fmt.Fprintf(out, "\nfaults injected: %d lost publish acks, %d relay crashes between broker confirm and mark-sent (%d relay starts), %d consumer rebalances\n",
		pub.lostAcks.Load(), pub.crashes.Load(), relayStarts.Load(), rebalances.Load())
	fmt.Fprintf(out, "took %s\n", time.Since(start).Round(time.Millisecond))

	if ctx.Err() != nil && written.Load() < int64(o.orders) {
		return &exitError{1, fmt.Sprintf("timed out after %s with %d of %d orders written", o.timeout, written.Load(), o.orders)}
	}
	if pub.lostAcks.Load() == 0 || pub.crashes.Load() == 0 {
		return &exitError{1, "a fault kind was never injected: the run proved less than it should"}
	}
	if lost > 0 || got.altered > 0 || unknown > 0 || st.Pending > 0 || st.Dead > 0 {
		return &exitError{1, fmt.Sprintf("FAILED: %d lost, %d altered, %d unknown, %d pending, %d dead", lost, got.altered, unknown, st.Pending, st.Dead)}
	}
	fmt.Fprintln(out, "OK: nothing lost; every duplicate is a same-id copy")
	return nil
}

// placeOrder is the order service's business transaction: the order row and
// its event commit together or not at all.
func placeOrder(ctx context.Context, db *sql.DB, ob *outbox.Outbox, n int64, writer int) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	orderID := fmt.Sprintf("order-%06d", n)
	customer := fmt.Sprintf("customer-%03d", n%97)
	amount := 500 + n%10000
	payload, _ := json.Marshal(map[string]any{"order_id": orderID, "customer": customer, "amount_cents": amount, "writer": writer})
	msg := &exactly.Message{Topic: demoTopic, Key: customer, Payload: payload}
	if err := ob.Enqueue(ctx, tx, msg); err != nil { // assigns msg.ID
		return err
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO orders (id, customer, amount_cents, event_id) VALUES (?, ?, ?, ?)",
		orderID, customer, amount, msg.ID); err != nil {
		return err
	}
	return tx.Commit()
}

// orderEventIDs lists the event ids of the committed orders: the ground
// truth the deliveries are checked against (the relay deletes sent outbox
// rows, the orders stay).
func orderEventIDs(ctx context.Context, db *sql.DB) ([]string, error) {
	rows, err := db.QueryContext(ctx, "SELECT event_id FROM orders")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

func topicRecords(ctx context.Context, seeds []string) (int64, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	if err != nil {
		return 0, err
	}
	defer cl.Close()
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, demoTopic)
	if err != nil {
		return 0, err
	}
	var n int64
	ends.Each(func(o kadm.ListedOffset) { n += o.Offset })
	return n, nil
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
