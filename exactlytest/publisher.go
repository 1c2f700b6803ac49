package exactlytest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
)

// Received is one message as a harness read it back from the broker.
type Received struct {
	// ID is the value of the exactly-id header.
	ID string
	// NativeID is the broker's own dedup field (Nats-Msg-Id, AMQP
	// message-id), or "" for a broker without one (Kafka).
	NativeID string
	// Key is the record key (Kafka) or the exactly-key header.
	Key string
	// Payload is the message body.
	Payload []byte
	// Headers holds every header the broker returned, exactly-* included.
	Headers map[string]string
}

// PublisherHarness connects RunPublisherSuite to one broker adapter.
type PublisherHarness struct {
	// New returns a publisher and a topic (Kafka topic, NATS subject, AMQP
	// routing key) that no other test uses, so subtests can run in
	// parallel. It must register any cleanup with t.Cleanup. Required.
	New func(t *testing.T) (p exactly.Publisher, topic string)

	// Read returns the messages the broker holds for topic, in broker order
	// for each key (partition order on Kafka, stream order on NATS). It
	// returns once it has n messages, or when timeout has passed with what
	// it has; it must not fail the test for having fewer than n, since the
	// suite also asks for messages that must not exist. A harness that can
	// tell how many messages the topic holds may return as soon as it has
	// read them all and that count is at least n. Required.
	Read func(t *testing.T, topic string, n int, timeout time.Duration) []Received

	// MaxMessageSize is the broker's size limit, in bytes: a message whose
	// payload is larger must fail alone as unpublishable, and one with half
	// of it (up to 10 KiB) must go through. Required.
	MaxMessageSize int

	// NativeDedup reports that the broker drops a message whose ID it has
	// already stored (NATS JetStream's Nats-Msg-Id within the duplicate
	// window). With it the suite demands no second copy on re-publish and
	// that Received.NativeID carries the ID; without it, it demands that
	// both copies are stored and carry the same ID.
	NativeDedup bool

	// Timeout bounds each Publish call and each Read that expects messages
	// to be there. Default 30s.
	Timeout time.Duration

	// Settle is how long Read waits for messages that should not exist, to
	// show they do not arrive. Default 1s.
	Settle time.Duration
}

// RunPublisherSuite runs the publisher conformance suite: every
// exactly.Publisher must pass it. The subtests run in parallel, each on the
// fresh topic the harness's New returns.
//
//	func TestPublisherSuite(t *testing.T) {
//		broker := startBroker(t)
//		exactlytest.RunPublisherSuite(t, exactlytest.PublisherHarness{
//			New: func(t *testing.T) (exactly.Publisher, string) {
//				return broker.newPublisher(t), broker.newTopic(t)
//			},
//			Read:           broker.read,
//			MaxMessageSize: broker.maxMessageBytes,
//		})
//	}
func RunPublisherSuite(t *testing.T, h PublisherHarness) {
	t.Helper()
	switch {
	case h.New == nil:
		t.Fatal("exactlytest: PublisherHarness.New is nil")
	case h.Read == nil:
		t.Fatal("exactlytest: PublisherHarness.Read is nil")
	case h.MaxMessageSize <= 0:
		t.Fatal("exactlytest: PublisherHarness.MaxMessageSize must be positive: the largest payload the broker accepts")
	}
	if h.Timeout <= 0 {
		h.Timeout = 30 * time.Second
	}
	if h.Settle <= 0 {
		h.Settle = time.Second
	}
	s := &suite{h: h}
	for _, tc := range []struct {
		name string
		fn   func(*testing.T)
	}{
		{"RoundTrip", s.testRoundTrip},
		{"KeyOrder", s.testKeyOrder},
		{"EmptyBatch", s.testEmptyBatch},
		{"OversizedMessage", s.testOversizedMessage},
		{"InvalidMessage", s.testInvalidMessage},
		{"Republish", s.testRepublish},
		{"CancelledContext", s.testCancelledContext},
		{"CancelMidFlight", s.testCancelMidFlight},
		{"ConcurrentPublish", s.testConcurrentPublish},
		{"PipelinedKeyOrder", s.testPipelinedKeyOrder},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t)
		})
	}
}

