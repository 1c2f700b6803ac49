package kafka_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/kafka"
)

// maxBatchBytes is the ProducerBatchMaxBytes of the test clients: a record
// larger than this is refused by the client as too large.
const maxBatchBytes = 64 << 10

// testCluster is an in-process Kafka-protocol cluster (kfake) with an admin
// client, shared by the topics of one test.
type testCluster struct {
	c     *kfake.Cluster
	admin *kadm.Client
}

func newCluster(t *testing.T) *testCluster {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(3))
	if err != nil {
		t.Fatalf("starting kfake: %v", err)
	}
	t.Cleanup(c.Close)
	tc := &testCluster{c: c}
	tc.admin = kadm.NewClient(tc.client(t))
	return tc
}

// client returns a producer client with the test defaults plus opts.
func (tc *testCluster) client(t *testing.T, opts ...kgo.Opt) *kgo.Client {
	t.Helper()
	cl, err := kgo.NewClient(append([]kgo.Opt{
		kgo.SeedBrokers(tc.c.ListenAddrs()...),
		kgo.ProducerBatchMaxBytes(maxBatchBytes),
	}, opts...)...)
	if err != nil {
		t.Fatalf("creating client: %v", err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// fastRetries makes a client retry refused produce requests quickly, so
// the fault tests do not wait out franz-go's production backoffs (up to 5s
// between metadata refreshes and between retries).
var fastRetries = []kgo.Opt{
	kgo.RetryBackoffFn(func(int) time.Duration { return 20 * time.Millisecond }),
	kgo.MetadataMinAge(50 * time.Millisecond),
}

var topicSeq atomic.Int64

// topic creates a fresh topic with 8 partitions and the given configs.
func (tc *testCluster) topic(t *testing.T, configs map[string]*string) string {
	t.Helper()
	name := fmt.Sprintf("exactly-test-%d-%d", time.Now().UnixNano(), topicSeq.Add(1))
	if _, err := tc.admin.CreateTopic(t.Context(), 8, -1, configs, name); err != nil {
		t.Fatalf("creating topic %s: %v", name, err)
	}
	return name
}

func (tc *testCluster) publisher(t *testing.T, opts ...kgo.Opt) *kafka.Publisher {
	t.Helper()
	p, err := kafka.NewPublisher(tc.client(t, opts...))
	if err != nil {
		t.Fatalf("NewPublisher: %v", err)
	}
	return p
}

// stored returns how many records topic holds, from its end offsets.
func (tc *testCluster) stored(t *testing.T, topic string) int {
	t.Helper()
	offs, err := tc.admin.ListEndOffsets(t.Context(), topic)
	if err != nil {
		t.Fatalf("listing end offsets of %s: %v", topic, err)
	}
	total := 0
	offs.Each(func(o kadm.ListedOffset) {
		if o.Err != nil {
			t.Fatalf("end offset of %s/%d: %v", topic, o.Partition, o.Err)
		}
		total += int(o.Offset)
	})
	return total
}

// records reads up to n records of topic, waiting up to timeout for the
// topic to hold n; records of one partition come in offset order.
func (tc *testCluster) records(t *testing.T, topic string, n int, timeout time.Duration) []*kgo.Record {
	t.Helper()
	deadline := time.Now().Add(timeout)
	have := tc.stored(t, topic)
	for have < n && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		have = tc.stored(t, topic)
	}
	want := min(have, n)
	if want == 0 {
		return nil
	}
	consumer, err := kgo.NewClient(
		kgo.SeedBrokers(tc.c.ListenAddrs()...),
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchMaxWait(100*time.Millisecond),
	)
	if err != nil {
		t.Fatalf("creating consumer: %v", err)
	}
	defer consumer.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var out []*kgo.Record
	for len(out) < want {
		fetches := consumer.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			t.Fatalf("read %d of %d records of %s: %v", len(out), want, topic, err)
		}
		for _, fe := range fetches.Errors() {
			t.Fatalf("fetching %s/%d: %v", fe.Topic, fe.Partition, fe.Err)
		}
		fetches.EachRecord(func(r *kgo.Record) {
			if len(out) < want {
				out = append(out, r)
			}
		})
	}
	return out
}

func received(r *kgo.Record) exactlytest.Received {
	h := make(map[string]string, len(r.Headers))
	for _, kv := range r.Headers {
		h[kv.Key] = string(kv.Value)
	}
	return exactlytest.Received{ID: h[exactly.HeaderID], Key: string(r.Key), Payload: r.Value, Headers: h}
}

func (tc *testCluster) read(t *testing.T, topic string, n int, timeout time.Duration) []exactlytest.Received {
	t.Helper()
	var out []exactlytest.Received
	for _, r := range tc.records(t, topic, n, timeout) {
		out = append(out, received(r))
	}
	return out
}

func TestPublisherSuite(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	exactlytest.RunPublisherSuite(t, exactlytest.PublisherHarness{
		New: func(t *testing.T) (exactly.Publisher, string) {
			return tc.publisher(t), tc.topic(t, nil)
		},
		Read:           tc.read,
		MaxMessageSize: maxBatchBytes,
		NativeDedup:    false,
		// Read sees the topic's end offsets, so a record that should not
		// exist would show at once.
		Settle: 200 * time.Millisecond,
	})
}

// batch builds n messages for topic over the given keys, payload "key/seq".
func batch(topic string, keys []string, n int) []*exactly.Message {
	msgs := make([]*exactly.Message, n)
	for i := range msgs {
		k := keys[i%len(keys)]
		msgs[i] = &exactly.Message{
			ID: exactly.NewID(), Topic: topic, Key: k,
			Payload: fmt.Appendf(nil, "%s/%d", k, i/len(keys)),
		}
	}
	return msgs
}

// checkExactlyOnceInOrder fails unless topic holds each message of msgs
// exactly once and each key's messages in slice order.
func (tc *testCluster) checkExactlyOnceInOrder(t *testing.T, topic string, msgs []*exactly.Message) {
	t.Helper()
	tc.checkDelivered(t, topic, msgs, 1)
}

// checkDelivered fails unless topic holds every message of msgs, at most
// maxCopies times, and the first copies of each key in slice order.
func (tc *testCluster) checkDelivered(t *testing.T, topic string, msgs []*exactly.Message, maxCopies int) {
	t.Helper()
	got := tc.read(t, topic, maxCopies*len(msgs), 10*time.Second)
	if stored := tc.stored(t, topic); stored != len(got) {
		t.Fatalf("topic holds %d records, read %d", stored, len(got))
	}
	count := make(map[string]int)
	next := make(map[string]int)
	for _, r := range got {
		count[r.ID]++
		if count[r.ID] > 1 {
			continue
		}
		var key string
		var seq int
		if _, err := fmt.Sscanf(string(bytes.ReplaceAll(r.Payload, []byte("/"), []byte(" "))), "%s %d", &key, &seq); err != nil {
			t.Fatalf("payload %q: %v", r.Payload, err)
		}
		if seq != next[key] {
			t.Fatalf("key %s: first copy of #%d arrived where #%d was due", key, seq, next[key])
		}
		next[key]++
	}
	for _, m := range msgs {
		if n := count[m.ID]; n == 0 || n > maxCopies {
			t.Fatalf("message %s stored %d times, want 1 to %d", m.ID, n, maxCopies)
		}
	}
	if len(got) > len(msgs) {
		t.Logf("%d records for %d messages: %d copies with the same exactly-id", len(got), len(msgs), len(got)-len(msgs))
	}
}

func TestNewPublisherRefusesUnsafeClients(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	for _, tt := range []struct {
		name string
		opts []kgo.Opt
	}{
		{"NotIdempotent", []kgo.Opt{kgo.DisableIdempotentWrite()}},
		{"LeaderAck", []kgo.Opt{kgo.DisableIdempotentWrite(), kgo.RequiredAcks(kgo.LeaderAck())}},
		{"Transactional", []kgo.Opt{kgo.TransactionalID("txn")}},
		{"ManualFlushing", []kgo.Opt{kgo.ManualFlushing()}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := kafka.NewPublisher(tc.client(t, tt.opts...)); err == nil {
				t.Fatal("NewPublisher accepted the client")
			} else {
				t.Log(err)
			}
		})
	}
	t.Run("Defaults", func(t *testing.T) {
		if _, err := kafka.NewPublisher(tc.client(t)); err != nil {
			t.Fatalf("NewPublisher refused franz-go's defaults: %v", err)
		}
	})
	if _, err := kafka.NewPublisher(nil); err == nil {
		t.Error("NewPublisher(nil) = nil error")
	}
	if _, err := kafka.NewClientPublisher(nil); err == nil {
		t.Error("NewClientPublisher without seeds = nil error")
	}
	if _, err := kafka.NewClientPublisher(tc.c.ListenAddrs(), kgo.DisableIdempotentWrite()); err == nil {
		t.Error("NewClientPublisher accepted DisableIdempotentWrite")
	}
}

