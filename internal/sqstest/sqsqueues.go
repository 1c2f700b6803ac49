// Package sqstest holds the SQS test helpers: queues on the emulator and what
// a test read from them. It lives apart from testenv because it builds on
// exactlytest, which testenv must not import (the inbox tests use testenv).
package sqstest

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/awsmsg"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// SQSQueues is a client of the SQS emulator, the queues a test creates on
// it and what the test read from them.
type SQSQueues struct {
	Client *awssqs.Client

	mu   sync.Mutex
	read map[string][]readMessage // queue URL -> messages read so far
	seen map[string]bool          // SQS message ids read so far
}

// NewSQSQueues connects to the emulator (see AWSConfig).
func NewSQSQueues(t testing.TB) *SQSQueues {
	t.Helper()
	return &SQSQueues{Client: awssqs.NewFromConfig(testenv.AWSConfig(t)), read: map[string][]readMessage{}, seen: map[string]bool{}}
}

// QueueName returns a fresh queue (or topic) name, FIFO or standard.
func QueueName(fifo bool) string {
	name := "exactly-test-" + strings.ReplaceAll(exactly.NewID(), "-", "")
	if fifo {
		name += ".fifo"
	}
	return name
}

// CreateQueue creates a queue named name, deleted when the test ends, and
// returns its URL.
func (e *SQSQueues) CreateQueue(t testing.TB, name string, attrs map[string]string) string {
	t.Helper()
	a := map[string]string{}
	if strings.HasSuffix(name, ".fifo") {
		a["FifoQueue"] = "true"
	}
	for k, v := range attrs {
		a[k] = v
	}
	out, err := e.Client.CreateQueue(t.Context(), &awssqs.CreateQueueInput{QueueName: aws.String(name), Attributes: a})
	if err != nil {
		t.Fatalf("creating queue %s: %v", name, err)
	}
	url := aws.ToString(out.QueueUrl)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := e.Client.DeleteQueue(ctx, &awssqs.DeleteQueueInput{QueueUrl: aws.String(url)}); err != nil {
			t.Errorf("deleting queue %s: %v", name, err)
		}
	})
	return url
}

// Read returns the messages read from the queue at url so far plus
// those it holds now, receiving (and deleting) until it has n or timeout
// has passed.
func (e *SQSQueues) Read(t testing.TB, url string, n int, timeout time.Duration) []exactlytest.Received {
	t.Helper()
	deadline := time.Now().Add(timeout)
	e.mu.Lock()
	have := len(e.read[url])
	e.mu.Unlock()
	for have < n {
		wait := int32(min(time.Until(deadline), time.Second) / time.Second)
		out, err := e.Client.ReceiveMessage(t.Context(), &awssqs.ReceiveMessageInput{
			QueueUrl:                    aws.String(url),
			MaxNumberOfMessages:         10,
			WaitTimeSeconds:             max(wait, 0),
			VisibilityTimeout:           1,
			MessageAttributeNames:       []string{"All"},
			MessageSystemAttributeNames: []types.MessageSystemAttributeName{types.MessageSystemAttributeNameAll},
		})
		if err != nil {
			if t.Context().Err() != nil || !time.Now().Before(deadline) {
				t.Fatalf("receiving from %s: %v", url, err)
			}
			// Under the race detector, an answer of the emulator is now and
			// then cut off ("use of closed network connection" while its
			// body is read). The client retries such a call by itself, and
			// this one once more; either way the messages of the lost
			// answer come back after the visibility timeout (1s, short for
			// that reason), and seen records each once.
			t.Logf("receiving from %s: %v", url, err)
			continue
		}
		var del []types.DeleteMessageBatchRequestEntry
		for _, m := range out.Messages {
			e.append(t, url, m)
			del = append(del, types.DeleteMessageBatchRequestEntry{Id: aws.String(aws.ToString(m.MessageId)), ReceiptHandle: m.ReceiptHandle})
		}
		if len(del) > 0 {
			out, err := e.Client.DeleteMessageBatch(t.Context(), &awssqs.DeleteMessageBatchInput{QueueUrl: aws.String(url), Entries: del})
			if err == nil && len(out.Failed) > 0 {
				err = fmt.Errorf("%d entries failed, first: %s: %s", len(out.Failed), aws.ToString(out.Failed[0].Code), aws.ToString(out.Failed[0].Message))
			}
			if err != nil {
				t.Fatalf("deleting from %s: %v", url, err)
			}
		}
		e.mu.Lock()
		have = len(e.read[url])
		e.mu.Unlock()
		if !time.Now().Before(deadline) {
			break
		}
	}
	e.mu.Lock()
	read := slices.Clone(e.read[url])
	e.mu.Unlock()
	if !strings.HasSuffix(url, ".fifo") {
		// A standard queue keeps no order, and a message whose receive
		// was cut off comes back later: read it in the order SQS
		// stamped the messages, and in the millisecond of a stamp in the
		// order of the publisher suite's x-seq header.
		slices.SortStableFunc(read, func(a, b readMessage) int {
			if c := cmp.Compare(a.sent, b.sent); c != 0 {
				return c
			}
			as, _ := strconv.Atoi(a.Headers["x-seq"])
			bs, _ := strconv.Atoi(b.Headers["x-seq"])
			return cmp.Compare(as, bs)
		})
	}
	out := make([]exactlytest.Received, len(read))
	for i, r := range read {
		out[i] = r.Received
	}
	return out
}

type readMessage struct {
	exactlytest.Received
	sent int64 // SentTimestamp, ms
}

func (e *SQSQueues) append(t testing.TB, url string, m types.Message) {
	t.Helper()
	r := received(t, aws.ToString(m.Body), m.MessageAttributes)
	r.NativeID = m.Attributes[string(types.MessageSystemAttributeNameMessageDeduplicationId)]
	e.mu.Lock()
	defer e.mu.Unlock()
	if id := aws.ToString(m.MessageId); !e.seen[id] {
		e.seen[id] = true
		sent, _ := strconv.ParseInt(m.Attributes[string(types.MessageSystemAttributeNameSentTimestamp)], 10, 64)
		e.read[url] = append(e.read[url], readMessage{r, sent})
	}
}

// received decodes a message as the Publisher encoded it.
func received(t testing.TB, body string, attrs map[string]types.MessageAttributeValue) exactlytest.Received {
	t.Helper()
	var as []awsmsg.Attr
	for name, v := range attrs {
		as = append(as, awsmsg.Attr{Name: name, Type: aws.ToString(v.DataType), String: aws.ToString(v.StringValue), Binary: v.BinaryValue})
	}
	d, err := awsmsg.Decode(body, as)
	if err != nil {
		t.Fatalf("decoding a message: %v", err)
	}
	h := d.Headers
	h[exactly.HeaderID] = d.ID
	if d.Key != "" {
		h[exactly.HeaderKey] = d.Key
	}
	return exactlytest.Received{ID: d.ID, Key: d.Key, Payload: d.Payload, Headers: h}
}