type suite struct{ h PublisherHarness }

// publish calls p.Publish under the harness timeout.
func (s *suite) publish(t *testing.T, p exactly.Publisher, msgs []*exactly.Message) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), s.h.Timeout)
	defer cancel()
	return p.Publish(ctx, msgs)
}

func (s *suite) mustPublish(t *testing.T, p exactly.Publisher, msgs []*exactly.Message) {
	t.Helper()
	if err := s.publish(t, p, msgs); err != nil {
		t.Fatalf("Publish(%d messages): %v", len(msgs), err)
	}
}

// readExactly reads n messages and fails unless the broker holds exactly n.
func (s *suite) readExactly(t *testing.T, topic string, n int) []Received {
	t.Helper()
	got := s.h.Read(t, topic, n, s.h.Timeout)
	if len(got) < n {
		t.Fatalf("read %d messages from %q, want %d", len(got), topic, n)
	}
	if extra := s.h.Read(t, topic, n+1, s.h.Settle); len(extra) > n {
		t.Fatalf("read %d messages from %q, want exactly %d", len(extra), topic, n)
	}
	return got[:n]
}

// message builds a message whose payload names its key and sequence number.
func message(topic, key string, seq int) *exactly.Message {
	return &exactly.Message{
		ID:      exactly.NewID(),
		Topic:   topic,
		Key:     key,
		Payload: fmt.Appendf(nil, "%s/%d", key, seq),
		Headers: map[string]string{
			"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
			"x-seq":       strconv.Itoa(seq),
		},
		CreatedAt: time.Now(),
	}
}

// keyed builds perKey messages for each key, interleaved across keys the
// way a relay batch mixes aggregates, numbering each key from first.
func keyed(topic string, keys []string, first, perKey int) []*exactly.Message {
	msgs := make([]*exactly.Message, 0, len(keys)*perKey)
	for seq := first; seq < first+perKey; seq++ {
		for _, k := range keys {
			msgs = append(msgs, message(topic, k, seq))
		}
	}
	return msgs
}

func keyNames(prefix string, n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%s-%02d", prefix, i)
	}
	return keys
}

// countIDs counts the received copies of each ID.
func countIDs(got []Received) map[string]int {
	n := make(map[string]int, len(got))
	for _, r := range got {
		n[r.ID]++
	}
	return n
}

// checkKeyOrder fails unless, for every key, the first copies of the
// messages of want appear in got in the order of want. Later copies
// (re-publishes) may appear anywhere after their first.
func checkKeyOrder(t *testing.T, want []*exactly.Message, got []Received) {
	t.Helper()
	type place struct {
		key string
		at  int // index in its key's sequence
	}
	places := make(map[string]place, len(want))
	byKey := make(map[string][]string)
	for _, m := range want {
		places[m.ID] = place{m.Key, len(byKey[m.Key])}
		byKey[m.Key] = append(byKey[m.Key], m.ID)
	}
	seen := make(map[string]bool, len(got))
	next := make(map[string]int)
	for _, r := range got {
		pl, ok := places[r.ID]
		if !ok || seen[r.ID] {
			continue
		}
		seen[r.ID] = true
		if due := next[pl.key]; pl.at != due {
			t.Fatalf("key %q: message #%d (id %s) arrived where #%d (id %s) was due: per-key order broken",
				pl.key, pl.at, r.ID, due, byKey[pl.key][due])
		}
		next[pl.key]++
	}
}

