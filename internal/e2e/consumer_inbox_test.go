package e2e_test

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/amqp"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/testenv"
	exnats "github.com/exactlyonce/exactly/nats"
)

// effectsDB is a PostgreSQL effects table and an SQL inbox of the test's own.
type effectsDB struct {
	db      *sql.DB
	table   string
	in      *inbox.SQL
	handler exactly.Handler
}

func newEffectsDB(t *testing.T) *effectsDB {
	t.Helper()
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	suffix := time.Now().UnixNano() % 1e9
	e := &effectsDB{db: db, table: fmt.Sprintf("e2e_effects_%d", suffix)}
	inboxTable := fmt.Sprintf("e2e_inbox_%d", suffix)
	if _, err := db.Exec("CREATE TABLE " + e.table + " (id text NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	e.in, err = inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Table: inboxTable, Consumer: "e2e"})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.in.Migrate(t.Context(), db); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.Exec("DROP TABLE IF EXISTS " + e.table)
		db.Exec("DROP TABLE IF EXISTS " + inboxTable)
		db.Exec("DELETE FROM exactly_migrations WHERE scope = $1", "inbox:"+inboxTable)
	})
	e.handler = e.in.Handler(db, func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO "+e.table+" (id) VALUES ($1)", m.ID)
		return err
	})
	return e
}

// checkOnce fails unless each id has exactly one effect row.
func (e *effectsDB) checkOnce(t *testing.T, ids []string) {
	t.Helper()
	counts := map[string]int{}
	rows, err := e.db.Query("SELECT id, count(*) FROM " + e.table + " GROUP BY id")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var n int
		rows.Scan(&id, &n)
		counts[id] = n
	}
	lost, twice := 0, 0
	for _, id := range ids {
		switch counts[id] {
		case 0:
			lost++
		case 1:
		default:
			twice++
		}
	}
	if lost > 0 || twice > 0 {
		t.Fatalf("of %d messages: %d lost, %d applied twice", len(ids), lost, twice)
	}
}

func (e *effectsDB) wait(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var have int
		e.db.QueryRow("SELECT count(DISTINCT id) FROM " + e.table).Scan(&have)
		if have >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s, %d of %d messages applied", timeout, have, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func quietLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError}))
}

// TestNATSLostAckWithInbox: the NATS connection drops right after an effect
// committed, before its ack; JetStream redelivers after AckWait to the
// restarted consumer and the SQL inbox absorbs it: one effect per message.
func TestNATSLostAckWithInbox(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.NATS)
	e := newEffectsDB(t)
	ctx := t.Context()
	stream := fmt.Sprintf("E2E_%d", time.Now().UnixNano())
	subject := "e2e." + stream

	connect := func() (*natsgo.Conn, jetstream.JetStream) {
		nc, err := natsgo.Connect(testenv.NATSURL())
		if err != nil {
			t.Fatal(err)
		}
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		return nc, js
	}
	nc, js := connect()
	defer nc.Close()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: stream, Subjects: []string{subject, subject + ".dlq"}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { js.DeleteStream(context.Background(), stream) })
	pub, err := exnats.NewPublisher(js)
	if err != nil {
		t.Fatal(err)
	}
	var msgs []*exactly.Message
	var ids []string
	for i := range 200 {
		m := &exactly.Message{ID: exactly.NewID(), Topic: subject, Key: fmt.Sprintf("k%d", i%10), Payload: fmt.Appendf(nil, "%d", i)}
		msgs, ids = append(msgs, m), append(ids, m.ID)
	}
	if err := pub.Publish(ctx, msgs); err != nil {
		t.Fatal(err)
	}

	var drops atomic.Int32
	for round := 0; round < 10; round++ {
		cnc, cjs := connect()
		handler := func(ctx context.Context, m *exactly.Message) error {
			if err := e.handler(ctx, m); err != nil {
				return err
			}
			if round < 3 && m.Payload[len(m.Payload)-1] == '7' && drops.Load() <= int32(round) {
				drops.Add(1)
				cnc.Close() // the effect committed; the ack can no longer be sent
			}
			return nil
		}
		c, err := exnats.NewConsumer(cjs, exnats.ConsumerConfig{Stream: stream, Durable: "e2e", FilterSubjects: []string{subject},
			AckWait: time.Second, ConsumerConfig: exactly.ConsumerConfig{Handler: handler, Logger: quietLogger(t)}})
		if err != nil {
			t.Fatal(err)
		}
		rctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		done := make(chan error, 1)
		go func() { done <- c.Run(rctx) }()
		finished := false
		for !finished {
			select {
			case <-done:
				finished = true
			case <-time.After(50 * time.Millisecond):
				var have int
				e.db.QueryRow("SELECT count(DISTINCT id) FROM " + e.table).Scan(&have)
				if have == len(ids) {
					cancel()
					<-done
					finished = true
				}
			}
		}
		cancel()
		cnc.Close()
		st := e.in.Stats()
		if st.Processed == int64(len(ids)) && round >= 3 {
			break
		}
	}
	e.wait(t, len(ids), 30*time.Second)
	e.checkOnce(t, ids)
	if drops.Load() == 0 || e.in.Stats().Duplicates == 0 {
		t.Fatalf("drops %d, duplicates absorbed %d: no ack was lost, the test proved nothing", drops.Load(), e.in.Stats().Duplicates)
	}
	t.Logf("%d acks lost; the inbox absorbed %d redeliveries", drops.Load(), e.in.Stats().Duplicates)
}

