package pubsub_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"google.golang.org/grpc/codes"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/pubsub"
)

func TestPublisherSuite(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	exactlytest.RunPublisherSuite(t, exactlytest.PublisherHarness{
		New: func(t *testing.T) (exactly.Publisher, string) {
			return f.publisher(t, pubsub.PublisherConfig{}), f.topic(t)
		},
		Read: f.read,
		// Pub/Sub's 10 MB bounds the whole request; a payload of that
		// size with its attributes is already over it.
		MaxMessageSize: pubsub.MaxRequestBytes,
		// Pub/Sub stores every copy it is given.
		NativeDedup: false,
		// The server holds a message once Publish confirmed it.
		Settle: 200 * time.Millisecond,
	})
}

// A request that fails on one ordering key pauses that key only: the other
// keys of the call are confirmed, the key's confirmed messages are a prefix
// of its messages (nothing later is stored ahead of the failed one), and
// the next Publish of the key, the relay's retry, resumes it with its order
// kept.
func TestPausedKeyResumes(t *testing.T) {
	t.Parallel()
	fail := &failPublish{code: codes.FailedPrecondition}
	f := newFake(t, fail.option())
	topic := f.topic(t)
	p := f.publisher(t, pubsub.PublisherConfig{})

	// Fail the request that holds message 2 of key "a", once.
	fail.set(1, func(req *pb.PublishRequest) bool {
		for _, m := range req.Messages {
			if m.OrderingKey == "a" && m.Attributes["x-seq"] == "2" {
				return true
			}
		}
		return false
	})
	msgs := messages(topic, []string{"a", "b", "c"}, 6)
	errs := exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs))
	if fail.count() != 1 {
		t.Fatalf("the failure was injected %d times, want 1", fail.count())
	}
	var retry []*exactly.Message
	failedA := false
	for i, m := range msgs {
		err := errs[i]
		switch {
		case m.Key != "a" && err != nil:
			t.Fatalf("message %d of key %q failed beside the failing key: %v", i, m.Key, err)
		case m.Key == "a" && err == nil && failedA:
			t.Fatalf("message %d of key a confirmed after an earlier one of the key failed", i)
		case err != nil && errors.Is(err, exactly.ErrUnpublishable):
			t.Fatalf("message %d: a refused request made it unpublishable: %v", i, err)
		case err != nil:
			failedA = true
			retry = append(retry, m)
		}
	}
	if len(retry) < 4 {
		t.Fatalf("%d messages of key a failed, want at least 4 (message 2 and those after it)", len(retry))
	}
	if got := f.stored(topic); countKey(got, "a") != 6-len(retry) {
		t.Fatalf("the server holds %d messages of key a, want the %d confirmed", countKey(got, "a"), 6-len(retry))
	}

	// The relay publishes the failed messages again, in order.
	if err := p.Publish(t.Context(), retry); err != nil {
		t.Fatalf("the retry of the paused key failed: %v", err)
	}
	got := f.stored(topic)
	if len(got) != len(msgs) {
		t.Fatalf("the server holds %d messages, want %d", len(got), len(msgs))
	}
	exactlytest.CheckKeyOrder(t, asMessages(got))
	seen := map[string]int{}
	for _, r := range got {
		seen[r.ID]++
	}
	for _, m := range msgs {
		if seen[m.ID] != 1 {
			t.Fatalf("message %s stored %d times, want 1", m.ID, seen[m.ID])
		}
	}
}

// A key that keeps failing fails alone, call after call, and never makes
// another key wait: each call resumes it, it fails again.
func TestFailingKeyDoesNotWedgeOthers(t *testing.T) {
	t.Parallel()
	fail := &failPublish{code: codes.PermissionDenied}
	f := newFake(t, fail.option())
	topic := f.topic(t)
	p := f.publisher(t, pubsub.PublisherConfig{})
	fail.set(-1, orderingKey("bad"))

	for round := range 3 {
		msgs := messages(topic, []string{"bad", "good"}, 3)
		start := time.Now()
		errs := exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs))
		if took := time.Since(start); took > 5*time.Second {
			t.Fatalf("round %d took %v", round, took)
		}
		for i, m := range msgs {
			if (m.Key == "bad") != (errs[i] != nil) {
				t.Fatalf("round %d, message %d of key %q: error %v", round, i, m.Key, errs[i])
			}
			if m.Key == "bad" && !strings.Contains(errs[i].Error(), "injected failure") && !strings.Contains(errs[i].Error(), "paused") {
				t.Fatalf("round %d, message %d: error %v, want the injected failure or the pause", round, i, errs[i])
			}
		}
		if round == 0 && !strings.Contains(errs[0].Error(), "injected failure") {
			t.Fatalf("the first message of the failing key: %v, want the injected failure", errs[0])
		}
	}
	// Once the cause is gone, the key goes through.
	fail.set(0, nil)
	msgs := messages(topic, []string{"bad"}, 3)
	if err := p.Publish(t.Context(), msgs); err != nil {
		t.Fatalf("after the failure stopped: %v", err)
	}
	if n := countKey(f.stored(topic), "bad"); n != 3 {
		t.Fatalf("the server holds %d messages of key bad, want 3", n)
	}
}

