// Package migrate applies versioned, embedded SQL migrations. The library
// (outbox.Migrate, inbox.Migrate) and the CLI (exactly migrate) share it, so
// both produce the same schema and record it in the same table.
package migrate

import (
	"bytes"
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strconv"
	"strings"
	"text/template"
	"time"

	"github.com/exactlyonce/exactly/internal/sqldb"
)

// Step is one versioned migration: several statements applied together.
type Step struct {
	Version    int
	Name       string
	Statements []string
}

// separator splits a migration file into statements; function bodies keep
// their semicolons.
const separator = "\n-- statement\n"

// Load reads the migrations for a dialect from dir/<dialect>/NNN_name.sql in
// fsys, renders them as templates with data, and returns them by version.
func Load(fsys fs.FS, dir string, d sqldb.Dialect, data any) ([]Step, error) {
	root := path.Join(dir, string(d))
	entries, err := fs.ReadDir(fsys, root)
	if err != nil {
		return nil, fmt.Errorf("migrations for %s: %w", d, err)
	}
	var steps []Step
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, ".sql") {
			continue
		}
		num, rest, ok := strings.Cut(name, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil {
			return nil, fmt.Errorf("migration file %s: name must be NNN_name.sql", name)
		}
		raw, err := fs.ReadFile(fsys, path.Join(root, name))
		if err != nil {
			return nil, err
		}
		tpl, err := template.New(name).Option("missingkey=error").Parse(string(raw))
		if err != nil {
			return nil, fmt.Errorf("migration %s: %w", name, err)
		}
		var buf bytes.Buffer
		if err := tpl.Execute(&buf, data); err != nil {
			return nil, fmt.Errorf("migration %s: %w", name, err)
		}
		var stmts []string
		for _, s := range strings.Split(buf.String(), separator) {
			if s = strings.TrimSpace(s); s != "" {
				stmts = append(stmts, s)
			}
		}
		steps = append(steps, Step{Version: v, Name: strings.TrimSuffix(rest, ".sql"), Statements: stmts})
	}
	slices.SortFunc(steps, func(a, b Step) int { return a.Version - b.Version })
	for i, s := range steps {
		if s.Version != i+1 {
			return nil, fmt.Errorf("migrations for %s: version %d follows %d; versions must be 1, 2, 3...", d, s.Version, i)
		}
	}
	return steps, nil
}

// Migrator applies steps for one scope (say "outbox:exactly_outbox").
type Migrator struct {
	DB      *sql.DB
	Dialect sqldb.Dialect
	// Schema holds the bookkeeping table; empty for the connection's default.
	Schema string
	Scope  string
	Steps  []Step
	// Check, when set, reads the tables of the scope and returns a
	// *sqldb.SchemaError when they do not have the columns the code needs.
	// Apply runs it once every step is applied (a migration keeps a table
	// that already exists as it is), Verify at the start of a relay or
	// consumer.
	Check func(ctx context.Context, q sqldb.Querier) error
}

func (m *Migrator) table() string {
	return sqldb.Ident{Schema: m.Schema, Name: "exactly_migrations"}.Quoted(m.Dialect)
}

// Pending returns the steps not yet applied, without changing anything. A
// database that does not have the bookkeeping table has every step pending.
// When every step is recorded but the tables fail m.Check (dropped or
// changed by hand), it returns the error Apply would.
func (m *Migrator) Pending(ctx context.Context) ([]Step, error) {
	applied, err := m.applied(ctx, m.DB)
	if err != nil {
		// No bookkeeping table yet: everything is pending.
		if ok, _ := m.hasTable(ctx); !ok {
			return m.Steps, nil
		}
		return nil, err
	}
	pending, err := m.pendingOf(applied)
	if err != nil || len(pending) > 0 || len(applied) == 0 {
		return pending, err
	}
	// Up to date by the records: Apply would refuse tables dropped or
	// changed by hand, and so does its dry run.
	if err := m.check(ctx, m.DB); err != nil {
		return nil, fmt.Errorf("migrate %s: %w", m.Scope, m.recordedButUnusable(applied, err))
	}
	return nil, nil
}

func (m *Migrator) pendingOf(applied []int) ([]Step, error) {
	if len(applied) > 0 && applied[len(applied)-1] > len(m.Steps) {
		return nil, fmt.Errorf("%s: the database is at schema version %d, newer than this build knows (%d); upgrade exactly",
			m.Scope, applied[len(applied)-1], len(m.Steps))
	}
	var out []Step
	for _, s := range m.Steps {
		if !slices.Contains(applied, s.Version) {
			out = append(out, s)
		}
	}
	return out, nil
}

