package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
)

// run executes cmd with args and returns what it printed.
func run(t *testing.T, cmd *cobra.Command, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

func mustRun(t *testing.T, cmd *cobra.Command, args ...string) string {
	t.Helper()
	out, err := run(t, cmd, args...)
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return out
}

func uniqueName(prefix string) string {
	return fmt.Sprintf("%s_%d", prefix, time.Now().UnixNano()%1e12)
}

func pgDB(t *testing.T) *sql.DB {
	t.Helper()
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// outboxFixture migrates a fresh outbox table, enqueues five messages and
// parks three of them (two on topic "orders", one on "payments").
func outboxFixture(t *testing.T) (db *sql.DB, table string, dead, pending []*exactly.Message) {
	t.Helper()
	db = pgDB(t)
	ctx := context.Background()
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "ops_ob")
	table = ob.Table()
	msgs := []*exactly.Message{
		{Topic: "orders", Key: "o-1", Payload: []byte("1")},
		{Topic: "orders", Key: "o-2", Payload: []byte("2")},
		{Topic: "payments", Key: "p-1", Payload: []byte("3")},
		{Topic: "orders", Key: "o-3", Payload: []byte("4")},
		{Topic: "payments", Key: "p-2", Payload: []byte("5")},
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Enqueue(ctx, tx, msgs...); err != nil {
		tx.Rollback()
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	dead, pending = msgs[:3], msgs[3:]
	for i, m := range dead {
		_, err := db.ExecContext(ctx, "UPDATE "+table+" SET status = 2, attempts = $1, last_error = $2, done_at = $3 WHERE id = $4",
			5+i, fmt.Sprintf("broker said no to %s\nsecond line", m.Key), time.Now().UnixMilli(), m.ID)
		if err != nil {
			t.Fatal(err)
		}
	}
	return db, table, dead, pending
}

func countStatus(t *testing.T, db *sql.DB, table string, status int) int {
	t.Helper()
	var n int
	if err := db.QueryRow("SELECT count(*) FROM "+table+" WHERE status = $1", status).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestOutboxStatus(t *testing.T) {
	_, table, _, _ := outboxFixture(t)
	dsn := testenv.PostgresDSN()
	out := mustRun(t, outboxCmd(), "status", "--db", dsn, "--table", table)
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^pending\s+2$`),
		regexp.MustCompile(`(?m)^dead\s+3$`),
		regexp.MustCompile(`(?m)^oldest pending age\s+\d`),
		regexp.MustCompile(`(?m)^TOPIC\s+PENDING\s+DEAD\s+OLDEST PENDING AGE$`),
		regexp.MustCompile(`(?m)^orders\s+1\s+2\s+\d`),
		regexp.MustCompile(`(?m)^payments\s+1\s+1\s+\d`),
	} {
		if !want.MatchString(out) {
			t.Errorf("status lacks %s:\n%s", want, out)
		}
	}

	out = mustRun(t, outboxCmd(), "status", "--db", dsn, "--table", table, "--json")
	var st statusJSON
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if st.Pending != 2 || st.Dead != 3 || len(st.Topics) != 2 || st.Topics[0].Topic != "orders" || st.Topics[0].Dead != 2 {
		t.Errorf("status --json: %+v", st)
	}

	// EXACTLY_DB stands in for --db.
	t.Setenv("EXACTLY_DB", dsn)
	out = mustRun(t, outboxCmd(), "status", "--table", table)
	if !strings.Contains(out, "dead") {
		t.Errorf("status with EXACTLY_DB:\n%s", out)
	}
}

func TestOutboxDeadListRetryPurge(t *testing.T) {
	db, table, dead, pending := outboxFixture(t)
	dsn := testenv.PostgresDSN()
	base := []string{"--db", dsn, "--table", table}

	out := mustRun(t, outboxCmd(), append([]string{"dead", "list"}, base...)...)
	for _, m := range dead {
		if !regexp.MustCompile(regexp.QuoteMeta(m.ID) + `\s+` + m.Topic + `\s+` + m.Key + `\s+\d\s+\S+\s+broker said no to ` + m.Key + ` second line`).MatchString(out) {
			t.Errorf("dead list lacks %s %s:\n%s", m.ID, m.Key, out)
		}
	}
	for _, m := range pending {
		if strings.Contains(out, m.ID) {
			t.Errorf("dead list shows pending %s:\n%s", m.ID, out)
		}
	}

	out = mustRun(t, outboxCmd(), append([]string{"dead", "list", "--topic", "orders", "--json"}, base...)...)
	var list []deadJSON
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("dead list --json: %v\n%s", err, out)
	}
	if len(list) != 2 || list[0].ID != dead[0].ID || list[1].ID != dead[1].ID || list[0].Attempts != 5 ||
		!strings.HasPrefix(list[0].LastError, "broker said no to o-1\n") || list[0].DeadAt == nil {
		t.Errorf("dead list --topic orders --json: %+v", list)
	}

	out = mustRun(t, outboxCmd(), append([]string{"dead", "list", "--limit", "1"}, base...)...)
	if !strings.Contains(out, dead[0].ID) || strings.Contains(out, dead[1].ID) || !strings.Contains(out, "raise --limit") {
		t.Errorf("dead list --limit 1:\n%s", out)
	}

	// Retry one by id.
	out = mustRun(t, outboxCmd(), append([]string{"dead", "retry", "--id", dead[1].ID}, base...)...)
	if !strings.Contains(out, "retried 1 dead message") {
		t.Errorf("retry --id: %s", out)
	}
	if p, d := countStatus(t, db, table, 0), countStatus(t, db, table, 2); p != 3 || d != 2 {
		t.Errorf("after retry --id: pending %d dead %d, want 3 and 2", p, d)
	}
	var attempts int
	if err := db.QueryRow("SELECT attempts FROM "+table+" WHERE id = $1 AND status = 0", dead[1].ID).Scan(&attempts); err != nil || attempts != 0 {
		t.Errorf("retried message: attempts %d, err %v", attempts, err)
	}

	// Purge without a filter and without --yes refuses and changes nothing.
	out, err := run(t, outboxCmd(), append([]string{"dead", "purge"}, base...)...)
	if err == nil || !strings.Contains(err.Error(), "--yes") {
		t.Errorf("purge without --yes: got %v\n%s", err, out)
	}
	if d := countStatus(t, db, table, 2); d != 2 {
		t.Errorf("refused purge changed the dead count to %d", d)
	}

	// Purge with a filter needs no --yes.
	out = mustRun(t, outboxCmd(), append([]string{"dead", "purge", "--topic", "payments"}, base...)...)
	if !strings.Contains(out, "purged 1 dead message") {
		t.Errorf("purge --topic: %s", out)
	}

	// Retry without a filter and without --yes refuses and changes nothing.
	out, err = run(t, outboxCmd(), append([]string{"dead", "retry"}, base...)...)
	if err == nil || !strings.Contains(err.Error(), "refusing to retry every dead message") || !strings.Contains(err.Error(), "--yes") {
		t.Errorf("retry without --yes: got %v\n%s", err, out)
	}
	if d := countStatus(t, db, table, 2); d != 1 {
		t.Errorf("refused retry changed the dead count to %d", d)
	}

	// Retry everything left, park it again, then purge --yes: only dead rows go.
	out = mustRun(t, outboxCmd(), append([]string{"dead", "retry", "--yes"}, base...)...)
	if !strings.Contains(out, "retried 1 dead message") {
		t.Errorf("retry: %s", out)
	}
	if _, err := db.Exec("UPDATE "+table+" SET status = 2, done_at = $1 WHERE id = $2", time.Now().UnixMilli(), dead[0].ID); err != nil {
		t.Fatal(err)
	}
	out = mustRun(t, outboxCmd(), append([]string{"dead", "purge", "--yes"}, base...)...)
	if !strings.Contains(out, "purged 1 dead message") {
		t.Errorf("purge --yes: %s", out)
	}
	if p, d := countStatus(t, db, table, 0), countStatus(t, db, table, 2); p != 3 || d != 0 {
		t.Errorf("after purge --yes: pending %d dead %d, want 3 and 0", p, d)
	}
	out = mustRun(t, outboxCmd(), append([]string{"dead", "list"}, base...)...)
	if !strings.Contains(out, "no dead messages") {
		t.Errorf("dead list after purge:\n%s", out)
	}
}

func TestInboxGC(t *testing.T) {
	db := pgDB(t)
	ctx := context.Background()
	table := uniqueName("ops_ib")
	inboxes := map[string]*inbox.SQL{}
	for _, c := range []string{"billing", "shipping"} {
		in, err := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Table: table, Consumer: c})
		if err != nil {
			t.Fatal(err)
		}
		inboxes[c] = in
	}
	if err := inboxes["billing"].Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.Exec("DROP TABLE IF EXISTS " + table)
		db.Exec("DELETE FROM exactly_migrations WHERE scope = $1", "inbox:"+table)
	})
	noop := func(context.Context, *sql.Tx) error { return nil }
	for c, n := range map[string]int{"billing": 3, "shipping": 2} {
		for i := range n {
			msg := &exactly.Message{ID: fmt.Sprintf("m-%d", i), Topic: "orders"}
			if o, err := inboxes[c].Handle(ctx, db, msg, noop); err != nil || o != inbox.Processed {
				t.Fatalf("handle %s %s: %v %v", c, msg.ID, o, err)
			}
		}
	}
	dsn := testenv.PostgresDSN()
	out := mustRun(t, inboxCmd(), "gc", "--db", dsn, "--table", table, "--consumer", "billing", "--older-than", "24h")
	if !strings.Contains(out, "deleted 0 inbox record") {
		t.Errorf("gc --older-than 24h: %s", out)
	}
	// Below the floor of a minute: refused, the records written just now stay.
	for _, age := range []string{"1ns", "59s"} {
		out, err := run(t, inboxCmd(), "gc", "--db", dsn, "--table", table, "--consumer", "billing", "--older-than", age)
		if err == nil || !strings.Contains(err.Error(), "below the floor of 1m0s") || !strings.Contains(err.Error(), "applied twice") {
			t.Errorf("gc --older-than %s: got %v\n%s", age, err, out)
		}
	}
	var left int
	if err := db.QueryRow("SELECT count(*) FROM " + table + " WHERE consumer = 'billing'").Scan(&left); err != nil || left != 3 {
		t.Fatalf("after the refused gc: %d billing records (%v), want 3", left, err)
	}
	// Two hours old: gone with --older-than 1h.
	if _, err := db.Exec("UPDATE "+table+" SET processed_at = processed_at - $1 WHERE consumer = 'billing'", int64(2*time.Hour/time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	out = mustRun(t, inboxCmd(), "gc", "--db", dsn, "--table", table, "--consumer", "billing", "--older-than", "1h", "--batch", "2")
	if !strings.Contains(out, "deleted 3 inbox record") {
		t.Errorf("gc --older-than 1h: %s", out)
	}
	var billing, shipping int
	if err := db.QueryRow("SELECT count(*) FILTER (WHERE consumer = 'billing'), count(*) FILTER (WHERE consumer = 'shipping') FROM "+table).Scan(&billing, &shipping); err != nil {
		t.Fatal(err)
	}
	if billing != 0 || shipping != 2 {
		t.Errorf("after gc: billing %d shipping %d records, want 0 and 2", billing, shipping)
	}
}

func TestOpsBadInput(t *testing.T) {
	t.Setenv("EXACTLY_DB", "")
	const unreachable = "postgres://u:secret@127.0.0.1:1/db"
	for _, tc := range []struct {
		cmd  func() *cobra.Command
		args string
		want string
	}{
		{outboxCmd, "status", "no database given"},
		{outboxCmd, "dead list", "no database given"},
		{outboxCmd, "dead retry --yes", "no database given"},
		{outboxCmd, "dead retry --db " + unreachable, "refusing to retry every dead message"},
		{outboxCmd, "dead purge --yes", "no database given"},
		{outboxCmd, "dead purge --db " + unreachable, "refusing to purge every dead message"},
		{outboxCmd, "status --db oracle://u:secret@x/db", "unrecognised database DSN"},
		{outboxCmd, "status --db " + unreachable + " --table bad;name", "unsafe table name"},
		{outboxCmd, "status --db " + unreachable, "cannot reach the database"},
		{outboxCmd, "dead list --db " + unreachable + " --limit -1", "--limit must not be negative"},
		{outboxCmd, "dead list --db " + unreachable + " --limit x", "invalid argument"},
		{inboxCmd, "gc --consumer c --older-than 1h", "no database given"},
		{inboxCmd, "gc --db " + unreachable + " --older-than 1h", "--consumer is required"},
		{inboxCmd, "gc --db " + unreachable + " --consumer c", "--older-than is required"},
		{inboxCmd, "gc --db " + unreachable + " --consumer c --older-than soon", "invalid argument"},
		{inboxCmd, "gc --db " + unreachable + " --consumer c --older-than 0s", "below the floor of 1m0s"},
		{inboxCmd, "gc --db " + unreachable + " --consumer c --older-than -1h", "below the floor of 1m0s"},
		{inboxCmd, "gc --db " + unreachable + " --consumer c --older-than 1ns", "below the floor of 1m0s"},
		{inboxCmd, "gc --db " + unreachable + " --consumer c --older-than 1h --batch -1", "--batch must not be negative"},
		{inboxCmd, "gc --db " + unreachable + " --consumer c --older-than 1h", "cannot reach the database"},
	} {
		out, err := run(t, tc.cmd(), strings.Fields(tc.args)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.args, err, tc.want)
		}
		if strings.Contains(out, "secret") || (err != nil && strings.Contains(err.Error(), "secret")) {
			t.Errorf("%s: the password leaked: %v\n%s", tc.args, err, out)
		}
	}
}

// Keys, topics and errors holding terminal escape sequences are shown
// escaped in the text listing; --json keeps them as they are.
func TestDeadListEscapesControlCharacters(t *testing.T) {
	db := pgDB(t)
	ctx := context.Background()
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "ops_esc")
	msg := &exactly.Message{Topic: "orders", Key: "k-\x1b[2J\x1b[31mred", Payload: []byte("1")}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Enqueue(ctx, tx, msg); err != nil {
		tx.Rollback()
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, "UPDATE "+ob.Table()+" SET status = 2, attempts = 3, last_error = $1, done_at = $2 WHERE id = $3",
		"refused \x1b]0;owned\x07 \u202eevil\x7f\u0085", time.Now().UnixMilli(), msg.ID); err != nil {
		t.Fatal(err)
	}
	base := []string{"--db", testenv.PostgresDSN(), "--table", ob.Table()}
	out := mustRun(t, outboxCmd(), append([]string{"dead", "list"}, base...)...)
	for _, r := range out {
		if (r < 0x20 && r != '\n') || r == 0x7f || (r >= 0x80 && r < 0xa0) || r == '\u202e' {
			t.Fatalf("dead list prints control character %U raw:\n%q", r, out)
		}
	}
	for _, want := range []string{`k-\x1b[2J\x1b[31mred`, `refused \x1b]0;owned\x07 \u202eevil\x7f\x85`} {
		if !strings.Contains(out, want) {
			t.Errorf("dead list lacks %s:\n%s", want, out)
		}
	}
	// outbox status names the topics; a topic written by another producer
	// may hold escapes too.
	if _, err := db.ExecContext(ctx, "UPDATE "+ob.Table()+" SET topic = $1 WHERE id = $2", "orders-\x1b[2J", msg.ID); err != nil {
		t.Fatal(err)
	}
	status := mustRun(t, outboxCmd(), append([]string{"status"}, base...)...)
	if strings.ContainsRune(status, 0x1b) || !strings.Contains(status, `orders-\x1b[2J`) {
		t.Errorf("outbox status prints the topic's escape raw:\n%q", status)
	}
	out = mustRun(t, outboxCmd(), append([]string{"dead", "list", "--json"}, base...)...)
	var list []deadJSON
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 1 || list[0].Key != msg.Key {
		t.Errorf("dead list --json: %v %+v", err, list)
	}
}

// The help of every command taking --db shows the MySQL DSN quoted, as the
// shell needs it.
func TestHelpQuotesMySQLDSN(t *testing.T) {
	const quoted = `'mysql://root@tcp(127.0.0.1:3306)/test'`
	for _, args := range [][]string{{"relay", "--help"}, {"outbox", "status", "--help"}, {"outbox", "dead", "list", "--help"},
		{"outbox", "dead", "retry", "--help"}, {"outbox", "dead", "purge", "--help"}, {"inbox", "gc", "--help"}, {"migrate", "--help"}} {
		out := mustRun(t, newRoot(), args...)
		if !strings.Contains(out, quoted) {
			t.Errorf("%v: the help lacks %s:\n%s", args, quoted, out)
		}
		if strings.Contains(strings.ReplaceAll(out, quoted, ""), "mysql://user@tcp(") {
			t.Errorf("%v: an unquoted MySQL DSN:\n%s", args, out)
		}
	}
}
