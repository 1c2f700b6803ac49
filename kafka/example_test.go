package kafka_test

import (
	"context"
	"fmt"
	"log"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/kafka"
)

func ExampleNewClientPublisher() {
	// An in-process Kafka-protocol cluster; use your brokers' addresses.
	cluster, err := kfake.NewCluster(kfake.SeedTopics(3, "orders"))
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()

	pub, err := kafka.NewClientPublisher(cluster.ListenAddrs())
	if err != nil {
		log.Fatal(err)
	}
	defer pub.Close()

	msgs := []*exactly.Message{
		{ID: exactly.NewID(), Topic: "orders", Key: "order-1", Payload: []byte(`{"status":"created"}`)},
		{ID: exactly.NewID(), Topic: "orders", Key: "order-1", Payload: []byte(`{"status":"paid"}`)},
	}
	err = pub.Publish(context.Background(), msgs)
	fmt.Println("published:", err == nil)
	// Output: published: true
}

func ExampleNewConsumer() {
	cluster, err := kfake.NewCluster(kfake.SeedTopics(3, "orders"))
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()
	pub, err := kafka.NewClientPublisher(cluster.ListenAddrs())
	if err != nil {
		log.Fatal(err)
	}
	defer pub.Close()
	if err := pub.Publish(context.Background(), []*exactly.Message{
		{ID: exactly.NewID(), Topic: "orders", Key: "order-1", Payload: []byte(`{"status":"created"}`)},
	}); err != nil {
		log.Fatal(err)
	}

	ctx, stop := context.WithCancel(context.Background())
	c, err := kafka.NewConsumer(cluster.ListenAddrs(), kafka.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			// In production, wrap the handler with the inbox so that a
			// redelivered record applies its effect once.
			Handler: func(_ context.Context, msg *exactly.Message) error {
				fmt.Printf("%s: %s\n", msg.Key, msg.Payload)
				stop()
				return nil
			},
			Retry:   exactly.RetryPolicy{MaxAttempts: 10},
			Workers: 3, // up to three partitions at a time, each in order
		},
		Group:  "billing",
		Topics: []string{"orders"},
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := c.Run(ctx); err != nil {
		log.Fatal(err)
	}
	// Output: order-1: {"status":"created"}
}
