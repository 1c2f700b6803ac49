// Command cdcbench measures the CDC relay (pgcdc) on one PostgreSQL server
// with wal_level=logical, in one run: pg_recvlogical (pgoutput) draining the
// same WAL as the ceiling, the CDC relay to a null publisher and to NATS
// JetStream, the polling relay on the same rows for comparison, and commit
// to broker-ack latency at a steady rate. It prints one markdown table.
//
//	go run ./cmd/cdcbench                      # starts a private server
//	go run ./cmd/cdcbench -dsn postgres://...  # a server with wal_level=logical
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/pginstance"
	"github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
	"github.com/exactlyonce/exactly/relay"
)

type config struct {
	dsn, natsURL string
	n, payload   int
	keys, batch  int
	rate         int
	latFor       time.Duration
	recvlogical  string
}

type row struct {
	name     string
	msgs     int
	elapsed  time.Duration
	p50, p99 time.Duration
	note     string
}

func main() {
	var c config
	flag.StringVar(&c.dsn, "dsn", "", "PostgreSQL with wal_level=logical (empty: start a private server)")
	flag.StringVar(&c.natsURL, "nats", "nats://127.0.0.1:4222", "NATS server with JetStream")
	flag.IntVar(&c.n, "n", 200_000, "messages per drain")
	flag.IntVar(&c.payload, "payload", 200, "payload bytes")
	flag.IntVar(&c.keys, "keys", 1000, "distinct keys")
	flag.IntVar(&c.batch, "batch", 2000, "relay batch size")
	flag.IntVar(&c.rate, "rate", 1000, "messages per second for the latency rows")
	flag.DurationVar(&c.latFor, "latency-for", 15*time.Second, "how long each latency row runs")
	flag.StringVar(&c.recvlogical, "pg-recvlogical", "/usr/bin/pg_recvlogical", "pg_recvlogical binary")
	flag.Parse()
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "cdcbench:", err)
		os.Exit(1)
	}
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func logf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

