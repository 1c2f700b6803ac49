package outboxstore

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/sqldb"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// uuidv7 is the canonical text form exactly.NewID writes.
var uuidv7 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// hashKeys are the keys whose key_hash each dialect must compute as
// KeyHash does: empty (the id is hashed), ASCII, case and spaces (MySQL
// compares 'a' and 'a ' as equal, the hash must not), 2-, 3- and 4-byte
// UTF-8, the longest key the column takes (255 characters, 1,020 bytes),
// and random ones.
func hashKeys() []string {
	keys := []string{"", " ", "  ", "a", "a ", " a", "A", "k", "K", "order-42", "ключ", "ünï", "日本語のキー", "🙂", "a🙂b",
		strings.Repeat("x", 255), strings.Repeat("🙂", 255), strings.Repeat("é", 255), "tab\there", "new\nline", `quote'"\`,
		"\u0085", "\u00a0", "\ufeff", "\U0010ffff"}
	r := rand.New(rand.NewPCG(1, 2))
	alphabet := []rune("abcXYZ019 -_.:/é€𝄞🙂ж語\t")
	for range 300 {
		n := 1 + r.IntN(40)
		if r.IntN(10) == 0 {
			n = 200 + r.IntN(56)
		}
		k := make([]rune, n)
		for i := range k {
			k[i] = alphabet[r.IntN(len(alphabet))]
		}
		keys = append(keys, string(k))
	}
	return keys
}

type plainDB struct {
	name string
	db   *sql.DB
	s    *Store
}

func openPlain(t *testing.T, dialect string) plainDB {
	t.Helper()
	var db *sql.DB
	var err error
	table := fmt.Sprintf("plain_%d", time.Now().UnixNano())
	switch dialect {
	case "postgres":
		testenv.Need(t, testenv.Postgres)
		db, err = sql.Open("pgx", testenv.PostgresDSN())
	case "mysql":
		testenv.Need(t, testenv.MariaDB)
		db, err = sql.Open("mysql", testenv.MySQLDSN())
	default:
		db, err = sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "o.db")+"?_pragma=busy_timeout(10000)")
		table = "exactly_outbox"
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s, err := New(dialect, table)
	if err != nil {
		t.Fatal(err)
	}
	if dialect != "sqlite" {
		t.Cleanup(func() {
			for _, suffix := range []string{"", "_leases", "_relays"} {
				db.Exec("DROP TABLE IF EXISTS " + s.Table.Derived(suffix).Quoted(s.D))
			}
			for _, suffix := range []string{"_key_hash", "_uuidv7", "_fill", "_notify"} {
				db.Exec("DROP FUNCTION IF EXISTS " + s.Table.Derived(suffix).Quoted(s.D))
			}
			a := sqldb.NewArgs(s.D)
			db.Exec("DELETE FROM exactly_migrations WHERE scope = "+a.Add("outbox:"+table), a.Vals...)
		})
	}
	return plainDB{dialect, db, s}
}

// migrateTo applies the outbox's migrations up to version v.
func (p plainDB) migrateTo(t *testing.T, v int) {
	t.Helper()
	m, err := p.s.Migrator(p.db)
	if err != nil {
		t.Fatal(err)
	}
	m.Steps = m.Steps[:v]
	if v < 2 {
		m.Check = nil
	}
	if _, err := m.Apply(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// plainInsert writes one row as a service in another language would: no
// id, no key_hash, no created_at, no headers.
func (p plainDB) plainInsert(t *testing.T, topic, key string, payload []byte) {
	t.Helper()
	a := sqldb.NewArgs(p.s.D)
	q := "INSERT INTO " + p.s.t + " (topic, msg_key, payload) VALUES (" + a.Add(topic) + ", " + a.Add(key) + ", " + a.Add(payload) + ")"
	if _, err := p.db.Exec(q, a.Vals...); err != nil {
		t.Fatalf("plain insert: %v", err)
	}
}

func (p plainDB) goInsert(t *testing.T, msgs ...*exactly.Message) {
	t.Helper()
	qs, args, err := p.s.InsertBatches(msgs)
	if err != nil {
		t.Fatal(err)
	}
	for i, q := range qs {
		if _, err := p.db.Exec(q, args[i]...); err != nil {
			t.Fatal(err)
		}
	}
}

func (p plainDB) fetchAll(t *testing.T) []Row {
	t.Helper()
	rows, err := p.s.Fetch(context.Background(), p.db, FetchQuery{Limit: 100000, NowMillis: time.Now().UnixMilli()})
	if err != nil {
		t.Fatal(err)
	}
	return rows
}

// TestPlainInsert: after migration 2, a plain INSERT of topic, key and
// payload is a complete outbox write on every dialect, from Go's drivers
// with no Go-side defaults: the row gets a UUIDv7 id fixed before it is
// first fetched, created_at in microseconds, and the key_hash KeyHash
// computes (the id's for an empty key), so Go and other writers agree on
// partitions. The table already held pending rows written by Go: they are
// unaffected and come first, in order, with the new rows after them.
func TestPlainInsert(t *testing.T) {
	for _, dialect := range []string{"postgres", "mysql", "sqlite"} {
		t.Run(dialect, func(t *testing.T) {
			p := openPlain(t, dialect)
			p.migrateTo(t, 1)
			var want []*exactly.Message // in seq order
			for i := range 20 {
				m := &exactly.Message{ID: exactly.NewID(), Topic: "orders", Key: fmt.Sprintf("k%d", i%3), Payload: []byte(fmt.Sprint(i)),
					Headers: map[string]string{"n": fmt.Sprint(i)}, CreatedAt: time.Now()}
				p.goInsert(t, m)
				want = append(want, m)
			}
			before := p.fetchAll(t)
			p.migrateTo(t, 2)
			after := p.fetchAll(t)
			if len(before) != 20 || len(after) != 20 {
				t.Fatalf("pending Go rows: %d before migration 2, %d after", len(before), len(after))
			}
			for i := range before {
				b, a := before[i], after[i]
				if b.Seq != a.Seq || b.Msg.ID != a.Msg.ID || b.KeyHash != a.KeyHash || !b.Msg.CreatedAt.Equal(a.Msg.CreatedAt) ||
					string(b.Msg.Payload) != string(a.Msg.Payload) || a.Msg.Headers["n"] != fmt.Sprint(i) {
					t.Fatalf("row %d changed by the migration: %+v -> %+v", i, b, a)
				}
			}
			// Plain rows and Go rows on the same keys, interleaved.
			start := time.Now()
			keys := hashKeys()
			for i, k := range keys {
				if i%4 == 0 {
					m := &exactly.Message{ID: exactly.NewID(), Topic: "orders", Key: k, Payload: []byte("go"), CreatedAt: time.Now()}
					p.goInsert(t, m)
					want = append(want, m)
				}
				p.plainInsert(t, "orders", k, []byte("plain"))
				want = append(want, &exactly.Message{Topic: "orders", Key: k, Payload: []byte("plain")})
			}
			end := time.Now()
			rows := p.fetchAll(t)
			if len(rows) != len(want) {
				t.Fatalf("fetched %d rows, want %d", len(rows), len(want))
			}
			ids := map[string]bool{}
			for i, r := range rows {
				w := want[i]
				if i > 0 && r.Seq <= rows[i-1].Seq {
					t.Fatalf("row %d: seq %d after %d", i, r.Seq, rows[i-1].Seq)
				}
				if r.Msg.Key != w.Key || string(r.Msg.Payload) != string(w.Payload) {
					t.Fatalf("row %d: key %q payload %q, want %q %q", i, r.Msg.Key, r.Msg.Payload, w.Key, w.Payload)
				}
				if ids[r.Msg.ID] {
					t.Fatalf("row %d: id %s given twice", i, r.Msg.ID)
				}
				ids[r.Msg.ID] = true
				if hash := KeyHash(&r.Msg); r.KeyHash != hash {
					t.Errorf("row %d (key %q, id %s): key_hash %d, KeyHash %d", i, r.Msg.Key, r.Msg.ID, r.KeyHash, hash)
				}
				if w.ID != "" {
					if r.Msg.ID != w.ID || !r.Msg.CreatedAt.Equal(w.CreatedAt.Truncate(time.Microsecond)) {
						t.Errorf("Go row %d: id %s created %v, want %s %v", i, r.Msg.ID, r.Msg.CreatedAt, w.ID, w.CreatedAt)
					}
					continue
				}
				if !uuidv7.MatchString(r.Msg.ID) {
					t.Errorf("plain row %d: id %q is not a UUIDv7", i, r.Msg.ID)
				}
				ms := parseUUIDMillis(r.Msg.ID)
				if ms < start.UnixMilli()-1 || ms > end.UnixMilli()+1 {
					t.Errorf("plain row %d: id time %d outside [%d, %d]", i, ms, start.UnixMilli(), end.UnixMilli())
				}
				// created_at is in microseconds, as Go writes it (the
				// databases' clocks have millisecond steps on SQLite).
				if c := r.Msg.CreatedAt; c.Before(start.Add(-2*time.Millisecond)) || c.After(end.Add(2*time.Millisecond)) {
					t.Errorf("plain row %d: created_at %v outside [%v, %v]", i, c, start, end)
				}
				if r.Msg.Headers != nil {
					t.Errorf("plain row %d: headers %v, want none", i, r.Msg.Headers)
				}
			}
			// The id is fixed in the row: a second read gives the same.
			again := p.fetchAll(t)
			for i := range again {
				if again[i].Msg.ID != rows[i].Msg.ID || again[i].KeyHash != rows[i].KeyHash {
					t.Fatalf("row %d changed between two reads", i)
				}
			}
			// The sequence goes on past rows that were deleted (SQLite's
			// rebuild keeps it): delete all, write one more.
			last := rows[len(rows)-1].Seq
			if _, err := p.db.Exec("DELETE FROM " + p.s.t); err != nil {
				t.Fatal(err)
			}
			p.plainInsert(t, "orders", "after", []byte("x"))
			if r := p.fetchAll(t); len(r) != 1 || r[0].Seq <= last {
				t.Fatalf("after deleting every row: %+v, want one row with seq > %d", r, last)
			}
		})
	}
}

func parseUUIDMillis(id string) int64 {
	var ms int64
	fmt.Sscanf(strings.ReplaceAll(id[:13], "-", ""), "%x", &ms)
	return ms
}

// TestKeyHashFunctions: the SQL functions migration 2 creates compute
// KeyHash's value for every key (PostgreSQL's PL/pgSQL and MySQL's stored
// function, called directly).
func TestKeyHashFunctions(t *testing.T) {
	keys := hashKeys()
	for _, dialect := range []string{"postgres", "mysql"} {
		t.Run(dialect, func(t *testing.T) {
			p := openPlain(t, dialect)
			p.migrateTo(t, 2)
			fn := p.s.Table.Derived("_key_hash").Quoted(p.s.D)
			for _, k := range keys {
				id := exactly.NewID()
				a := sqldb.NewArgs(p.s.D)
				var q string
				if dialect == "mysql" {
					q = "SELECT " + fn + "(CAST(CONVERT(IF(LENGTH(" + a.Add(k) + ") > 0, " + a.Add(k) + ", " + a.Add(id) + ") USING utf8mb4) AS BINARY))"
				} else {
					q = "SELECT " + fn + "(" + a.Add(k) + "::text, " + a.Add(id) + "::text)"
				}
				var got int32
				if err := p.db.QueryRow(q, a.Vals...).Scan(&got); err != nil {
					t.Fatal(err)
				}
				if want := KeyHash(&exactly.Message{ID: id, Key: k}); got != want {
					t.Errorf("key %q: SQL %d, KeyHash %d", k, got, want)
				}
			}
		})
	}
}

// TestSQLiteRebuildRefusesExtraColumns: migration 2 rebuilds the SQLite
// table and refuses one with columns of its own, which it would drop.
func TestSQLiteRebuildRefusesExtraColumns(t *testing.T) {
	p := openPlain(t, "sqlite")
	p.migrateTo(t, 1)
	p.goInsert(t, &exactly.Message{ID: exactly.NewID(), Topic: "t", Payload: []byte("x"), CreatedAt: time.Now()})
	if _, err := p.db.Exec("ALTER TABLE " + p.s.t + " ADD COLUMN tenant TEXT"); err != nil {
		t.Fatal(err)
	}
	m, err := p.s.Migrator(p.db)
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.Apply(context.Background())
	if err == nil || !strings.Contains(err.Error(), "columns beyond exactly's 13") {
		t.Fatalf("migration 2 on a table with a column of its own: %v", err)
	}
	var n int
	if err := p.db.QueryRow("SELECT count(*) FROM " + p.s.t + " WHERE tenant IS NULL").Scan(&n); err != nil || n != 1 {
		t.Fatalf("the table after the refusal: %d rows, %v", n, err)
	}
}

// On SQLite the relay fills key_hash before it reads, and a plain INSERT
// can commit between the two: a read never passes such a row, or a later
// row of its key written by Go (key_hash set) would be published first.
// The read stops before it; the next Fetch fills it and goes on in order.
func TestSQLiteReadStopsAtARowWithoutItsKeyHash(t *testing.T) {
	t.Parallel()
	p := openPlain(t, "sqlite")
	p.migrateTo(t, 2)
	first := &exactly.Message{ID: exactly.NewID(), Topic: "t", Key: "k", Payload: []byte("1")}
	p.goInsert(t, first)
	p.plainInsert(t, "t", "k", []byte("2")) // committed after the fill: key_hash NULL
	third := &exactly.Message{ID: exactly.NewID(), Topic: "t", Key: "k", Payload: []byte("3")}
	p.goInsert(t, third)
	q, args := p.s.fetchSQL(FetchQuery{Limit: 100, NowMillis: time.Now().UnixMilli()})
	rows, err := p.db.Query(q, args...)
	if err != nil {
		t.Fatal(err)
	}
	got, err := scanRows(rows)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Msg.ID != first.ID {
		t.Fatalf("a read with row 2's key_hash unfilled returned %d rows (%v), want only row 1", len(got), got)
	}
	all := p.fetchAll(t) // fills, then reads
	var payloads []string
	for _, r := range all {
		payloads = append(payloads, string(r.Msg.Payload))
	}
	if strings.Join(payloads, ",") != "1,2,3" {
		t.Fatalf("Fetch after the fill returned %v, want 1,2,3", payloads)
	}
}