// TestRabbitMQCrashBeforeAckWithInbox: the consumer's connection is cut
// right after an effect committed, before the ack; RabbitMQ redelivers
// (Redelivered=true) after the consumer reconnects, and the SQL inbox
// absorbs it: one effect per message.
func TestRabbitMQCrashBeforeAckWithInbox(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.RabbitMQ)
	e := newEffectsDB(t)
	ctx := t.Context()
	url := "amqp://guest:guest@" + testenv.RabbitMQ.Addr + "/"
	queue := fmt.Sprintf("e2e-%d", time.Now().UnixNano())
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(queue, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ch.QueueDelete(queue, false, false, false)
		ch.QueueDelete(queue+".dlq", false, false, false)
	})
	pub, err := amqp.NewPublisher(url)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	var msgs []*exactly.Message
	var ids []string
	for i := range 200 {
		m := &exactly.Message{ID: exactly.NewID(), Topic: queue, Payload: fmt.Appendf(nil, "%d", i)}
		msgs, ids = append(msgs, m), append(ids, m.ID)
	}
	if err := pub.Publish(ctx, msgs); err != nil {
		t.Fatal(err)
	}

	// The consumer dials through a hook that lets the handler cut its socket.
	var sock atomic.Pointer[net.Conn]
	dial := func(network, addr string) (net.Conn, error) {
		c, err := net.DialTimeout(network, addr, 5*time.Second)
		if err == nil {
			sock.Store(&c)
		}
		return c, err
	}
	var cuts atomic.Int32
	handler := func(ctx context.Context, m *exactly.Message) error {
		if err := e.handler(ctx, m); err != nil {
			return err
		}
		if m.Payload[len(m.Payload)-1] == '3' && cuts.Load() < 3 {
			if info, ok := amqp.DeliveryInfoFrom(ctx); ok && !info.Redelivered {
				cuts.Add(1)
				if c := sock.Load(); c != nil {
					(*c).Close() // the effect committed; the ack will not reach the broker
				}
			}
		}
		return nil
	}
	c, err := amqp.NewConsumer(url, amqp.ConsumerConfig{
		ConsumerConfig:      exactly.ConsumerConfig{Handler: handler, Logger: quietLogger(t)},
		Queue:               queue,
		Prefetch:            20,
		DialConfig:          amqp091.Config{Dial: dial},
		ReconnectBackoff:    50 * time.Millisecond,
		ReconnectMaxBackoff: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(rctx) }()
	e.wait(t, len(ids), 60*time.Second)
	time.Sleep(300 * time.Millisecond)
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	e.checkOnce(t, ids)
	if cuts.Load() == 0 || e.in.Stats().Duplicates == 0 {
		t.Fatalf("cuts %d, duplicates absorbed %d: no redelivery happened, the test proved nothing", cuts.Load(), e.in.Stats().Duplicates)
	}
	t.Logf("%d connections cut after the effect; the inbox absorbed %d redeliveries", cuts.Load(), e.in.Stats().Duplicates)
}