// A broker that refuses every produce for a while (NOT_ENOUGH_REPLICAS, as
// during an ISR shrink) delays Publish: franz-go retries, and when the
// broker accepts again every message is stored exactly once, in order.
func TestBrokerRefusesProduceForAWhile(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	topic := tc.topic(t, nil)
	p := tc.publisher(t, fastRetries...)
	refuse := tc.c.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Err: kerr.NotEnoughReplicas, Count: -1})

	msgs := batch(topic, []string{"a", "b", "c", "d"}, 200)
	result := make(chan error, 1)
	go func() { result <- p.Publish(t.Context(), msgs) }()

	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := refuse.Wait(ctx, 5); err != nil {
		t.Fatalf("the broker refused %d produce requests, want 5: %v", refuse.Hits(), err)
	}
	select {
	case err := <-result:
		t.Fatalf("Publish returned %v while the broker refused every write", err)
	default:
	}
	refuse.Remove()
	select {
	case err := <-result:
		if err != nil {
			t.Fatalf("Publish after the broker recovered: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Publish did not return after the broker recovered")
	}
	t.Logf("broker refused %d produce requests before accepting", refuse.Hits())
	tc.checkExactlyOnceInOrder(t, topic, msgs)
}

// When the outage outlasts the relay's deadline, Publish returns at the
// deadline with every message failed as "outcome unknown" (retryable), and
// confirms none. The client keeps the records and delivers them when the
// broker recovers; the relay's re-publish adds copies with the same
// exactly-id behind them. Nothing is lost and no key is reordered.
func TestBrokerOutageThenRepublish(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	topic := tc.topic(t, nil)
	p := tc.publisher(t, fastRetries...)
	refuse := tc.c.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Err: kerr.NotEnoughReplicas, Count: -1})

	msgs := batch(topic, []string{"a", "b", "c"}, 90)
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := p.Publish(ctx, msgs)
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("Publish took %v past its 500ms deadline", took)
	}
	if err == nil {
		t.Fatal("Publish = nil while the broker refused every write")
	}
	for i, e := range exactly.PerMessage(err, len(msgs)) {
		if e == nil {
			t.Fatalf("message %d reported confirmed while the broker refused every write", i)
		}
		if errors.Is(e, exactly.ErrUnpublishable) {
			t.Fatalf("message %d reported unpublishable for an outage: %v", i, e)
		}
		if !errors.Is(e, context.DeadlineExceeded) {
			t.Fatalf("message %d: %v, want the context's deadline in the chain", i, e)
		}
	}
	t.Logf("during the outage: %v", err)
	if n := tc.stored(t, topic); n != 0 {
		t.Fatalf("topic holds %d records after a refused publish", n)
	}

	refuse.Remove()
	if err := p.Publish(t.Context(), msgs); err != nil {
		t.Fatalf("re-publish after the outage: %v", err)
	}
	tc.checkDelivered(t, topic, msgs, 2)
}

