package sqs

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/aws-sdk-go-v2/service/sqs/types"
	"github.com/aws/smithy-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/awsmsg"
	"github.com/exactlyonce/exactly/internal/consume"
	"github.com/exactlyonce/exactly/internal/pause"
)

// ConsumeAPI is the part of *sqs.Client a Consumer uses (SendMessageBatch
// and GetQueueUrl for its default dead-letter queue).
type ConsumeAPI interface {
	PublishAPI
	ReceiveMessage(ctx context.Context, in *awssqs.ReceiveMessageInput, opts ...func(*awssqs.Options)) (*awssqs.ReceiveMessageOutput, error)
	DeleteMessageBatch(ctx context.Context, in *awssqs.DeleteMessageBatchInput, opts ...func(*awssqs.Options)) (*awssqs.DeleteMessageBatchOutput, error)
	ChangeMessageVisibility(ctx context.Context, in *awssqs.ChangeMessageVisibilityInput, opts ...func(*awssqs.Options)) (*awssqs.ChangeMessageVisibilityOutput, error)
}

// errNoID is the reason a message without an id is dead-lettered with.
var errNoID = fmt.Errorf("sqs: the message has no exactly-id attribute: %w", exactly.ErrNoID)

// ConsumerConfig configures a Consumer: the settings every consumer shares
// (exactly.ConsumerConfig) and SQS's own. QueueURL and Handler are
// required. On SQS the shared settings mean:
//
//   - Workers (default 1): messages are spread over the workers by
//     Message.Key, so one key's messages are handled one at a time in the
//     order received (on a FIFO queue, the group's order); keyless ones go
//     to the workers in turn.
//   - Retry: a failing message is retried in place while its visibility is
//     extended. Attempts continue from SQS's receive count, so a message
//     redelivered after a crash is dead-lettered once MaxAttempts runs were
//     made in all.
//   - DeadLetter: nil sends dead letters to DeadLetterQueueURL; the
//     original is deleted only once the dead letter is confirmed.
type ConsumerConfig struct {
	exactly.ConsumerConfig

	// QueueURL is the queue to consume. Required.
	QueueURL string

	// VisibilityTimeout is the visibility the Consumer asks for on each
	// receive, and extends by every third of it while the message is held
	// (queued for a worker or being handled). Default 30s, at least 1s,
	// at most 12h. A crashed consumer's messages come back after it: a
	// short one redelivers sooner, at the cost of more ChangeMessageVisibility
	// calls.
	VisibilityTimeout time.Duration

	// WaitTime is the long-polling wait of each receive. Default 20s (the
	// maximum); 0 is not allowed here (short polling costs a call per
	// empty answer); use a small value such as 1s for tests.
	WaitTime time.Duration

	// DeadLetterQueueURL is the queue dead letters go to when DeadLetter
	// is nil; it must be set then, and must not be QueueURL.
	DeadLetterQueueURL string
}

// Consumer receives messages from one SQS queue with long polling and runs
// ConsumerConfig.Handler for each through the policy every consumer of this
// module shares. A message is deleted only after its handler returned nil
// (the effect committed) or it was dead-lettered; deletes are batched.
// While a message is held its visibility is extended, so a slow handler
// keeps it; when Run's context ends the messages not handled are made
// visible again at once.
//
// SQS delivers at least once (a standard queue may deliver a message twice
// even without any failure; a delete that fails or comes too late brings it
// back): wrap the handler with the inbox.
//
// Messages published by a Publisher of this package, and SNS deliveries in
// raw form or in SNS's JSON envelope, are decoded to the Message that was
// published. Message.Topic is the queue's name.
type Consumer struct {
	api    ConsumeAPI
	cfg    ConsumerConfig
	policy *consume.Policy
	noID   consume.Policy
	stats  consume.Stats
	log    *slog.Logger
	queue  string
}

// NewConsumer checks cfg and returns a Consumer.
func NewConsumer(api ConsumeAPI, cfg ConsumerConfig) (*Consumer, error) {
	if api == nil {
		return nil, errors.New("sqs: NewConsumer: the client is nil")
	}
	shared, err := cfg.ConsumerConfig.WithDefaults()
	if err != nil {
		return nil, fmt.Errorf("sqs: NewConsumer: %w", err)
	}
	cfg.ConsumerConfig = shared
	switch {
	case cfg.QueueURL == "":
		return nil, errors.New("sqs: NewConsumer: QueueURL is required")
	case cfg.VisibilityTimeout == 0:
		cfg.VisibilityTimeout = 30 * time.Second
	}
	if cfg.VisibilityTimeout < time.Second || cfg.VisibilityTimeout > 12*time.Hour {
		return nil, fmt.Errorf("sqs: NewConsumer: VisibilityTimeout is %v, it must be between 1s and 12h", cfg.VisibilityTimeout)
	}
	if cfg.WaitTime == 0 {
		cfg.WaitTime = 20 * time.Second
	}
	if cfg.WaitTime < time.Second || cfg.WaitTime > 20*time.Second {
		return nil, fmt.Errorf("sqs: NewConsumer: WaitTime is %v, it must be between 1s and 20s", cfg.WaitTime)
	}
	dl := cfg.DeadLetter
	if dl == nil {
		if cfg.DeadLetterQueueURL == "" || cfg.DeadLetterQueueURL == cfg.QueueURL {
			return nil, errors.New("sqs: NewConsumer: DeadLetterQueueURL is required when DeadLetter is nil, and must not be QueueURL")
		}
		p, err := NewPublisher(api, PublisherConfig{})
		if err != nil {
			return nil, err
		}
		p.fixedURL = cfg.DeadLetterQueueURL
		dl = p
	} else if cfg.DeadLetterQueueURL != "" {
		return nil, errors.New("sqs: NewConsumer: DeadLetterQueueURL is for DeadLetter nil; set one of them")
	}
	policy, err := consume.FromConfig(cfg.ConsumerConfig, dl)
	if err != nil {
		return nil, fmt.Errorf("sqs: NewConsumer: %w", err)
	}
	c := &Consumer{api: api, cfg: cfg, policy: policy, noID: *policy, log: cfg.Logger, queue: cfg.QueueURL[strings.LastIndexByte(cfg.QueueURL, '/')+1:]}
	c.noID.Retry.MaxAttempts = 1
	return c, nil
}

