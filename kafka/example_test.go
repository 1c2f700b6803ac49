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
