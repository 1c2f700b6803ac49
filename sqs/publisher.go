package sqs

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/aws-sdk-go-v2/service/sqs/types"
	"github.com/aws/smithy-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/awsmsg"
)

// PublishAPI is the part of *sqs.Client (github.com/aws/aws-sdk-go-v2/service/sqs)
// a Publisher uses.
type PublishAPI interface {
	SendMessageBatch(ctx context.Context, in *awssqs.SendMessageBatchInput, opts ...func(*awssqs.Options)) (*awssqs.SendMessageBatchOutput, error)
	GetQueueUrl(ctx context.Context, in *awssqs.GetQueueUrlInput, opts ...func(*awssqs.Options)) (*awssqs.GetQueueUrlOutput, error)
}

// DefaultMaxMessageSize is the default PublisherConfig.MaxMessageSize:
// 256 KiB, the limit of SNS and of every SQS queue created before 2025.
const DefaultMaxMessageSize = 256 << 10

// PublisherConfig configures a Publisher. The zero value is ready to use:
// every topic is the name of its queue.
type PublisherConfig struct {
	// QueueURLs maps a topic to the URL of its queue. A topic it does not
	// name is looked up once with GetQueueUrl, by QueueName(topic), and
	// the URL is kept for the Publisher's life. Default: none.
	QueueURLs map[string]string

	// QueueName names the queue of a topic QueueURLs does not map, for
	// GetQueueUrl. Default: the topic itself. A FIFO queue's name ends in
	// ".fifo", and so must the name returned for it.
	QueueName func(topic string) string

	// QueueOwner is the AWS account id that owns the queues looked up by
	// name, when it is not the caller's own. Default: the caller's account.
	QueueOwner string

	// MaxMessageSize is the largest message Publish sends, in bytes,
	// counted as SQS counts: the body (a binary payload travels as base64,
	// a third larger) plus every attribute's name, type and value. A larger
	// message fails as exactly.ErrUnpublishable and the relay parks it.
	// Default DefaultMaxMessageSize (256 KiB). Queues accept up to their
	// MaximumMessageSize attribute (up to 1 MiB): a value above it makes
	// SQS refuse the message instead, which is also reported as
	// unpublishable, but only after a round trip. It also bounds the bytes
	// of one SendMessageBatch call.
	MaxMessageSize int
}

// Publisher publishes exactly.Messages to SQS queues with SendMessageBatch,
// up to 10 messages a call.
//
// Each message goes to the queue of its Topic (PublisherConfig.QueueURLs,
// or GetQueueUrl by name). Its body is the payload when the payload is
// text SQS accepts, and its base64 otherwise (the exactly-encoding
// attribute says which). Its attributes are exactly-id, exactly-key,
// exactly-created-at and the headers; see the package documentation for
// how headers beyond SQS's 10 attributes travel.
//
// On a FIFO queue (its URL ends in ".fifo") MessageDeduplicationId is the
// message ID, so SQS itself drops a re-publish within its 5-minute
// deduplication window, and MessageGroupId is the Key, so SQS keeps a
// key's order; a message with an empty Key is its own group (its ID): it
// needs no order, and waits for no other message. A Key or ID that is not
// 1-128 printable ASCII characters becomes "sha256-" and its hex SHA-256.
// Standard queues carry the ID in the exactly-id attribute only: they
// deliver a message at least once, in no guaranteed order.
//
// A Publisher is safe for concurrent use. The batches of one Publish call
// are sent one after another, in slice order; the caller must not publish
// the same key from two concurrent calls if it needs their relative order.
type Publisher struct {
	api PublishAPI
	cfg PublisherConfig

	mu   sync.Mutex
	urls map[string]string // topic -> queue URL

	fixedURL string // every topic's queue, for a Consumer's dead letters
}

// NewPublisher returns a Publisher that sends through api, usually an
// *sqs.Client (sqs.NewFromConfig): its retryer retries throttling and
// transient errors before Publish sees them.
func NewPublisher(api PublishAPI, cfg PublisherConfig) (*Publisher, error) {
	if api == nil {
		return nil, errors.New("sqs: NewPublisher: the client is nil")
	}
	if cfg.MaxMessageSize == 0 {
		cfg.MaxMessageSize = DefaultMaxMessageSize
	}
	if cfg.MaxMessageSize < 1024 || cfg.MaxMessageSize > 1<<20 {
		return nil, fmt.Errorf("sqs: NewPublisher: MaxMessageSize is %d, it must be between 1024 and 1048576 bytes (SQS's range)", cfg.MaxMessageSize)
	}
	p := &Publisher{api: api, cfg: cfg, urls: make(map[string]string, len(cfg.QueueURLs))}
	for topic, url := range cfg.QueueURLs {
		if url == "" {
			return nil, fmt.Errorf("sqs: NewPublisher: QueueURLs maps topic %q to an empty URL", topic)
		}
		p.urls[topic] = url
	}
	return p, nil
}

