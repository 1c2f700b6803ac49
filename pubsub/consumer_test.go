package pubsub_test

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	_ "github.com/jackc/pgx/v5/stdlib"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/pubsub"
)

// suiteAckDeadline is the subscriptions' ack deadline in the consumer
// suite: pstest's minimum, and the client library's shortest lease
// extension, so a handler running three times as long is kept only by the
// library's extensions.
const suiteAckDeadline = 10 * time.Second

// TestConsumerSuite holds the Consumer to the contract every consumer
// keeps, on pstest with ordered subscriptions and the SQL inbox on
// PostgreSQL.
func TestConsumerSuite(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(40)
	t.Cleanup(func() { db.Close() })
	f := newFake(t)
	exactlytest.RunConsumerSuite(t, exactlytest.ConsumerHarness{
		DB: db,
		Setup: func(t *testing.T) exactlytest.ConsumerSource {
			topic := f.topicWith(t, int32(suiteAckDeadline/time.Second))
			return exactlytest.ConsumerSource{
				Topic:     topic,
				Publisher: f.publisher(t, pubsub.PublisherConfig{}),
				PublishWithoutID: func(t *testing.T, payload []byte) {
					f.srv.PublishOrdered(f.name(topic), payload, map[string]string{"x-from": "legacy"}, "legacy")
				},
				New: func(t *testing.T, cfg exactly.ConsumerConfig) exactlytest.TestConsumer {
					return f.consumer(t, topic, cfg)
				},
			}
		},
		Ordering: exactlytest.OrderPerKey,
		// Pub/Sub's message ID stays the same across redeliveries.
		NoID:        exactlytest.NoIDDerived,
		AckDeadline: suiteAckDeadline,
		Timeout:     90 * time.Second,
	})
}

// consumer is one consumer process of the suite: a client of its own,
// which Crash closes, so nothing it holds can be acknowledged any more and
// pstest redelivers it once its lease runs out (MaxLeaseExtension after the
// last extension at most).
func (f *fake) consumer(t *testing.T, sub string, shared exactly.ConsumerConfig) exactlytest.TestConsumer {
	t.Helper()
	client, err := gpubsub.NewClient(context.Background(), project,
		option.WithEndpoint(f.srv.Addr),
		option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	c, err := pubsub.NewConsumer(client, pubsub.ConsumerConfig{ConsumerConfig: shared, Subscription: sub,
		MaxLeaseExtension: suiteAckDeadline})
	if err != nil {
		t.Fatalf("NewConsumer: %v", err)
	}
	return exactlytest.TestConsumer{
		Run:   c.Run,
		Stats: func() exactly.ConsumerStats { return c.Stats().ConsumerStats },
		Crash: func() { _ = client.Close() },
	}
}

// topicWith is topic with the subscription's ack deadline in seconds.
func (f *fake) topicWith(t *testing.T, ackDeadline int32) string {
	t.Helper()
	id := f.topic(t)
	ctx := context.Background()
	sub := "projects/" + project + "/subscriptions/" + id
	if err := f.client.SubscriptionAdminClient.DeleteSubscription(ctx, &pb.DeleteSubscriptionRequest{Subscription: sub}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.SubscriptionAdminClient.CreateSubscription(ctx, &pb.Subscription{
		Name: sub, Topic: f.name(id), EnableMessageOrdering: true, AckDeadlineSeconds: ackDeadline,
	}); err != nil {
		t.Fatal(err)
	}
	return id
}

func TestNewConsumerRefusesBadConfig(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	h := func(context.Context, *exactly.Message) error { return nil }
	for _, tc := range []struct {
		cfg   pubsub.ConsumerConfig
		field string
	}{
		{pubsub.ConsumerConfig{Subscription: "s"}, "Handler"},
		{pubsub.ConsumerConfig{ConsumerConfig: exactly.ConsumerConfig{Handler: h}}, "Subscription"},
		{pubsub.ConsumerConfig{ConsumerConfig: exactly.ConsumerConfig{Handler: h}, Subscription: "s", MaxExtension: -time.Second}, "MaxExtension"},
		{pubsub.ConsumerConfig{ConsumerConfig: exactly.ConsumerConfig{Handler: h}, Subscription: "s", AckTimeout: -time.Second}, "AckTimeout"},
		{pubsub.ConsumerConfig{ConsumerConfig: exactly.ConsumerConfig{Handler: h}, Subscription: "s", MaxLeaseExtension: time.Second}, "MaxLeaseExtension"},
	} {
		_, err := pubsub.NewConsumer(f.client, tc.cfg)
		var ce *exactly.ConfigError
		if !errors.As(err, &ce) || ce.Field != tc.field {
			t.Errorf("NewConsumer(%+v) = %v, want a *exactly.ConfigError naming %s", tc.cfg, err, tc.field)
		}
	}
}
