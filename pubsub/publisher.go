package pubsub

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	gpubsub "cloud.google.com/go/pubsub/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/exactlyonce/exactly"
)

// Pub/Sub's limits on a published message
// (https://cloud.google.com/pubsub/quotas#resource_limits). Publish refuses a
// message over one of them as unpublishable before anything is sent: the
// service would refuse it, and the client library pauses the message's
// ordering key when it fails, or refuses a whole request over it.
const (
	// MaxRequestBytes bounds one publish request: a message, its attributes
	// and its ordering key, encoded, plus the topic's name (10 MB).
	MaxRequestBytes = int(gpubsub.MaxPublishRequestBytes)
	// MaxAttributes is the most attributes a message may have, exactly's
	// own (exactly-id, exactly-created-at) included.
	MaxAttributes = 100
	// MaxAttributeKeyBytes and MaxAttributeValueBytes bound one attribute.
	MaxAttributeKeyBytes   = 256
	MaxAttributeValueBytes = 1024
	// MaxOrderingKeyBytes bounds Message.Key, Pub/Sub's ordering key. It is
	// above exactly.MaxKeyLen, so a valid outbox row never reaches it.
	MaxOrderingKeyBytes = 1024
)

// DefaultPublishTimeout is the PublishSettings.Timeout of the default
// PublisherConfig.Settings.
const DefaultPublishTimeout = 15 * time.Second

// PublisherConfig configures a Publisher. The zero value is ready to use.
type PublisherConfig struct {
	// Topic names the Pub/Sub topic of a message: a topic ID in the client's
	// project, or a full name projects/<project>/topics/<id>. The default is
	// Message.Topic. It must be fast and must not block. A name Pub/Sub
	// does not allow (an ID of 3 to 255 letters, digits and -_.~+%,
	// starting with a letter and not with "goog") fails the message as
	// unpublishable, and the relay parks it; a topic that does not exist
	// fails with a retryable error until it is created. It must map the
	// messages of one key to one topic, or their order is lost.
	Topic func(*exactly.Message) string

	// Settings are the client library's batching, flow control and
	// timeout settings, applied to the publisher of every topic. The
	// default is pubsub.DefaultPublishSettings with a Timeout of
	// DefaultPublishTimeout (15s) instead of 60s: Timeout bounds how long
	// the library retries a request before its messages fail, and a relay
	// batch waits for its slowest message, so a long Timeout on one
	// failing key delays every other key of the batch. A message that
	// fails this way may still have been stored; it is reported as
	// exactly.ErrOutcomeUnknown and published again. HedgingSettings must
	// be nil: the library refuses hedging with message ordering. Flow
	// control that blocks (pubsub.FlowControlBlock) waits within the
	// context passed to Publish. Publish flushes the bundles once it has
	// handed over every message of the call, so DelayThreshold only bounds
	// the wait of a bundle that fills up while the call is handing over.
	Settings *gpubsub.PublishSettings
}

// Publisher publishes exactly.Messages to Google Cloud Pub/Sub with message
// ordering enabled. Each message goes to the topic that PublisherConfig.Topic
// names, with Message.Key as its ordering key, its payload as data, and as
// attributes its headers plus exactly-id (Message.ID) and exactly-created-at.
// Pub/Sub has no dedup field a publisher sets (message_id is the server's):
// a re-published message is stored again, with the same exactly-id, which
// the inbox deduplicates on.
//
// Pub/Sub pauses an ordering key after a failed publish: later messages of
// the key fail, unsent, until the key is resumed, which keeps every key in
// order. Publish resumes the keys it is given before it sends them, once
// every earlier message of the key has its outcome: being asked to publish
// a key again is the sign the caller (the relay, which re-publishes a
// failed message before any later one of its key) has dealt with the
// failure. So a failing key holds back only itself, for as long as the
// relay holds it back, and no key stays paused.
//
// A Publisher is safe for concurrent use, but the caller must not publish
// the same key from two concurrent Publish calls if it needs their relative
// order. Send and Resume (exactly.PipelinedPublisher) are the way to have
// several calls of one key out at once, in order: the relay uses them, and
// hands the publisher the next batch while the last one's confirmations
// are on their way.
// It caches one client publisher per topic; Close stops them. The
// pubsub.Client stays the caller's to close, after the Publisher.
type Publisher struct {
	client   *gpubsub.Client
	topic    func(*exactly.Message) string
	settings gpubsub.PublishSettings

	mu     sync.Mutex
	topics map[string]*gpubsub.Publisher // by full topic name
	// tails holds, per topic and ordering key, the result of the last
	// message handed to the library that has no outcome yet: a later call
	// for the key waits for it before resuming the key.
	tails  map[tailKey]*gpubsub.PublishResult
	closed bool

	// flushing counts the Flush calls under way; stopTopics waits for them
	// (under flushMu) before it stops the client publishers, which must not
	// be flushed and stopped at once.
	flushMu  sync.RWMutex
	flushing sync.WaitGroup
	// flushes holds, per client publisher, whether a Flush is under way
	// (the key is there) and whether another call handed messages over
	// since it began (true), under mu.
	flushes map[*gpubsub.Publisher]bool
}

