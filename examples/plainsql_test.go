package examples

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/sqldb"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
	"github.com/exactlyonce/exactly/relay"
)

var uuidv7 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

type natsStream struct {
	js     jetstream.JetStream
	name   string
	topic  string
	pub    *nats.Publisher
	closer func()
}

func newStream(t *testing.T, ctx context.Context) *natsStream {
	t.Helper()
	testenv.Need(t, testenv.NATS)
	nc, err := natsgo.Connect(testenv.NATSURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	u := time.Now().UnixNano()
	s := &natsStream{js: js, name: fmt.Sprintf("PLAIN_%d", u), topic: fmt.Sprintf("plain%d.events", u)}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: s.name, Subjects: []string{s.topic}, Duplicates: 5 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { js.DeleteStream(context.Background(), s.name) })
	if s.pub, err = nats.NewPublisher(js, nats.StrictKeyOrder()); err != nil {
		t.Fatal(err)
	}
	return s
}

// plainRow is what a writer in any language inserts: topic, key, payload
// and maybe headers, in its own transaction.
func plainRow(t *testing.T, tx *sql.Tx, d sqldb.Dialect, table, topic, key, payload string, headers any) {
	t.Helper()
	a := sqldb.NewArgs(d)
	q := "INSERT INTO " + table + " (topic, msg_key, payload, headers) VALUES (" + a.Add(topic) + ", " + a.Add(key) + ", " +
		a.Add([]byte(payload)) + ", " + a.Add(headers) + ")"
	if _, err := tx.Exec(q, a.Vals...); err != nil {
		t.Fatalf("plain insert: %v", err)
	}
}

type event struct {
	Key string `json:"key"`
	N   int    `json:"n"`
	By  string `json:"by"`
}

