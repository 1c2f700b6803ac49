package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"github.com/exactlyonce/exactly"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/sqs"
)

// The SQS consumers' timings in the demo: a short visibility timeout, so a
// message whose delete was lost comes back within seconds.
const (
	demoSQSVisibility = 2 * time.Second
	demoSQSWait       = time.Second
)

// checkSQSEndpoint checks the --sqs endpoint: http://host:port of an
// emulator, or https://host of SQS.
func checkSQSEndpoint(endpoint string) error {
	u, err := url.Parse(endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Hostname() == "" {
		return fmt.Errorf("--sqs %q: want the endpoint of SQS, http://host:port for an emulator or https://sqs.REGION.amazonaws.com", hide.String(endpoint))
	}
	return nil
}

// isAWSEndpoint reports whether endpoint is Amazon's own: the demo then
// signs with the standard credential chain; any other endpoint is taken
// for an emulator, which checks no credentials.
func isAWSEndpoint(endpoint string) bool {
	u, err := url.Parse(endpoint)
	return err == nil && (strings.HasSuffix(u.Hostname(), ".amazonaws.com") || strings.HasSuffix(u.Hostname(), ".amazonaws.com.cn"))
}

// sqsDemoConfig is the SDK configuration for endpoint: the standard chain
// for AWS (the region from it, or from the endpoint's name), static dummy
// credentials and AWS_REGION or us-east-1 for an emulator.
func sqsDemoConfig(ctx context.Context, endpoint string) (aws.Config, error) {
	if !isAWSEndpoint(endpoint) {
		return aws.Config{Region: envDefault("AWS_REGION", "us-east-1"), BaseEndpoint: aws.String(endpoint),
			Credentials: credentials.NewStaticCredentialsProvider("exactly-demo", "exactly-demo", "")}, nil
	}
	hide.Add(os.Getenv("AWS_SECRET_ACCESS_KEY"), os.Getenv("AWS_SESSION_TOKEN"))
	var opts []func(*config.LoadOptions) error
	u, _ := url.Parse(endpoint)
	if parts := strings.Split(u.Hostname(), "."); len(parts) >= 4 && parts[0] == "sqs" && os.Getenv("AWS_REGION") == "" {
		opts = append(opts, config.WithRegion(parts[1]))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return aws.Config{}, fmt.Errorf("--sqs: AWS configuration: %w", err)
	}
	if cfg.Region == "" {
		return aws.Config{}, errors.New("--sqs: no region: set AWS_REGION or use https://sqs.REGION.amazonaws.com")
	}
	cfg.BaseEndpoint = aws.String(endpoint)
	return cfg, nil
}

// sqsBroker is Amazon SQS (or an emulator of it) at the --sqs endpoint: a
// FIFO queue of the run's own and its dead-letter queue, consumed by the
// group's members, each with a consumer of its own.
//
// Two faults are SQS's own. The relay's client loses answers: now and then
// the answer to a SendMessageBatch that SQS stored is turned into an
// error, as a timeout would; the relay publishes the batch again with the
// same deduplication ids, and the FIFO queue drops the copies (within its
// 5-minute window). The members' client loses deletes: now and then a
// DeleteMessageBatch after the effect committed is dropped though the
// consumer is told it succeeded, so SQS delivers the message again once
// its visibility timeout has passed, and the inbox absorbs it.
type sqsBroker struct {
	endpoint string
	client   *awssqs.Client
	queueURL string
	dlqURL   string
	t        string
	pub      *sqs.Publisher
	log      *slog.Logger
	f        *faults

	sendCalls, deleteCalls atomic.Int64
	lostWire               atomic.Int64 // answers lost after SQS stored the batch
	lostDeletes            atomic.Int64 // messages whose delete was dropped

	mu  sync.Mutex
	ids map[string]bool // SQS message ids in the answers: the copies SQS holds
}

func newSQSBroker(ctx context.Context, endpoint, run string, f *faults, log *slog.Logger) (*sqsBroker, error) {
	cfg, err := sqsDemoConfig(ctx, endpoint)
	if err != nil {
		return nil, err
	}
	b := &sqsBroker{endpoint: endpoint, client: awssqs.NewFromConfig(cfg), log: log, f: f, ids: map[string]bool{},
		t: "exactly-demo-" + run + ".order.created"}
	sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if _, err := b.client.ListQueues(sctx, &awssqs.ListQueuesInput{MaxResults: aws.Int32(1)}); !reached(err) {
		return nil, fmt.Errorf("--sqs: cannot reach SQS at %s: %s", hide.String(endpoint), err)
	}
	name := "exactly-demo-" + run + "-order-created"
	for _, q := range []struct {
		name string
		url  *string
	}{{name + ".fifo", &b.queueURL}, {name + "-dlq.fifo", &b.dlqURL}} {
		out, err := b.client.CreateQueue(sctx, &awssqs.CreateQueueInput{QueueName: aws.String(q.name), Attributes: map[string]string{
			"FifoQueue": "true", "VisibilityTimeout": fmt.Sprint(int(demoSQSVisibility / time.Second)),
		}})
		if err != nil {
			b.close()
			return nil, fmt.Errorf("--sqs: creating the demo's queue %s: %s", q.name, err)
		}
		*q.url = aws.ToString(out.QueueUrl)
	}
	if b.pub, err = sqs.NewPublisher(relayAPI{b}, sqs.PublisherConfig{QueueURLs: map[string]string{b.t: b.queueURL}}); err != nil {
		b.close()
		return nil, err
	}
	return b, nil
}

// relayAPI is the relay's client: it loses some answers after SQS stored
// the batch, and records the message ids SQS answered with.
type relayAPI struct{ b *sqsBroker }

func (a relayAPI) SendMessageBatch(ctx context.Context, in *awssqs.SendMessageBatchInput, opts ...func(*awssqs.Options)) (*awssqs.SendMessageBatchOutput, error) {
	b := a.b
	out, err := b.client.SendMessageBatch(ctx, in, opts...)
	if err != nil {
		return out, err
	}
	b.mu.Lock()
	for _, e := range out.Successful {
		b.ids[aws.ToString(e.MessageId)] = true
	}
	b.mu.Unlock()
	if n := b.sendCalls.Add(1); n == 3 || n == 40 || b.f.roll() < 0.005 {
		b.lostWire.Add(1)
		b.f.lostAcks.Add(1)
		return nil, errors.New("injected: the answer to a SendMessageBatch SQS stored was lost (a timeout)")
	}
	return out, nil
}

func (a relayAPI) GetQueueUrl(ctx context.Context, in *awssqs.GetQueueUrlInput, opts ...func(*awssqs.Options)) (*awssqs.GetQueueUrlOutput, error) {
	return a.b.client.GetQueueUrl(ctx, in, opts...)
}

// memberAPI is a member's client: it drops some deletes and says they
// succeeded.
type memberAPI struct {
	*awssqs.Client
	b *sqsBroker
}

func (a memberAPI) DeleteMessageBatch(ctx context.Context, in *awssqs.DeleteMessageBatchInput, opts ...func(*awssqs.Options)) (*awssqs.DeleteMessageBatchOutput, error) {
	b := a.b
	if n := b.deleteCalls.Add(1); n == 4 || n == 30 || b.f.roll() < 0.005 {
		b.lostDeletes.Add(int64(len(in.Entries)))
		out := &awssqs.DeleteMessageBatchOutput{Successful: make([]types.DeleteMessageBatchResultEntry, len(in.Entries))}
		for i, e := range in.Entries {
			out.Successful[i] = types.DeleteMessageBatchResultEntry{Id: e.Id}
		}
		return out, nil
	}
	return a.Client.DeleteMessageBatch(ctx, in, opts...)
}

func (b *sqsBroker) label() string {
	if isAWSEndpoint(b.endpoint) {
		return "SQS FIFO"
	}
	return "SQS FIFO (emulator)"
}
func (b *sqsBroker) topic() string                { return b.t }
func (b *sqsBroker) publisher() exactly.Publisher { return b.pub }

func (b *sqsBroker) member(ctx context.Context, spec memberSpec) error {
	if spec.handler == nil {
		return errors.New("SQS has no offsets to store in the database")
	}
	c, err := sqs.NewConsumer(memberAPI{b.client, b}, sqs.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: spec.handler, Workers: 4, Retry: demoRetry, Logger: b.log.With("member", spec.name),
			Hooks: exactly.ConsumerHooks{DeadLettered: spec.deadLettered},
		},
		QueueURL: b.queueURL, DeadLetterQueueURL: b.dlqURL, VisibilityTimeout: demoSQSVisibility, WaitTime: demoSQSWait,
	})
	if err != nil {
		return err
	}
	return c.Run(ctx)
}

// stored counts the copies SQS holds: the distinct message ids in its
// answers (a FIFO queue answers a re-send it dropped with the first copy's
// id), the answers lost on the way to the relay included.
func (b *sqsBroker) stored(context.Context) (int64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return int64(len(b.ids)), nil
}

func (b *sqsBroker) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, u := range []string{b.queueURL, b.dlqURL} {
		if u != "" {
			b.client.DeleteQueue(ctx, &awssqs.DeleteQueueInput{QueueUrl: aws.String(u)})
		}
	}
}