func (m *Migrator) hasTable(ctx context.Context) (bool, error) {
	var n int
	err := m.DB.QueryRowContext(ctx, "SELECT count(*) FROM "+m.table()).Scan(&n)
	return err == nil, err
}

type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

func (m *Migrator) applied(ctx context.Context, q querier) ([]int, error) {
	a := sqldb.NewArgs(m.Dialect)
	rows, err := q.QueryContext(ctx, "SELECT version FROM "+m.table()+" WHERE scope = "+a.Add(m.Scope)+" ORDER BY version", a.Vals...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []int
	for rows.Next() {
		var v int
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// Apply brings the schema up to date and returns the versions it applied. It
// is safe to run concurrently from several processes: PostgreSQL takes an
// advisory lock, MySQL a named lock, SQLite an immediate transaction.
func (m *Migrator) Apply(ctx context.Context) ([]int, error) {
	conn, err := m.DB.Conn(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()

	create := "CREATE TABLE IF NOT EXISTS " + m.table() + ` (
		scope VARCHAR(255) NOT NULL,
		version INTEGER NOT NULL,
		name VARCHAR(255) NOT NULL,
		applied_at BIGINT NOT NULL,
		PRIMARY KEY (scope, version))`
	lockName := "exactly_migrate:" + m.Scope
	switch m.Dialect {
	case sqldb.Postgres:
		if _, err := conn.ExecContext(ctx, "SELECT pg_advisory_lock(hashtext($1))", lockName); err != nil {
			return nil, fmt.Errorf("migrate: lock: %w", err)
		}
		defer unlock(ctx, conn, "SELECT pg_advisory_unlock(hashtext($1))", lockName)
	case sqldb.MySQL:
		var got sql.NullInt64
		if err := conn.QueryRowContext(ctx, "SELECT GET_LOCK(?, 60)", lockName).Scan(&got); err != nil || got.Int64 != 1 {
			return nil, fmt.Errorf("migrate: could not take lock %q within 60s (err=%v)", lockName, err)
		}
		defer unlock(ctx, conn, "SELECT RELEASE_LOCK(?)", lockName)
	case sqldb.SQLite:
		if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
			return nil, fmt.Errorf("migrate: lock: %w", err)
		}
		committed := false
		defer func() {
			if !committed {
				conn.ExecContext(context.WithoutCancel(ctx), "ROLLBACK")
			}
		}()
		done, err := m.applySteps(ctx, conn, create, false)
		if err != nil {
			return nil, err // rolled back, bookkeeping included
		}
		if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
			return nil, fmt.Errorf("migrate: commit: %w", err)
		}
		committed = true
		return done, nil
	}
	return m.applySteps(ctx, conn, create, m.Dialect == sqldb.Postgres)
}

// unlock releases a session lock. When that fails, the connection is
// discarded rather than returned to the pool: closing the session releases
// the lock, so another migrate is never left waiting for it.
func unlock(ctx context.Context, conn *sql.Conn, q, name string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if _, err := conn.ExecContext(ctx, q, name); err != nil {
		_ = conn.Raw(func(any) error { return driver.ErrBadConn })
	}
}

// createBookkeeping creates the table of applied versions if it is missing.
// Every scope shares it while the migration lock is per scope, and two
// PostgreSQL sessions running CREATE TABLE IF NOT EXISTS at once can both
// try to create it (23505 on the catalog), so there the create runs under a
// transaction-scoped lock of its own. MySQL and SQLite serialize it already.
func (m *Migrator) createBookkeeping(ctx context.Context, conn *sql.Conn, create string) error {
	if m.Dialect != sqldb.Postgres {
		_, err := conn.ExecContext(ctx, create)
		return err
	}
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", "exactly_migrate:"+m.table()); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, create); err != nil {
		return err
	}
	return tx.Commit()
}

// applySteps runs on a connection that holds the migration lock. With perTx
// each step commits atomically with its bookkeeping row (PostgreSQL has
// transactional DDL; MySQL does not, so its statements are written to be
// re-runnable). Once every step is applied, m.Check must pass (on
// PostgreSQL in the last step's transaction); when it does not, the
// versions this run recorded are taken back.
func (m *Migrator) applySteps(ctx context.Context, conn *sql.Conn, create string, perTx bool) ([]int, error) {
	if err := m.createBookkeeping(ctx, conn, create); err != nil {
		return nil, fmt.Errorf("migrate: create %s: %w", m.table(), err)
	}
	applied, err := m.applied(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("migrate: read applied versions: %w", err)
	}
	pending, err := m.pendingOf(applied)
	if err != nil {
		return nil, err
	}
	if len(pending) == 0 {
		if err := m.check(ctx, conn); err != nil {
			return nil, fmt.Errorf("migrate %s: %w", m.Scope, m.recordedButUnusable(applied, err))
		}
		return nil, nil
	}
	var done []int
	for i, s := range pending {
		var final func(sqldb.Querier) error
		if perTx && i == len(pending)-1 {
			final = func(q sqldb.Querier) error { return m.check(ctx, q) }
		}
		if err := m.applyStep(ctx, conn, s, perTx, final); err != nil {
			var se *sqldb.SchemaError
			if !errors.As(err, &se) {
				// A statement failed: say what is wrong with a table that
				// was already there, if that is the cause. The first step
				// of this run is the one that met that table (a later step
				// fails on what it kept).
				if cerr := m.check(ctx, conn); errors.As(cerr, &se) && !se.Missing {
					err = fmt.Errorf("%w; the table was there before and cannot be used: rename or drop it, or choose another table name\n  (%w)", se, err)
					s = pending[0]
				}
			} else {
				err = existingTable(se)
			}
			m.takeBack(ctx, conn, done)
			return nil, fmt.Errorf("migrate %s: version %d (%s): %w", m.Scope, s.Version, s.Name, err)
		}
		done = append(done, s.Version)
	}
	if !perTx {
		if err := m.check(ctx, conn); err != nil {
			var se *sqldb.SchemaError
			if errors.As(err, &se) {
				err = existingTable(se)
			}
			m.takeBack(ctx, conn, done)
			last := pending[len(pending)-1]
			return nil, fmt.Errorf("migrate %s: version %d (%s): %w", m.Scope, last.Version, last.Name, err)
		}
	}
	return done, nil
}

func existingTable(se *sqldb.SchemaError) error {
	if se.Missing {
		return se
	}
	return fmt.Errorf("%w; the table was there before and the migration keeps an existing table as it is: rename or drop it, or choose another table name", se)
}

func (m *Migrator) check(ctx context.Context, q sqldb.Querier) error {
	if m.Check == nil {
		return nil
	}
	return m.Check(ctx, q)
}

// takeBack deletes the bookkeeping rows of versions this run recorded but
// whose result cannot be used, so that the schema is not reported as
// migrated. (SQLite rolls them back instead; PostgreSQL's last step never
// commits.)
func (m *Migrator) takeBack(ctx context.Context, conn *sql.Conn, versions []int) {
	if len(versions) == 0 || m.Dialect == sqldb.SQLite {
		return
	}
	vs := make([]int64, len(versions))
	for i, v := range versions {
		vs[i] = int64(v)
	}
	a := sqldb.NewArgs(m.Dialect)
	q := "DELETE FROM " + m.table() + " WHERE scope = " + a.Add(m.Scope) + " AND " + sqldb.In(a, "version", vs, false)
	_, _ = conn.ExecContext(context.WithoutCancel(ctx), q, a.Vals...)
}

// ResetSQL is the statement that makes the migrations of the scope run
// again from version 1, for tables dropped by hand.
func (m *Migrator) ResetSQL() string {
	return "DELETE FROM " + m.table() + " WHERE scope = '" + m.Scope + "'"
}

// recordedButUnusable explains a table whose versions are recorded but
// that was dropped or changed since.
func (m *Migrator) recordedButUnusable(applied []int, err error) error {
	var se *sqldb.SchemaError
	if !errors.As(err, &se) {
		return fmt.Errorf("migrate %s: checking the tables: %w", m.Scope, err)
	}
	what := "to create it again, run this statement, then migrate again"
	if !se.Missing {
		what = "to create it again, rename or drop it, run this statement, then migrate again"
	}
	return fmt.Errorf("%w, but exactly_migrations records its migrations as applied (version %s): it was dropped or changed by hand. "+
		"Migrate applies nothing while they are recorded; %s:\n  %s;",
		se, joinInts(applied), what, m.ResetSQL())
}

// Verify checks, without changing anything, that the tables of the scope
// can be used; relays and consumers call it before they start. migrateHint
// says how to apply the migrations (for example "outbox.Migrate or
// `exactly migrate --only outbox`"). A table that is not usable is an error
// wrapping a *sqldb.SchemaError that says what is wrong and what to do:
// apply the migrations when none are recorded, else how to reset them.
func (m *Migrator) Verify(ctx context.Context, migrateHint string) error {
	err := m.check(ctx, m.DB)
	var se *sqldb.SchemaError
	if err == nil || !errors.As(err, &se) {
		return err
	}
	applied, aerr := m.applied(ctx, m.DB)
	if aerr != nil || len(applied) == 0 {
		if se.Missing {
			return fmt.Errorf("%w: apply the migrations first (%s)", se, migrateHint)
		}
		return fmt.Errorf("%w; it was not created by the migrations (none are recorded for %s): rename or drop it and apply them (%s), or choose another table name", se, m.Scope, migrateHint)
	}
	return m.recordedButUnusable(applied, se)
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ", ")
}

