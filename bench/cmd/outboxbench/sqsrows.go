package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"github.com/exactlyonce/exactly/internal/awsmsg"
	"github.com/exactlyonce/exactly/sqs"
)

// sqsClient is the client of the SQS emulator at -sqs, made on first use.
func (b *bench) sqsClient() (*awssqs.Client, error) {
	if b.cfg.sqsEndpoint == "" {
		return nil, errors.New("the SQS rows need an SQS emulator: -sqs http://127.0.0.1:4566 or EXACTLY_TEST_SQS_ENDPOINT (scripts/aws-emulator start 4566)")
	}
	if b.sqs == nil {
		b.sqs = awssqs.NewFromConfig(aws.Config{Region: "us-east-1", BaseEndpoint: aws.String(b.cfg.sqsEndpoint),
			Credentials: credentials.NewStaticCredentialsProvider("bench", "bench", "")})
	}
	return b.sqs, nil
}

// sqsQueueSeq numbers the rows' queues.
var sqsQueueSeq atomic.Int64

// freshFIFOQueue creates a FIFO queue of the row's own, and returns its URL
// and what deletes it.
func (b *bench) freshFIFOQueue(ctx context.Context, id string) (*awssqs.Client, string, func(), error) {
	client, err := b.sqsClient()
	if err != nil {
		return nil, "", nil, err
	}
	name := fmt.Sprintf("exactlybench-%s-%d-%d.fifo", id, sqsQueueSeq.Add(1), time.Now().UnixNano())
	out, err := client.CreateQueue(ctx, &awssqs.CreateQueueInput{QueueName: aws.String(name), Attributes: map[string]string{"FifoQueue": "true"}})
	if err != nil {
		return nil, "", nil, fmt.Errorf("create queue %s at %s: %w", name, b.cfg.sqsEndpoint, err)
	}
	url := aws.ToString(out.QueueUrl)
	return client, url, func() {
		cctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		if _, err := client.DeleteQueue(cctx, &awssqs.DeleteQueueInput{QueueUrl: aws.String(url)}); err != nil {
			b.log.Warn("could not delete the row's queue", "queue", url, "err", err)
		}
	}, nil
}

// checkQueue fails unless the queue holds want messages: with every
// message's id as its deduplication id, a message stored twice or one
// missing shows in the count.
func checkQueue(ctx context.Context, client *awssqs.Client, url string, want int) error {
	out, err := client.GetQueueAttributes(ctx, &awssqs.GetQueueAttributesInput{QueueUrl: aws.String(url),
		AttributeNames: []types.QueueAttributeName{types.QueueAttributeNameApproximateNumberOfMessages}})
	if err != nil {
		return fmt.Errorf("counting the messages of %s: %w", url, err)
	}
	n, _ := strconv.Atoi(out.Attributes[string(types.QueueAttributeNameApproximateNumberOfMessages)])
	if n != want {
		return fmt.Errorf("queue %s holds %d messages, want %d", url, n, want)
	}
	return nil
}

// runSQSCeiling sends the messages as fast as a plain loop of
// SendMessageBatch calls gets them into a FIFO queue of the emulator: 10
// entries a call, one call after the other (as the sqs Publisher sends a
// Publish call's batches), each entry encoded as the sqs Publisher encodes
// it (body, attributes, group id = key, deduplication id = id). The
// entries are built before the clock starts.
func runSQSCeiling(ctx context.Context, b *bench) (result, error) {
	const id = "sqs"
	client, url, drop, err := b.freshFIFOQueue(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer drop()
	gen := b.messages("bench")
	var calls [][]types.SendMessageBatchRequestEntry
	for i := 0; i < b.cfg.n; i += awsmsg.MaxBatchEntries {
		var batch []types.SendMessageBatchRequestEntry
		for j := i; j < min(i+awsmsg.MaxBatchEntries, b.cfg.n); j++ {
			m := gen.get(j)
			enc, err := awsmsg.Encode(m)
			if err != nil {
				return result{}, err
			}
			attrs := make(map[string]types.MessageAttributeValue, len(enc.Attrs))
			for _, a := range enc.Attrs {
				v := types.MessageAttributeValue{DataType: aws.String(a.Type)}
				if a.Type == "Binary" {
					v.BinaryValue = a.Binary
				} else {
					v.StringValue = aws.String(a.String)
				}
				attrs[a.Name] = v
			}
			batch = append(batch, types.SendMessageBatchRequestEntry{Id: aws.String(strconv.Itoa(j - i)), MessageBody: aws.String(enc.Body),
				MessageAttributes: attrs, MessageGroupId: aws.String(awsmsg.GroupID(m)), MessageDeduplicationId: aws.String(awsmsg.FIFOID(m.ID))})
		}
		calls = append(calls, batch)
	}
	tm := b.startTimer(id)
	for _, batch := range calls {
		out, err := client.SendMessageBatch(ctx, &awssqs.SendMessageBatchInput{QueueUrl: aws.String(url), Entries: batch})
		if err == nil && len(out.Failed) > 0 {
			err = fmt.Errorf("SendMessageBatch: %d entries refused, the first: %s: %s", len(out.Failed), aws.ToString(out.Failed[0].Code), aws.ToString(out.Failed[0].Message))
		}
		if err != nil {
			tm.stop()
			return result{}, err
		}
	}
	elapsed := tm.stop()
	if err := checkQueue(ctx, client, url, b.cfg.n); err != nil {
		return result{}, err
	}
	return result{msgs: b.cfg.n, elapsed: elapsed, note: fmt.Sprintf("%d sequential SendMessageBatch calls of up to 10 to a FIFO queue at %s (the emulator's CPU is not the bench's); %s",
		len(calls), b.cfg.sqsEndpoint, tm.cpu())}, nil
}

// runRelaySQS drains the outbox to a FIFO queue of the emulator through the
// sqs Publisher, with its defaults.
func runRelaySQS(ctx context.Context, b *bench) (result, error) {
	const id = "relay-sqs"
	client, url, drop, err := b.freshFIFOQueue(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer drop()
	pub, err := sqs.NewPublisher(client, sqs.PublisherConfig{QueueURLs: map[string]string{"bench": url}})
	if err != nil {
		return result{}, err
	}
	res, err := b.drainRelay(ctx, id, "bench", pub, nil)
	if err != nil {
		return res, err
	}
	if err := checkQueue(ctx, client, url, b.cfg.n); err != nil {
		return result{}, err
	}
	res.note = "FIFO queue on the emulator; " + res.note
	return res, nil
}