// Close abandons the records an early-returning Publish left in the client:
// they fail instead of reaching the broker later.
func TestCloseAbandonsBufferedRecords(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	topic := tc.topic(t, nil)
	cl := tc.client(t, fastRetries...)
	p, err := kafka.NewPublisher(cl)
	if err != nil {
		t.Fatal(err)
	}
	refuse := tc.c.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Err: kerr.NotEnoughReplicas, Count: -1})
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if err := p.Publish(ctx, batch(topic, []string{"a"}, 20)); err == nil {
		t.Fatal("Publish = nil during an outage")
	}
	if cl.BufferedProduceRecords() == 0 {
		t.Fatal("no records left buffered; the test proves nothing")
	}
	p.Close()
	refuse.Remove()
	flushCtx, cancelFlush := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancelFlush()
	if err := cl.Flush(flushCtx); err != nil {
		t.Fatalf("flushing the abandoned records: %v", err)
	}
	if n := tc.stored(t, topic); n != 0 {
		t.Fatalf("topic holds %d records the closed publisher abandoned", n)
	}
	if err := p.Publish(t.Context(), batch(topic, []string{"a"}, 1)); err == nil {
		t.Fatal("Publish after Close = nil")
	}
}

// REQUEST_TIMED_OUT after the broker appended the batch is the ambiguous
// outcome: franz-go retries, and the idempotent producer's sequence numbers
// make the broker drop the second copy.
func TestAmbiguousTimeoutIsDeduplicatedByIdempotence(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	topic := tc.topic(t, nil)
	p := tc.publisher(t)
	timeouts := tc.c.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Err: kerr.RequestTimedOut, Count: 3})

	msgs := batch(topic, []string{"a", "b"}, 60)
	if err := p.Publish(t.Context(), msgs); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	if timeouts.Hits() == 0 {
		t.Fatal("no produce request timed out; the test proved nothing")
	}
	tc.checkExactlyOnceInOrder(t, topic, msgs)
}