// flush sends t's bundles now, or, when a Flush of t is under way, once it
// returns: calls that come while the last one's requests are out are sent
// together, in bigger requests (one per key), as a busy relay's calls
// overlap. Called under flushMu (read).
func (p *Publisher) flush(t *gpubsub.Publisher) {
	p.mu.Lock()
	if _, running := p.flushes[t]; running {
		p.flushes[t] = true
		p.mu.Unlock()
		return
	}
	p.flushes[t] = false
	p.mu.Unlock()
	p.flushing.Add(1)
	go func() {
		defer p.flushing.Done()
		for {
			t.Flush()
			p.mu.Lock()
			if !p.flushes[t] {
				delete(p.flushes, t)
				p.mu.Unlock()
				return
			}
			p.flushes[t] = false
			p.mu.Unlock()
		}
	}()
}

type tailKey struct{ topic, key string }

var _ exactly.PipelinedPublisher = (*Publisher)(nil)

// ErrPublisherClosed is the error of Publish after Close.
var ErrPublisherClosed = errors.New("pubsub: the publisher is closed")

// NewPublisher returns a Publisher that publishes through client. The
// client's project is the project of topic IDs; create it with
// pubsub.NewClient, which honours PUBSUB_EMULATOR_HOST and uses
// Application Default Credentials unless given other options.
func NewPublisher(client *gpubsub.Client, cfg PublisherConfig) (*Publisher, error) {
	if client == nil {
		return nil, errors.New("pubsub: NewPublisher: the pubsub.Client is nil")
	}
	settings := gpubsub.DefaultPublishSettings
	settings.Timeout = DefaultPublishTimeout
	if cfg.Settings != nil {
		settings = *cfg.Settings
		if settings.HedgingSettings != nil {
			return nil, errors.New("pubsub: NewPublisher: PublisherConfig.Settings.HedgingSettings must be nil: the client library refuses hedging with message ordering, which the Publisher needs")
		}
		if settings.Timeout < 0 {
			return nil, fmt.Errorf("pubsub: NewPublisher: PublisherConfig.Settings.Timeout is %v, it must not be negative", settings.Timeout)
		}
	}
	topic := cfg.Topic
	if topic == nil {
		topic = func(m *exactly.Message) string { return m.Topic }
	}
	return &Publisher{
		client:   client,
		topic:    topic,
		settings: settings,
		topics:   map[string]*gpubsub.Publisher{},
		tails:    map[tailKey]*gpubsub.PublishResult{},
		flushes:  map[*gpubsub.Publisher]bool{},
	}, nil
}

// Close stops the publisher of every topic, after their messages in flight
// have their outcome (bounded by Settings.Timeout). Publish after Close
// fails with ErrPublisherClosed. Close is safe to call more than once.
func (p *Publisher) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.stopTopics()
	return nil
}

// stopTopics stops the client publisher of every topic, and their
// goroutines; a later Publish makes new ones.
func (p *Publisher) stopTopics() {
	p.mu.Lock()
	topics := p.topics
	p.topics = map[string]*gpubsub.Publisher{}
	p.mu.Unlock()
	p.flushMu.Lock()
	p.flushing.Wait()
	p.flushMu.Unlock()
	var wg sync.WaitGroup
	for _, t := range topics {
		wg.Go(t.Stop)
	}
	wg.Wait()
}