// writeMixed writes, on keys k0..k4, committed and rolled-back transactions
// of plain rows and of Go rows (outbox.Enqueue), and one plain row with
// headers that are not a JSON object of strings. It returns the committed
// events in commit order.
func writeMixed(t *testing.T, ctx context.Context, db *sql.DB, d sqldb.Dialect, ob *outbox.Outbox, table, topic string, from, n int) []event {
	t.Helper()
	var committed []event
	for i := from; i < from+n; i++ {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		e := event{Key: fmt.Sprintf("k%d", i%5), N: i, By: "plain"}
		if i%3 == 0 {
			e.By = "go"
		}
		payload, _ := json.Marshal(e)
		if e.By == "go" {
			if err := ob.Enqueue(ctx, tx, &exactly.Message{Topic: topic, Key: e.Key, Payload: payload}); err != nil {
				t.Fatal(err)
			}
		} else {
			plainRow(t, tx, d, table, topic, e.Key, string(payload), `{"by":"plain"}`)
		}
		if i == from+n/2 {
			plainRow(t, tx, d, table, topic, e.Key, `{}`, `{"by":["not","a","string"]}`)
		}
		if i%7 == 6 && i != from+n/2 {
			tx.Rollback()
			continue
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		committed = append(committed, e)
	}
	return committed
}

// checkPublished compares the stream with the committed events: each once,
// in commit order per key, every id a UUIDv7 (plain rows) or the one Go
// gave, and returns the messages.
func checkPublished(t *testing.T, ctx context.Context, s *natsStream, want []event) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	var got []published
	for time.Now().Before(deadline) {
		info, err := s.js.Stream(ctx, s.name)
		if err != nil {
			t.Fatal(err)
		}
		st, err := info.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.State.Msgs >= uint64(len(want)) {
			got = readStream(t, ctx, s.js, s.name)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(got) != len(want) {
		t.Fatalf("%d messages published, want the %d committed", len(got), len(want))
	}
	perKey := map[string][]int{}
	for _, e := range want {
		perKey[e.Key] = append(perKey[e.Key], e.N)
	}
	ids := map[string]bool{}
	for i, p := range got {
		var e event
		if err := json.Unmarshal(p.payload, &e); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if len(perKey[e.Key]) == 0 || perKey[e.Key][0] != e.N {
			t.Fatalf("message %d: %+v, want key %s's next event %v", i, e, e.Key, perKey[e.Key])
		}
		perKey[e.Key] = perKey[e.Key][1:]
		if ids[p.id] || p.natsID != p.id || !uuidv7.MatchString(p.id) || p.key != e.Key {
			t.Fatalf("message %d: id %q (Nats-Msg-Id %q), key %q", i, p.id, p.natsID, p.key)
		}
		ids[p.id] = true
		if e.By == "plain" && p.headers.Get("by") != "plain" {
			t.Fatalf("message %d: headers %v", i, p.headers)
		}
	}
}

func checkParked(t *testing.T, ctx context.Context, db *sql.DB, dialect, table string, n int) {
	t.Helper()
	store, err := outboxstore.New(dialect, table)
	if err != nil {
		t.Fatal(err)
	}
	dead, err := store.ListDead(ctx, db, outboxstore.DeadFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != n {
		t.Fatalf("%d rows parked, want %d: %+v", len(dead), n, dead)
	}
	for _, d := range dead {
		if !strings.Contains(d.LastError, `headers: header "by" is a JSON array, not a string`) {
			t.Fatalf("parked with %q", d.LastError)
		}
	}
}

// TestPlainInsertRelay: on MySQL/MariaDB and SQLite, through Go's drivers
// with no Go-side defaults, plain INSERTs and Go writers on the same keys,
// some transactions rolled back; two relays splitting the keys over 4
// partitions publish exactly the committed rows once each, in order per key
// (on SQLite the relays fill key_hash, with the value a Go writer stores),
// and park the row whose headers are not a JSON object of strings.
func TestPlainInsertRelay(t *testing.T) {
	for _, dialect := range []string{"mysql", "sqlite"} {
		t.Run(dialect, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			var db *sql.DB
			var err error
			table := fmt.Sprintf("plainrelay_%d", time.Now().UnixNano())
			if dialect == "mysql" {
				testenv.Need(t, testenv.MariaDB)
				db, err = sql.Open("mysql", testenv.MySQLDSN())
			} else {
				db, err = sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "o.db")+"?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)")
			}
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			s := newStream(t, ctx)
			ob, err := outbox.New(outbox.Config{Dialect: dialect, Table: table})
			if err != nil {
				t.Fatal(err)
			}
			if err := ob.Migrate(ctx, db); err != nil {
				t.Fatal(err)
			}
			if dialect == "mysql" {
				t.Cleanup(func() {
					for _, sfx := range []string{"", "_leases", "_relays"} {
						db.Exec("DROP TABLE IF EXISTS " + table + sfx)
					}
					db.Exec("DROP FUNCTION IF EXISTS " + table + "_key_hash")
					db.Exec("DELETE FROM exactly_migrations WHERE scope = ?", "outbox:"+table)
				})
			}
			d, _ := sqldb.ParseDialect(dialect)
			want := writeMixed(t, ctx, db, d, ob, table, s.topic, 0, 60)
			var stops []func() error
			for range 2 {
				r, err := relay.New(relay.Config{Outbox: ob, DB: db, Publisher: s.pub, Partitions: 4, PollInterval: 50 * time.Millisecond})
				if err != nil {
					t.Fatal(err)
				}
				rctx, stop := context.WithCancel(ctx)
				done := make(chan error, 1)
				go func() { done <- r.Run(rctx) }()
				stops = append(stops, func() error { stop(); return <-done })
			}
			want = append(want, writeMixed(t, ctx, db, d, ob, table, s.topic, 60, 60)...)
			checkPublished(t, ctx, s, want)
			for _, stop := range stops {
				if err := stop(); err != nil && !strings.Contains(err.Error(), "context canceled") {
					t.Errorf("relay: %v", err)
				}
			}
			checkParked(t, ctx, db, dialect, table, 2)
			// Every row's key_hash is KeyHash's: partitions do not depend on
			// who wrote the row.
			rows, err := db.Query("SELECT id, msg_key, key_hash FROM " + table)
			if err != nil {
				t.Fatal(err)
			}
			defer rows.Close()
			for rows.Next() {
				var m exactly.Message
				var h int32
				if err := rows.Scan(&m.ID, &m.Key, &h); err != nil {
					t.Fatal(err)
				}
				if h != outboxstore.KeyHash(&m) {
					t.Errorf("row %s: key_hash %d, KeyHash %d", m.ID, h, outboxstore.KeyHash(&m))
				}
			}
		})
	}
}

// TestPlainInsertCDC: the CDC relay (pgcdc, logical decoding) publishes
// plain-INSERT rows with the values the trigger and defaults filled, both
// the rows pending when its slot is created (the snapshot) and the ones
// streamed after, mixed with Go rows on the same keys; a row whose headers
// are not a JSON object of strings is parked from either path.
func TestPlainInsertCDC(t *testing.T) {
	in := testenv.LogicalPostgres(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dsn := in.DSN("postgres")
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	s := newStream(t, ctx)
	table := "plaincdc"
	ob, err := outbox.New(outbox.Config{Dialect: "postgres", Table: table})
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	want := writeMixed(t, ctx, db, sqldb.Postgres, ob, table, s.topic, 0, 40)
	r, err := pgcdc.New(pgcdc.Config{DSN: dsn, Slot: "plaincdc", Table: table, Publisher: s.pub,
		InitialBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond, StatusInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(rctx) }()
	defer func() {
		stop()
		<-done
		pgcdc.DropSlot(context.Background(), dsn, "plaincdc")
	}()
	want = append(want, writeMixed(t, ctx, db, sqldb.Postgres, ob, table, s.topic, 40, 40)...)
	checkPublished(t, ctx, s, want)
	deadline := time.Now().Add(30 * time.Second)
	for {
		var n int
		if err := db.QueryRow("SELECT count(*) FROM " + table + " WHERE status = 2").Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	checkParked(t, ctx, db, "postgres", table, 2)
}