func (s *suite) testRoundTrip(t *testing.T) {
	p, topic := s.h.New(t)
	binary := make([]byte, 256)
	for i := range binary {
		binary[i] = byte(i)
	}
	msgs := []*exactly.Message{
		{
			ID: exactly.NewID(), Topic: topic, Key: "order-1", Payload: []byte(`{"total":42}`),
			Headers: map[string]string{
				"traceparent":  "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
				"content-type": "application/json",
			},
			CreatedAt: time.Now(),
		},
		{ID: exactly.NewID(), Topic: topic, Key: "", Payload: binary, Headers: map[string]string{"x-empty": ""}},
		{ID: exactly.NewID(), Topic: topic, Key: "ключ/κλειδί/キー", Payload: nil},
		{ID: exactly.NewID(), Topic: topic, Key: "order-1", Payload: bytes.Repeat([]byte("x"), min(10<<10, s.h.MaxMessageSize/2))},
		{ID: "business-key:order-7:shipped", Topic: topic, Key: "order-7", Payload: []byte("caller-chosen id")},
	}
	s.mustPublish(t, p, msgs)

	got := s.readExactly(t, topic, len(msgs))
	byID := make(map[string]Received, len(got))
	for _, r := range got {
		if _, dup := byID[r.ID]; dup {
			t.Fatalf("id %s read twice after one publish", r.ID)
		}
		byID[r.ID] = r
	}
	for i, m := range msgs {
		r, ok := byID[m.ID]
		if !ok {
			t.Fatalf("message %d (id %s) not found on the broker; read ids %v", i, m.ID, keysOf(byID))
		}
		if r.Headers[exactly.HeaderID] != m.ID {
			t.Errorf("message %d: %s header = %q, want %q", i, exactly.HeaderID, r.Headers[exactly.HeaderID], m.ID)
		}
		if s.h.NativeDedup && r.NativeID != m.ID {
			t.Errorf("message %d: native dedup id = %q, want the message ID %q", i, r.NativeID, m.ID)
		}
		if r.NativeID != "" && r.NativeID != m.ID {
			t.Errorf("message %d: native dedup id = %q, want the message ID %q", i, r.NativeID, m.ID)
		}
		if r.Key != m.Key {
			t.Errorf("message %d: key = %q, want %q", i, r.Key, m.Key)
		}
		if !bytes.Equal(r.Payload, m.Payload) {
			t.Errorf("message %d: payload = %q (%d bytes), want %d bytes", i, truncate(r.Payload), len(r.Payload), len(m.Payload))
		}
		for k, v := range m.Headers {
			if got, ok := r.Headers[k]; !ok || got != v {
				t.Errorf("message %d: header %q = %q (present %v), want %q", i, k, got, ok, v)
			}
		}
	}
	checkKeyOrder(t, msgs, got)
}

func (s *suite) testKeyOrder(t *testing.T) {
	p, topic := s.h.New(t)
	keys := keyNames("aggregate", 20)
	first := keyed(topic, keys, 0, 25)
	second := keyed(topic, keys, 25, 25)
	s.mustPublish(t, p, first)
	s.mustPublish(t, p, second)

	all := append(first, second...)
	got := s.readExactly(t, topic, len(all))
	for id, n := range countIDs(got) {
		if n != 1 {
			t.Fatalf("id %s stored %d times after one publish", id, n)
		}
	}
	checkKeyOrder(t, all, got)
	// Order is also visible in the payloads, independent of the IDs.
	last := make(map[string]int)
	for _, r := range got {
		key, seq, ok := strings.Cut(string(r.Payload), "/")
		if !ok || key != r.Key {
			t.Fatalf("payload %q does not belong to key %q", r.Payload, r.Key)
		}
		n, _ := strconv.Atoi(seq)
		if want := last[key]; n != want {
			t.Fatalf("key %q: read sequence %d, want %d", key, n, want)
		}
		last[key] = n + 1
	}
	for _, k := range keys {
		if last[k] != 50 {
			t.Fatalf("key %q: read %d messages, want 50", k, last[k])
		}
	}
}

