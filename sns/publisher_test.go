package sns_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssns "github.com/aws/aws-sdk-go-v2/service/sns"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/sqstest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/sns"
)

// topicWithQueue creates an SNS topic and an SQS queue subscribed to it
// with raw message delivery, both deleted when the test ends, and returns
// the topic's ARN and the queue's URL.
func topicWithQueue(t *testing.T, client *awssns.Client, queues *sqstest.SQSQueues, fifo bool) (arn, url string) {
	t.Helper()
	name := sqstest.QueueName(fifo)
	attrs := map[string]string{}
	if fifo {
		attrs["FifoTopic"] = "true"
	}
	out, err := client.CreateTopic(t.Context(), &awssns.CreateTopicInput{Name: aws.String(name), Attributes: attrs})
	if err != nil {
		t.Fatalf("creating topic %s: %v", name, err)
	}
	arn = aws.ToString(out.TopicArn)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := client.DeleteTopic(ctx, &awssns.DeleteTopicInput{TopicArn: aws.String(arn)}); err != nil {
			t.Errorf("deleting topic %s: %v", arn, err)
		}
	})
	url = queues.CreateQueue(t, name, nil)
	qa, err := queues.Client.GetQueueAttributes(t.Context(), &awssqs.GetQueueAttributesInput{
		QueueUrl: aws.String(url), AttributeNames: []sqstypes.QueueAttributeName{sqstypes.QueueAttributeNameQueueArn}})
	if err != nil {
		t.Fatalf("queue %s: %v", url, err)
	}
	if _, err := client.Subscribe(t.Context(), &awssns.SubscribeInput{
		TopicArn: aws.String(arn), Protocol: aws.String("sqs"),
		Endpoint:   aws.String(qa.Attributes[string(sqstypes.QueueAttributeNameQueueArn)]),
		Attributes: map[string]string{"RawMessageDelivery": "true"},
	}); err != nil {
		t.Fatalf("subscribing %s to %s: %v", url, arn, err)
	}
	return arn, url
}

func TestPublisherSuite(t *testing.T) {
	for _, fifo := range []bool{false, true} {
		name := "Standard"
		if fifo {
			name = "FIFO"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			queues := sqstest.NewSQSQueues(t)
			client := awssns.NewFromConfig(testenv.AWSConfig(t))
			var urls sync.Map // topic ARN -> URL of the queue subscribed to it
			exactlytest.RunPublisherSuite(t, exactlytest.PublisherHarness{
				New: func(t *testing.T) (exactly.Publisher, string) {
					arn, url := topicWithQueue(t, client, queues, fifo)
					urls.Store(arn, url)
					// fauxqs orders the entries of a batch by the text of
					// their index (1, 10, 2, ...).
					p, err := sns.NewPublisher(client, sns.PublisherConfig{BatchSize: 9})
					if err != nil {
						t.Fatal(err)
					}
					return p, arn
				},
				Read: func(t *testing.T, topic string, n int, timeout time.Duration) []exactlytest.Received {
					url, _ := urls.Load(topic)
					return queues.Read(t, url.(string), n, timeout)
				},
				MaxMessageSize: sns.MaxMessageSize,
				NativeDedup:    fifo,
				// fauxqs hands out one message per FIFO group per receive,
				// and a receive cut off under the race detector hides its
				// messages for the reader's visibility timeout (1s).
				Settle: 3 * time.Second,
			})
		})
	}
}
