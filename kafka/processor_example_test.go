package kafka_test

import (
	"context"
	"fmt"
	"log"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/kafka"
)

func ExampleNewProcessor() {
	// An in-process Kafka-protocol cluster; use your brokers' addresses.
	cluster, err := kfake.NewCluster(kfake.SeedTopics(3, "orders", "orders-upper"))
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()
	seeds := cluster.ListenAddrs()

	in, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	if err != nil {
		log.Fatal(err)
	}
	defer in.Close()
	for _, v := range []string{"created", "paid", "shipped"} {
		in.ProduceSync(context.Background(), &kgo.Record{Topic: "orders", Key: []byte("order-1"), Value: []byte(v)})
	}

	p, err := kafka.NewProcessor(kafka.ProcessorConfig{
		Seeds: seeds, Group: "upper", Topics: []string{"orders"},
		InstanceID: "instance-0", // stable across restarts, unique among running instances
	}, func(_ context.Context, rec *kgo.Record) ([]exactly.Message, error) {
		// Outputs, dead letters and the input offset commit together.
		return []exactly.Message{{Topic: "orders-upper", Key: string(rec.Key), Payload: []byte(strings.ToUpper(string(rec.Value)))}}, nil
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	for p.Stats().Processed < 3 {
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	if err := <-done; err != nil {
		log.Fatal(err)
	}

	// Consumers of the output read committed records only.
	out, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumeTopics("orders-upper"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		log.Fatal(err)
	}
	defer out.Close()
	for n := 0; n < 3; {
		out.PollFetches(context.Background()).EachRecord(func(r *kgo.Record) {
			fmt.Println(string(r.Key), string(r.Value))
			n++
		})
	}
	// Output:
	// order-1 CREATED
	// order-1 PAID
	// order-1 SHIPPED
}