// entry is a message ready to send.
type entry struct {
	i   int // index in the Publish call
	req types.SendMessageBatchRequestEntry
	n   int // size as SQS counts it
}

// Publish sends every message and waits for SQS's answer on each.
//
// It returns nil when SQS accepted every message, or a *exactly.BatchError
// with one entry per message. Entries matching exactly.ErrUnpublishable
// will never succeed: an invalid message (no ID, no topic), one larger
// than MaxMessageSize, one SQS refuses for its contents or size. Every
// other failure is worth retrying: a queue that does not exist (yet), or
// access denied, or throttling beyond the client's retries, and
// exactly.ErrOutcomeUnknown when the call may have reached SQS but its
// answer did not come back (a timeout, a dropped connection, a server
// error, ctx ending mid-call). A FIFO queue drops a re-publish of a stored
// message within 5 minutes; beyond that, and on standard queues, the
// exactly-id attribute lets the inbox drop it.
//
// After a retryable failure the later messages of the same queue and key
// are not sent (they fail with a retryable error), so for each key the
// messages SQS accepted are a prefix of the call's, as long as SQS does
// not fail single entries of a batch for a retryable reason.
func (p *Publisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("sqs: publish not started: %w", err)
	}
	errs := make([]error, len(msgs))
	byQueue := map[string][]entry{}
	var queues []string           // in order of first appearance
	lookups := map[string]error{} // topic -> why its queue was not found, in this call
	for i, m := range msgs {
		enc, err := awsmsg.Encode(m)
		if err != nil {
			errs[i] = exactly.Unpublishable(fmt.Errorf("sqs: %w", err))
			continue
		}
		if n := enc.Size(); n > p.cfg.MaxMessageSize {
			errs[i] = exactly.Unpublishable(fmt.Errorf("sqs: message %s is %d bytes (body and attributes), over the limit of %d bytes (MaxMessageSize)",
				m.ID, n, p.cfg.MaxMessageSize))
			continue
		}
		url, err := p.queueURL(ctx, m.Topic, lookups)
		if err != nil {
			errs[i] = fmt.Errorf("sqs: message %s not sent: %w", m.ID, err)
			continue
		}
		e := entry{i: i, n: enc.Size(), req: types.SendMessageBatchRequestEntry{
			MessageBody:       aws.String(enc.Body),
			MessageAttributes: attributes(enc.Attrs),
		}}
		if isFIFO(url) {
			e.req.MessageGroupId = aws.String(awsmsg.GroupID(m))
			e.req.MessageDeduplicationId = aws.String(awsmsg.FIFOID(m.ID))
		}
		if _, ok := byQueue[url]; !ok {
			queues = append(queues, url)
		}
		byQueue[url] = append(byQueue[url], e)
	}
	for _, url := range queues {
		entries := byQueue[url]
		items := make([]awsmsg.Item, len(entries))
		reqs := make(map[int]types.SendMessageBatchRequestEntry, len(entries))
		for k, e := range entries {
			items[k] = awsmsg.Item{I: e.i, Size: e.n}
			reqs[e.i] = e.req
		}
		awsmsg.SendInBatches(ctx, "sqs", msgs, items, awsmsg.MaxBatchEntries, p.cfg.MaxMessageSize, errs, func(ctx context.Context, batch []awsmsg.Item) error {
			return p.sendBatch(ctx, url, msgs, batch, reqs, errs)
		})
	}
	return exactly.NewBatchError(errs)
}

// sendBatch sends one SendMessageBatch call and records each entry's
// outcome. It returns the call's error when the call failed as a whole.
func (p *Publisher) sendBatch(ctx context.Context, url string, msgs []*exactly.Message, batch []awsmsg.Item,
	reqs map[int]types.SendMessageBatchRequestEntry, errs []error) error {
	in := &awssqs.SendMessageBatchInput{QueueUrl: aws.String(url), Entries: make([]types.SendMessageBatchRequestEntry, len(batch))}
	for k, it := range batch {
		in.Entries[k] = reqs[it.I]
		in.Entries[k].Id = aws.String(strconv.Itoa(k))
	}
	out, err := p.api.SendMessageBatch(ctx, in)
	if err != nil {
		err = describeCall(ctx, url, err)
		for _, it := range batch {
			errs[it.I] = fmt.Errorf("sqs: message %s: %w", msgs[it.I].ID, err)
		}
		return err
	}
	ok := make([]string, len(out.Successful))
	for i, e := range out.Successful {
		ok[i] = aws.ToString(e.Id)
	}
	failed := make([]awsmsg.Refusal, len(out.Failed))
	for i, f := range out.Failed {
		failed[i] = awsmsg.Refusal{ID: aws.ToString(f.Id), Code: aws.ToString(f.Code), Message: aws.ToString(f.Message), SenderFault: f.SenderFault}
	}
	awsmsg.RecordAnswer("sqs", "SQS", url, msgs, batch, ok, failed, errs, func(m *exactly.Message, f awsmsg.Refusal) error {
		return describeEntry(m, url, f)
	})
	return nil
}

