package kafka

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/kafkarec"
)

// Publisher publishes exactly.Messages to Kafka with franz-go's idempotent
// producer (acks=all). Each message becomes one record: Topic from
// Message.Topic (or the TopicFunc option), Key from Message.Key, Value from
// Message.Payload, and the headers of the message plus exactly-id and
// exactly-created-at. The client's partitioner maps the key to a partition;
// the default one hashes keys like the Java client (murmur2), so a key always
// lands on the same partition and keeps its order there.
//
// A Publisher is safe for concurrent use. Messages of one Publish call are
// handed to the client in slice order; the caller must not publish the same
// key from two concurrent calls if it needs their relative order.
//
// Idempotence is scoped to one producer session, that is one client: the
// broker drops the client's own retries of a batch it already wrote, by
// producer ID and sequence number. It does not cover a restarted producer
// (a new client gets a new producer ID, so a message published again after
// a crash is a new record), nor a message the caller publishes twice. Those
// copies carry the same exactly-id header for the inbox to absorb. For
// Kafka-to-Kafka processing without copies, use a Processor, whose
// transactions make the output exactly-once for read_committed consumers.
type Publisher struct {
	client      *kgo.Client
	owned       bool
	topic       func(*exactly.Message) string
	maxBuffered int64

	// life is the context of every record: it ends with Close, not with
	// the context of the Publish call that produced the record.
	life  context.Context
	close context.CancelFunc
}

// Option configures a Publisher.
type Option func(*Publisher)

// TopicFunc sets the function that names the Kafka topic of a message,
// overriding the default of Message.Topic. Use it to add a prefix or to
// route several outbox topics to one Kafka topic. It must be fast, must not
// block, and must return a legal topic name (1 to 249 of a-z A-Z 0-9 . _ -):
// a message whose topic name is illegal fails as unpublishable and the relay
// parks it. It must return the same topic for messages of the same key, or
// their order is lost across topics.
func TopicFunc(fn func(*exactly.Message) string) Option {
	return func(p *Publisher) { p.topic = fn }
}

// NewPublisher returns a Publisher that produces through client. The client
// stays the caller's: Close does not close it.
//
// The client must keep the producer settings the guarantees rest on, which
// are franz-go's defaults: idempotent writes (no kgo.DisableIdempotentWrite),
// acks from all in-sync replicas (kgo.RequiredAcks(kgo.AllISRAcks())), no
// kgo.TransactionalID (records outside a transaction would fail) and no
// kgo.ManualFlushing (records would wait for a Flush nobody calls).
// NewPublisher refuses a client that changed any of them.
//
// Keep kgo.ProducerBatchMaxBytes at or below the max.message.bytes of the
// topics you publish to (franz-go's default, 1,000,012 bytes, is below
// Kafka's default). A record larger than ProducerBatchMaxBytes is refused by
// the client, alone, as unpublishable. If a topic's limit is lower, the
// broker refuses whole batches; Publish then re-sends the refused records one
// by one to find the ones that are too large on their own, so neighbours are
// not parked with them, but their order relative to later records of the
// same partition is lost.
func NewPublisher(client *kgo.Client, opts ...Option) (*Publisher, error) {
	if client == nil {
		return nil, errors.New("kafka: NewPublisher: the *kgo.Client is nil")
	}
	if err := checkClient(client); err != nil {
		return nil, err
	}
	p := &Publisher{client: client, maxBuffered: 50_000}
	if n, ok := client.OptValue(kgo.MaxBufferedRecords).(int64); ok && n > 0 {
		p.maxBuffered = n
	}
	for _, opt := range opts {
		opt(p)
	}
	p.life, p.close = context.WithCancel(context.Background())
	return p, nil
}

// NewClientPublisher creates a franz-go client for the seed brokers with
// opts and returns a Publisher that owns it: Close closes the client. The
// same rules as for NewPublisher apply to opts.
func NewClientPublisher(seeds []string, opts ...kgo.Opt) (*Publisher, error) {
	if len(seeds) == 0 {
		return nil, errors.New("kafka: NewClientPublisher: no seed brokers; pass at least one host:port")
	}
	client, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(seeds...)}, opts...)...)
	if err != nil {
		return nil, fmt.Errorf("kafka: creating the client: %w", err)
	}
	p, err := NewPublisher(client)
	if err != nil {
		client.Close()
		return nil, err
	}
	p.owned = true
	return p, nil
}

