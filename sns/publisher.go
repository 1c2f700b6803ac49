package sns

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssns "github.com/aws/aws-sdk-go-v2/service/sns"
	"github.com/aws/aws-sdk-go-v2/service/sns/types"
	"github.com/aws/smithy-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/awsmsg"
)

// PublishAPI is the part of *sns.Client (github.com/aws/aws-sdk-go-v2/service/sns)
// a Publisher uses.
type PublishAPI interface {
	PublishBatch(ctx context.Context, in *awssns.PublishBatchInput, opts ...func(*awssns.Options)) (*awssns.PublishBatchOutput, error)
}

// MaxMessageSize is SNS's limit on a message, in bytes: 256 KiB, counting
// the body and every attribute's name, type and value.
const MaxMessageSize = 256 << 10

// PublisherConfig configures a Publisher.
type PublisherConfig struct {
	// TopicARNs maps a Message.Topic to the ARN of its SNS topic. A topic
	// it does not map is used as an ARN when it starts with "arn:", and
	// is appended to ARNPrefix otherwise. Default: none.
	TopicARNs map[string]string

	// ARNPrefix turns a topic name into its ARN: for example
	// "arn:aws:sns:eu-west-1:123456789012:". Default: none, and a topic
	// that is neither mapped nor an ARN fails as unpublishable.
	ARNPrefix string

	// MaxMessageSize is the largest message Publish sends, counted as SNS
	// counts (a binary payload travels as base64, a third larger); a
	// larger one fails as exactly.ErrUnpublishable and the relay parks it.
	// Default and maximum MaxMessageSize (256 KiB). It also bounds the
	// bytes of one PublishBatch call.
	MaxMessageSize int

	// BatchSize is the most messages one PublishBatch call carries.
	// Default and maximum 10. (The fauxqs emulator, up to at least 1.9.2,
	// delivers the entries of a batch of 10 out of order, the tenth
	// second: against it, use 9.)
	BatchSize int
}

// Publisher publishes exactly.Messages to SNS topics with PublishBatch, up
// to 10 messages a call. Bodies and attributes are those of the sqs
// package's Publisher (a subscribed queue with raw message delivery gets
// the same message as a direct SQS publish), and so are FIFO topics (an
// ARN ending in ".fifo"): MessageDeduplicationId is the message ID (SNS
// drops a re-publish within 5 minutes) and MessageGroupId the Key (the ID
// when the Key is empty).
//
// A Publisher is safe for concurrent use. The batches of one Publish call
// are sent one after another, in slice order.
type Publisher struct {
	api PublishAPI
	cfg PublisherConfig
}

// NewPublisher returns a Publisher that sends through api, usually an
// *sns.Client (sns.NewFromConfig).
func NewPublisher(api PublishAPI, cfg PublisherConfig) (*Publisher, error) {
	if api == nil {
		return nil, errors.New("sns: NewPublisher: the client is nil")
	}
	if cfg.MaxMessageSize == 0 {
		cfg.MaxMessageSize = MaxMessageSize
	}
	if cfg.MaxMessageSize < 1024 || cfg.MaxMessageSize > MaxMessageSize {
		return nil, fmt.Errorf("sns: NewPublisher: MaxMessageSize is %d, it must be between 1024 and %d bytes", cfg.MaxMessageSize, MaxMessageSize)
	}
	if cfg.BatchSize == 0 {
		cfg.BatchSize = awsmsg.MaxBatchEntries
	}
	if cfg.BatchSize < 1 || cfg.BatchSize > awsmsg.MaxBatchEntries {
		return nil, fmt.Errorf("sns: NewPublisher: BatchSize is %d, it must be between 1 and %d", cfg.BatchSize, awsmsg.MaxBatchEntries)
	}
	for topic, arn := range cfg.TopicARNs {
		if !strings.HasPrefix(arn, "arn:") {
			return nil, fmt.Errorf("sns: NewPublisher: TopicARNs maps topic %q to %q, which is not an ARN", topic, arn)
		}
	}
	return &Publisher{api: api, cfg: cfg}, nil
}

// topicARN returns the ARN of topic's SNS topic.
func (p *Publisher) topicARN(topic string) (string, error) {
	if arn, ok := p.cfg.TopicARNs[topic]; ok {
		return arn, nil
	}
	if strings.HasPrefix(topic, "arn:") {
		return topic, nil
	}
	if p.cfg.ARNPrefix != "" {
		return p.cfg.ARNPrefix + topic, nil
	}
	return "", fmt.Errorf("topic %q is not an ARN, and neither PublisherConfig.TopicARNs nor ARNPrefix names its ARN", topic)
}