// Stats returns the consumer's totals.
func (c *Consumer) Stats() exactly.ConsumerStats { return c.stats.Load() }

// held is a received message until it is deleted or released.
type held struct {
	m      types.Message
	msg    *exactly.Message
	count  int
	stop   chan struct{}
	done   sync.WaitGroup
	handle string
}

// Run receives and handles messages until ctx ends, then returns nil once
// the handlers in flight returned and the handled messages were deleted.
// Receive errors are logged and retried with backoff; a queue that does not
// exist ends Run with an error.
func (c *Consumer) Run(ctx context.Context) error {
	workers := make([]chan *held, c.cfg.Workers)
	var wg sync.WaitGroup
	deletes := make(chan *held, 64)
	var delWG sync.WaitGroup
	delWG.Go(func() { c.deleter(deletes) })
	capacity := max(10, 2*c.cfg.Workers)
	slots := make(chan struct{}, capacity)
	for i := range workers {
		workers[i] = make(chan *held, capacity)
		wg.Go(func() {
			for h := range workers[i] {
				if ctx.Err() != nil {
					c.release(h)
					<-slots
					continue
				}
				if c.handle(ctx, h) {
					deletes <- h
				} else {
					c.release(h)
				}
				<-slots
			}
		})
	}
	next := 0
	var runErr error
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		slots <- struct{}{} // at least one free
		free := 1
		for free < 10 && len(slots) < capacity {
			slots <- struct{}{}
			free++
		}
		out, err := c.api.ReceiveMessage(ctx, &awssqs.ReceiveMessageInput{
			QueueUrl:                    aws.String(c.cfg.QueueURL),
			MaxNumberOfMessages:         int32(free),
			WaitTimeSeconds:             int32(c.cfg.WaitTime / time.Second),
			VisibilityTimeout:           int32(c.cfg.VisibilityTimeout / time.Second),
			MessageAttributeNames:       []string{"All"},
			MessageSystemAttributeNames: []types.MessageSystemAttributeName{types.MessageSystemAttributeNameAll},
		})
		got := 0
		if out != nil {
			got = len(out.Messages)
		}
		for range free - got {
			<-slots
		}
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			var apiErr smithy.APIError
			if errors.As(err, &apiErr) && isNoQueue(apiErr) {
				runErr = fmt.Errorf("sqs: queue %s does not exist: %w", c.cfg.QueueURL, err)
				break
			}
			c.log.Warn("sqs: receive failed; retrying", "queue", c.queue, "err", err)
			pause.For(ctx, backoff)
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		for _, m := range out.Messages {
			h := c.hold(m)
			w := next
			if h.msg.Key != "" {
				f := fnv.New32a()
				f.Write([]byte(h.msg.Key))
				w = int(f.Sum32() % uint32(len(workers)))
			} else {
				next = (next + 1) % len(workers)
			}
			workers[w] <- h
		}
	}
	for _, w := range workers {
		close(w)
	}
	wg.Wait()
	close(deletes)
	delWG.Wait()
	return runErr
}

// hold decodes m and keeps it invisible until it is deleted or released.
func (c *Consumer) hold(m types.Message) *held {
	h := &held{m: m, stop: make(chan struct{}), handle: aws.ToString(m.ReceiptHandle)}
	h.count, _ = strconv.Atoi(m.Attributes[string(types.MessageSystemAttributeNameApproximateReceiveCount)])
	h.msg = c.decode(m)
	every := c.cfg.VisibilityTimeout / 3
	h.done.Go(func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-h.stop:
				return
			case <-t.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), every)
			_, err := c.api.ChangeMessageVisibility(ctx, &awssqs.ChangeMessageVisibilityInput{QueueUrl: aws.String(c.cfg.QueueURL),
				ReceiptHandle: aws.String(h.handle), VisibilityTimeout: int32(c.cfg.VisibilityTimeout / time.Second)})
			cancel()
			if err != nil {
				c.log.Warn("sqs: could not extend a message's visibility; it may be delivered again", "queue", c.queue, "id", h.msg.ID, "err", err)
			}
		}
	})
	return h
}

