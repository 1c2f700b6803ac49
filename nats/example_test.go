package nats_test

import (
	"context"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/nats"
)

func ExampleNewPublisher() {
	nc, err := natsgo.Connect(natsgo.DefaultURL)
	if err != nil {
		log.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The stream's duplicate window is how long Nats-Msg-Id drops a
	// re-publish; make it longer than the relay's retry horizon.
	if _, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:       "ORDERS",
		Subjects:   []string{"orders.>"},
		Duplicates: 10 * time.Minute,
	}); err != nil {
		log.Fatal(err)
	}

	pub, err := nats.NewPublisher(js, nats.StrictKeyOrder())
	if err != nil {
		log.Fatal(err)
	}
	err = pub.Publish(ctx, []*exactly.Message{
		{ID: exactly.NewID(), Topic: "orders.events", Key: "order-1", Payload: []byte(`{"status":"created"}`)},
	})
	if err != nil {
		log.Fatal(err)
	}
}

func ExampleNewConsumer() {
	nc, err := natsgo.Connect(natsgo.DefaultURL)
	if err != nil {
		log.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		log.Fatal(err)
	}
	// The stream captures the events and, on "orders.events.dlq", their
	// dead letters, which the consumer below does not see: it is filtered
	// on "orders.events".
	if _, err := js.CreateOrUpdateStream(context.Background(), jetstream.StreamConfig{
		Name:       "ORDERS",
		Subjects:   []string{"orders.>"},
		Duplicates: 10 * time.Minute,
	}); err != nil {
		log.Fatal(err)
	}

	c, err := nats.NewConsumer(js, nats.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			// In production, wrap the handler with the inbox so that a
			// redelivered message applies its effect once.
			Handler: func(ctx context.Context, msg *exactly.Message) error {
				log.Printf("order %s: %s (message %s)", msg.Key, msg.Payload, msg.ID)
				return nil
			},
			Retry:   exactly.RetryPolicy{MaxAttempts: 10},
			Workers: 8, // in parallel across keys, in order within one
		},
		Stream:         "ORDERS",
		Durable:        "billing",
		FilterSubjects: []string{"orders.events"},
	})
	if err != nil {
		log.Fatal(err)
	}
	// Run until SIGTERM: the in-flight handler sees its context end, and
	// the messages not handled go back to the stream for another instance.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := c.Run(ctx); err != nil {
		log.Fatal(err)
	}
	log.Printf("stopped: %+v", c.Stats())
}