func run(c config) error {
	ctx := context.Background()
	if c.dsn == "" {
		in, err := pginstance.Start(ctx, pginstance.Options{Settings: map[string]string{"max_wal_size": "'4GB'"}})
		if err != nil {
			return err
		}
		defer in.Remove()
		c.dsn = in.DSN("test")
	}
	pool, err := pgxpool.New(ctx, c.dsn)
	if err != nil {
		return err
	}
	defer pool.Close()
	nc, err := natsgo.Connect(c.natsURL)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	var rows []row

	// Drains. Two identical tables: cdc (read from the WAL by three slots
	// created before the rows are written) and poll (drained by the
	// polling relay).
	cdcOb, err := freshOutbox(ctx, pool, "bench_cdc")
	if err != nil {
		return err
	}
	pollOb, err := freshOutbox(ctx, pool, "bench_poll")
	if err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, "DROP PUBLICATION IF EXISTS bench_pub"); err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, "CREATE PUBLICATION bench_pub FOR TABLE bench_cdc WITH (publish = 'insert, update')"); err != nil {
		return err
	}
	slots := []string{"bench_recv", "bench_null", "bench_js", "bench_recv2"}
	for _, s := range slots {
		pgcdc.DropSlot(ctx, c.dsn, s)
		if _, err := pool.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", s); err != nil {
			return err
		}
	}
	defer func() {
		for _, s := range slots {
			pgcdc.DropSlot(context.Background(), c.dsn, s)
		}
	}()
	logf("writing %d messages to each table", c.n)
	if err := fill(ctx, pool, cdcOb, c); err != nil {
		return err
	}
	if err := fill(ctx, pool, pollOb, c); err != nil {
		return err
	}
	var end string
	if err := pool.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&end); err != nil {
		return err
	}

	recv := func(slot string) (time.Duration, error) {
		logf("pg_recvlogical slot %s", slot)
		start := time.Now()
		cmd := exec.Command(c.recvlogical, "-d", c.dsn, "--slot", slot, "--start", "--endpos", end, "--no-loop",
			"-o", "proto_version=1", "-o", "publication_names=bench_pub", "-f", "/dev/null")
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			return 0, fmt.Errorf("pg_recvlogical: %w", err)
		}
		return time.Since(start), nil
	}
	// The ceiling is drained first and again last (caches warm either
	// way); the faster of the two counts.
	ceil, err := recv("bench_recv")
	if err != nil {
		return err
	}

	null := exactly.PublisherFunc(func(context.Context, []*exactly.Message) error { return nil })
	r, err := drainCDC(ctx, c, "bench_null", cdcOb, null)
	if err != nil {
		return err
	}
	r.name, r.note = "pgcdc → null publisher", "KeepRows"
	rows = append(rows, r)

	stream := "CDCBENCH"
	js.DeleteStream(ctx, stream)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: stream, Subjects: []string{"cdcbench.>"}, Storage: jetstream.MemoryStorage, MaxBytes: 1 << 30}); err != nil {
		return err
	}
	defer js.DeleteStream(context.Background(), stream)
	jsPub, err := nats.NewPublisher(js)
	if err != nil {
		return err
	}
	if r, err = drainCDC(ctx, c, "bench_js", cdcOb, jsPub); err != nil {
		return err
	}
	r.name, r.note = "pgcdc → JetStream", "KeepRows, memory stream"
	rows = append(rows, r)

	ceil2, err := recv("bench_recv2")
	if err != nil {
		return err
	}
	rows = slices.Insert(rows, 0, row{name: "pg_recvlogical (pgoutput) → /dev/null: the ceiling", msgs: c.n, elapsed: min(ceil, ceil2),
		note: fmt.Sprintf("faster of two runs (%s, %s)", ceil.Round(time.Millisecond), ceil2.Round(time.Millisecond))})

	if r, err = drainPoll(ctx, c, pool, pollOb, null); err != nil {
		return err
	}
	r.name, r.note = "polling relay → null publisher (same rows)", "deletes rows"
	rows = append(rows, r)

	// Latency at a steady rate, commit to broker ack.
	for _, mode := range []string{"cdc", "poll"} {
		logf("latency %s", mode)
		r, err := latency(ctx, c, pool, jsPub, mode)
		if err != nil {
			return err
		}
		rows = append(rows, r)
	}

	fmt.Printf("| row | messages | time | msgs/s | vs pg_recvlogical | p50 | p99 | note |\n|---|---:|---:|---:|---:|---:|---:|---|\n")
	ceiling := float64(rows[0].msgs) / rows[0].elapsed.Seconds()
	for _, r := range rows {
		rate, ratio, p50, p99 := "", "", "", ""
		if r.elapsed > 0 {
			v := float64(r.msgs) / r.elapsed.Seconds()
			rate = fmt.Sprintf("%.0f", v)
			ratio = fmt.Sprintf("%.0f%%", 100*v/ceiling)
		}
		if r.p99 > 0 {
			p50, p99 = fmt.Sprintf("%.2f ms", ms(r.p50)), fmt.Sprintf("%.2f ms", ms(r.p99))
		}
		el := ""
		if r.elapsed > 0 {
			el = r.elapsed.Round(time.Millisecond).String()
		}
		fmt.Printf("| %s | %d | %s | %s | %s | %s | %s | %s |\n", r.name, r.msgs, el, rate, ratio, p50, p99, r.note)
	}
	fmt.Printf("\n%d messages of %d bytes on %d keys; relay batch %d; latency rows at %d msgs/s for %s, one message per transaction.\n",
		c.n, c.payload, c.keys, c.batch, c.rate, c.latFor)
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func freshOutbox(ctx context.Context, pool *pgxpool.Pool, table string) (*outbox.Outbox, error) {
	for _, t := range []string{table, table + "_leases", table + "_relays"} {
		if _, err := pool.Exec(ctx, "DROP TABLE IF EXISTS "+t); err != nil {
			return nil, err
		}
	}
	pool.Exec(ctx, "DELETE FROM exactly_migrations WHERE scope = $1", "outbox:"+table)
	ob, err := outbox.New(outbox.Config{Dialect: "postgres", Table: table})
	if err != nil {
		return nil, err
	}
	return ob, ob.Migrate(ctx, pool)
}