// A request the service never answers within the publish timeout fails as
// "outcome unknown", retryable, and does not stop other keys.
func TestPublishTimeoutIsOutcomeUnknown(t *testing.T) {
	t.Parallel()
	fail := &failPublish{code: codes.Unavailable}
	f := newFake(t, fail.option())
	topic := f.topic(t)
	settings := gpubsub.DefaultPublishSettings
	settings.Timeout = 500 * time.Millisecond
	p := f.publisher(t, pubsub.PublisherConfig{Settings: &settings})
	fail.set(-1, orderingKey("slow"))

	msgs := messages(topic, []string{"slow", "fast"}, 2)
	errs := exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs))
	for i, m := range msgs {
		switch {
		case m.Key == "fast" && errs[i] != nil:
			t.Fatalf("message %d of key fast: %v", i, errs[i])
		case m.Key == "slow" && i == 0 && !errors.Is(errs[i], exactly.ErrOutcomeUnknown):
			t.Fatalf("message %d of key slow: %v, want exactly.ErrOutcomeUnknown", i, errs[i])
		case m.Key == "slow" && (errs[i] == nil || errors.Is(errs[i], exactly.ErrUnpublishable)):
			t.Fatalf("message %d of key slow: %v, want a retryable error", i, errs[i])
		}
	}
	fail.set(0, nil)
	if err := p.Publish(t.Context(), msgs[:1]); err != nil {
		t.Fatalf("after the service answered again: %v", err)
	}
}

// A topic that does not exist fails its messages with a retryable error;
// once it is created, the same messages go through.
func TestPublishMissingTopic(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	p := f.publisher(t, pubsub.PublisherConfig{})
	msgs := messages("not-yet", []string{"k"}, 2)
	for i, err := range exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs)) {
		if err == nil || errors.Is(err, exactly.ErrUnpublishable) {
			t.Fatalf("message %d to a missing topic: %v, want a retryable error", i, err)
		}
	}
	if _, err := f.client.TopicAdminClient.CreateTopic(t.Context(), &pb.Topic{Name: f.name("not-yet")}); err != nil {
		t.Fatal(err)
	}
	if err := p.Publish(t.Context(), msgs); err != nil {
		t.Fatalf("after the topic was created: %v", err)
	}
}

// Messages over Pub/Sub's limits, or with a topic name it does not allow,
// fail alone as unpublishable before anything is sent, without pausing
// their key.
func TestPublishUnpublishable(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	topic := f.topic(t)
	p := f.publisher(t, pubsub.PublisherConfig{Topic: func(m *exactly.Message) string {
		if m.Headers["x-topic"] != "" {
			return m.Headers["x-topic"]
		}
		return m.Topic
	}})
	many := map[string]string{}
	for i := range pubsub.MaxAttributes {
		many["h"+strings.Repeat("x", i%10)+string(rune('a'+i/10))+string(rune('a'+i%10))] = "v"
	}
	bad := map[string]*exactly.Message{
		"long attribute value": {Headers: map[string]string{"x": strings.Repeat("v", pubsub.MaxAttributeValueBytes+1)}},
		"long attribute name":  {Headers: map[string]string{strings.Repeat("n", pubsub.MaxAttributeKeyBytes+1): "v"}},
		"goog attribute":       {Headers: map[string]string{"googclient_x": "v"}},
		"too many attributes":  {Headers: many},
		"invalid UTF-8 key":    {Key: "k\xff"},
		"invalid UTF-8 header": {Headers: map[string]string{"x": "\xff"}},
		"topic with a slash":   {Headers: map[string]string{"x-topic": "a/b"}},
		"goog topic":           {Headers: map[string]string{"x-topic": "google-things"}},
		"short topic":          {Headers: map[string]string{"x-topic": "ab"}},
		"bad full name":        {Headers: map[string]string{"x-topic": "projects/p/subscriptions/x"}},
	}
	var msgs []*exactly.Message
	var names []string
	for name, m := range bad {
		good := messages(topic, []string{"k"}, 1)[0]
		m.ID, m.Topic, m.Payload = exactly.NewID(), topic, []byte(name)
		if m.Key == "" {
			m.Key = "k"
		}
		msgs = append(msgs, good, m)
		names = append(names, "", name)
	}
	errs := exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs))
	for i, err := range errs {
		switch {
		case names[i] == "" && err != nil:
			t.Errorf("a valid message beside them failed: %v", err)
		case names[i] != "" && !errors.Is(err, exactly.ErrUnpublishable):
			t.Errorf("%s: %v, want exactly.ErrUnpublishable", names[i], err)
		}
	}
	// A full topic name is taken as it is.
	full := messages(f.name(topic), []string{"k"}, 1)
	if err := p.Publish(t.Context(), full); err != nil {
		t.Fatalf("a full topic name: %v", err)
	}
}

func TestNewPublisherRefusesHedging(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	settings := gpubsub.DefaultPublishSettings
	settings.HedgingSettings = &gpubsub.HedgingSettings{}
	if _, err := pubsub.NewPublisher(f.client, pubsub.PublisherConfig{Settings: &settings}); err == nil || !strings.Contains(err.Error(), "HedgingSettings") {
		t.Fatalf("NewPublisher with hedging = %v, want an error naming HedgingSettings", err)
	}
	if _, err := pubsub.NewPublisher(nil, pubsub.PublisherConfig{}); err == nil {
		t.Fatal("NewPublisher(nil) = nil error")
	}
}

func countKey(got []exactlytest.Received, key string) int {
	n := 0
	for _, r := range got {
		if r.Key == key {
			n++
		}
	}
	return n
}

func asMessages(got []exactlytest.Received) []exactly.Message {
	out := make([]exactly.Message, len(got))
	for i, r := range got {
		out[i] = exactly.Message{ID: r.ID, Key: r.Key, Payload: r.Payload, Headers: r.Headers}
	}
	return out
}