// Produce requests lost on the wire (the broker never answers) are retried
// on a new connection after the request timeout, without loss or copies.
func TestDroppedProduceRequestsAreRetried(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	topic := tc.topic(t, nil)
	p := tc.publisher(t, kgo.ProduceRequestTimeout(200*time.Millisecond), kgo.RequestTimeoutOverhead(200*time.Millisecond))
	var dropped atomic.Int32
	tc.c.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		if dropped.Add(1) <= 2 {
			tc.c.KeepControl()
			return nil, nil, true // swallow the request: no reply
		}
		return nil, nil, false
	})

	msgs := batch(topic, []string{"a", "b", "c"}, 30)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := p.Publish(ctx, msgs); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	if dropped.Load() < 2 {
		t.Fatalf("only %d produce requests seen; none dropped", dropped.Load())
	}
	tc.checkExactlyOnceInOrder(t, topic, msgs)
}

// A relay that crashes after the broker confirmed, before it marked the rows
// sent, publishes them again from a new producer session: Kafka stores a
// second copy, which carries the same exactly-id for the inbox to absorb.
func TestRestartedProducerDuplicatesCarryTheID(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	topic := tc.topic(t, nil)
	msgs := batch(topic, []string{"a"}, 10)
	first, err := kafka.NewClientPublisher(tc.c.ListenAddrs())
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Publish(t.Context(), msgs); err != nil {
		t.Fatal(err)
	}
	first.Close() // the crash
	second := tc.publisher(t)
	if err := second.Publish(t.Context(), msgs); err != nil {
		t.Fatal(err)
	}
	got := tc.read(t, topic, 2*len(msgs), 10*time.Second)
	if len(got) != 2*len(msgs) {
		t.Fatalf("read %d records, want %d", len(got), 2*len(msgs))
	}
	for i, r := range got {
		if want := msgs[i%len(msgs)].ID; r.ID != want {
			t.Fatalf("record %d has id %s, want %s (the copy keeps the id and the order)", i, r.ID, want)
		}
	}
}

// A topic whose max.message.bytes is below the client's batch limit makes
// the broker refuse whole batches. Only the record too large on its own is
// reported unpublishable; its neighbours are confirmed.
func TestBrokerRefusesTooLargeBatch(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	limit := "16384"
	topic := tc.topic(t, map[string]*string{"max.message.bytes": &limit})
	p := tc.publisher(t, append(fastRetries, kgo.ProducerBatchMaxBytes(1<<20))...)

	// Random bytes: the client compresses batches (snappy by default), and
	// the broker's limit applies to the compressed batch.
	rng := rand.New(rand.NewPCG(1, 2))
	noise := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	msgs := batch(topic, []string{"a"}, 12)
	for _, m := range msgs {
		m.Payload = append(m.Payload, noise(3000)...) // 12 x 3 KB > 16 KB per batch
	}
	const big = 5
	msgs[big].Payload = append(msgs[big].Payload, noise(20000)...)

	err := p.Publish(t.Context(), msgs)
	var be *exactly.BatchError
	if !errors.As(err, &be) {
		t.Fatalf("Publish = %v, want a *exactly.BatchError", err)
	}
	for i, e := range be.Errs {
		if i == big {
			if !errors.Is(e, exactly.ErrUnpublishable) || !errors.Is(e, kerr.MessageTooLarge) {
				t.Fatalf("message %d: %v, want unpublishable MESSAGE_TOO_LARGE", i, e)
			}
			t.Logf("refused: %v", e)
			continue
		}
		if e != nil {
			t.Fatalf("message %d, small enough, failed: %v", i, e)
		}
	}
	got := tc.read(t, topic, len(msgs), time.Second)
	if len(got) != len(msgs)-1 {
		t.Fatalf("read %d records, want %d", len(got), len(msgs)-1)
	}
	for _, r := range got {
		if r.ID == msgs[big].ID {
			t.Fatal("the too large message is on the broker")
		}
	}
}