// fill writes c.n messages in transactions of 1,000.
func fill(ctx context.Context, pool *pgxpool.Pool, ob *outbox.Outbox, c config) error {
	payload := []byte(strings.Repeat("x", c.payload))
	for i := 0; i < c.n; i += 1000 {
		msgs := make([]*exactly.Message, 0, 1000)
		for j := i; j < min(i+1000, c.n); j++ {
			msgs = append(msgs, &exactly.Message{Topic: "cdcbench.orders", Key: fmt.Sprintf("k%d", j%c.keys), Payload: payload})
		}
		tx, err := pool.Begin(ctx)
		if err != nil {
			return err
		}
		if err := ob.Enqueue(ctx, tx, msgs...); err != nil {
			return err
		}
		if err := tx.Commit(ctx); err != nil {
			return err
		}
	}
	return nil
}

// drainCDC times a CDC relay from Run until the Published hook counted
// every message.
func drainCDC(ctx context.Context, c config, slot string, ob *outbox.Outbox, pub exactly.Publisher) (row, error) {
	logf("pgcdc slot %s", slot)
	var confirmed atomic.Int64
	done := make(chan struct{})
	var once sync.Once
	r, err := pgcdc.New(pgcdc.Config{
		DSN: c.dsn, Slot: slot, Publication: "bench_pub", Table: ob.Table(), KeepRows: true, Publisher: pub,
		BatchSize: c.batch, Logger: quiet,
		Hooks: pgcdc.Hooks{Published: func(msgs []*exactly.Message, _ time.Duration) {
			if confirmed.Add(int64(len(msgs))) >= int64(c.n) {
				once.Do(func() { close(done) })
			}
		}},
	})
	if err != nil {
		return row{}, err
	}
	rctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	start := time.Now()
	go func() { errc <- r.Run(rctx) }()
	select {
	case <-done:
	case err := <-errc:
		cancel()
		return row{}, fmt.Errorf("pgcdc stopped early: %v", err)
	case <-time.After(10 * time.Minute):
		cancel()
		return row{}, fmt.Errorf("pgcdc drained %d of %d in 10 minutes", confirmed.Load(), c.n)
	}
	elapsed := time.Since(start)
	cancel()
	if err := <-errc; err != nil {
		return row{}, err
	}
	return row{msgs: c.n, elapsed: elapsed}, nil
}

func drainPoll(ctx context.Context, c config, pool *pgxpool.Pool, ob *outbox.Outbox, pub exactly.Publisher) (row, error) {
	logf("polling relay")
	var confirmed atomic.Int64
	done := make(chan struct{})
	var once sync.Once
	r, err := relay.New(relay.Config{Outbox: ob, DB: pool, Publisher: pub, BatchSize: c.batch, Logger: quiet,
		Hooks: relay.Hooks{Published: func(msgs []*exactly.Message, _ time.Duration) {
			if confirmed.Add(int64(len(msgs))) >= int64(c.n) {
				once.Do(func() { close(done) })
			}
		}}})
	if err != nil {
		return row{}, err
	}
	rctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	start := time.Now()
	go func() { errc <- r.Run(rctx) }()
	select {
	case <-done:
	case <-time.After(10 * time.Minute):
		cancel()
		return row{}, fmt.Errorf("relay drained %d of %d in 10 minutes", confirmed.Load(), c.n)
	}
	elapsed := time.Since(start)
	cancel()
	<-errc
	return row{msgs: c.n, elapsed: elapsed}, nil
}

