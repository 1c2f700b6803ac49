package pubsub

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/consume"
)

// ConsumerConfig configures a Consumer: the settings every consumer shares,
// embedded, and Pub/Sub's own.
type ConsumerConfig struct {
	exactly.ConsumerConfig

	// Subscription is the subscription to pull from: an ID in the client's
	// project, or a full name projects/<project>/subscriptions/<id>.
	// Required. Create it with message ordering enabled to have the
	// messages of one key handled one at a time, in order, with any number
	// of Workers; without it Pub/Sub promises no order. The consumer does
	// not create it: its settings (ack deadline, retention, dead-letter
	// policy, exactly-once delivery) are yours.
	Subscription string

	// Topic is the Message.Topic of the messages handed to the Handler, and
	// what DeadLetterTopic sees. Pub/Sub does not deliver the topic with a
	// message. Default: the ID of the subscription's topic, read when Run
	// starts (it needs pubsub.subscriptions.get).
	Topic string

	// MaxExtension bounds how long the client library keeps extending the
	// ack deadline of a message while its Handler runs, retries included.
	// Default 60m (the library's). A handler that takes longer loses its
	// message to a redelivery, and the inbox absorbs the second run. Keep
	// Retry.MaxAttempts times Retry.MaxBackoff below it.
	MaxExtension time.Duration

	// MaxLeaseExtension bounds what one extension of a message's ack
	// deadline adds (the library's MaxDurationPerAckExtension), and so how
	// long a message held by a consumer that died waits before Pub/Sub
	// delivers it again. Default 0: the library's choice, from the 99th
	// percentile of ack latency, 60s at start. Between 10s and 600s: a
	// shorter one costs more ModifyAckDeadline calls. On a subscription
	// with exactly-once delivery the library extends by at least 60s
	// whatever this says.
	MaxLeaseExtension time.Duration

	// AckTimeout bounds the wait for the outcome of an acknowledgement on a
	// subscription with exactly-once delivery (elsewhere Pub/Sub reports
	// none). Default 60s. An ack that fails or is not confirmed in time is
	// counted in AckFailures and the AckFailed hook: the message may be
	// delivered again, and the inbox absorbs it.
	AckTimeout time.Duration
}

// ConsumerStats are a Consumer's running totals.
type ConsumerStats struct {
	exactly.ConsumerStats
}

// Consumer pulls messages from a Pub/Sub subscription with streaming pull
// and runs the Handler for each, under the shared consumer contract: a
// message is acknowledged only once its Handler returned nil or its dead
// letter was confirmed; a failing Handler is retried in place with backoff
// (the library extending the message's ack deadline meanwhile) and
// dead-lettered after Retry.MaxAttempts; a message whose handling is cut
// short by the end of Run is nacked, and delivered again.
//
// The attempt count starts from the subscription's delivery attempt when it
// has a dead-letter policy (Pub/Sub counts deliveries only then), so a
// message redelivered after a crash does not start over. Pub/Sub's own
// dead-letter policy, when the subscription has one, moves a message after
// its max delivery attempts by itself; keep those above Retry.MaxAttempts so
// the consumer's dead letter, with its reason headers, comes first.
//
// Message.ID is the exactly-id attribute. A message without it (from a
// producer that is not exactly's) gets an id derived from its Pub/Sub
// message ID, which stays the same across redeliveries: "pubsub:" + the
// subscription's topic + ":" + message ID. It is handled as any other.
type Consumer struct {
	client  *gpubsub.Client
	cfg     ConsumerConfig
	subName string
	policy  *consume.Policy
	ownDL   *Publisher // the default dead-letter publisher, when cfg.DeadLetter is nil
	stats   consume.Stats
	running atomic.Bool
}

// NewConsumer checks cfg and returns a Consumer of the subscription,
// pulling through client. It does no I/O. With no DeadLetter, dead letters
// go to the Pub/Sub topic DeadLetterTopic names (default the message's
// Topic plus ".dlq", which must exist) through a Publisher on client.
func NewConsumer(client *gpubsub.Client, cfg ConsumerConfig) (*Consumer, error) {
	if client == nil {
		return nil, errors.New("pubsub: NewConsumer: the pubsub.Client is nil")
	}
	shared, err := cfg.ConsumerConfig.WithDefaults()
	if err != nil {
		return nil, fmt.Errorf("pubsub: NewConsumer: %w", err)
	}
	cfg.ConsumerConfig = shared
	switch {
	case strings.TrimSpace(cfg.Subscription) == "":
		return nil, fmt.Errorf("pubsub: NewConsumer: %w", &exactly.ConfigError{Field: "Subscription", Err: errors.New("is empty: name the subscription to pull from")})
	case cfg.MaxExtension < 0:
		return nil, fmt.Errorf("pubsub: NewConsumer: %w", &exactly.ConfigError{Field: "MaxExtension", Err: fmt.Errorf("is %v; it must not be negative", cfg.MaxExtension)})
	case cfg.MaxLeaseExtension != 0 && (cfg.MaxLeaseExtension < 10*time.Second || cfg.MaxLeaseExtension > 600*time.Second):
		return nil, fmt.Errorf("pubsub: NewConsumer: %w", &exactly.ConfigError{Field: "MaxLeaseExtension", Err: fmt.Errorf("is %v; it must be between 10s and 600s (or 0 for the library's choice)", cfg.MaxLeaseExtension)})
	case cfg.AckTimeout < 0:
		return nil, fmt.Errorf("pubsub: NewConsumer: %w", &exactly.ConfigError{Field: "AckTimeout", Err: fmt.Errorf("is %v; it must not be negative", cfg.AckTimeout)})
	}
	if cfg.MaxExtension == 0 {
		cfg.MaxExtension = gpubsub.DefaultReceiveSettings.MaxExtension
	}
	if cfg.AckTimeout == 0 {
		cfg.AckTimeout = 60 * time.Second
	}
	subName := cfg.Subscription
	if !strings.HasPrefix(subName, "projects/") {
		subName = "projects/" + client.Project() + "/subscriptions/" + subName
	}
	dl := cfg.DeadLetter
	var ownDL *Publisher
	if dl == nil {
		ownDL, err = NewPublisher(client, PublisherConfig{})
		if err != nil {
			return nil, fmt.Errorf("pubsub: NewConsumer: the dead-letter publisher: %w", err)
		}
		dl = ownDL
	}
	policy, err := consume.FromConfig(cfg.ConsumerConfig, dl)
	if err != nil {
		return nil, fmt.Errorf("pubsub: NewConsumer: %w", err)
	}
	return &Consumer{client: client, cfg: cfg, subName: subName, policy: policy, ownDL: ownDL}, nil
}