// outgoing is a message ready to hand to the library.
type outgoing struct {
	topic string // full name
	msg   *gpubsub.Message
}

// Publish sends every message and waits for the service to confirm each.
//
// It returns nil when every message is stored, or a *exactly.BatchError
// with one entry per message. Entries matching exactly.ErrUnpublishable
// will never succeed: an invalid message (no ID, no topic), a topic name
// Pub/Sub does not allow, a message over Pub/Sub's limits (MaxRequestBytes,
// MaxAttributes, MaxAttributeKeyBytes, MaxAttributeValueBytes, an attribute
// name starting with "goog"), a key or header that is not valid UTF-8.
// Every other failure is worth retrying: a topic that does not exist (yet),
// missing permissions, a message not sent because an earlier one of its key
// failed (Pub/Sub paused the key), and exactly.ErrOutcomeUnknown when the
// service did not answer within Settings.Timeout or ctx ended first: the
// message may be stored, and the library may still send it after Publish
// returned; publishing it again is safe.
//
// For every key, the confirmed messages are a prefix of the call's messages
// with that key (the unpublishable ones aside): after a failure Pub/Sub
// sends no later message of the key.
func (p *Publisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	return p.send(ctx, msgs, true)()
}

// Send hands msgs to the client library and returns once they are handed
// over; wait returns their outcome as Publish would (see Publish). It is
// the exactly.PipelinedPublisher half of the Publisher, which the relay
// uses: calls may overlap and share keys, and the library sends a key's
// messages in the order of the calls, one request of the key at a time.
// Unlike Publish, Send does not resume a key Pub/Sub paused after a
// failure: a paused key's messages fail unsent until Resume, so a message
// handed over before the caller learnt of the failure cannot overtake the
// failed one's retry.
func (p *Publisher) Send(ctx context.Context, msgs []*exactly.Message) (wait func() error) {
	return p.send(ctx, msgs, false)
}

// Resume lets Pub/Sub send m's key again after a failed publish paused it,
// once every message of the key handed over earlier has its outcome (or ctx
// ended; the key then stays paused, and its next messages fail unsent).
// The relay calls it before it sends the message that goes first once the
// key goes again. It does nothing when the key is not paused.
func (p *Publisher) Resume(ctx context.Context, m *exactly.Message) {
	if m.Key == "" {
		return
	}
	name, err := TopicName(p.client.Project(), p.topic(m))
	if err != nil {
		return // never sent: nothing of it is paused
	}
	k := tailKey{name, m.Key}
	p.mu.Lock()
	t, tail := p.topics[name], p.tails[k]
	p.mu.Unlock()
	if t == nil {
		return
	}
	if tail != nil {
		select {
		case <-tail.Ready():
		case <-ctx.Done():
			return
		}
	}
	t.ResumePublish(m.Key)
}

