package nats_test

import (
	"context"
	"log"
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
