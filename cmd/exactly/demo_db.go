package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/exactlyonce/exactly"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/outbox"
)

// demoDB is the demo's database: the order service's tables, the outbox,
// the inbox and the offsets, all in one namespace of their own that the
// demo removes when it ends (a temporary SQLite file by default, a schema
// on PostgreSQL, a database on MySQL).
type demoDB struct {
	db      *sql.DB
	dialect string
	label   string       // what to call it in the output
	ns      string       // schema (PostgreSQL) or database (MySQL) of the run; "" for SQLite
	dsn     string       // what the console is given to open it (the SQLite file's for SQLite)
	drop    func() error // removes everything the run created
}

// table names a table of the run.
func (d *demoDB) table(name string) string {
	if d.ns == "" {
		return name
	}
	return d.ns + "." + name
}

// bind turns ? placeholders into $n on PostgreSQL.
func (d *demoDB) bind(q string) string {
	if d.dialect != outbox.Postgres {
		return q
	}
	var b strings.Builder
	n := 0
	for _, r := range q {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

const demoCustomers = 97

// openDemoDB opens dsn (the embedded SQLite file when empty) and creates
// the run's namespace and the order service's tables in it.
func openDemoDB(ctx context.Context, dsn, run string) (*demoDB, error) {
	d := &demoDB{}
	var dir string
	if dsn == "" {
		var err error
		if dir, err = os.MkdirTemp("", "exactly-demo-"); err != nil {
			return nil, err
		}
		dsn = "sqlite:" + filepath.Join(dir, "demo.db")
	}
	db, dialect, err := openDB(dsn)
	if err != nil {
		if dir != "" {
			os.RemoveAll(dir)
		}
		return nil, fmt.Errorf("--db: %w", err)
	}
	d.db, d.dialect, d.dsn = db, dialect, dsn
	d.drop = func() error { return nil }
	fail := func(err error) (*demoDB, error) {
		db.Close()
		if dir != "" {
			os.RemoveAll(dir)
		}
		return nil, err
	}
	if err := db.PingContext(ctx); err != nil {
		return fail(fmt.Errorf("--db: cannot reach the database %s: %s", hide.String(dsn), scrub(err, dsn)))
	}
	switch dialect {
	case outbox.SQLite:
		if dir != "" {
			d.label = "SQLite (embedded)"
			d.drop = func() error { return os.RemoveAll(dir) }
		} else {
			return fail(errors.New("--db: the demo takes a PostgreSQL or MySQL database, or none for its embedded SQLite; it does not write into an SQLite file of yours"))
		}
	case outbox.Postgres:
		d.label, d.ns = "PostgreSQL", "exactly_demo_"+run
		if _, err := db.ExecContext(ctx, "CREATE SCHEMA "+d.ns); err != nil {
			return fail(fmt.Errorf("--db: creating the demo's schema %s: %s", d.ns, scrub(err, dsn)))
		}
		d.drop = func() error {
			_, err := db.ExecContext(context.Background(), "DROP SCHEMA "+d.ns+" CASCADE")
			return err
		}
	case outbox.MySQL:
		d.label, d.ns = "MySQL", "exactly_demo_"+run
		if _, err := db.ExecContext(ctx, "CREATE DATABASE "+d.ns); err != nil {
			return fail(fmt.Errorf("--db: creating the demo's database %s: %s", d.ns, scrub(err, dsn)))
		}
		d.drop = func() error {
			_, err := db.ExecContext(context.Background(), "DROP DATABASE "+d.ns)
			return err
		}
	}
	stmts := []string{
		"CREATE TABLE " + d.table("customers") + " (id VARCHAR(64) PRIMARY KEY, points BIGINT NOT NULL)",
		"CREATE TABLE " + d.table("orders") + " (id VARCHAR(64) PRIMARY KEY, customer VARCHAR(64) NOT NULL, " +
			"amount_cents BIGINT NOT NULL, points BIGINT NOT NULL, event_id VARCHAR(128) NOT NULL)",
		// No unique key on order_id: a promotion applied twice must show.
		"CREATE TABLE " + d.table("promotions") + " (order_id VARCHAR(64) NOT NULL, event_id VARCHAR(128) NOT NULL, " +
			"customer VARCHAR(64) NOT NULL, points BIGINT NOT NULL, member VARCHAR(64) NOT NULL, attempt BIGINT NOT NULL)",
		"CREATE INDEX promotions_order_idx ON " + d.table("promotions") + " (order_id)",
	}
	for _, s := range stmts {
		if _, err := db.ExecContext(ctx, s); err != nil {
			d.drop()
			return fail(fmt.Errorf("creating the demo's tables: %w", err))
		}
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		d.drop()
		return fail(err)
	}
	for i := range demoCustomers {
		if _, err := tx.ExecContext(ctx, d.bind("INSERT INTO "+d.table("customers")+" (id, points) VALUES (?, 0)"), customerID(i)); err != nil {
			tx.Rollback()
			d.drop()
			return fail(err)
		}
	}
	if err := tx.Commit(); err != nil {
		d.drop()
		return fail(err)
	}
	return d, nil
}

// close removes the run's namespace and closes the database.
func (d *demoDB) close() error {
	err := d.drop()
	if cerr := d.db.Close(); err == nil {
		err = cerr
	}
	return err
}

func customerID(n int) string { return fmt.Sprintf("customer-%03d", n%demoCustomers) }

// order is what the order service writes and the promotion service reads.
type order struct {
	ID       string `json:"order_id"`
	Customer string `json:"customer"`
	Amount   int64  `json:"amount_cents"`
	Points   int64  `json:"points"`
}

// placeOrder is the order service's business transaction: the order row and
// its event commit together or not at all.
func (d *demoDB) placeOrder(ctx context.Context, ob *outbox.Outbox, topic string, n int64) error {
	o := order{ID: fmt.Sprintf("order-%06d", n), Customer: customerID(int(n)), Amount: 500 + n*7919%20000}
	o.Points = o.Amount / 100
	payload, err := json.Marshal(o)
	if err != nil {
		return err
	}
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	msg := &exactly.Message{Topic: topic, Key: o.Customer, Payload: payload}
	if err := ob.Enqueue(ctx, tx, msg); err != nil { // assigns msg.ID
		return err
	}
	if _, err := tx.ExecContext(ctx, d.bind("INSERT INTO "+d.table("orders")+" (id, customer, amount_cents, points, event_id) VALUES (?, ?, ?, ?, ?)"),
		o.ID, o.Customer, o.Amount, o.Points, msg.ID); err != nil {
		return err
	}
	return tx.Commit()
}

// applyPromotion is the consumer's effect, in tx: a promotion row for the
// order and the customer's points. attempt numbers the handler run that
// applied it (see attemptLog); 0 where none is kept.
func (d *demoDB) applyPromotion(ctx context.Context, tx *sql.Tx, msg *exactly.Message, member string, attempt int64) error {
	var o order
	if err := json.Unmarshal(msg.Payload, &o); err != nil {
		return fmt.Errorf("undecodable order event %s: %w", msg.ID, err)
	}
	if _, err := tx.ExecContext(ctx, d.bind("INSERT INTO "+d.table("promotions")+" (order_id, event_id, customer, points, member, attempt) VALUES (?, ?, ?, ?, ?, ?)"),
		o.ID, msg.ID, o.Customer, o.Points, member, attempt); err != nil {
		return err
	}
	_, err := tx.ExecContext(ctx, d.bind("UPDATE "+d.table("customers")+" SET points = points + ? WHERE id = ?"), o.Points, o.Customer)
	return err
}

// applied counts the orders whose promotion is applied.
func (d *demoDB) applied(ctx context.Context) (int64, error) {
	var n int64
	err := d.db.QueryRowContext(ctx, "SELECT COUNT(DISTINCT order_id) FROM "+d.table("promotions")).Scan(&n)
	return n, err
}

// verdict is the ground truth, read from the database once everything stopped.
type verdict struct {
	orders       int64 // committed orders
	applied      int64 // orders with a promotion
	appliedTwice int64 // orders with more than one promotion
	lost         int64 // orders without a promotion
	promotions   int64 // promotion rows
	strangers    int64 // promotions of no committed order
	pointsWant   int64 // sum of the orders' points
	pointsGot    int64 // sum of the customers' points
	// sum of the promotions' points: pointsGot when each promotion credited
	// its customer once, pointsWant as well when none was applied twice
	pointsPromoted int64
}

func (d *demoDB) verify(ctx context.Context) (verdict, error) {
	var v verdict
	o, p, c := d.table("orders"), d.table("promotions"), d.table("customers")
	for _, q := range []struct {
		sql string
		dst *int64
	}{
		{"SELECT COUNT(*) FROM " + o, &v.orders},
		{"SELECT COUNT(DISTINCT order_id) FROM " + p, &v.applied},
		{"SELECT COUNT(*) FROM (SELECT order_id FROM " + p + " GROUP BY order_id HAVING COUNT(*) > 1) twice", &v.appliedTwice},
		{"SELECT COUNT(*) FROM " + o + " o WHERE NOT EXISTS (SELECT 1 FROM " + p + " p WHERE p.order_id = o.id)", &v.lost},
		{"SELECT COUNT(*) FROM " + p, &v.promotions},
		{"SELECT COUNT(*) FROM " + p + " p WHERE NOT EXISTS (SELECT 1 FROM " + o + " o WHERE o.id = p.order_id AND o.event_id = p.event_id)", &v.strangers},
		{"SELECT COALESCE(SUM(points), 0) FROM " + o, &v.pointsWant},
		{"SELECT COALESCE(SUM(points), 0) FROM " + c, &v.pointsGot},
		{"SELECT COALESCE(SUM(points), 0) FROM " + p, &v.pointsPromoted},
	} {
		if err := d.db.QueryRowContext(ctx, q.sql).Scan(q.dst); err != nil {
			return v, fmt.Errorf("verifying (%s): %w", q.sql, err)
		}
	}
	return v, nil
}

// application is one promotion row of an order applied more than once.
type application struct {
	order   string
	event   string // the message ID
	member  string
	attempt int64
}

// appliedTwice returns the promotion rows of the orders with more than one,
// by order.
func (d *demoDB) appliedTwice(ctx context.Context) ([]application, error) {
	p := d.table("promotions")
	rows, err := d.db.QueryContext(ctx, "SELECT order_id, event_id, member, attempt FROM "+p+" WHERE order_id IN "+
		"(SELECT order_id FROM "+p+" GROUP BY order_id HAVING COUNT(*) > 1) ORDER BY order_id, attempt")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []application
	for rows.Next() {
		var a application
		if err := rows.Scan(&a.order, &a.event, &a.member, &a.attempt); err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, rows.Err()
}

// printKept says where the run's tables stay (--keep), how to look at them
// with the console and how to remove them. The DSN is printed with its
// password hidden.
func (r *demoRun) printKept() {
	d := r.db
	if d == nil {
		return
	}
	var where, remove string
	switch d.dialect {
	case outbox.Postgres:
		where, remove = "schema "+d.ns, "DROP SCHEMA "+d.ns+" CASCADE"
	case outbox.MySQL:
		where, remove = "database "+d.ns, "DROP DATABASE "+d.ns
	default:
		file := strings.TrimPrefix(d.dsn, "sqlite:")
		where, remove = "SQLite file "+file, "rm -r "+filepath.Dir(file)
	}
	cmd := "exactly console --db " + shellQuote(hide.String(d.dsn)) + " --table " + d.table("outbox")
	if r.o.inbox == inboxSQL || r.o.offsets == offsetsDB {
		cmd += " --inbox-table " + d.table("inbox")
	}
	fmt.Fprintf(r.out, "\nkept the run's tables in %s; look at them with\n  %s\nand open http://127.0.0.1:9465/; remove them with\n  %s\n", where, cmd, remove)
}

// shellQuote quotes s for a POSIX shell when it holds anything but plain
// URL characters (a MySQL DSN's parentheses).
func shellQuote(s string) string {
	if strings.IndexFunc(s, func(c rune) bool { return strings.ContainsRune("()&;|<>$`\\\"' *?[]#~!{}", c) }) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
