package relay_test

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"time"

	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// The whole outbox on SQLite: write an order and its event in one
// transaction, and let the relay publish the event.
func Example() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "example")
	defer os.RemoveAll(dir)
	db, _ := sql.Open("sqlite", "file:"+filepath.Join(dir, "app.db")+"?_pragma=busy_timeout(5000)&_pragma=journal_mode(WAL)")
	defer db.Close()

	ob, _ := outbox.New(outbox.Config{Dialect: outbox.SQLite})
	if err := ob.Migrate(ctx, db); err != nil {
		panic(err)
	}
	db.Exec(`CREATE TABLE orders (id TEXT PRIMARY KEY, total INTEGER)`)

	tx, _ := db.BeginTx(ctx, nil)
	tx.Exec(`INSERT INTO orders VALUES ('o-1', 4200)`)
	ob.Enqueue(ctx, tx, &exactly.Message{Topic: "order.created", Key: "o-1", Payload: []byte(`{"total":4200}`)})
	tx.Commit()

	pub := &exactlytest.Recorder{} // kafka.NewClientPublisher(...) or nats.NewPublisher(...) in production
	r, _ := relay.New(relay.Config{Outbox: ob, DB: db, Publisher: pub})
	runCtx, stop := context.WithCancel(ctx)
	go r.Run(runCtx)
	for len(pub.Delivered()) == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	m := pub.Delivered()[0]
	fmt.Println(m.Topic, m.Key, string(m.Payload))
	// Output: order.created o-1 {"total":4200}
}
