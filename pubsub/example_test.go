package pubsub_test

import (
	"context"
	"fmt"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/pubsub"
)

// A Publisher on an in-process pstest server: Message.Key becomes the
// ordering key, Message.ID the exactly-id attribute. Against Google Cloud,
// gpubsub.NewClient(ctx, "my-project") with Application Default Credentials
// is all it takes (or PUBSUB_EMULATOR_HOST for an emulator).
func ExamplePublisher() {
	ctx := context.Background()
	srv := pstest.NewServer()
	defer srv.Close()
	client, err := gpubsub.NewClient(ctx, "my-project", option.WithEndpoint(srv.Addr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		panic(err)
	}
	defer client.Close()
	if _, err := client.TopicAdminClient.CreateTopic(ctx, &pb.Topic{Name: "projects/my-project/topics/orders"}); err != nil {
		panic(err)
	}

	pub, err := pubsub.NewPublisher(client, pubsub.PublisherConfig{})
	if err != nil {
		panic(err)
	}
	defer pub.Close()
	err = pub.Publish(ctx, []*exactly.Message{
		{ID: "order-7-placed", Topic: "orders", Key: "order-7", Payload: []byte(`{"total":42}`)},
		{ID: "order-7-paid", Topic: "orders", Key: "order-7", Payload: []byte(`{"paid":42}`)},
	})
	fmt.Println("publish:", err)
	for _, m := range srv.Messages() {
		fmt.Println(m.Topic, m.OrderingKey, m.Attributes[exactly.HeaderID], string(m.Data))
	}
	// Output:
	// publish: <nil>
	// projects/my-project/topics/orders order-7 order-7-placed {"total":42}
	// projects/my-project/topics/orders order-7 order-7-paid {"paid":42}
}