// testPipelinedKeyOrder: an exactly.PipelinedPublisher takes batches that
// share keys before the earlier ones have their outcome, and stores every
// key's messages in the order of the calls.
func (s *suite) testPipelinedKeyOrder(t *testing.T) {
	p, topic := s.h.New(t)
	pp, ok := p.(exactly.PipelinedPublisher)
	if !ok {
		t.Skip("the publisher is not an exactly.PipelinedPublisher: nothing to check")
	}
	keys := keyNames("aggregate", 20)
	ctx, cancel := context.WithTimeout(t.Context(), s.h.Timeout)
	defer cancel()
	var all []*exactly.Message
	var waits []func() error
	for call := range 4 {
		batch := keyed(topic, keys, call*10, 10)
		all = append(all, batch...)
		waits = append(waits, pp.Send(ctx, batch)) // none awaited yet
	}
	for i, wait := range waits {
		if err := wait(); err != nil {
			t.Fatalf("Send %d of 4, sent before the earlier ones had their outcome: %v", i+1, err)
		}
	}
	got := s.readExactly(t, topic, len(all))
	for id, n := range countIDs(got) {
		if n != 1 {
			t.Fatalf("id %s stored %d times after one Send", id, n)
		}
	}
	checkKeyOrder(t, all, got)
}

func (s *suite) testEmptyBatch(t *testing.T) {
	p, topic := s.h.New(t)
	if err := s.publish(t, p, nil); err != nil {
		t.Fatalf("Publish(nil) = %v, want nil", err)
	}
	if err := s.publish(t, p, []*exactly.Message{}); err != nil {
		t.Fatalf("Publish(empty) = %v, want nil", err)
	}
	m := message(topic, "k", 0)
	s.mustPublish(t, p, []*exactly.Message{m})
	got := s.readExactly(t, topic, 1)
	if got[0].ID != m.ID {
		t.Fatalf("read id %s, want %s", got[0].ID, m.ID)
	}
}

// expectBatchError returns the per-message errors of err, failing unless it
// is a *exactly.BatchError with one entry per message.
func expectBatchError(t *testing.T, err error, n int) []error {
	t.Helper()
	var be *exactly.BatchError
	if !errors.As(err, &be) {
		t.Fatalf("Publish = %v (%T), want a *exactly.BatchError", err, err)
	}
	if len(be.Errs) != n {
		t.Fatalf("BatchError has %d entries, want one per message (%d)", len(be.Errs), n)
	}
	return be.Errs
}

func (s *suite) testOversizedMessage(t *testing.T) {
	p, topic := s.h.New(t)
	msgs := keyed(topic, []string{"order-1"}, 0, 5)
	const bad = 2
	msgs[bad].Payload = bytes.Repeat([]byte("z"), s.h.MaxMessageSize+1)

	errs := expectBatchError(t, s.publish(t, p, msgs), len(msgs))
	for i, err := range errs {
		switch {
		case i == bad && !errors.Is(err, exactly.ErrUnpublishable):
			t.Fatalf("oversized message %d: error %v, want one matching exactly.ErrUnpublishable", i, err)
		case i != bad && err != nil:
			t.Fatalf("message %d failed beside an oversized one: %v", i, err)
		}
	}
	if errs[bad].Error() == "" {
		t.Fatal("oversized message error has no text to park it with")
	}

	good := append(append([]*exactly.Message{}, msgs[:bad]...), msgs[bad+1:]...)
	got := s.readExactly(t, topic, len(good))
	counts := countIDs(got)
	for _, m := range good {
		if counts[m.ID] != 1 {
			t.Fatalf("confirmed message %s stored %d times, want 1", m.ID, counts[m.ID])
		}
	}
	if counts[msgs[bad].ID] != 0 {
		t.Fatal("the refused oversized message is on the broker")
	}
	checkKeyOrder(t, good, got)
}

