package examples

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/inboxstore"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

const python = "/usr/bin/python3"

// need fails the test under CI, and skips it elsewhere, when a tool the
// examples run is missing.
func need(t *testing.T, what string, ok bool) {
	t.Helper()
	if ok {
		return
	}
	msg := what + " is missing; scripts/polyglot-deps installs it"
	if testenv.InCI() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

func nodePath(t *testing.T) string {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, ".cache", "node-pg", "node_modules")
}

func needTools(t *testing.T) {
	t.Helper()
	need(t, "python3-psycopg2 (for /usr/bin/python3)", exec.Command(python, "-c", "import psycopg2").Run() == nil)
	_, err := exec.LookPath("java")
	need(t, "java (OpenJDK 17)", err == nil)
	_, err = os.Stat("/usr/share/java/postgresql.jar")
	need(t, "libpostgresql-jdbc-java (/usr/share/java/postgresql.jar)", err == nil)
	_, err = exec.LookPath("node")
	need(t, "node", err == nil)
	_, err = os.Stat(filepath.Join(nodePath(t), "pg", "package.json"))
	need(t, "the npm package pg in .cache/node-pg", err == nil)
}

// order is an event as the writers encode it.
type order struct {
	OrderID  string `json:"order_id"`
	Customer string `json:"customer"`
	Amount   int    `json:"amount"`
	Writer   string `json:"writer"`
	N        int    `json:"n"`
}

type published struct {
	id, natsID, key string
	payload         []byte
	headers         natsgo.Header
}

