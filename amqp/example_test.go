package amqp_test

import (
	"context"
	"fmt"
	"log"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/amqp"
)

// A publisher sends an order event to a queue through the default
// exchange, and a consumer handles it. In a service the handler would be
// wrapped with the inbox, so that a redelivered event is applied once.
func Example() {
	const url = "amqp://guest:guest@localhost:5672/"
	queue := "example-orders-" + exactly.NewID()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Queues are yours to declare: durable, so that what the broker
	// confirmed survives its restart.
	conn, err := amqp091.Dial(url)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		log.Fatal(err)
	}
	if _, err := ch.QueueDeclare(queue, true, false, false, false, nil); err != nil {
		log.Fatal(err)
	}
	defer ch.QueueDelete(queue, false, false, false)
	defer ch.QueueDelete(queue+".dlq", false, false, false) // declared by the consumer

	pub, err := amqp.NewPublisher(url)
	if err != nil {
		log.Fatal(err)
	}
	defer pub.Close()
	err = pub.Publish(ctx, []*exactly.Message{{
		ID:      exactly.NewID(),
		Topic:   queue, // the routing key: with the default exchange, the queue
		Key:     "order-1",
		Payload: []byte(`{"status":"created"}`),
	}})
	if err != nil {
		log.Fatal(err)
	}

	consumer, err := amqp.NewConsumer(url, amqp.ConsumerConfig{
		// The settings every consumer shares, under the same names.
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: func(ctx context.Context, m *exactly.Message) error {
				fmt.Printf("%s: %s\n", m.Key, m.Payload)
				cancel() // one message is all this example waits for
				return nil
			},
			Retry: exactly.RetryPolicy{MaxAttempts: 3},
		},
		// RabbitMQ's own.
		Queue:    queue,
		Prefetch: 16,
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := consumer.Run(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("handled:", consumer.Stats().Handled)
	// Output:
	// order-1: {"status":"created"}
	// handled: 1
}