// send hands msgs over and returns the wait for their outcome. With
// implicitResume (Publish), a paused key of the call is resumed before its
// first message, once the key's earlier messages have their outcome.
func (p *Publisher) send(ctx context.Context, msgs []*exactly.Message, implicitResume bool) func() error {
	if len(msgs) == 0 {
		return func() error { return nil }
	}
	if err := ctx.Err(); err != nil {
		return func() error { return fmt.Errorf("pubsub: publish not started: %w", err) }
	}
	errs := make([]error, len(msgs))
	out := make([]outgoing, len(msgs))
	todo := make([]int, 0, len(msgs))
	names := make(map[string]topicName, 1) // the call's topics, checked once each
	for i, m := range msgs {
		if out[i], errs[i] = p.outgoing(m, names); errs[i] == nil {
			todo = append(todo, i)
		}
	}
	if len(todo) == 0 {
		return func() error { return exactly.NewBatchError(errs) }
	}
	topics, earlier, err := p.prepare(msgs, out, todo, implicitResume)
	if err != nil {
		for _, i := range todo {
			errs[i] = fmt.Errorf("pubsub: message %s not sent: %w", msgs[i].ID, err)
		}
		return func() error { return exactly.NewBatchError(errs) }
	}
	// A key is resumed only once every earlier message of it has its
	// outcome: resumed sooner, a message queued behind one that failed
	// would be sent, ahead of the failed one's retry.
	ready := make(map[tailKey]bool, len(earlier))
	for k, r := range earlier {
		select {
		case <-r.Ready():
			ready[k] = true
		case <-ctx.Done():
		}
	}
	results := make([]*gpubsub.PublishResult, len(msgs))
	resumed := make(map[tailKey]bool)
	for _, i := range todo {
		o := out[i]
		k := tailKey{o.topic, o.msg.OrderingKey}
		if _, waits := earlier[k]; waits && !ready[k] {
			errs[i] = fmt.Errorf("pubsub: message %s not sent: an earlier publish of its key %q to %s has no outcome yet: %w",
				msgs[i].ID, o.msg.OrderingKey, o.topic, ctx.Err())
			continue
		}
		if err := ctx.Err(); err != nil {
			errs[i] = fmt.Errorf("pubsub: message %s to %s not sent: %w", msgs[i].ID, o.topic, err)
			continue
		}
		t := topics[o.topic]
		if implicitResume && k.key != "" && !resumed[k] {
			t.ResumePublish(k.key)
			resumed[k] = true
		}
		results[i] = t.Publish(ctx, o.msg)
	}
	// Every message of the call is handed over: send the bundles now rather
	// than after the library's DelayThreshold, which would add its 10ms to
	// every call. Flush blocks until they are sent; the waits below keep to
	// ctx.
	p.flushMu.RLock()
	for _, t := range topics {
		p.flush(t)
	}
	p.flushMu.RUnlock()
	p.track(out, results)
	return func() error {
		for _, i := range todo {
			r := results[i]
			if r == nil {
				continue
			}
			select {
			case <-r.Ready():
				if _, err := r.Get(ctx); err != nil {
					errs[i] = describe(msgs[i], out[i].topic, err)
				}
			case <-ctx.Done():
				errs[i] = fmt.Errorf("pubsub: message %s to %s: outcome unknown, the context ended before the service confirmed it, and it may still be sent; publishing it again is safe: %w: %w",
					msgs[i].ID, out[i].topic, exactly.ErrOutcomeUnknown, ctx.Err())
			}
		}
		return exactly.NewBatchError(errs)
	}
}

// prepare returns the client publisher of every topic of the call, and,
// with withEarlier, the last unsettled result of each key of the call from
// earlier calls.
func (p *Publisher) prepare(msgs []*exactly.Message, out []outgoing, todo []int, withEarlier bool) (map[string]*gpubsub.Publisher, map[tailKey]*gpubsub.PublishResult, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, nil, ErrPublisherClosed
	}
	topics := make(map[string]*gpubsub.Publisher)
	earlier := make(map[tailKey]*gpubsub.PublishResult)
	for _, i := range todo {
		name := out[i].topic
		if _, ok := topics[name]; !ok {
			t := p.topics[name]
			if t == nil {
				t = p.client.Publisher(name)
				t.PublishSettings = p.settings
				t.EnableMessageOrdering = true
				p.topics[name] = t
			}
			topics[name] = t
		}
		if key := msgs[i].Key; key != "" && withEarlier {
			k := tailKey{name, key}
			if r := p.tails[k]; r != nil {
				earlier[k] = r
			}
		}
	}
	return topics, earlier, nil
}

// track records the last result of each key, and forgets it once it has
// its outcome, unless a later call replaced it.
func (p *Publisher) track(out []outgoing, results []*gpubsub.PublishResult) {
	last := make(map[tailKey]*gpubsub.PublishResult)
	for i, r := range results {
		if r != nil && out[i].msg.OrderingKey != "" {
			last[tailKey{out[i].topic, out[i].msg.OrderingKey}] = r
		}
	}
	if len(last) == 0 {
		return
	}
	p.mu.Lock()
	for k, r := range last {
		p.tails[k] = r
	}
	p.mu.Unlock()
	go func() {
		for k, r := range last {
			<-r.Ready() // the library settles every result within its Timeout
			p.mu.Lock()
			if p.tails[k] == r {
				delete(p.tails, k)
			}
			p.mu.Unlock()
		}
	}()
}