// Close stops the publisher. Records still buffered from Publish calls that
// returned early (their context ended) are failed once the client knows the
// broker does not have them in flight; the relay publishes them again. Close
// closes the client if NewClientPublisher created it; a client passed to
// NewPublisher stays open. Publish after Close fails. Close always returns
// nil; the error is for io.Closer.
func (p *Publisher) Close() error {
	p.close()
	if p.owned {
		p.client.Close()
	}
	return nil
}

func checkClient(cl *kgo.Client) error {
	if acks, ok := cl.OptValue(kgo.RequiredAcks).(kgo.Acks); ok && acks != kgo.AllISRAcks() {
		return errors.New("kafka: the client does not require acks from all in-sync replicas: a confirmed message could be lost when a leader fails; use kgo.RequiredAcks(kgo.AllISRAcks()), the default")
	}
	if off, _ := cl.OptValue(kgo.DisableIdempotentWrite).(bool); off {
		return errors.New("kafka: the client disables idempotent writes (kgo.DisableIdempotentWrite): its internal retries could duplicate or reorder a key's messages; remove the option")
	}
	if v := cl.OptValues(kgo.TransactionalID); len(v) == 2 {
		if set, _ := v[1].(bool); set {
			return errors.New("kafka: the client is transactional (kgo.TransactionalID): records produced outside a transaction fail; give the publisher a client without a transactional ID")
		}
	}
	if manual, _ := cl.OptValue(kgo.ManualFlushing).(bool); manual {
		return errors.New("kafka: the client uses kgo.ManualFlushing: records would wait for a Flush that Publish does not make; remove the option")
	}
	return nil
}

type produced struct {
	i   int
	err error
}

// Publish produces every message and waits until the broker has
// acknowledged each one (acks=all) or the outcome of each is known.
//
// It returns nil when every message is confirmed, or a *exactly.BatchError
// with one entry per message, or another error when it produced nothing
// (context already ended, publisher closed, client buffer full). Entries
// matching exactly.ErrUnpublishable (invalid message, illegal topic name,
// record too large, refused by the broker's validation) will never succeed.
// Every other failure is worth retrying: franz-go itself retries retriable
// broker errors without limit, so what remains is a topic that does not
// exist (after kgo.UnknownTopicRetries), a closed client, an opt-in limit
// (kgo.RecordRetries, kgo.RecordDeliveryTimeout) or the context ending.
//
// Give ctx a deadline: without one, Publish waits as long as the broker
// refuses writes with retriable errors.
//
// The context bounds how long Publish waits, not the records: a record
// handed to the client is never cancelled, as with the Java producer's
// send. When ctx ends first, Publish returns at once and reports the
// unanswered messages with errors matching exactly.ErrOutcomeUnknown; the
// client keeps delivering them in the background, in order, until the broker takes them or Close.
// Publishing them again is safe: the broker may then hold two copies with
// the same exactly-id, which the inbox absorbs. Cancelling records instead
// would fail every record buffered behind them in the same partition,
// including those of concurrent calls, and could confirm a later message of
// a key after failing an earlier one.
//
// Within a partition franz-go fails every buffered record after a failed
// one (its gapless ordering), so for each key the confirmed messages are a
// prefix of the call's messages with that key, except around a message the
// broker refused as unpublishable.
//
// Publish does not copy payloads; do not modify them until the client has
// delivered them (Publish returned nil, or Close).
func (p *Publisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("kafka: publish not started: %w", err)
	}
	if p.life.Err() != nil {
		return errors.New("kafka: publish not started: the publisher is closed")
	}

	errs := make([]error, len(msgs))
	recs := make([]*kgo.Record, len(msgs))
	topics := make([]string, len(msgs)) // read from here, not from records the client owns
	todo := make([]int, 0, len(msgs))
	for i, m := range msgs {
		rec, err := p.record(m)
		if err != nil {
			errs[i] = err
			continue
		}
		recs[i], topics[i] = rec, rec.Topic
		todo = append(todo, i)
	}
	if len(todo) == 0 {
		return exactly.NewBatchError(errs)
	}
	// Records of abandoned calls stay buffered while the broker refuses
	// writes. Refuse to pile more on top rather than block past ctx.
	if n := p.client.BufferedProduceRecords(); n > 0 && n+int64(len(todo)) > p.maxBuffered {
		return fmt.Errorf("kafka: publish not started: the client still buffers %d records the broker has not accepted (kgo.MaxBufferedRecords is %d); retry later", n, p.maxBuffered)
	}

	// Buffered for every record, so a promise never blocks franz-go's
	// promise goroutine, even after Publish has returned.
	done := make(chan produced, len(todo))
	go func() {
		// Produce blocks while the client's buffer is full; doing it here
		// lets Publish return when ctx ends. The loop keeps slice order.
		for _, i := range todo {
			p.client.Produce(p.life, recs[i], func(_ *kgo.Record, err error) { done <- produced{i, err} })
		}
	}()

	var tooLarge []int
	resolved := make([]bool, len(msgs))
	for left := len(todo); left > 0; left-- {
		select {
		case r := <-done:
			resolved[r.i] = true
			switch {
			case r.err == nil:
			case isTooLarge(r.err):
				tooLarge = append(tooLarge, r.i)
			default:
				errs[r.i] = describe(msgs[r.i], topics[r.i], r.err)
			}
		case <-ctx.Done():
			for _, i := range todo {
				if !resolved[i] {
					errs[i] = fmt.Errorf("kafka: message %s to topic %q: the context ended before the broker answered; publishing it again is safe: %w: %w",
						msgs[i].ID, topics[i], exactly.ErrOutcomeUnknown, ctx.Err())
				}
			}
			left = 0
		}
	}
	if len(tooLarge) > 0 {
		p.isolate(ctx, msgs, tooLarge, errs)
	}
	return exactly.NewBatchError(errs)
}