// latency writes one message per transaction at c.rate for c.latFor and
// measures, per message, from the return of COMMIT to the return of the
// Publish call that confirmed it (JetStream PubAck).
func latency(ctx context.Context, c config, pool *pgxpool.Pool, js *nats.Publisher, mode string) (row, error) {
	ob, err := freshOutbox(ctx, pool, "bench_lat_"+mode)
	if err != nil {
		return row{}, err
	}
	var mu sync.Mutex
	committed := map[string]time.Time{}
	var lats []time.Duration
	pub := exactly.PublisherFunc(func(ctx context.Context, msgs []*exactly.Message) error {
		err := js.Publish(ctx, msgs)
		now := time.Now()
		errs := exactly.PerMessage(err, len(msgs))
		mu.Lock()
		for i, m := range msgs {
			if t, ok := committed[m.ID]; ok && errs[i] == nil {
				if t.IsZero() {
					lats = append(lats, 0) // confirmed before COMMIT returned to the writer
				} else {
					lats = append(lats, now.Sub(t))
				}
				delete(committed, m.ID)
			}
		}
		mu.Unlock()
		return err
	})
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 1)
	slot := "bench_lat"
	if mode == "cdc" {
		pgcdc.DropSlot(ctx, c.dsn, slot)
		pool.Exec(ctx, "DROP PUBLICATION IF EXISTS "+slot)
		r, err := pgcdc.New(pgcdc.Config{DSN: c.dsn, Slot: slot, Table: ob.Table(), Publisher: pub, BatchSize: c.batch, Logger: quiet})
		if err != nil {
			return row{}, err
		}
		go func() { errc <- r.Run(rctx) }()
		defer pgcdc.DropSlot(context.Background(), c.dsn, slot)
	} else {
		r, err := relay.New(relay.Config{Outbox: ob, DB: pool, Publisher: pub, BatchSize: c.batch, Logger: quiet})
		if err != nil {
			return row{}, err
		}
		go func() { errc <- r.Run(rctx) }()
	}
	time.Sleep(2 * time.Second) // set-up done
	payload := []byte(strings.Repeat("x", c.payload))
	// Four writers, each on its own schedule (a quarter of the rate), so
	// one slow COMMIT does not hold the rate back.
	const writers = 4
	interval := time.Second * writers / time.Duration(c.rate)
	began := time.Now()
	var sentN atomic.Int64
	var wg sync.WaitGroup
	var werr atomic.Value
	for w := range writers {
		wg.Go(func() {
			for i := 0; ; i++ {
				next := began.Add(time.Duration(i)*interval + time.Duration(w)*interval/writers)
				if next.Sub(began) >= c.latFor {
					return
				}
				time.Sleep(time.Until(next))
				m := &exactly.Message{Topic: "cdcbench.lat", Key: fmt.Sprintf("k%d", (i*writers+w)%c.keys), Payload: payload}
				tx, err := pool.Begin(ctx)
				if err == nil {
					if err = ob.Enqueue(ctx, tx, m); err != nil {
						tx.Rollback(ctx)
					}
				}
				if err != nil {
					werr.Store(err)
					return
				}
				// Registered before COMMIT so a fast relay cannot beat it;
				// the clock starts when COMMIT returns.
				mu.Lock()
				committed[m.ID] = time.Time{}
				mu.Unlock()
				if err := tx.Commit(ctx); err != nil {
					werr.Store(err)
					return
				}
				mu.Lock()
				if _, ok := committed[m.ID]; ok {
					committed[m.ID] = time.Now()
				}
				mu.Unlock()
				sentN.Add(1)
			}
		})
	}
	wg.Wait()
	if err, _ := werr.Load().(error); err != nil {
		return row{}, err
	}
	sent := int(sentN.Load())
	achieved := float64(sent) / time.Since(began).Seconds()
	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		n := len(lats)
		mu.Unlock()
		if n >= sent || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-errc
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(lats)
	if len(lats) < sent {
		return row{}, fmt.Errorf("%s: %d of %d messages confirmed", mode, len(lats), sent)
	}
	name := "pgcdc → JetStream, commit → ack"
	if mode == "poll" {
		name = "polling relay (LISTEN/NOTIFY) → JetStream, commit → ack"
	}
	return row{name: name, msgs: sent, p50: lats[len(lats)/2], p99: lats[len(lats)*99/100], note: fmt.Sprintf("%.0f msgs/s achieved (target %d)", achieved, c.rate)}, nil
}