// Publish sends every message and waits for SNS's answer on each.
//
// It returns nil when SNS accepted every message, or a *exactly.BatchError
// with one entry per message. Entries matching exactly.ErrUnpublishable
// will never succeed: an invalid message, one larger than MaxMessageSize,
// a topic without an ARN, one SNS refuses for its contents. Every other
// failure is worth retrying: a topic that does not exist (yet), access
// denied, throttling beyond the client's retries, and
// exactly.ErrOutcomeUnknown when the call may have reached SNS but its
// answer did not come back. After a retryable failure the later messages
// of the same topic and key are not sent.
func (p *Publisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("sns: publish not started: %w", err)
	}
	errs := make([]error, len(msgs))
	reqs := make(map[int]types.PublishBatchRequestEntry, len(msgs))
	byTopic := map[string][]awsmsg.Item{}
	var arns []string
	for i, m := range msgs {
		enc, err := awsmsg.Encode(m)
		if err != nil {
			errs[i] = exactly.Unpublishable(fmt.Errorf("sns: %w", err))
			continue
		}
		if n := enc.Size(); n > p.cfg.MaxMessageSize {
			errs[i] = exactly.Unpublishable(fmt.Errorf("sns: message %s is %d bytes (body and attributes), over the limit of %d bytes (MaxMessageSize)",
				m.ID, n, p.cfg.MaxMessageSize))
			continue
		}
		arn, err := p.topicARN(m.Topic)
		if err != nil {
			errs[i] = exactly.Unpublishable(fmt.Errorf("sns: message %s: %w", m.ID, err))
			continue
		}
		req := types.PublishBatchRequestEntry{Message: aws.String(enc.Body), MessageAttributes: attributes(enc.Attrs)}
		if strings.HasSuffix(arn, ".fifo") {
			req.MessageGroupId = aws.String(awsmsg.GroupID(m))
			req.MessageDeduplicationId = aws.String(awsmsg.FIFOID(m.ID))
		}
		reqs[i] = req
		if _, ok := byTopic[arn]; !ok {
			arns = append(arns, arn)
		}
		byTopic[arn] = append(byTopic[arn], awsmsg.Item{I: i, Size: enc.Size()})
	}
	for _, arn := range arns {
		awsmsg.SendInBatches(ctx, "sns", msgs, byTopic[arn], p.cfg.BatchSize, p.cfg.MaxMessageSize, errs, func(ctx context.Context, batch []awsmsg.Item) error {
			return p.sendBatch(ctx, arn, msgs, batch, reqs, errs)
		})
	}
	return exactly.NewBatchError(errs)
}

func (p *Publisher) sendBatch(ctx context.Context, arn string, msgs []*exactly.Message, batch []awsmsg.Item,
	reqs map[int]types.PublishBatchRequestEntry, errs []error) error {
	in := &awssns.PublishBatchInput{TopicArn: aws.String(arn), PublishBatchRequestEntries: make([]types.PublishBatchRequestEntry, len(batch))}
	for k, it := range batch {
		in.PublishBatchRequestEntries[k] = reqs[it.I]
		in.PublishBatchRequestEntries[k].Id = aws.String(strconv.Itoa(k))
	}
	out, err := p.api.PublishBatch(ctx, in)
	if err != nil {
		err = describeCall(ctx, arn, err)
		for _, it := range batch {
			errs[it.I] = fmt.Errorf("sns: message %s: %w", msgs[it.I].ID, err)
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
	awsmsg.RecordAnswer("sns", "SNS", arn, msgs, batch, ok, failed, errs, func(m *exactly.Message, f awsmsg.Refusal) error {
		e := fmt.Errorf("sns: message %s to %s: refused: %s: %s", m.ID, arn, f.Code, f.Message)
		if f.SenderFault && permanentCodes[f.Code] {
			return exactly.Unpublishable(e)
		}
		return e
	})
	return nil
}

// permanentCodes are the batch entry error codes no retry can fix.
var permanentCodes = map[string]bool{
	"InvalidParameter":      true,
	"InvalidParameterValue": true,
	"ValidationError":       true,
}

// describeCall explains the error of a call that failed as a whole: a
// client fault (no such topic, access denied, throttled) sent nothing;
// anything else may have reached SNS.
func describeCall(ctx context.Context, arn string, err error) error {
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorFault() == smithy.FaultClient {
		var nf *types.NotFoundException
		if errors.As(err, &nf) || apiErr.ErrorCode() == "NotFound" {
			return fmt.Errorf("topic %s does not exist; create it or wait for it: %w", arn, err)
		}
		return fmt.Errorf("refused by SNS: %w", err)
	}
	if ctx.Err() != nil {
		return fmt.Errorf("outcome unknown, the context ended before SNS answered; publishing it again is safe: %w: %w", exactly.ErrOutcomeUnknown, err)
	}
	return fmt.Errorf("outcome unknown, no answer from SNS; publishing it again is safe: %w: %w", exactly.ErrOutcomeUnknown, err)
}

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
