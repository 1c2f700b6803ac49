package migrate_test

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/exactlyonce/exactly/internal/migrate"
	"github.com/exactlyonce/exactly/internal/sqldb"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// applyWithin runs m.Apply and fails the test when it does not return
// within d.
func applyWithin(t *testing.T, m *migrate.Migrator, d time.Duration) error {
	t.Helper()
	ch := make(chan error, 1)
	go func() { _, err := m.Apply(context.Background()); ch <- err }()
	select {
	case err := <-ch:
		return err
	case <-time.After(d):
		t.Fatalf("Apply of %s did not return within %s", m.Scope, d)
		return nil
	}
}

// TestFailedStepReleasesLock: on PostgreSQL a step whose statement fails is
// rolled back, Apply returns its error naming the step, the session lock is
// released and nothing is recorded, so the next Apply of the scope runs at
// once (it waited forever, behind a connection that could not close).
func TestFailedStepReleasesLock(t *testing.T) {
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	schema := fmt.Sprintf("migrate_lock_%d", time.Now().UnixNano()%1e12)
	if _, err := db.Exec("CREATE SCHEMA " + schema); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Exec("DROP SCHEMA " + schema + " CASCADE") })
	m := func() *migrate.Migrator {
		return &migrate.Migrator{DB: db, Dialect: sqldb.Postgres, Schema: schema, Scope: "test:" + schema, Steps: []migrate.Step{{
			Version: 1, Name: "broken",
			Statements: []string{"CREATE TABLE " + schema + ".t (id int)", "CREATE INDEX ON " + schema + ".t (no_such_column)"},
		}}}
	}
	for i := range 2 {
		err := applyWithin(t, m(), 20*time.Second)
		if err == nil || !strings.Contains(err.Error(), "version 1 (broken)") || !strings.Contains(err.Error(), "no_such_column") {
			t.Fatalf("Apply %d = %v, want the failed step's error", i, err)
		}
	}
	var n int
	if err := db.QueryRow("SELECT count(*) FROM " + schema + ".exactly_migrations").Scan(&n); err != nil || n != 0 {
		t.Errorf("recorded versions after a failed step: %d %v", n, err)
	}
	if err := db.QueryRow("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = hashtext($1)::oid",
		"exactly_migrate:test:"+schema).Scan(&n); err != nil || n != 0 {
		t.Errorf("advisory locks held after Apply returned: %d %v", n, err)
	}
	var exists bool
	if err := db.QueryRow("SELECT to_regclass($1) IS NOT NULL", schema+".t").Scan(&exists); err != nil || exists {
		t.Errorf("the failed step's table was kept: %v %v", exists, err)
	}
}

// TestScopesMigrateAtOnce: migrations of different scopes take different
// locks but share the bookkeeping table; the first ones to run at the same
// moment on a fresh PostgreSQL schema all create it (CREATE TABLE IF NOT
// EXISTS raced to a duplicate key on the catalog, 23505, before).
func TestScopesMigrateAtOnce(t *testing.T) {
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for round := range 10 {
		schema := fmt.Sprintf("migrate_race_%d_%d", time.Now().UnixNano()%1e12, round)
		if _, err := db.Exec("CREATE SCHEMA " + schema); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Exec("DROP SCHEMA " + schema + " CASCADE") })
		const n = 8
		errs := make(chan error, n)
		start := make(chan struct{})
		for i := range n {
			m := &migrate.Migrator{DB: db, Dialect: sqldb.Postgres, Schema: schema, Scope: fmt.Sprintf("test:%s:%d", schema, i),
				Steps: []migrate.Step{{Version: 1, Name: "t", Statements: []string{fmt.Sprintf("CREATE TABLE %s.t%d (id int)", schema, i)}}}}
			go func() {
				<-start
				_, err := m.Apply(context.Background())
				errs <- err
			}()
		}
		close(start)
		for range n {
			if err := <-errs; err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		var recorded int
		if err := db.QueryRow("SELECT count(*) FROM " + schema + ".exactly_migrations").Scan(&recorded); err != nil || recorded != n {
			t.Fatalf("round %d: %d versions recorded (%v), want %d", round, recorded, err, n)
		}
	}
}
