package sqs_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/sqstest"
	"github.com/exactlyonce/exactly/sqs"
)

// lossyAPI passes calls to a real client and counts them; while loseAnswers
// is set, it drops the answer of every SendMessageBatch that SQS accepted,
// as a timeout after the request reached SQS would.
type lossyAPI struct {
	sqs.PublishAPI
	loseAnswers atomic.Bool
	sends       atomic.Int32
	lookups     atomic.Int32
}

var errAnswerLost = errors.New("read tcp: i/o timeout (the answer was lost)")

func (l *lossyAPI) SendMessageBatch(ctx context.Context, in *awssqs.SendMessageBatchInput, opts ...func(*awssqs.Options)) (*awssqs.SendMessageBatchOutput, error) {
	l.sends.Add(1)
	out, err := l.PublishAPI.SendMessageBatch(ctx, in, opts...)
	if err == nil && l.loseAnswers.Load() {
		return nil, errAnswerLost
	}
	return out, err
}

func (l *lossyAPI) GetQueueUrl(ctx context.Context, in *awssqs.GetQueueUrlInput, opts ...func(*awssqs.Options)) (*awssqs.GetQueueUrlOutput, error) {
	l.lookups.Add(1)
	return l.PublishAPI.GetQueueUrl(ctx, in, opts...)
}

func batch(topic string, keys, perKey int) []*exactly.Message {
	var msgs []*exactly.Message
	for seq := range perKey {
		for k := range keys {
			msgs = append(msgs, &exactly.Message{ID: exactly.NewID(), Topic: topic, Key: fmt.Sprintf("k-%d", k), Payload: fmt.Appendf(nil, "%d", seq)})
		}
	}
	return msgs
}

// A publish whose answer is lost after SQS stored the messages is reported
// as outcome unknown, never as confirmed nor unpublishable; published again
// with the same ids, a FIFO queue stores each once, and the queue URL was
// looked up once for all of it.
func TestLostAnswerRepublished(t *testing.T) {
	t.Parallel()
	e := sqstest.NewSQSQueues(t)
	topic := sqstest.QueueName(true)
	url := e.CreateQueue(t, topic, nil)
	api := &lossyAPI{PublishAPI: e.Client}
	p, err := sqs.NewPublisher(api, sqs.PublisherConfig{})
	if err != nil {
		t.Fatal(err)
	}
	msgs := batch(topic, 3, 10)
	api.loseAnswers.Store(true)
	err = p.Publish(t.Context(), msgs)
	for i, e := range exactly.PerMessage(err, len(msgs)) {
		switch {
		case e == nil:
			t.Fatalf("message %d reported confirmed though its answer was lost", i)
		case errors.Is(e, exactly.ErrUnpublishable):
			t.Fatalf("message %d reported unpublishable after a lost answer: %v", i, e)
		case i < 10 && !errors.Is(e, exactly.ErrOutcomeUnknown):
			t.Fatalf("message %d of the first batch: %v, want exactly.ErrOutcomeUnknown", i, e)
		}
	}
	if n := api.sends.Load(); n != 1 {
		t.Fatalf("%d SendMessageBatch calls after the first answer was lost, want 1 (the rest of the queue waits)", n)
	}
	api.loseAnswers.Store(false)
	if err := p.Publish(t.Context(), msgs); err != nil {
		t.Fatalf("publishing again: %v", err)
	}
	got := e.Read(t, url, len(msgs)+1, 3*time.Second)
	counts := map[string]int{}
	for _, r := range got {
		counts[r.ID]++
	}
	for _, m := range msgs {
		if counts[m.ID] != 1 {
			t.Fatalf("message %s stored %d times, want 1 (the FIFO queue drops the re-send by its dedup id)", m.ID, counts[m.ID])
		}
	}
	if n := api.lookups.Load(); n != 1 {
		t.Fatalf("GetQueueUrl called %d times, want once", n)
	}
}

// A topic without a queue fails with a retryable error naming the queue,
// and publishing works once the queue exists.
func TestMissingQueueRetryable(t *testing.T) {
	t.Parallel()
	e := sqstest.NewSQSQueues(t)
	topic := sqstest.QueueName(false)
	p, err := sqs.NewPublisher(e.Client, sqs.PublisherConfig{})
	if err != nil {
		t.Fatal(err)
	}
	msgs := batch(topic, 2, 2)
	err = p.Publish(t.Context(), msgs)
	for i, e := range exactly.PerMessage(err, len(msgs)) {
		if e == nil || errors.Is(e, exactly.ErrUnpublishable) || !strings.Contains(e.Error(), topic) {
			t.Fatalf("message %d to a missing queue: %v, want a retryable error naming the queue", i, e)
		}
	}
	url := e.CreateQueue(t, topic, nil)
	if err := p.Publish(t.Context(), msgs); err != nil {
		t.Fatalf("publishing once the queue exists: %v", err)
	}
	if got := e.Read(t, url, len(msgs), 10*time.Second); len(got) != len(msgs) {
		t.Fatalf("read %d messages, want %d", len(got), len(msgs))
	}
}

// Headers beyond the room of SQS's 10 attributes, or with names or values
// an attribute cannot take, travel in exactly-headers; a binary key and
// payload come back as they were; a message over the size limit only by
// its attributes is unpublishable.
func TestAttributesBeyondTheLimits(t *testing.T) {
	t.Parallel()
	e := sqstest.NewSQSQueues(t)
	topic := sqstest.QueueName(true)
	url := e.CreateQueue(t, topic, nil)
	p, err := sqs.NewPublisher(e.Client, sqs.PublisherConfig{})
	if err != nil {
		t.Fatal(err)
	}
	many := map[string]string{}
	for i := range 12 {
		many[fmt.Sprintf("h-%02d", i)] = fmt.Sprint(i)
	}
	msgs := []*exactly.Message{
		{ID: exactly.NewID(), Topic: topic, Key: "k", Payload: []byte("many"), Headers: many},
		{ID: exactly.NewID(), Topic: topic, Key: "k", Payload: []byte("odd names"), Headers: map[string]string{"AWS.trace": "x", "with space": "y", "empty": ""}},
		{ID: exactly.NewID(), Topic: topic, Key: "\x00\xffbinary", Payload: []byte{0, 1, 2, 0xff}},
		{ID: exactly.NewID(), Topic: topic, Key: "k", Payload: []byte("big"), Headers: map[string]string{"big": strings.Repeat("v", sqs.DefaultMaxMessageSize)}},
	}
	errs := exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs))
	for i, err := range errs[:3] {
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	if !errors.Is(errs[3], exactly.ErrUnpublishable) {
		t.Fatalf("a message over the limit by its headers: %v, want unpublishable", errs[3])
	}
	got := e.Read(t, url, 3, 10*time.Second)
	if len(got) != 3 {
		t.Fatalf("read %d messages, want 3", len(got))
	}
	byID := map[string]int{}
	for i, r := range got {
		byID[r.ID] = i
	}
	for i, m := range msgs[:3] {
		r := got[byID[m.ID]]
		if r.Key != m.Key || string(r.Payload) != string(m.Payload) {
			t.Errorf("message %d: key %q payload %q, want %q %q", i, r.Key, r.Payload, m.Key, m.Payload)
		}
		for k, v := range m.Headers {
			if r.Headers[k] != v {
				t.Errorf("message %d: header %q = %q, want %q", i, k, r.Headers[k], v)
			}
		}
	}
}