func (s *suite) testInvalidMessage(t *testing.T) {
	p, topic := s.h.New(t)
	msgs := []*exactly.Message{
		message(topic, "k", 0),
		{ID: exactly.NewID(), Topic: "", Key: "k", Payload: []byte("no topic")},
		message(topic, "k", 1),
		{ID: "", Topic: topic, Key: "k", Payload: []byte("no id")},
		nil,
		message(topic, "k", 2),
	}
	invalid := map[int]bool{1: true, 3: true, 4: true}
	errs := expectBatchError(t, s.publish(t, p, msgs), len(msgs))
	for i, err := range errs {
		switch {
		case invalid[i] && !errors.Is(err, exactly.ErrUnpublishable):
			t.Errorf("invalid message %d: error %v, want one matching exactly.ErrUnpublishable", i, err)
		case !invalid[i] && err != nil:
			t.Errorf("valid message %d failed: %v", i, err)
		}
	}
	if t.Failed() {
		return
	}
	valid := []*exactly.Message{msgs[0], msgs[2], msgs[5]}
	got := s.readExactly(t, topic, len(valid))
	checkKeyOrder(t, valid, got)
}

func (s *suite) testRepublish(t *testing.T) {
	p, topic := s.h.New(t)
	msgs := keyed(topic, []string{"a", "b"}, 0, 10)
	s.mustPublish(t, p, msgs)
	// The relay could not record the outcome (a timeout, a crash before it
	// marked the rows sent) and publishes the same rows again.
	s.mustPublish(t, p, msgs)

	copies := 2
	if s.h.NativeDedup {
		copies = 1
	}
	got := s.readExactly(t, topic, copies*len(msgs))
	counts := countIDs(got)
	for _, m := range msgs {
		if counts[m.ID] != copies {
			t.Fatalf("id %s stored %d times after a re-publish, want %d (NativeDedup=%v)", m.ID, counts[m.ID], copies, s.h.NativeDedup)
		}
	}
	for _, r := range got {
		if r.Headers[exactly.HeaderID] != r.ID || r.ID == "" {
			t.Fatalf("a copy lost its id header: %+v", r.Headers)
		}
	}
	checkKeyOrder(t, msgs, got)
}

// checkConfirmedStored fails unless every message the result of Publish
// reports as confirmed is on the broker. others is how many messages the
// topic may hold besides copies of msgs.
func (s *suite) checkConfirmedStored(t *testing.T, topic string, msgs []*exactly.Message, err error, others int) int {
	t.Helper()
	per := exactly.PerMessage(err, len(msgs))
	confirmed := 0
	for _, e := range per {
		if e == nil {
			confirmed++
		}
	}
	if confirmed == 0 {
		return 0
	}
	counts := countIDs(s.h.Read(t, topic, 2*len(msgs)+others, s.h.Settle))
	for i, e := range per {
		if e == nil && counts[msgs[i].ID] == 0 {
			t.Fatalf("message %d (id %s) was reported confirmed but is not on the broker", i, msgs[i].ID)
		}
	}
	return confirmed
}

// checkRetryDelivers re-publishes msgs with a live context, as the relay
// does after a failed call, and checks that everything is then stored, once
// with NativeDedup, without reordering any key.
func (s *suite) checkRetryDelivers(t *testing.T, p exactly.Publisher, topic string, msgs []*exactly.Message, others int) {
	t.Helper()
	s.mustPublish(t, p, msgs)
	got := s.h.Read(t, topic, 2*len(msgs)+others, s.h.Settle)
	counts := countIDs(got)
	for i, m := range msgs {
		switch n := counts[m.ID]; {
		case n == 0:
			t.Fatalf("message %d (id %s) missing after the retry confirmed it", i, m.ID)
		case n > 2:
			t.Fatalf("message %d (id %s) stored %d times after two publishes", i, m.ID, n)
		case n > 1 && s.h.NativeDedup:
			t.Fatalf("message %d (id %s) stored %d times though the broker deduplicates", i, m.ID, n)
		}
	}
	checkKeyOrder(t, msgs, got)
}