// permanentCodes are the batch entry error codes no retry can fix.
var permanentCodes = map[string]bool{
	"InvalidMessageContents": true,
	"InvalidParameterValue":  true,
	"InvalidAttributeName":   true,
	"InvalidAttributeValue":  true,
	"MessageTooLong":         true,
}

func describeEntry(m *exactly.Message, url string, f awsmsg.Refusal) error {
	err := fmt.Errorf("sqs: message %s to %s: refused: %s: %s", m.ID, url, f.Code, f.Message)
	if f.SenderFault && permanentCodes[f.Code] {
		return exactly.Unpublishable(err)
	}
	return err
}

// describeCall explains the error of a call that failed as a whole. A call
// SQS refused for a reason of the caller's (a client fault: no such queue,
// access denied, throttled) sent nothing; anything else may have reached
// SQS.
func describeCall(ctx context.Context, url string, err error) error {
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorFault() == smithy.FaultClient {
		if isNoQueue(apiErr) {
			return fmt.Errorf("queue %s does not exist; create it or wait for it: %w", url, err)
		}
		return fmt.Errorf("refused by SQS: %w", err)
	}
	if ctx.Err() != nil {
		return fmt.Errorf("outcome unknown, the context ended before SQS answered; publishing it again is safe: %w: %w", exactly.ErrOutcomeUnknown, err)
	}
	return fmt.Errorf("outcome unknown, no answer from SQS; publishing it again is safe: %w: %w", exactly.ErrOutcomeUnknown, err)
}

func isNoQueue(err smithy.APIError) bool {
	switch err.ErrorCode() {
	case "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist":
		return true
	}
	var qe *types.QueueDoesNotExist
	return errors.As(err, &qe)
}

// queueURL returns the URL of topic's queue, looking it up once; failed
// records the topics whose lookup failed in this Publish call, so it is not
// repeated for each of their messages.
func (p *Publisher) queueURL(ctx context.Context, topic string, failed map[string]error) (string, error) {
	if p.fixedURL != "" {
		return p.fixedURL, nil
	}
	p.mu.Lock()
	url, ok := p.urls[topic]
	p.mu.Unlock()
	if ok {
		return url, nil
	}
	if err, ok := failed[topic]; ok {
		return "", err
	}
	url, err := p.lookup(ctx, topic)
	if err != nil {
		failed[topic] = err
	}
	return url, err
}

func (p *Publisher) lookup(ctx context.Context, topic string) (string, error) {
	name := topic
	if p.cfg.QueueName != nil {
		name = p.cfg.QueueName(topic)
	}
	in := &awssqs.GetQueueUrlInput{QueueName: aws.String(name)}
	if p.cfg.QueueOwner != "" {
		in.QueueOwnerAWSAccountId = aws.String(p.cfg.QueueOwner)
	}
	out, err := p.api.GetQueueUrl(ctx, in)
	if err != nil {
		var apiErr smithy.APIError
		if errors.As(err, &apiErr) && isNoQueue(apiErr) {
			return "", fmt.Errorf("no queue named %q for topic %q; create it, or map the topic in PublisherConfig.QueueURLs: %w", name, topic, err)
		}
		return "", fmt.Errorf("looking up the queue %q of topic %q: %w", name, topic, err)
	}
	url := aws.ToString(out.QueueUrl)
	p.mu.Lock()
	p.urls[topic] = url
	p.mu.Unlock()
	return url, nil
}

func isFIFO(url string) bool { return strings.HasSuffix(url, ".fifo") }

func attributes(attrs []awsmsg.Attr) map[string]types.MessageAttributeValue {
	out := make(map[string]types.MessageAttributeValue, len(attrs))
	for _, a := range attrs {
		v := types.MessageAttributeValue{DataType: aws.String(a.Type)}
		if a.Type == "Binary" {
			v.BinaryValue = a.Binary
		} else {
			v.StringValue = aws.String(a.String)
		}
		out[a.Name] = v
	}
	return out
}