// describe wraps an error of the library with the message and what to do
// about it.
func describe(m *exactly.Message, topic string, err error) error {
	var paused gpubsub.ErrPublishingPaused
	if errors.As(err, &paused) {
		return fmt.Errorf("pubsub: message %s to %s not sent: an earlier message of its key %q failed and Pub/Sub paused the key; publish them again in order (Publish, or Resume before Send, lets the key go again): %w",
			m.ID, topic, m.Key, err)
	}
	if errors.Is(err, gpubsub.ErrPublisherStopped) {
		return fmt.Errorf("pubsub: message %s to %s not sent: %w", m.ID, topic, ErrPublisherClosed)
	}
	s, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("pubsub: message %s to %s: outcome unknown; publishing it again is safe: %w: %w", m.ID, topic, exactly.ErrOutcomeUnknown, err)
	}
	switch s.Code() {
	case codes.NotFound:
		return fmt.Errorf("pubsub: message %s: topic %s does not exist; create it, or wait for it: %w", m.ID, topic, err)
	case codes.PermissionDenied, codes.Unauthenticated:
		return fmt.Errorf("pubsub: message %s to %s: the credentials may not publish to the topic (roles/pubsub.publisher): %w", m.ID, topic, err)
	case codes.InvalidArgument, codes.FailedPrecondition, codes.OutOfRange, codes.AlreadyExists, codes.Unimplemented:
		// Refused before it was stored. Not parked at once: the request
		// held other messages of the key, which a message of its own
		// would not fail; the relay retries and parks after its attempts.
		return fmt.Errorf("pubsub: message %s to %s refused: %w", m.ID, topic, err)
	default:
		// The library retried (Unavailable, DeadlineExceeded, Internal, ...)
		// until Settings.Timeout: an attempt may have been stored.
		return fmt.Errorf("pubsub: message %s to %s: outcome unknown, no confirmation within the publish timeout; publishing it again is safe: %w: %w",
			m.ID, topic, exactly.ErrOutcomeUnknown, err)
	}
}

// topicName is a topic's full name, or why Pub/Sub would refuse it.
type topicName struct {
	name string
	err  error
}

// outgoing converts m, or returns why it can never be published. names
// holds the topics already checked.
func (p *Publisher) outgoing(m *exactly.Message, names map[string]topicName) (outgoing, error) {
	if err := m.Validate(); err != nil {
		return outgoing{}, exactly.Unpublishable(fmt.Errorf("pubsub: %w", err))
	}
	if m.ID == "" {
		return outgoing{}, exactly.Unpublishable(errors.New("pubsub: message has an empty ID; outbox.Enqueue assigns one, a direct caller must set it (exactly.NewID)"))
	}
	topic := p.topic(m)
	tn, ok := names[topic]
	if !ok {
		tn.name, tn.err = TopicName(p.client.Project(), topic)
		names[topic] = tn
	}
	name, err := tn.name, tn.err
	if err != nil {
		return outgoing{}, exactly.Unpublishable(fmt.Errorf("pubsub: message %s: %w", m.ID, err))
	}
	if !utf8.ValidString(m.Key) {
		return outgoing{}, exactly.Unpublishable(fmt.Errorf("pubsub: message %s: key %.60q is not valid UTF-8, which Pub/Sub's ordering key must be", m.ID, m.Key))
	}
	if len(m.Key) > MaxOrderingKeyBytes {
		return outgoing{}, exactly.Unpublishable(fmt.Errorf("pubsub: message %s: key is %d bytes, Pub/Sub's limit on ordering keys is %d", m.ID, len(m.Key), MaxOrderingKeyBytes))
	}
	attrs := make(map[string]string, len(m.Headers)+2)
	for k, v := range m.Headers {
		switch k {
		case exactly.HeaderID, exactly.HeaderKey, exactly.HeaderCreatedAt:
			continue // ours win, so a stale copy cannot mislabel the message
		}
		if err := checkAttribute(k, v); err != nil {
			return outgoing{}, exactly.Unpublishable(fmt.Errorf("pubsub: message %s: %w", m.ID, err))
		}
		attrs[k] = v
	}
	attrs[exactly.HeaderID] = m.ID
	if !m.CreatedAt.IsZero() {
		attrs[exactly.HeaderCreatedAt] = m.CreatedAt.UTC().Format(time.RFC3339Nano)
	}
	if len(attrs) > MaxAttributes {
		return outgoing{}, exactly.Unpublishable(fmt.Errorf("pubsub: message %s has %d attributes (its headers plus exactly's), Pub/Sub's limit is %d", m.ID, len(attrs), MaxAttributes))
	}
	msg := &gpubsub.Message{Data: m.Payload, Attributes: attrs, OrderingKey: m.Key}
	// As the library measures a request: the message, the topic's name
	// field, and 5 bytes for the message's own field header.
	size := messageSize(msg) + protowire.SizeTag(1) + protowire.SizeBytes(len(name)) + 5
	if size > MaxRequestBytes {
		return outgoing{}, exactly.Unpublishable(fmt.Errorf("pubsub: message %s: payload of %d bytes with its attributes makes a request of %d bytes, Pub/Sub's limit is %d",
			m.ID, len(m.Payload), size, MaxRequestBytes))
	}
	return outgoing{topic: name, msg: msg}, nil
}

