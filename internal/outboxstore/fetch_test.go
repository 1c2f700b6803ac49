package outboxstore

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/sqldb"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// badHeaders are stored by a service writing with plain SQL; each parks its
// row, and the rows around it (of the same key too) are fetched as usual.
var badHeaders = []string{`{"a":1}`, `not json`, `["x"]`, `{"exactly-id":"x"}`, `{"":"x"}`}

func fillFetchTable(t *testing.T, ctx context.Context, db *sql.DB, s *Store) (good []string) {
	t.Helper()
	m, err := s.Migrator(db)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Apply(ctx); err != nil {
		t.Fatal(err)
	}
	var msgs []*exactly.Message
	for i := range 12 {
		msgs = append(msgs, &exactly.Message{ID: exactly.NewID(), Topic: "t", Key: fmt.Sprintf("k%d", i%2),
			Payload: []byte("p"), Headers: map[string]string{"n": fmt.Sprint(i)}, CreatedAt: time.Now()})
	}
	qs, args, err := s.InsertBatches(msgs)
	if err != nil {
		t.Fatal(err)
	}
	for i, q := range qs {
		if _, err := db.ExecContext(ctx, q, args[i]...); err != nil {
			t.Fatal(err)
		}
	}
	// Every other row from the second on gets bad headers.
	for i, m := range msgs {
		if i%2 == 1 && i/2 < len(badHeaders) {
			q := "UPDATE " + s.t + " SET headers = ? WHERE id = ?"
			if s.D == sqldb.Postgres {
				q = "UPDATE " + s.t + " SET headers = $1 WHERE id = $2"
			}
			if _, err := db.ExecContext(ctx, q, badHeaders[i/2], m.ID); err != nil {
				t.Fatal(err)
			}
			continue
		}
		good = append(good, m.ID)
	}
	return good
}

func checkParked(t *testing.T, ctx context.Context, db *sql.DB, s *Store, got []Row, good []string) {
	t.Helper()
	var ids []string
	for _, r := range got {
		if r.Bad != nil {
			t.Errorf("row %d returned with Bad %v", r.Seq, r.Bad)
		}
		ids = append(ids, r.Msg.ID)
	}
	if strings.Join(ids, ",") != strings.Join(good, ",") {
		t.Errorf("fetched %v, want %v", ids, good)
	}
	dead, err := s.ListDead(ctx, db, DeadFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != len(badHeaders) {
		t.Fatalf("%d rows parked, want %d", len(dead), len(badHeaders))
	}
	for _, d := range dead {
		if !strings.HasPrefix(d.LastError, "not publishable as stored: headers: ") {
			t.Errorf("row %d parked with %q", d.Seq, d.LastError)
		}
	}
}

func TestFetchParksBadHeadersSQLite(t *testing.T) {
	ctx := context.Background()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "o.db")+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	s, err := New("sqlite", "outbox")
	if err != nil {
		t.Fatal(err)
	}
	good := fillFetchTable(t, ctx, db, s)
	// A limit smaller than the table: the parked rows are fetched past.
	got, err := s.Fetch(ctx, db, FetchQuery{Limit: 7, NowMillis: time.Now().UnixMilli()})
	if err != nil {
		t.Fatal(err)
	}
	checkParked(t, ctx, db, s, got, good[:7])
	kept, err := s.Fetch(ctx, db, FetchQuery{Limit: 100, NowMillis: time.Now().UnixMilli(), KeepBad: true})
	if err != nil || len(kept) != len(good) {
		t.Fatalf("after parking: %d rows, %v", len(kept), err)
	}
}

func TestFetchParksBadHeadersPostgres(t *testing.T) {
	testenv.Need(t, testenv.Postgres)
	ctx := context.Background()
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	table := fmt.Sprintf("fetch_bad_%d", time.Now().UnixNano())
	s, err := New("postgres", table)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, suffix := range []string{"", "_leases", "_relays"} {
			db.Exec("DROP TABLE IF EXISTS " + table + suffix)
		}
		db.Exec("DELETE FROM exactly_migrations WHERE scope = $1", "outbox:"+table)
	})
	good := fillFetchTable(t, ctx, db, s)
	pool, err := pgxpool.New(ctx, testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	// KeepBad (the CDC relay's read-only snapshot) parks nothing.
	kept, err := s.FetchPgx(ctx, pool, FetchQuery{Limit: 100, NowMillis: time.Now().UnixMilli(), KeepBad: true})
	if err != nil {
		t.Fatal(err)
	}
	bad := 0
	for _, r := range kept {
		if r.Bad != nil {
			bad++
		}
	}
	if len(kept) != len(good)+len(badHeaders) || bad != len(badHeaders) {
		t.Fatalf("KeepBad: %d rows, %d bad", len(kept), bad)
	}
	got, err := s.FetchPgx(ctx, pool, FetchQuery{Limit: 100, NowMillis: time.Now().UnixMilli()})
	if err != nil {
		t.Fatal(err)
	}
	checkParked(t, ctx, db, s, got, good)
}
