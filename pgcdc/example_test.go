package pgcdc_test

import (
	"context"
	"log"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
)

// The write side is the outbox's, unchanged; the relay reads the WAL.
func Example() {
	ctx := context.Background()
	dsn := os.Getenv("DATABASE_URL") // a server with wal_level=logical
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		log.Fatal(err)
	}
	ob, _ := outbox.New(outbox.Config{Dialect: outbox.Postgres})
	if err := ob.Migrate(ctx, pool); err != nil {
		log.Fatal(err)
	}

	nc, _ := natsgo.Connect(natsgo.DefaultURL)
	js, _ := jetstream.New(nc)
	pub, _ := nats.NewPublisher(js)
	r, err := pgcdc.New(pgcdc.Config{DSN: dsn, Publisher: pub})
	if err != nil {
		log.Fatal(err)
	}
	go r.Run(ctx) // until ctx ends, or ErrSlotLost / ErrSlotInvalidated

	tx, _ := pool.Begin(ctx)
	// ... business writes in tx ...
	ob.Enqueue(ctx, tx, &exactly.Message{Topic: "orders.created", Key: "order-42", Payload: []byte(`{"id":42}`)})
	tx.Commit(ctx) // published after the commit, from the WAL
}

// Table-less: the message goes into the WAL only, with the transaction.
func ExampleEmit() {
	ctx := context.Background()
	pool, _ := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	tx, _ := pool.Begin(ctx)
	// ... business writes in tx ...
	if err := pgcdc.Emit(ctx, tx, &exactly.Message{Topic: "orders.created", Key: "order-42", Payload: []byte(`{"id":42}`)}); err != nil {
		log.Fatal(err)
	}
	tx.Commit(ctx) // a relay with Config.Messages publishes it
}

// Debezium layout: consumers written for Debezium's outbox event router
// get the same topic, key and id header.
func ExampleEnqueueDebezium() {
	ctx := context.Background()
	pool, _ := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err := pgcdc.MigrateDebezium(ctx, pool, "outboxevent"); err != nil {
		log.Fatal(err)
	}
	tx, _ := pool.Begin(ctx)
	pgcdc.EnqueueDebezium(ctx, tx, "outboxevent", &pgcdc.DebeziumEvent{
		AggregateType: "Order", AggregateID: "order-42", Type: "OrderCreated", Payload: []byte(`{"id": 42}`),
	}) // → topic outbox.event.Order, key order-42, header id
	tx.Commit(ctx)
	// The relay: pgcdc.Config{..., Debezium: &pgcdc.Debezium{Table: "outboxevent"}}
}
