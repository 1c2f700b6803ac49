package sqs_test

import (
	"context"
	"database/sql"
	"errors"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssns "github.com/aws/aws-sdk-go-v2/service/sns"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/aws-sdk-go-v2/service/sqs/types"
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/sqstest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/sns"
	"github.com/exactlyonce/exactly/sqs"
)

// faultyAPI is a consumer's client the suite can cut: after cut every call
// fails, as a killed process's would; after loseDeletes the next delete
// reports success without reaching SQS.
type faultyAPI struct {
	*awssqs.Client
	cut         atomic.Bool
	loseDeletes atomic.Bool
}

var errCut = errors.New("connection cut by the test")

func (f *faultyAPI) ReceiveMessage(ctx context.Context, in *awssqs.ReceiveMessageInput, opts ...func(*awssqs.Options)) (*awssqs.ReceiveMessageOutput, error) {
	if f.cut.Load() {
		return nil, errCut
	}
	out, err := f.Client.ReceiveMessage(ctx, in, opts...)
	if f.cut.Load() {
		return nil, errCut
	}
	return out, err
}

func (f *faultyAPI) DeleteMessageBatch(ctx context.Context, in *awssqs.DeleteMessageBatchInput, opts ...func(*awssqs.Options)) (*awssqs.DeleteMessageBatchOutput, error) {
	if f.cut.Load() {
		return nil, errCut
	}
	if f.loseDeletes.CompareAndSwap(true, false) {
		out := &awssqs.DeleteMessageBatchOutput{}
		for _, e := range in.Entries {
			out.Successful = append(out.Successful, types.DeleteMessageBatchResultEntry{Id: e.Id})
		}
		return out, nil
	}
	return f.Client.DeleteMessageBatch(ctx, in, opts...)
}

func (f *faultyAPI) ChangeMessageVisibility(ctx context.Context, in *awssqs.ChangeMessageVisibilityInput, opts ...func(*awssqs.Options)) (*awssqs.ChangeMessageVisibilityOutput, error) {
	if f.cut.Load() {
		return nil, errCut
	}
	return f.Client.ChangeMessageVisibility(ctx, in, opts...)
}

func (f *faultyAPI) SendMessageBatch(ctx context.Context, in *awssqs.SendMessageBatchInput, opts ...func(*awssqs.Options)) (*awssqs.SendMessageBatchOutput, error) {
	if f.cut.Load() {
		return nil, errCut
	}
	return f.Client.SendMessageBatch(ctx, in, opts...)
}

const visibility = 2 * time.Second

// TestConsumerSuite holds the Consumer to the contract every consumer
// keeps, on FIFO queues (per-key order) and standard queues (no order) of
// the emulator, with the SQL inbox on PostgreSQL.
func TestConsumerSuite(t *testing.T) {
	t.Parallel()
	t.Run("FIFO", func(t *testing.T) { t.Parallel(); runConsumerSuite(t, true) })
	t.Run("Standard", func(t *testing.T) { t.Parallel(); runConsumerSuite(t, false) })
}

func runConsumerSuite(t *testing.T, fifo bool) {
	e := sqstest.NewSQSQueues(t)
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(40)
	t.Cleanup(func() { db.Close() })
	// A standard queue hands out a key's messages in no set order.
	ordering := exactlytest.NoOrder
	if fifo {
		ordering = exactlytest.OrderPerKey
	}
	exactlytest.RunConsumerSuite(t, exactlytest.ConsumerHarness{
		DB: db,
		Setup: func(t *testing.T) exactlytest.ConsumerSource {
			name := sqstest.QueueName(fifo)
			url := e.CreateQueue(t, name, nil)
			p, err := sqs.NewPublisher(e.Client, sqs.PublisherConfig{})
			if err != nil {
				t.Fatal(err)
			}
			return exactlytest.ConsumerSource{
				Topic:     name,
				Publisher: p,
				PublishWithoutID: func(t *testing.T, payload []byte) {
					in := &awssqs.SendMessageInput{
						QueueUrl: aws.String(url), MessageBody: aws.String(string(payload)),
						MessageAttributes: map[string]types.MessageAttributeValue{"x-from": {DataType: aws.String("String"), StringValue: aws.String("legacy")}},
					}
					if fifo {
						in.MessageGroupId, in.MessageDeduplicationId = aws.String("legacy"), aws.String(exactly.NewID())
					}
					if _, err := e.Client.SendMessage(t.Context(), in); err != nil {
						t.Fatalf("publishing without an id: %v", err)
					}
				},
				New: func(t *testing.T, cfg exactly.ConsumerConfig) exactlytest.TestConsumer {
					api := &faultyAPI{Client: e.Client}
					c, err := sqs.NewConsumer(api, sqs.ConsumerConfig{ConsumerConfig: cfg, QueueURL: url,
						VisibilityTimeout: visibility, WaitTime: time.Second})
					if err != nil {
						t.Fatalf("NewConsumer: %v", err)
					}
					return exactlytest.TestConsumer{
						Run:      c.Run,
						Stats:    c.Stats,
						Crash:    func() { api.cut.Store(true) },
						LoseAcks: func() { api.loseDeletes.Store(true) },
					}
				},
			}
		},
		Ordering:    ordering,
		NoID:        exactlytest.NoIDDeadLettered,
		AckDeadline: visibility,
		Timeout:     time.Minute,
	})
}