func (h *held) unhold() {
	close(h.stop)
	h.done.Wait()
}

// handle runs the policy for h and reports whether it may be deleted.
func (c *Consumer) handle(ctx context.Context, h *held) bool {
	c.stats.Received.Add(1)
	if h.count > 1 {
		c.stats.Redeliveries.Add(1)
	}
	var err error
	if h.msg.ID == "" {
		h.msg.ID = "sqs-noid-" + aws.ToString(h.m.MessageId)
		c.log.Error("sqs: message without an id; dead-lettering it", "queue", c.queue, "dead_letter_id", h.msg.ID)
		_, err = c.noID.Process(ctx, func(context.Context, *exactly.Message) error { return errNoID }, h.msg, 1, &c.stats)
	} else {
		_, err = c.policy.Process(ctx, c.cfg.Handler, h.msg, max(h.count, 1), &c.stats)
	}
	return err == nil
}

// release makes h visible again at once, for the next consumer.
func (c *Consumer) release(h *held) {
	h.unhold()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.api.ChangeMessageVisibility(ctx, &awssqs.ChangeMessageVisibilityInput{QueueUrl: aws.String(c.cfg.QueueURL),
		ReceiptHandle: aws.String(h.handle), VisibilityTimeout: 0}); err != nil {
		c.log.Debug("sqs: could not release a message; it comes back after its visibility timeout", "queue", c.queue, "err", err)
	}
}

// deleter deletes the handled messages, up to 10 a call.
func (c *Consumer) deleter(in <-chan *held) {
	for h := range in {
		batch := []*held{h}
	more:
		for len(batch) < 10 {
			select {
			case h, ok := <-in:
				if !ok {
					break more
				}
				batch = append(batch, h)
			default:
				break more
			}
		}
		c.delete(batch)
	}
}

func (c *Consumer) delete(batch []*held) {
	in := &awssqs.DeleteMessageBatchInput{QueueUrl: aws.String(c.cfg.QueueURL)}
	for k, h := range batch {
		in.Entries = append(in.Entries, types.DeleteMessageBatchRequestEntry{Id: aws.String(strconv.Itoa(k)), ReceiptHandle: aws.String(h.handle)})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	out, err := c.api.DeleteMessageBatch(ctx, in)
	cancel()
	failed := make([]error, len(batch))
	if err != nil {
		for k := range failed {
			failed[k] = err
		}
	} else {
		for _, f := range out.Failed {
			if k, err := strconv.Atoi(aws.ToString(f.Id)); err == nil && k >= 0 && k < len(batch) {
				failed[k] = fmt.Errorf("%s: %s", aws.ToString(f.Code), aws.ToString(f.Message))
			}
		}
	}
	for k, h := range batch {
		h.unhold()
		if failed[k] != nil {
			c.log.Warn("sqs: could not delete a handled message; SQS will deliver it again", "queue", c.queue, "id", h.msg.ID, "err", failed[k])
			c.policy.AckFailed(h.msg, failed[k], &c.stats)
		}
	}
}

// snsEnvelope is the JSON body of an SNS delivery without raw delivery.
type snsEnvelope struct {
	Type              string
	TopicArn          string
	Message           string
	MessageAttributes map[string]struct{ Type, Value string }
}

// decode turns a received message into a Message; ID is empty when the
// message carries none.
func (c *Consumer) decode(m types.Message) *exactly.Message {
	body := aws.ToString(m.Body)
	var attrs []awsmsg.Attr
	for name, v := range m.MessageAttributes {
		attrs = append(attrs, awsmsg.Attr{Name: name, Type: aws.ToString(v.DataType), String: aws.ToString(v.StringValue), Binary: v.BinaryValue})
	}
	if _, ok := m.MessageAttributes[exactly.HeaderID]; !ok && strings.HasPrefix(body, "{") {
		var env snsEnvelope
		if json.Unmarshal([]byte(body), &env) == nil && env.Type == "Notification" && env.TopicArn != "" {
			body = env.Message
			attrs = attrs[:0]
			for name, v := range env.MessageAttributes {
				a := awsmsg.Attr{Name: name, Type: v.Type, String: v.Value}
				if strings.HasPrefix(v.Type, "Binary") {
					a.Binary, _ = base64.StdEncoding.DecodeString(v.Value)
				}
				attrs = append(attrs, a)
			}
		}
	}
	msg := &exactly.Message{Topic: c.queue}
	d, err := awsmsg.Decode(body, attrs)
	if err != nil {
		c.log.Warn("sqs: message not in exactly's encoding; its body is the payload", "queue", c.queue, "err", err)
		d.Payload = []byte(body)
	}
	msg.ID, msg.Key, msg.Payload, msg.CreatedAt = d.ID, d.Key, d.Payload, d.CreatedAt
	if len(d.Headers) > 0 {
		msg.Headers = d.Headers
	}
	return msg
}