// applyStep applies one step and records it. With perTx it runs in a
// transaction that is rolled back on any failure; final, when set, runs in
// that transaction before it commits.
func (m *Migrator) applyStep(ctx context.Context, conn *sql.Conn, s Step, perTx bool, final func(sqldb.Querier) error) (err error) {
	type execer interface {
		ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
		QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	}
	var ex execer = conn
	var tx *sql.Tx
	if perTx {
		var berr error
		if tx, berr = conn.BeginTx(ctx, nil); berr != nil {
			return berr
		}
		// Every failure below rolls back: an open transaction would keep
		// the connection, and with it the session's lock, forever.
		defer func() {
			if err != nil {
				_ = tx.Rollback()
			}
		}()
		ex = tx
	}
	for _, stmt := range s.Statements {
		if _, err := ex.ExecContext(ctx, stmt); err != nil {
			return fmt.Errorf("%w\n  in statement: %s", err, firstLine(stmt))
		}
	}
	a := sqldb.NewArgs(m.Dialect)
	q := "INSERT INTO " + m.table() + " (scope, version, name, applied_at) VALUES (" +
		a.Add(m.Scope) + ", " + a.Add(s.Version) + ", " + a.Add(s.Name) + ", " + a.Add(time.Now().UnixMilli()) + ")"
	if _, err := ex.ExecContext(ctx, q, a.Vals...); err != nil {
		return err
	}
	if final != nil {
		if err := final(ex); err != nil {
			return err
		}
	}
	if tx != nil {
		return tx.Commit()
	}
	return nil
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " ..."
	}
	return s
}

