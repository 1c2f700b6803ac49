package inbox_test

import (
	"context"
	"database/sql"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
)

// The broker delivers the same message three times (a lost ack, a
// rebalance); the invoice is written once, and every delivery is
// acknowledged.
func Example() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "inbox-example")
	defer os.RemoveAll(dir)
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "app.db")+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("CREATE TABLE invoices (order_id TEXT PRIMARY KEY, amount INTEGER)"); err != nil {
		log.Fatal(err)
	}

	ib, err := inbox.NewSQL(inbox.Config{Dialect: inbox.SQLite, Consumer: "billing"})
	if err != nil {
		log.Fatal(err)
	}
	if err := ib.Migrate(ctx, db); err != nil {
		log.Fatal(err)
	}
	// The handler writes through tx: its effect commits with the inbox record.
	handler := ib.Handler(db, func(ctx context.Context, tx *sql.Tx, msg *exactly.Message) error {
		_, err := tx.ExecContext(ctx, "INSERT INTO invoices (order_id, amount) VALUES (?, ?)", msg.Key, 42)
		return err
	})

	msg := &exactly.Message{ID: "0190b7e4-order-7-paid", Topic: "orders.paid", Key: "order-7"}
	for delivery := 1; delivery <= 3; delivery++ {
		err := handler(ctx, msg) // nil: acknowledge
		fmt.Printf("delivery %d: err=%v\n", delivery, err)
	}
	var n int
	if err := db.QueryRow("SELECT count(*) FROM invoices").Scan(&n); err != nil {
		log.Fatal(err)
	}
	st := ib.Stats()
	fmt.Printf("invoices: %d, processed: %d, duplicates: %d\n", n, st.Processed, st.Duplicates)

	// A message without an ID is refused, never applied without dedup.
	fmt.Println(handler(ctx, &exactly.Message{Topic: "orders.paid", Key: "order-8"}))
	// Output:
	// delivery 1: err=<nil>
	// delivery 2: err=<nil>
	// delivery 3: err=<nil>
	// invoices: 1, processed: 1, duplicates: 2
	// no message id: the message cannot be deduplicated, so it is not handled
}

// A Redis inbox in front of a handler whose effect lives elsewhere (here, a
// call to a payment provider). Copies of a message being handled are
// refused with inbox.ErrInProgress and retried by the consumer; copies of a
// handled one are acknowledged without running the handler.
func ExampleRedis_Handler() {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:6379"})
	defer client.Close()
	ib, err := inbox.NewRedis(client, inbox.RedisConfig{
		Consumer: "payments",
		Lease:    time.Minute,         // well above the handler's worst case
		TTL:      14 * 24 * time.Hour, // above the broker's redelivery horizon
	})
	if err != nil {
		log.Fatal(err)
	}
	charge := func(ctx context.Context, msg *exactly.Message) error {
		// Pass msg.ID as the provider's idempotency key too: the Redis
		// inbox is not exact (see the package documentation).
		return nil
	}
	handler := ib.Handler(charge)
	_ = handler // give it to a Kafka, NATS or AMQP consumer
}