// Stats returns the running totals.
func (c *Consumer) Stats() ConsumerStats { return ConsumerStats{c.stats.Load()} }

// Run pulls and handles messages until ctx ends, then waits for the
// handlers in flight (whose context ends too) and returns nil. It returns
// an error when the subscription cannot be read (it does not exist, the
// credentials may not consume it, the client was closed).
func (c *Consumer) Run(ctx context.Context) error {
	if !c.running.CompareAndSwap(false, true) {
		return errors.New("pubsub: Consumer.Run called twice")
	}
	defer c.running.Store(false)
	if c.ownDL != nil {
		defer c.ownDL.stopTopics() // every handler has returned by then
	}
	topic := c.cfg.Topic
	if topic == "" {
		sub, err := c.client.SubscriptionAdminClient.GetSubscription(ctx, &pb.GetSubscriptionRequest{Subscription: c.subName})
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("pubsub: reading subscription %s for its topic (or set ConsumerConfig.Topic): %w", c.subName, err)
		}
		topic = sub.Topic[strings.LastIndexByte(sub.Topic, '/')+1:]
	}
	sub := c.client.Subscriber(c.subName)
	sub.ReceiveSettings.MaxOutstandingMessages = c.cfg.Workers
	sub.ReceiveSettings.MaxExtension = c.cfg.MaxExtension
	sub.ReceiveSettings.MaxDurationPerAckExtension = c.cfg.MaxLeaseExtension
	sub.ReceiveSettings.NumGoroutines = 1
	err := sub.Receive(ctx, func(mctx context.Context, m *gpubsub.Message) {
		c.handle(mctx, m, topic)
	})
	if ctx.Err() != nil {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pubsub: receiving from %s: %w", c.subName, err)
	}
	return errors.New("pubsub: receiving from " + c.subName + " stopped")
}

// handle runs the policy for one message, then acknowledges it, or nacks it
// when the policy gave up because ctx ended.
func (c *Consumer) handle(ctx context.Context, m *gpubsub.Message, topic string) {
	c.stats.Received.Add(1)
	first := 1
	if m.DeliveryAttempt != nil {
		first = max(*m.DeliveryAttempt, 1)
		if first > 1 {
			c.stats.Redeliveries.Add(1)
		}
	}
	msg := decode(m, topic)
	if _, err := c.policy.Process(ctx, c.cfg.Handler, msg, first, &c.stats); err != nil {
		m.Nack()
		return
	}
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.AckTimeout)
	defer cancel()
	status, err := m.AckWithResult().Get(actx)
	if err == nil && status != gpubsub.AcknowledgeStatusSuccess {
		err = fmt.Errorf("acknowledge status %d", status)
	}
	if err != nil {
		c.cfg.Logger.Warn("pubsub: the acknowledgement of a handled message failed or is not confirmed; Pub/Sub may deliver it again",
			"subscription", c.subName, "id", msg.ID, "err", err)
		c.policy.AckFailed(msg, fmt.Errorf("pubsub: ack of message %s: %w", msg.ID, err), &c.stats)
	}
}

// decode turns a Pub/Sub message into a Message.
func decode(m *gpubsub.Message, topic string) *exactly.Message {
	msg := &exactly.Message{
		ID:      m.Attributes[exactly.HeaderID],
		Topic:   topic,
		Key:     m.OrderingKey,
		Payload: m.Data,
	}
	for k, v := range m.Attributes {
		switch k {
		case exactly.HeaderID, exactly.HeaderKey, exactly.HeaderCreatedAt:
			continue
		}
		if msg.Headers == nil {
			msg.Headers = make(map[string]string, len(m.Attributes))
		}
		msg.Headers[k] = v
	}
	if s := m.Attributes[exactly.HeaderCreatedAt]; s != "" {
		msg.CreatedAt, _ = time.Parse(time.RFC3339Nano, s)
	}
	if msg.CreatedAt.IsZero() {
		msg.CreatedAt = m.PublishTime
	}
	if msg.ID == "" {
		msg.ID = "pubsub:" + topic + ":" + m.ID
		if len(msg.ID) > exactly.MaxIDLen {
			msg.ID = msg.ID[len(msg.ID)-exactly.MaxIDLen:]
		}
	}
	return msg
}
