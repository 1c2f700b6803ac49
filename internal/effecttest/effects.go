// Package effecttest counts a test's effects per message id: a SQL inbox on
// PostgreSQL and a table its handler writes one row to per applied message,
// in the inbox's transaction, for the broker fault tests.
package effecttest

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// Effects is a test's SQL inbox and the table its handler writes one row
// to per applied message, in the inbox's transaction, on PostgreSQL; and
// how many times the handler ran per id, duplicates included.
type Effects struct {
	t     *testing.T
	db    *sql.DB
	In    *inbox.SQL
	table string

	mu   sync.Mutex
	runs map[string]int
}

func New(t *testing.T, prefix, consumer string) *Effects {
	t.Helper()
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(10)
	t.Cleanup(func() { db.Close() })
	table := prefix + strings.ReplaceAll(exactly.NewID(), "-", "")[:20]
	in, err := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Table: table, Consumer: consumer})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := in.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, "CREATE TABLE "+table+"_effects (seq BIGSERIAL PRIMARY KEY, id TEXT NOT NULL, msg_key TEXT NOT NULL, payload TEXT NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = db.ExecContext(ctx, "DROP TABLE IF EXISTS "+table+", "+table+"_effects")
		_, _ = db.ExecContext(ctx, "DELETE FROM exactly_migrations WHERE scope = $1", "inbox:"+table)
	})
	return &Effects{t: t, db: db, In: in, table: table, runs: map[string]int{}}
}

// Handler counts the run, then through the inbox runs before (an error
// rolls the transaction back), writes the effect and commits, then runs
// after.
func (e *Effects) Handler(before, after func(context.Context, *exactly.Message) error) exactly.Handler {
	apply := e.In.Handler(e.db, func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
		if before != nil {
			if err := before(ctx, m); err != nil {
				return err
			}
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+e.table+"_effects (id, msg_key, payload) VALUES ($1, $2, $3)", m.ID, m.Key, string(m.Payload))
		return err
	})
	return func(ctx context.Context, m *exactly.Message) error {
		e.mu.Lock()
		e.runs[m.ID]++
		e.mu.Unlock()
		if err := apply(ctx, m); err != nil {
			return err
		}
		if after != nil {
			return after(ctx, m)
		}
		return nil
	}
}

func (e *Effects) RunsOf(id string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.runs[id]
}

// Applied returns the ids of the effects in the order they were written.
func (e *Effects) Applied() []string {
	e.t.Helper()
	rows, err := e.db.QueryContext(context.Background(), "SELECT id FROM "+e.table+"_effects ORDER BY seq")
	if err != nil {
		e.t.Fatalf("reading effects: %v", err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			e.t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		e.t.Fatal(err)
	}
	return ids
}

// Missing is how many of msgs have no effect yet.
func (e *Effects) Missing(msgs []*exactly.Message) int {
	have := map[string]bool{}
	for _, id := range e.Applied() {
		have[id] = true
	}
	n := 0
	for _, m := range msgs {
		if !have[m.ID] {
			n++
		}
	}
	return n
}

// WaitApplied waits until every message of msgs has an effect.
func (e *Effects) WaitApplied(msgs []*exactly.Message, timeout time.Duration) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		n := e.Missing(msgs)
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out after %v: %d of %d messages never applied", timeout, n, len(msgs))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// CheckOnce fails unless every message of msgs was applied exactly once and
// nothing else was, after a moment for late duplicates.
func (e *Effects) CheckOnce(msgs []*exactly.Message) {
	e.t.Helper()
	time.Sleep(500 * time.Millisecond)
	counts := map[string]int{}
	for _, id := range e.Applied() {
		counts[id]++
	}
	want := map[string]bool{}
	for i, m := range msgs {
		want[m.ID] = true
		if n := counts[m.ID]; n != 1 {
			e.t.Errorf("message %d (id %s, key %s) applied %d times, want once", i, m.ID, m.Key, n)
		}
	}
	for id, n := range counts {
		if !want[id] {
			e.t.Errorf("an effect for id %s (%d times) that the test never published", id, n)
		}
	}
	if e.t.Failed() {
		e.t.FailNow()
	}
}

// CheckKeyOrder fails unless the effects of each key were written in the
// order of msgs.
func (e *Effects) CheckKeyOrder(msgs []*exactly.Message) {
	e.t.Helper()
	pos := map[string]int{}
	key := map[string]string{}
	next := map[string]int{}
	for _, m := range msgs {
		key[m.ID], pos[m.ID] = m.Key, next[m.Key]
		next[m.Key]++
	}
	due := map[string]int{}
	for _, id := range e.Applied() {
		k := key[id]
		if pos[id] != due[k] {
			e.t.Fatalf("group %s: message #%d (id %s) applied where #%d was due: the group's order broken", k, pos[id], id, due[k])
		}
		due[k]++
	}
}

// String describes the handler runs, for a failure message.
func (e *Effects) String() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	total := 0
	for _, n := range e.runs {
		total += n
	}
	return fmt.Sprintf("%d handler runs over %d ids, %d duplicates absorbed by the inbox", total, len(e.runs), e.In.Stats().Duplicates)
}
