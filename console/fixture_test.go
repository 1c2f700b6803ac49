package console_test

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/console"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
)

// bundle is one test's database state: a private schema with an outbox
// and an inbox table holding known rows, and a console over them.
type bundle struct {
	db      *sql.DB
	schema  string
	ob      *outbox.Outbox
	inbox   string
	console *console.Console
	logs    *logBuffer
}

// The known rows of every fixture.
var (
	pendingIDs = []string{"ord-1", "ord-2", "ord-3"}
	failingID  = "ord-4" // pending, key k-blocked, failed twice
	waitingID  = "ord-5" // pending behind ord-4 on the same key
	deadIDs    = []string{"dead-1", "dead-2", "dead-3"}
	sentID     = "sent-1" // sent, kept, claimed by two consumers
)

var schemaSeq atomic.Int64

// setup builds the fixture; actions enables the console's actions, and
// tune changes the console's configuration further.
func setup(t *testing.T, actions bool, tune ...func(*console.Config)) *bundle {
	t.Helper()
	testenv.Need(t, testenv.Postgres)
	ctx := context.Background()
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	schema := fmt.Sprintf("console_%d_%d", time.Now().UnixNano()%1e9, schemaSeq.Add(1))
	if _, err := db.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := db.ExecContext(context.Background(), "DROP SCHEMA "+schema+" CASCADE"); err != nil {
			t.Errorf("drop schema: %v", err)
		}
	})
	ob, err := outbox.New(outbox.Config{Dialect: outbox.Postgres, Table: schema + ".exactly_outbox"})
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	inboxTable := schema + ".exactly_inbox"
	var consumers []*inbox.SQL
	for _, name := range []string{"promotions", "audit"} {
		in, err := inbox.NewSQL(inbox.Config{Dialect: outbox.Postgres, Table: inboxTable, Consumer: name})
		if err != nil {
			t.Fatal(err)
		}
		consumers = append(consumers, in)
	}
	if err := consumers[0].Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}

	var msgs []*exactly.Message
	for _, id := range pendingIDs {
		msgs = append(msgs, &exactly.Message{ID: id, Topic: "orders", Key: "k-" + id, Payload: []byte(`{"order":"` + id + `"}`)})
	}
	msgs = append(msgs,
		&exactly.Message{ID: failingID, Topic: "orders", Key: "k-blocked", Payload: []byte(`{"order":4}`)},
		&exactly.Message{ID: waitingID, Topic: "orders", Key: "k-blocked", Payload: []byte(`{"order":5}`)},
		&exactly.Message{ID: deadIDs[0], Topic: "orders", Key: "k-dead", Payload: []byte(`{"order":"bad"}`), Headers: map[string]string{"trace": "t-1"}},
		&exactly.Message{ID: deadIDs[1], Topic: "payments", Key: "p-1", Payload: []byte{0x00, 0x01, 0xfe, 0xff}},
		&exactly.Message{ID: deadIDs[2], Topic: "payments", Key: "p-2", Payload: []byte("refund 7")},
		&exactly.Message{ID: sentID, Topic: "payments", Key: "p-3", Payload: []byte("paid 9")},
	)
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Enqueue(ctx, tx, msgs...); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	st := outboxstore.For(ob)
	seq := func(id string) int64 {
		rows, err := st.FindByID(ctx, db, id)
		if err != nil || len(rows) != 1 {
			t.Fatalf("find %s: %v %v", id, rows, err)
		}
		return rows[0].Seq
	}
	now := time.Now().UnixMilli()
	if err := st.RecordFailures(ctx, db, []outboxstore.Failure{
		{Seq: seq(failingID), Attempts: 2, NextAttemptAt: now + 3600_000, Err: "broker refused: quota exceeded"},
		{Seq: seq(deadIDs[0]), Attempts: 5, Err: "schema v2 rejected the payload", Dead: true},
		{Seq: seq(deadIDs[1]), Attempts: 5, Err: "timeout after 30s", Dead: true},
		{Seq: seq(deadIDs[2]), Attempts: 5, Err: "timeout after 30s", Dead: true},
	}, now); err != nil {
		t.Fatal(err)
	}
	if err := st.MarkSent(ctx, db, []int64{seq(sentID)}, true, now); err != nil {
		t.Fatal(err)
	}
	for _, in := range consumers {
		if _, err := in.Handle(ctx, db, &exactly.Message{ID: sentID, Topic: "payments"}, func(context.Context, *sql.Tx) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.EnsurePartitions(ctx, db, 4, time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Acquire(ctx, db, "relay-a", 2, time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, _, err := st.Heartbeat(ctx, db, "relay-a", time.Minute); err != nil {
		t.Fatal(err)
	}

	logs := &logBuffer{}
	cfg := console.Config{DB: db, Outbox: ob, Inboxes: []string{inboxTable},
		InboxStats: func() map[string]inbox.Stats {
			return map[string]inbox.Stats{"promotions": consumers[0].Stats(), "audit": consumers[1].Stats()}
		},
		Slots: []string{"console_test_no_such_slot"}, DSN: "postgres://postgres:Zq7ConsoleS3cret@127.0.0.1:5432/test",
		Actions: actions, Logger: slog.New(slog.NewTextHandler(logs, nil)), SampleInterval: time.Second}
	for _, f := range tune {
		f(&cfg)
	}
	c, err := console.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	if err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	return &bundle{db: db, schema: schema, ob: ob, inbox: inboxTable, console: c, logs: logs}
}

// status is the status of the row with id (-1 when there is none).
func (b *bundle) status(t *testing.T, id string) int {
	t.Helper()
	rows, err := outboxstore.For(b.ob).FindByID(context.Background(), b.db, id)
	if err != nil {
		t.Fatal(err)
	}
	switch len(rows) {
	case 0:
		return -1
	case 1:
		return rows[0].Status
	}
	t.Fatalf("%d rows with id %s", len(rows), id)
	return 0
}

// logBuffer collects the console's log lines.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

var _ io.Writer = (*logBuffer)(nil)