// TestPolyglotWriters: services in Python (psycopg2), Java (JDBC) and
// Node.js (pg) write an order and its event in one transaction with a plain
// INSERT into the outbox, some transactions rolled back, beside a Go writer
// (outbox.Enqueue) on the same customers, into a table that held Go rows
// before migration 2 and holds one with headers that are not a JSON object
// of strings. The relay publishes to NATS JetStream exactly the committed
// events, each once, in order per customer and writer; the bad row is
// parked. Then the Python consumer applies each event once through the
// plain-SQL inbox claim while deliveries are repeated and the consumer is
// killed between its commit and its ack.
func TestPolyglotWriters(t *testing.T) {
	testenv.Need(t, testenv.Postgres)
	testenv.Need(t, testenv.NATS)
	needTools(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	dsn := testenv.PostgresDSN()
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	u := time.Now().UnixNano()
	outboxTable, orders := fmt.Sprintf("poly_outbox_%d", u), fmt.Sprintf("poly_orders_%d", u)
	inboxTable, shipments, totals := fmt.Sprintf("poly_inbox_%d", u), fmt.Sprintf("poly_ship_%d", u), fmt.Sprintf("poly_totals_%d", u)
	topic := fmt.Sprintf("poly%d.orders", u)
	t.Cleanup(func() {
		for _, tb := range []string{outboxTable, outboxTable + "_leases", outboxTable + "_relays", orders, inboxTable, shipments, totals} {
			db.Exec("DROP TABLE IF EXISTS " + tb)
		}
		for _, f := range []string{"_key_hash", "_uuidv7", "_fill", "_notify"} {
			db.Exec("DROP FUNCTION IF EXISTS " + outboxTable + f + " CASCADE")
		}
		db.Exec("DELETE FROM exactly_migrations WHERE scope IN ($1, $2)", "outbox:"+outboxTable, "inbox:"+inboxTable)
	})
	if _, err := db.Exec("CREATE TABLE " + orders + " (id text PRIMARY KEY, customer text NOT NULL, amount integer NOT NULL, writer text NOT NULL, n integer NOT NULL)"); err != nil {
		t.Fatal(err)
	}

	// The table as it was before migration 2, holding Go rows.
	store, err := outboxstore.New("postgres", outboxTable)
	if err != nil {
		t.Fatal(err)
	}
	m, err := store.Migrator(db)
	if err != nil {
		t.Fatal(err)
	}
	m.Steps, m.Check = m.Steps[:1], nil
	if _, err := m.Apply(ctx); err != nil {
		t.Fatal(err)
	}
	ob, err := outbox.New(outbox.Config{Dialect: "postgres", Table: outboxTable})
	if err != nil {
		t.Fatal(err)
	}
	customers := []string{"alice", "bob", "carol", "дмитрий", "🙂"}
	goN := 0
	goOrder := func(decline bool) {
		t.Helper()
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		o := order{OrderID: exactly.NewID(), Customer: customers[goN%len(customers)], Amount: 100 + goN, Writer: "go", N: goN}
		goN++
		if _, err := tx.Exec("INSERT INTO "+orders+" (id, customer, amount, writer, n) VALUES ($1, $2, $3, $4, $5)", o.OrderID, o.Customer, o.Amount, o.Writer, o.N); err != nil {
			t.Fatal(err)
		}
		payload, _ := json.Marshal(o)
		if err := ob.Enqueue(ctx, tx, &exactly.Message{Topic: topic, Key: o.Customer, Payload: payload}); err != nil {
			t.Fatal(err)
		}
		if !decline {
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := range 10 {
		goOrder(i%5 == 4)
	}
	if err := ob.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	// A row whose headers are not a JSON object of strings: parked.
	if _, err := db.Exec("INSERT INTO "+outboxTable+" (topic, msg_key, payload, headers) VALUES ($1, 'alice', '\\x7b7d'::bytea, '{\"a\":1}')", topic); err != nil {
		t.Fatal(err)
	}

	// The writers, at once, on the same customers, and Go beside them.
	const perWriter = 40
	common := []string{"--outbox", outboxTable, "--orders", orders, "--topic", topic, "--customers", strings.Join(customers, ","),
		"--count", fmt.Sprint(perWriter), "--decline-every", "4"}
	writers := map[string]*exec.Cmd{
		"python": exec.CommandContext(ctx, python, append([]string{"python/writer.py", "--dsn", dsn, "--writer", "python"}, common...)...),
		"java": exec.CommandContext(ctx, "java", append([]string{"-cp", "/usr/share/java/postgresql.jar", "java/OrderWriter.java",
			"--dsn", "jdbc:postgresql://" + testenv.Postgres.Addr + "/test?user=postgres", "--writer", "java"}, common...)...),
		"node": exec.CommandContext(ctx, "node", append([]string{"node/writer.js", "--dsn", dsn, "--writer", "node"}, common...)...),
	}
	writers["node"].Env = append(os.Environ(), "NODE_PATH="+nodePath(t))
	var wg sync.WaitGroup
	outs := map[string][]byte{}
	var mu sync.Mutex
	for name, cmd := range writers {
		wg.Go(func() {
			out, err := cmd.CombinedOutput()
			mu.Lock()
			defer mu.Unlock()
			outs[name] = out
			if err != nil {
				t.Errorf("%s writer: %v\n%s", name, err, out)
			}
		})
	}
	for i := range 30 {
		goOrder(i%4 == 3)
		time.Sleep(5 * time.Millisecond)
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for name, out := range outs {
		committed, rolledBack := strings.Count(string(out), "committed "), strings.Count(string(out), "rolled back ")
		if committed != perWriter-perWriter/4 || rolledBack != perWriter/4 {
			t.Fatalf("%s writer: %d committed, %d rolled back:\n%s", name, committed, rolledBack, out)
		}
	}

	// The relay, to a stream of the run's own.
	nc, err := natsgo.Connect(testenv.NATSURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	stream := fmt.Sprintf("POLY_%d", u)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: stream, Subjects: []string{topic}, Duplicates: 5 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { js.DeleteStream(context.Background(), stream) })
	pub, err := nats.NewPublisher(js, nats.StrictKeyOrder())
	if err != nil {
		t.Fatal(err)
	}
	r, err := relay.New(relay.Config{Outbox: ob, DB: db, Publisher: pub, PollInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	relayDone := make(chan error, 1)
	go func() { relayDone <- r.Run(rctx) }()
	var pending int
	for {
		if err := db.QueryRow("SELECT count(*) FROM " + outboxTable + " WHERE status = 0").Scan(&pending); err != nil {
			t.Fatal(err)
		}
		if pending == 0 || ctx.Err() != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	stop()
	if err := <-relayDone; err != nil && ctx.Err() == nil && !strings.Contains(err.Error(), "context canceled") {
		t.Fatalf("relay: %v", err)
	}
	if pending != 0 {
		t.Fatalf("%d rows still pending", pending)
	}
	dead, err := store.ListDead(ctx, db, outboxstore.DeadFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 1 || !strings.Contains(dead[0].LastError, `header "a" is a JSON number`) {
		t.Fatalf("parked: %+v, want the row with bad headers", dead)
	}

	// What the stream holds: exactly the committed orders, each once.
	msgs := readStream(t, ctx, js, stream)
	want := map[string]order{}
	rows, err := db.Query("SELECT id, customer, amount, writer, n FROM " + orders)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var o order
		if err := rows.Scan(&o.OrderID, &o.Customer, &o.Amount, &o.Writer, &o.N); err != nil {
			t.Fatal(err)
		}
		want[o.OrderID] = o
	}
	rows.Close()
	if wantN := 3*(perWriter-perWriter/4) + 8 + 23; len(want) != wantN {
		t.Fatalf("%d committed orders, want %d", len(want), wantN)
	}
	seen := map[string]bool{}
	last := map[string]int{} // customer/writer -> n
	ids := map[string]bool{}
	for i, p := range msgs {
		var o order
		if err := json.Unmarshal(p.payload, &o); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if w, ok := want[o.OrderID]; !ok || w != o {
			t.Fatalf("message %d: %+v is not a committed order", i, o)
		}
		if seen[o.OrderID] || ids[p.id] {
			t.Fatalf("message %d: order %s (id %s) published twice", i, o.OrderID, p.id)
		}
		seen[o.OrderID], ids[p.id] = true, true
		if p.id == "" || p.natsID != p.id || p.key != o.Customer {
			t.Fatalf("message %d: exactly-id %q, Nats-Msg-Id %q, exactly-key %q (customer %q)", i, p.id, p.natsID, p.key, o.Customer)
		}
		if o.Writer != "go" && (p.headers.Get("writer") != o.Writer || p.headers.Get("content-type") != "application/json") {
			t.Fatalf("message %d: headers %v", i, p.headers)
		}
		k := o.Customer + "/" + o.Writer
		if n, ok := last[k]; ok && o.N <= n {
			t.Fatalf("message %d: %s's order %d from %s after its order %d", i, o.Customer, o.N, o.Writer, n)
		}
		last[k] = o.N
	}
	if len(seen) != len(want) {
		t.Fatalf("%d orders published, %d committed", len(seen), len(want))
	}
	t.Logf("%d committed orders from Python, Java, Node.js and Go published once each, in order per customer", len(want))

	consumeOnce(t, ctx, db, dsn, msgs, want, inboxTable, shipments, totals)
}

func readStream(t *testing.T, ctx context.Context, js jetstream.JetStream, stream string) []published {
	t.Helper()
	c, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	total := info.NumPending
	var out []published
	for uint64(len(out)) < total {
		batch, err := c.Fetch(500, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for m := range batch.Messages() {
			h := m.Headers()
			out = append(out, published{id: h.Get(exactly.HeaderID), natsID: h.Get(jetstream.MsgIDHeader), key: h.Get(exactly.HeaderKey),
				payload: m.Data(), headers: h})
		}
		if err := batch.Error(); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// consumeOnce feeds the stream's messages to the Python consumer as a
// broker would, with redeliveries: about a third of them are delivered
// again later, and the consumer is killed a few times after it was handed
// a message, before its ack was read (the broker then delivers it again).
// Each order must be shipped once, and each customer's total be the sum of
// its orders.
func consumeOnce(t *testing.T, ctx context.Context, db *sql.DB, dsn string, msgs []published, want map[string]order, inboxTable, shipments, totals string) {
	t.Helper()
	im, err := inboxstore.New("postgres", inboxTable)
	if err != nil {
		t.Fatal(err)
	}
	mig, err := im.Migrator(db)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mig.Apply(ctx); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 11))
	var queue []published
	for _, p := range msgs {
		queue = append(queue, p)
		if rng.IntN(3) == 0 {
			queue = append(queue, msgs[rng.IntN(len(msgs))])
		}
	}
	kills := map[int]bool{}
	for len(kills) < 3 {
		kills[1+rng.IntN(len(queue)-1)] = true
	}
	type proc struct {
		cmd *exec.Cmd
		in  io.WriteCloser
		out *bufio.Scanner
	}
	start := func() proc {
		cmd := exec.CommandContext(ctx, python, "python/consumer.py", "--dsn", dsn, "--inbox", inboxTable, "--consumer", "shipping",
			"--shipments", shipments, "--totals", totals)
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return proc{cmd, in, bufio.NewScanner(out)}
	}
	p := start()
	applied, dups, redelivered := 0, 0, 0
	for i := 0; i < len(queue); i++ {
		d := queue[i]
		line, _ := json.Marshal(map[string]string{"id": d.id, "key": d.key, "payload": string(d.payload)})
		if _, err := p.in.Write(append(line, '\n')); err != nil {
			t.Fatal(err)
		}
		if kills[i] {
			// Killed with the delivery handed over and no ack read: the
			// effect may or may not be committed. The broker delivers the
			// message again to the next consumer.
			delete(kills, i)
			time.Sleep(time.Duration(rng.IntN(30)) * time.Millisecond)
			p.cmd.Process.Kill()
			p.cmd.Wait()
			p = start()
			redelivered++
			i--
			continue
		}
		if !p.out.Scan() {
			t.Fatalf("consumer ended: %v", p.out.Err())
		}
		f := strings.Fields(p.out.Text())
		if len(f) != 3 || f[0] != "ack" || f[1] != d.id {
			t.Fatalf("consumer answered %q to %s", p.out.Text(), d.id)
		}
		if f[2] == "applied" {
			applied++
		} else {
			dups++
		}
	}
	p.in.Close()
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("consumer: %v", err)
	}
	var shipped, distinct int
	if err := db.QueryRow("SELECT count(*), count(DISTINCT order_id) FROM "+shipments).Scan(&shipped, &distinct); err != nil {
		t.Fatal(err)
	}
	if shipped != len(want) || distinct != len(want) {
		t.Fatalf("%d shipments for %d distinct orders, want one for each of %d", shipped, distinct, len(want))
	}
	sums := map[string]int64{}
	for _, o := range want {
		sums[o.Customer] += int64(o.Amount)
	}
	rows, err := db.Query("SELECT customer, total FROM " + totals)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	got := map[string]int64{}
	for rows.Next() {
		var c string
		var total int64
		if err := rows.Scan(&c, &total); err != nil {
			t.Fatal(err)
		}
		got[c] = total
	}
	for c, s := range sums {
		if got[c] != s {
			t.Errorf("customer %s: total %d, want %d", c, got[c], s)
		}
	}
	if len(got) != len(sums) {
		t.Errorf("totals for %v, want %v", slices.Sorted(mapKeys(got)), slices.Sorted(mapKeys(sums)))
	}
	t.Logf("%d deliveries (%d repeated, %d after a kill): %d applied, %d skipped as duplicates; %d orders shipped once each",
		len(queue)+redelivered, len(queue)-len(msgs), redelivered, applied, dups, shipped)
}

func mapKeys[M ~map[string]V, V any](m M) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}