// Script renders steps as one SQL script, for dry runs.
func Script(steps []Step) string {
	var b strings.Builder
	for _, s := range steps {
		fmt.Fprintf(&b, "-- version %d: %s\n", s.Version, s.Name)
		for _, stmt := range s.Statements {
			b.WriteString(stmt)
			b.WriteString(";\n\n")
		}
	}
	return b.String()
}

// ApplyOn opens db (a *sql.DB or a *pgxpool.Pool), builds its migrator
// with build and applies what is pending: the body of each public
// ApplyMigrations. It returns the versions applied. A handle that cannot
// be used is an error starting with prefix ("outbox", "inbox", "kafka");
// the migrator's own errors name their scope already.
func ApplyOn(ctx context.Context, db any, prefix string, build func(*sql.DB) (*Migrator, error)) ([]int, error) {
	m, done, err := on(db, prefix, build)
	if err != nil {
		return nil, err
	}
	defer done()
	return m.Apply(ctx)
}

// ScriptOn is the SQL that ApplyOn would run now on db, without running
// it: the body of each public MigrationSQL. With db nil it is every step.
func ScriptOn(ctx context.Context, db any, prefix string, build func(*sql.DB) (*Migrator, error)) (string, error) {
	if db == nil {
		m, err := build(nil)
		if err != nil {
			return "", err
		}
		return Script(m.Steps), nil
	}
	m, done, err := on(db, prefix, build)
	if err != nil {
		return "", err
	}
	defer done()
	steps, err := m.Pending(ctx)
	if err != nil {
		return "", err
	}
	return Script(steps), nil
}

// on opens db and builds its migrator; done releases what Open took.
func on(db any, prefix string, build func(*sql.DB) (*Migrator, error)) (_ *Migrator, done func(), _ error) {
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", prefix, err)
	}
	m, err := build(sdb)
	if err != nil {
		done()
		return nil, nil, err
	}
	return m, done, nil
}