func (s *suite) testCancelledContext(t *testing.T) {
	p, topic := s.h.New(t)
	msgs := keyed(topic, keyNames("k", 5), 0, 10)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()

	start := time.Now()
	err := p.Publish(ctx, msgs)
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("Publish with a cancelled context took %v", took)
	}
	if err == nil {
		t.Fatal("Publish with a cancelled context = nil, want an error")
	}
	if errors.Is(err, exactly.ErrUnpublishable) {
		t.Fatalf("a cancelled context made messages unpublishable (they would be parked): %v", err)
	}
	s.checkConfirmedStored(t, topic, msgs, err, 0)
	s.checkRetryDelivers(t, p, topic, msgs, 0)
}

func (s *suite) testCancelMidFlight(t *testing.T) {
	p, topic := s.h.New(t)
	// A first, whole publish warms the publisher up (connections,
	// metadata, producer IDs) and measures how long a batch takes, so the
	// cancel can land halfway through the next one, with messages in
	// flight, whatever the broker's speed.
	warm := keyed(topic, keyNames("warm", 20), 0, 50)
	start := time.Now()
	s.mustPublish(t, p, warm)
	full := time.Since(start)

	msgs := keyed(topic, keyNames("k", 20), 0, 50)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var (
		mu        sync.Mutex
		cancelled time.Time
	)
	timer := time.AfterFunc(full/2, func() {
		mu.Lock()
		cancelled = time.Now()
		mu.Unlock()
		cancel()
	})
	defer timer.Stop()
	err := p.Publish(ctx, msgs)
	returned := time.Now()
	mu.Lock()
	if !cancelled.IsZero() && returned.Sub(cancelled) > 5*time.Second {
		t.Fatalf("Publish returned %v after its context was cancelled", returned.Sub(cancelled))
	}
	mu.Unlock()
	for i, e := range exactly.PerMessage(err, len(msgs)) {
		if errors.Is(e, exactly.ErrUnpublishable) {
			t.Fatalf("message %d reported unpublishable after a cancel (it would be parked): %v", i, e)
		}
	}
	confirmed := s.checkConfirmedStored(t, topic, msgs, err, len(warm))
	t.Logf("a full batch took %v; %d of %d messages confirmed before the cancel at half that", full, confirmed, len(msgs))
	s.checkRetryDelivers(t, p, topic, msgs, len(warm))
}

func (s *suite) testConcurrentPublish(t *testing.T) {
	p, topic := s.h.New(t)
	const workers, batches = 4, 5
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		sent []*exactly.Message
		errs = make(chan error, workers*batches)
	)
	for w := range workers {
		wg.Go(func() {
			keys := keyNames(fmt.Sprintf("w%d", w), 5)
			for b := range batches {
				msgs := keyed(topic, keys, b*10, 10)
				if err := s.publish(t, p, msgs); err != nil {
					errs <- fmt.Errorf("worker %d batch %d: %w", w, b, err)
					return
				}
				mu.Lock()
				sent = append(sent, msgs...)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got := s.readExactly(t, topic, len(sent))
	counts := countIDs(got)
	for _, m := range sent {
		if counts[m.ID] != 1 {
			t.Fatalf("id %s stored %d times, want 1", m.ID, counts[m.ID])
		}
	}
	// Each worker's batches are sequential, so per key the order is the
	// order of sent, which appends whole batches in publish order per key.
	checkKeyOrder(t, sent, got)
}

func keysOf(m map[string]Received) []string {
	out := make([]string, 0, len(m))
	for k := range maps.Keys(m) {
		out = append(out, k)
	}
	return out
}

func truncate(b []byte) []byte {
	if len(b) > 64 {
		return b[:64]
	}
	return b
}