// isolate re-sends, one at a time and in slice order, the messages whose
// batch was refused as too large, so that only the ones too large on their
// own are reported unpublishable. When the client refused the record itself
// (it exceeds kgo.ProducerBatchMaxBytes) this costs nothing: it is refused
// again at once. When the broker refused a whole batch (its max.message.bytes
// is below the client's limit), the neighbours of the culprit get through.
func (p *Publisher) isolate(ctx context.Context, msgs []*exactly.Message, idx []int, errs []error) {
	slices.Sort(idx)
	for _, i := range idx {
		m := msgs[i]
		rec, err := p.record(m)
		if err != nil {
			errs[i] = err
			continue
		}
		topic := rec.Topic
		done := make(chan error, 1)
		if ctx.Err() == nil {
			p.client.Produce(p.life, rec, func(_ *kgo.Record, err error) { done <- err })
		}
		select {
		case err = <-done:
		case <-ctx.Done():
			errs[i] = fmt.Errorf("kafka: message %s to topic %q: refused in a batch too large for the broker, and the context ended before it was sent alone; publishing it again is safe: %w",
				m.ID, topic, ctx.Err())
			continue
		}
		switch {
		case err == nil:
			errs[i] = nil
		case isTooLarge(err):
			errs[i] = exactly.Unpublishable(fmt.Errorf("kafka: message %s to topic %q is too large (payload %d bytes; the limit is the smaller of kgo.ProducerBatchMaxBytes and the topic's max.message.bytes): %w",
				m.ID, topic, len(m.Payload), err))
		default:
			errs[i] = describe(m, topic, err)
		}
	}
}

// record converts m, or returns why it can never be published.
func (p *Publisher) record(m *exactly.Message) (*kgo.Record, error) {
	return kafkarec.Record(m, p.topic)
}

func isTooLarge(err error) bool {
	return errors.Is(err, kerr.MessageTooLarge) || errors.Is(err, kerr.RecordListTooLarge)
}

// describe wraps a produce error with the message and what to do about it,
// marking the ones no retry can fix.
func describe(m *exactly.Message, topic string, err error) error {
	switch {
	case errors.Is(err, kerr.InvalidTopicException), errors.Is(err, kerr.InvalidRecord):
		return exactly.Unpublishable(fmt.Errorf("kafka: message %s to topic %q refused by the broker: %w", m.ID, topic, err))
	case errors.Is(err, kerr.UnknownTopicOrPartition), errors.Is(err, kerr.UnknownTopicID):
		return fmt.Errorf("kafka: message %s: topic %q does not exist; create it or enable auto-creation on the broker: %w", m.ID, topic, err)
	default:
		return fmt.Errorf("kafka: message %s to topic %q: %w", m.ID, topic, err)
	}
}
