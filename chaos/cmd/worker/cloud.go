package main

import (
	"context"
	"database/sql"
	"os"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/pubsub"
	"github.com/exactlyonce/exactly/sqs"
)

// sqsClient is a client of the SQS emulator through its fault proxy
// (CHAOS_SQS); the emulator checks no credentials.
func sqsClient() *awssqs.Client {
	return awssqs.NewFromConfig(aws.Config{Region: "us-east-1", BaseEndpoint: aws.String(os.Getenv("CHAOS_SQS")),
		Credentials: credentials.NewStaticCredentialsProvider("chaos", "chaos", "")})
}

// pubsubClient is a client of pstest through its fault proxy (CHAOS_PUBSUB).
func pubsubClient(ctx context.Context) (*gpubsub.Client, error) {
	return gpubsub.NewClient(ctx, "chaos", option.WithEndpoint(os.Getenv("CHAOS_PUBSUB")), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())), option.WithTelemetryDisabled())
}

// sqlInboxHandler is the SQL inbox around the effect, with each delivery
// recorded first.
func (c *consumer) sqlInboxHandler() (exactly.Handler, error) {
	in, err := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Table: inboxTable, Consumer: c.pipeline})
	if err != nil {
		return nil, err
	}
	h := in.Handler(c.db, func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error { return c.effect(ctx, tx, m) })
	return func(ctx context.Context, m *exactly.Message) error {
		if err := c.delivered(ctx, m); err != nil {
			return err
		}
		return h(ctx, m)
	}, nil
}

// sqsSQLInbox: the sqs Consumer on the FIFO queue (one group per key, one
// message of a group out at a time), SQL inbox in the effect's
// transaction. The visibility timeout (3s) is shorter than a pause, so a
// paused consumer wakes up with messages another one may have taken.
func (w *worker) sqsSQLInbox(ctx context.Context, pipeline string) error {
	c, err := w.openConsumer(pipeline)
	if err != nil {
		return err
	}
	defer c.db.Close()
	h, err := c.sqlInboxHandler()
	if err != nil {
		return err
	}
	cons, err := sqs.NewConsumer(sqsClient(), sqs.ConsumerConfig{
		QueueURL: os.Getenv("CHAOS_SQS_QUEUE"), DeadLetterQueueURL: os.Getenv("CHAOS_SQS_DLQ"),
		VisibilityTimeout: 3 * time.Second, WaitTime: time.Second,
		ConsumerConfig: exactly.ConsumerConfig{Workers: 8, Retry: retry, Logger: w.log, Handler: h},
	})
	if err != nil {
		return err
	}
	return cons.Run(ctx)
}

// pubsubSQLInbox: the pubsub Consumer on the subscription with message
// ordering (a key's messages handled one at a time, in order), SQL inbox in
// the effect's transaction; dead letters to the topic's .dlq.
func (w *worker) pubsubSQLInbox(ctx context.Context, pipeline string) error {
	c, err := w.openConsumer(pipeline)
	if err != nil {
		return err
	}
	defer c.db.Close()
	h, err := c.sqlInboxHandler()
	if err != nil {
		return err
	}
	client, err := pubsubClient(ctx)
	if err != nil {
		return err
	}
	defer client.Close()
	cons, err := pubsub.NewConsumer(client, pubsub.ConsumerConfig{
		Subscription: pubsubSub, Topic: pubsubTopic, MaxLeaseExtension: 10 * time.Second,
		ConsumerConfig: exactly.ConsumerConfig{Workers: 8, Retry: retry, Logger: w.log, Handler: h},
	})
	if err != nil {
		return err
	}
	return cons.Run(ctx)
}