// A queue that does not exist ends Run with an error naming it.
func TestConsumerMissingQueue(t *testing.T) {
	t.Parallel()
	e := sqstest.NewSQSQueues(t)
	url := testenv.SQSEndpoint() + "/000000000000/" + sqstest.QueueName(false)
	c, err := sqs.NewConsumer(e.Client, sqs.ConsumerConfig{QueueURL: url, WaitTime: time.Second,
		ConsumerConfig: exactly.ConsumerConfig{Handler: func(context.Context, *exactly.Message) error { return nil }, DeadLetter: &exactlytest.Recorder{}}})
	if err != nil {
		t.Fatal(err)
	}
	err = testenv.ReturnsWithin(t, 30*time.Second, "Run kept going on a missing queue", c.Run)
	if err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("Run on a missing queue = %v, want an error saying it does not exist", err)
	}
}

// SNS deliveries, in SNS's JSON envelope and raw, come out as the messages
// the sns Publisher published.
func TestConsumerSNSDeliveries(t *testing.T) {
	t.Parallel()
	e := sqstest.NewSQSQueues(t)
	client := awssns.NewFromConfig(testenv.AWSConfig(t))
	name := sqstest.QueueName(false)
	topic, err := client.CreateTopic(t.Context(), &awssns.CreateTopicInput{Name: aws.String(name)})
	if err != nil {
		t.Fatal(err)
	}
	arn := aws.ToString(topic.TopicArn)
	t.Cleanup(func() {
		_, _ = client.DeleteTopic(context.Background(), &awssns.DeleteTopicInput{TopicArn: aws.String(arn)})
	})
	msgs := []*exactly.Message{
		{ID: exactly.NewID(), Topic: arn, Key: "order-1", Payload: []byte(`{"total":42}`), Headers: map[string]string{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}},
		{ID: exactly.NewID(), Topic: arn, Payload: []byte{0, 1, 2, 0xff}},
		{ID: exactly.NewID(), Topic: arn, Key: "order-2", Payload: nil, Headers: map[string]string{"x-empty": ""}},
	}
	for _, raw := range []bool{false, true} {
		url := e.CreateQueue(t, sqstest.QueueName(false), nil)
		qa, err := e.Client.GetQueueAttributes(t.Context(), &awssqs.GetQueueAttributesInput{QueueUrl: aws.String(url),
			AttributeNames: []types.QueueAttributeName{types.QueueAttributeNameQueueArn}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := client.Subscribe(t.Context(), &awssns.SubscribeInput{TopicArn: aws.String(arn), Protocol: aws.String("sqs"),
			Endpoint:   aws.String(qa.Attributes[string(types.QueueAttributeNameQueueArn)]),
			Attributes: map[string]string{"RawMessageDelivery": strconv.FormatBool(raw)}}); err != nil {
			t.Fatal(err)
		}
		defer func(raw bool, url string) {
			got := make(chan *exactly.Message, len(msgs))
			c, err := sqs.NewConsumer(e.Client, sqs.ConsumerConfig{QueueURL: url, WaitTime: time.Second,
				ConsumerConfig: exactly.ConsumerConfig{DeadLetter: &exactlytest.Recorder{},
					Handler: func(_ context.Context, m *exactly.Message) error { got <- m; return nil }}})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- c.Run(ctx) }()
			byID := map[string]*exactly.Message{}
			for len(byID) < len(msgs) {
				select {
				case m := <-got:
					byID[m.ID] = m
				case <-ctx.Done():
					t.Fatalf("raw=%v: %d of %d messages consumed", raw, len(byID), len(msgs))
				}
			}
			cancel()
			if err := <-done; err != nil {
				t.Fatalf("Run: %v", err)
			}
			for i, want := range msgs {
				m := byID[want.ID]
				if m == nil || m.Key != want.Key || string(m.Payload) != string(want.Payload) {
					t.Fatalf("raw=%v: message %d consumed as %+v, want key %q payload %q", raw, i, m, want.Key, want.Payload)
				}
				for k, v := range want.Headers {
					if m.Headers[k] != v {
						t.Fatalf("raw=%v: message %d header %q = %q, want %q", raw, i, k, m.Headers[k], v)
					}
				}
			}
		}(raw, url)
	}
	p, err := sns.NewPublisher(client, sns.PublisherConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Publish(t.Context(), msgs); err != nil {
		t.Fatalf("Publish: %v", err)
	}
}