// messageSize is proto.Size of the PubsubMessage of m (data, attributes,
// ordering key), counted without building it: proto.Size walks the
// attributes map through reflection, a cost per message that showed in
// the relay's profile.
func messageSize(m *gpubsub.Message) int {
	n := 0
	if len(m.Data) > 0 {
		n += protowire.SizeTag(1) + protowire.SizeBytes(len(m.Data))
	}
	for k, v := range m.Attributes {
		// A map entry always carries its key (field 1) and value (field 2).
		entry := protowire.SizeTag(1) + protowire.SizeBytes(len(k)) + protowire.SizeTag(2) + protowire.SizeBytes(len(v))
		n += protowire.SizeTag(2) + protowire.SizeBytes(entry)
	}
	if m.OrderingKey != "" {
		n += protowire.SizeTag(5) + protowire.SizeBytes(len(m.OrderingKey))
	}
	return n
}

func checkAttribute(k, v string) error {
	switch {
	case k == "":
		return errors.New("a header has an empty name, which Pub/Sub attributes may not have")
	case len(k) > MaxAttributeKeyBytes:
		return fmt.Errorf("header name %.40q... is %d bytes, Pub/Sub's limit on attribute names is %d", k, len(k), MaxAttributeKeyBytes)
	case len(v) > MaxAttributeValueBytes:
		return fmt.Errorf("header %q has a value of %d bytes, Pub/Sub's limit on attribute values is %d", k, len(v), MaxAttributeValueBytes)
	case strings.HasPrefix(strings.ToLower(k), "goog"):
		return fmt.Errorf("header name %q starts with \"goog\", which Pub/Sub reserves", k)
	case !utf8.ValidString(k) || !utf8.ValidString(v):
		return fmt.Errorf("header %.40q is not valid UTF-8, which Pub/Sub attributes must be", k)
	}
	return nil
}

var (
	topicID   = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}$`)
	projectID = regexp.MustCompile(`^[a-z0-9][a-z0-9\-.:]*[a-z0-9]$`)
)

// TopicName returns the full name, projects/<project>/topics/<id>, of topic:
// a topic ID in project, or a full name, which it returns as it is. It
// returns an error when Pub/Sub would refuse the name (a topic ID is 3 to 255
// letters, digits and -_.~+%, starts with a letter and not with "goog"), as
// Publish does for the names PublisherConfig.Topic returns; a configuration
// can be checked with it before anything is published.
func TopicName(project, topic string) (string, error) {
	id := topic
	if rest, ok := strings.CutPrefix(topic, "projects/"); ok {
		var found bool
		project, id, found = strings.Cut(rest, "/topics/")
		if !found || !projectID.MatchString(project) {
			return "", fmt.Errorf("topic %q is not projects/<project>/topics/<id>", topic)
		}
	}
	if !topicID.MatchString(id) || strings.HasPrefix(id, "goog") {
		return "", fmt.Errorf("topic %q is not a Pub/Sub topic ID (3 to 255 letters, digits and -_.~+%%, starting with a letter, not with \"goog\")", id)
	}
	return "projects/" + project + "/topics/" + id, nil
}