func TestRecordLayout(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	topic := tc.topic(t, nil)
	p := tc.publisher(t)
	created := time.Date(2025, 3, 1, 12, 30, 45, 123456789, time.FixedZone("CET", 3600))
	msgs := []*exactly.Message{
		{ID: "id-1", Topic: topic, Key: "k", Payload: []byte("body"), CreatedAt: created,
			Headers: map[string]string{"b": "2", "a": "1", exactly.HeaderID: "forged"}},
		{ID: "id-2", Topic: topic, Payload: nil},
	}
	if err := p.Publish(t.Context(), msgs); err != nil {
		t.Fatal(err)
	}
	recs := tc.records(t, topic, 2, 5*time.Second)
	if len(recs) != 2 {
		t.Fatalf("read %d records, want 2", len(recs))
	}
	byID := map[string]*kgo.Record{}
	for _, r := range recs {
		byID[received(r).ID] = r
	}
	r1, r2 := byID["id-1"], byID["id-2"]
	if r1 == nil || r2 == nil {
		t.Fatalf("records by id: %v", byID)
	}
	var names []string
	for _, h := range r1.Headers {
		names = append(names, h.Key+"="+string(h.Value))
	}
	want := []string{"a=1", "b=2", "exactly-id=id-1", "exactly-created-at=2025-03-01T11:30:45.123456789Z"}
	if fmt.Sprint(names) != fmt.Sprint(want) {
		t.Fatalf("headers %v, want %v", names, want)
	}
	if string(r1.Key) != "k" || r2.Key != nil {
		t.Fatalf("keys %q and %v, want \"k\" and nil", r1.Key, r2.Key)
	}
	if r2.Value == nil || len(r2.Value) != 0 {
		t.Fatalf("empty payload stored as %v, want an empty non-null value (not a tombstone)", r2.Value)
	}
	if _, err := time.Parse(time.RFC3339Nano, "2025-03-01T11:30:45.123456789Z"); err != nil {
		t.Fatal(err)
	}
}

func TestTopicFunc(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	topic := tc.topic(t, nil)
	p, err := kafka.NewPublisher(tc.client(t), kafka.TopicFunc(func(m *exactly.Message) string {
		if m.Topic == "orders" {
			return topic
		}
		return "illegal topic/" + m.Topic
	}))
	if err != nil {
		t.Fatal(err)
	}
	msgs := []*exactly.Message{
		{ID: exactly.NewID(), Topic: "orders", Key: "1", Payload: []byte("x")},
		{ID: exactly.NewID(), Topic: "other", Key: "1", Payload: []byte("y")},
	}
	errs := exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs))
	if errs[0] != nil || !errors.Is(errs[1], exactly.ErrUnpublishable) {
		t.Fatalf("errors %v, want [nil, unpublishable illegal topic]", errs)
	}
	got := tc.read(t, topic, 1, 5*time.Second)
	if len(got) != 1 || got[0].ID != msgs[0].ID {
		t.Fatalf("read %+v from the mapped topic", got)
	}
}

// A topic that does not exist is retryable, not unpublishable: it may be
// created (by an operator or a deploy) before the relay's next attempt.
func TestMissingTopicIsRetryable(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	p := tc.publisher(t, kgo.UnknownTopicRetries(1))
	missing := "missing-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	msgs := []*exactly.Message{{ID: exactly.NewID(), Topic: missing, Payload: []byte("x")}}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	err := p.Publish(ctx, msgs)
	if err == nil {
		t.Fatal("Publish to a missing topic = nil")
	}
	if errors.Is(err, exactly.ErrUnpublishable) {
		t.Fatalf("a missing topic is unpublishable (the relay would park the message): %v", err)
	}
	t.Log(err)
}
