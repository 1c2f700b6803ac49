package amqp

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/consume"
)

// ErrNoID is the reason a delivery without a message id is dead-lettered:
// its AMQP message-id property and its exactly-id header are both empty, so
// the inbox could not deduplicate it. The handler never sees such a
// delivery.
var ErrNoID = errors.New("amqp: the delivery has no message id (neither the AMQP message-id property nor the exactly-id header); it was not handled")

// Consumer consumes one queue with manual acknowledgements and runs an
// exactly.Handler for each delivery, through the policy every consumer of
// this module shares: a panic counts as a failure, a failure is retried with
// backoff, and after the last attempt the message goes to a dead-letter
// destination with the reason. A delivery is acknowledged only after its
// handler returned nil or it was dead-lettered; when Run's context ends
// first it is rejected with requeue, so the broker delivers it again. The
// handler's context ends when Run's does, and when the connection the
// delivery came on is lost (context.Cause then says so): the delivery can
// no longer be acknowledged and will be redelivered.
//
// RabbitMQ delivers at least once: after a lost connection it redelivers
// every unacknowledged delivery (with the Redelivered flag), so a handler
// runs more than once for the same Message.ID. Wrap it with the inbox to
// apply its effect once per ID.
type Consumer struct {
	dial      *dialer
	url       string
	conn      connOptions
	log       *slog.Logger
	queue     string
	handler   exactly.Handler
	prefetch  int
	workers   int
	retry     exactly.RetryPolicy
	reconnect exactly.RetryPolicy // only its backoff is used
	dlQueue   string              // declared and published to when dlPub is nil
	dlPub     exactly.Publisher
	dlTopic   string

	hooks  ConsumerHooks
	tracer exactly.Tracer

	running     atomic.Bool
	stats       consume.Stats
	received    atomic.Int64
	ackFailures atomic.Int64
	redelivered atomic.Int64
	reconnects  atomic.Int64
}

type consumerOptions struct {
	conn      connOptions
	prefetch  int
	workers   int
	retry     exactly.RetryPolicy
	reconnect exactly.RetryPolicy
	dlQueue   string
	dlPub     exactly.Publisher
	dlTopic   string
	hooks     ConsumerHooks
	tracer    exactly.Tracer
}

type consumerOption func(*consumerOptions)

func (o consumerOption) applyConsumer(c *consumerOptions) { o(c) }

// Prefetch sets how many unacknowledged deliveries the broker sends ahead
// (basic.qos), overriding the default of 64. Too low a value leaves the
// consumer waiting for the network between messages; too high a value holds
// messages in one consumer's memory that other consumers of the queue could
// be handling, and all of them are redelivered if the connection drops. It
// must be at least Workers, or workers would sit idle, and at most 65535.
func Prefetch(n int) ConsumerOption {
	return consumerOption(func(o *consumerOptions) { o.prefetch = n })
}

// Workers sets how many deliveries are handled at once, overriding the
// default of 1. With 1, deliveries are handled one at a time in queue
// order. With more, they are handled concurrently and complete in any
// order: messages of one key may be applied out of order, and a message
// that is being retried no longer holds back the others. Use more than one
// only when the handler does not depend on the order of messages. n must be
// between 1 and Prefetch.
func Workers(n int) ConsumerOption {
	return consumerOption(func(o *consumerOptions) { o.workers = n })
}

// Retry sets how a failing handler is retried before its message is
// dead-lettered, overriding the defaults of exactly.RetryPolicy (5 attempts,
// backoff from 100ms doubling to 10s). The delivery stays unacknowledged
// while it is retried, and RabbitMQ closes a channel whose delivery stays
// unacknowledged longer than its consumer_timeout (30 minutes by default),
// which redelivers it: keep MaxAttempts times MaxBackoff, plus the
// handler's own time, well below it. A single worker handles nothing else
// meanwhile.
func Retry(p exactly.RetryPolicy) ConsumerOption {
	return consumerOption(func(o *consumerOptions) { o.retry = p })
}

// ReconnectBackoff sets the wait between attempts to reconnect after the
// connection is lost, overriding the defaults of 250ms doubling up to 10s,
// with jitter; a zero argument keeps its default. A short maximum makes
// many consumers hammer a broker that is restarting; a long one delays
// recovery by up to that much. max must not be below initial.
func ReconnectBackoff(initial, max time.Duration) ConsumerOption {
	return consumerOption(func(o *consumerOptions) {
		o.reconnect.InitialBackoff, o.reconnect.MaxBackoff = initial, max
	})
}

// DeadLetterQueue sets the queue that messages whose handler kept failing
// are published to, overriding the default of the consumed queue's name
// plus ".dlq". The Consumer declares it (durable, no arguments) each time
// it connects, and publishes to it through the default exchange with
// publisher confirms, on a connection of its own, before it acknowledges
// the original. If a queue of that name exists with other arguments the
// declaration fails and Run returns the error. Not to be combined with
// DeadLetterPublisher.
func DeadLetterQueue(name string) ConsumerOption {
	return consumerOption(func(o *consumerOptions) { o.dlQueue = name })
}

// DeadLetterPublisher sends messages whose handler kept failing to pub,
// with Message.Topic set to topic, instead of to the dead-letter queue the
// Consumer declares (see DeadLetterQueue). Use it to dead-letter to an
// exchange or another broker. pub must confirm before it returns (every
// exactly.Publisher does): the original is acknowledged as soon as Publish
// returns nil, and while Publish fails the delivery is held and the
// dead-letter publish retried, so a destination that never accepts the
// message stalls the consumer instead of losing it.
func DeadLetterPublisher(pub exactly.Publisher, topic string) ConsumerOption {
	return consumerOption(func(o *consumerOptions) { o.dlPub, o.dlTopic = pub, topic })
}

// Hooks sets functions the Consumer calls as it handles deliveries, for
// metrics; see ConsumerHooks. By default there are none; Stats keeps the
// totals either way.
func Hooks(h ConsumerHooks) ConsumerOption {
	return consumerOption(func(o *consumerOptions) { o.hooks = h })
}

// Tracer runs each delivery's handling in a span that continues the trace
// the message carries (its traceparent header, written by outbox.Enqueue
// with a Tracer), so the handler's context holds that span; see
// exactlyotel.New. By default there is none: no spans, no overhead.
func Tracer(t exactly.Tracer) ConsumerOption {
	return consumerOption(func(o *consumerOptions) { o.tracer = t })
}

// NewConsumer returns a Consumer of queue at url
// (amqp://user:password@host:port/vhost) that runs h for each delivery.
// It does not connect: Run does. The queue must exist; the Consumer does
// not declare it, since its type and arguments are yours.
func NewConsumer(url, queue string, h exactly.Handler, opts ...ConsumerOption) (*Consumer, error) {
	o := consumerOptions{prefetch: 64, workers: 1}
	for _, opt := range opts {
		opt.applyConsumer(&o)
	}
	if o.reconnect.InitialBackoff == 0 {
		o.reconnect.InitialBackoff = 250 * time.Millisecond
	}
	if o.reconnect.MaxBackoff == 0 {
		o.reconnect.MaxBackoff = max(10*time.Second, o.reconnect.InitialBackoff)
	}
	if o.dlQueue == "" && o.dlPub == nil {
		o.dlQueue = queue + ".dlq"
	}
	retry, err := o.retry.WithDefaults()
	if err != nil {
		return nil, fmt.Errorf("amqp: NewConsumer: Retry: %w", err)
	}
	reconnect, err := o.reconnect.WithDefaults()
	if err != nil {
		return nil, fmt.Errorf("amqp: NewConsumer: ReconnectBackoff: %w", err)
	}
	switch {
	case queue == "":
		return nil, errors.New("amqp: NewConsumer: the queue name is empty")
	case len(queue) > maxShortString:
		return nil, fmt.Errorf("amqp: NewConsumer: the queue name is %d bytes, AMQP's limit is %d", len(queue), maxShortString)
	case h == nil:
		return nil, errors.New("amqp: NewConsumer: the handler is nil")
	case o.workers < 1:
		return nil, fmt.Errorf("amqp: NewConsumer: Workers is %d, it must be at least 1", o.workers)
	case o.prefetch < o.workers || o.prefetch > 65535:
		return nil, fmt.Errorf("amqp: NewConsumer: Prefetch is %d, it must be between Workers (%d) and 65535", o.prefetch, o.workers)
	case o.dlPub != nil && o.dlQueue != "":
		return nil, errors.New("amqp: NewConsumer: DeadLetterQueue and DeadLetterPublisher both set; choose one destination")
	case o.dlPub != nil && o.dlTopic == "":
		return nil, errors.New("amqp: NewConsumer: DeadLetterPublisher needs a topic to publish dead letters to")
	case len(o.dlQueue) > maxShortString:
		return nil, fmt.Errorf("amqp: NewConsumer: the DeadLetterQueue name is %d bytes, AMQP's limit is %d", len(o.dlQueue), maxShortString)
	case o.dlQueue == queue:
		return nil, errors.New("amqp: NewConsumer: DeadLetterQueue is the consumed queue; failing messages would come back forever")
	}
	d, err := newDialer(url, o.conn, "exactly consumer "+queue)
	if err != nil {
		return nil, fmt.Errorf("amqp: NewConsumer: %w", err)
	}
	c := &Consumer{
		dial:      d,
		url:       url,
		conn:      o.conn,
		log:       o.conn.logger,
		queue:     queue,
		handler:   h,
		prefetch:  o.prefetch,
		workers:   o.workers,
		retry:     retry,
		reconnect: reconnect,
		dlQueue:   o.dlQueue,
		dlPub:     o.dlPub,
		dlTopic:   o.dlTopic,
		hooks:     o.hooks,
		tracer:    o.tracer,
	}
	if c.dlPub == nil {
		c.dlTopic = c.dlQueue
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	return c, nil
}

// ConsumerStats are a Consumer's running totals since NewConsumer.
type ConsumerStats struct {
	// Received counts deliveries taken from the broker, redeliveries
	// included.
	Received int64
	// Handled counts deliveries whose handler returned nil.
	Handled int64
	// Failed counts failed handler attempts: a delivery that failed twice
	// and then succeeded counts two here and one in Handled. A delivery
	// without a message id counts one.
	Failed int64
	// DeadLettered counts deliveries the dead-letter destination confirmed
	// (and that were then acknowledged).
	DeadLettered int64
	// AckFailures counts acknowledgements that could not be sent (the
	// connection was lost): each such delivery is redelivered.
	AckFailures int64
	// Redeliveries counts deliveries the broker flagged as delivered before.
	Redeliveries int64
	// Reconnects counts how many times Run lost a connection it was
	// consuming on, and started to reconnect.
	Reconnects int64
}

// Stats returns the running totals. It is safe to call at any time.
func (c *Consumer) Stats() ConsumerStats {
	return ConsumerStats{
		Received:     c.received.Load(),
		Handled:      c.stats.Handled.Load(),
		Failed:       c.stats.Failed.Load(),
		DeadLettered: c.stats.DeadLettered.Load(),
		AckFailures:  c.ackFailures.Load(),
		Redeliveries: c.redelivered.Load(),
		Reconnects:   c.reconnects.Load(),
	}
}

// ConsumerHooks report what a Consumer does, for metrics. Every hook is
// optional and runs synchronously on the goroutine of the worker handling
// the delivery; with Workers > 1 hooks run concurrently and must be safe
// for that. A hook that blocks stalls its worker, and with it the
// acknowledgement of its delivery.
type ConsumerHooks struct {
	// Handled runs after the handler returned nil, with its duration.
	Handled func(msg *exactly.Message, took time.Duration)
	// Failed runs after each failed attempt (attempt 1 is the first).
	Failed func(msg *exactly.Message, attempt int, err error)
	// DeadLettered runs once the dead-letter destination confirmed the copy.
	DeadLettered func(msg *exactly.Message, err error)
	// AckFailed runs when the acknowledgement of a handled or
	// dead-lettered delivery could not be sent; it will be redelivered.
	AckFailed func(msg *exactly.Message, err error)
}

// DeliveryInfo describes the delivery a handler is running for.
type DeliveryInfo struct {
	Queue       string
	Exchange    string
	RoutingKey  string
	ConsumerTag string
	DeliveryTag uint64
	// Redelivered is set by the broker when it delivered the message
	// before (to this consumer or another) and got no acknowledgement: the
	// effect may already be applied.
	Redelivered bool
}

type deliveryKey struct{}

// DeliveryInfoFrom returns the delivery a Consumer's handler runs for,
// from the handler's context.
func DeliveryInfoFrom(ctx context.Context) (DeliveryInfo, bool) {
	d, ok := ctx.Value(deliveryKey{}).(DeliveryInfo)
	return d, ok
}

// setupError marks a refusal of the set-up (credentials, queue, qos,
// declare, consume) that no reconnect fixes.
type setupError struct{ err error }

func (e *setupError) Error() string { return e.err.Error() }
func (e *setupError) Unwrap() error { return e.err }

// Run consumes the queue until ctx ends, reconnecting whenever the
// connection or channel is lost; the broker then redelivers what was not
// acknowledged. It returns nil once ctx has ended and the deliveries in
// progress are finished (acknowledged) or, if the handler gave up on the
// ended context, rejected with requeue. It returns an error without
// retrying when the broker refuses the set-up: the queue does not exist,
// access is refused, or the dead-letter queue exists with other arguments.
// Run may be called again after it returns, but not concurrently.
func (c *Consumer) Run(ctx context.Context) error {
	if !c.running.CompareAndSwap(false, true) {
		return errors.New("amqp: Consumer.Run is already running")
	}
	defer c.running.Store(false)

	dl := c.dlPub
	if dl == nil {
		pub, err := NewPublisher(c.url, DialConfig(c.conn.config), Logger(c.log), Channels(1))
		if err != nil {
			return fmt.Errorf("amqp: the dead-letter publisher: %w", err)
		}
		defer pub.Close()
		dl = pub
	}
	policy, err := consume.New(consume.Policy{
		Retry:           c.retry,
		DeadLetter:      dl,
		DeadLetterTopic: func(*exactly.Message) string { return c.dlTopic },
		Logger:          c.log,
		Tracer:          c.tracer,
		Hooks: consume.Hooks{
			Handled:      c.hooks.Handled,
			Failed:       c.hooks.Failed,
			DeadLettered: c.hooks.DeadLettered,
		},
	})
	if err != nil {
		return fmt.Errorf("amqp: %w", err)
	}
	// A delivery without an id goes to the dead-letter destination at once.
	noID := *policy
	noID.Retry.MaxAttempts = 1

	for attempt := 1; ; attempt++ {
		consumed, err := c.session(ctx, policy, &noID)
		if ctx.Err() != nil {
			return nil
		}
		if se := (*setupError)(nil); errors.As(err, &se) {
			return fmt.Errorf("amqp: consuming %q: %w", c.queue, se.err)
		}
		if consumed {
			attempt = 1
		}
		wait := c.reconnect.Backoff(attempt)
		if consumed {
			c.reconnects.Add(1)
		}
		c.log.Warn("amqp: consumer connection lost; reconnecting", "queue", c.queue, "broker", c.dial.where, "err", err, "in", wait)
		if !sleep(ctx, wait) {
			return nil
		}
	}
}

// session consumes on one connection until it is lost or ctx ends, and
// reports whether it got as far as consuming.
func (c *Consumer) session(ctx context.Context, policy, noID *consume.Policy) (bool, error) {
	conn, err := c.dial.dial(ctx)
	if err != nil {
		var ae *amqp091.Error
		if errors.As(err, &ae) && (ae.Code == amqp091.AccessRefused || ae.Code == amqp091.NotAllowed) {
			return false, &setupError{err}
		}
		return false, err
	}
	defer func() { _ = conn.CloseDeadline(time.Now().Add(closeTimeout)) }()
	connClosed := conn.NotifyClose(make(chan *amqp091.Error, 1))
	ch, err := conn.Channel()
	if err != nil {
		return false, fmt.Errorf("amqp: opening a channel: %w", err)
	}
	chClosed := ch.NotifyClose(make(chan *amqp091.Error, 1))
	deliveries, err := c.setup(ch)
	if err != nil {
		return false, err
	}
	c.log.Info("amqp: consuming", "queue", c.queue, "broker", c.dial.where, "prefetch", c.prefetch, "workers", c.workers)

	// Handlers run under a context that also ends when the channel is
	// lost: their delivery can no longer be acknowledged, and the broker
	// redelivers it.
	hctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	lost := ch.NotifyClose(make(chan *amqp091.Error, 1))
	go func() {
		select {
		case <-lost:
			cancel(errChannelLost)
		case <-hctx.Done():
		}
	}()
	var wg sync.WaitGroup
	for range c.workers {
		wg.Go(func() { c.work(ctx, hctx, ch, deliveries, policy, noID) })
	}
	wg.Wait()
	if ctx.Err() != nil {
		// Closing the connection (deferred) makes the broker requeue what
		// it sent ahead and no worker took.
		return true, nil
	}
	for _, closed := range []chan *amqp091.Error{chClosed, connClosed} {
		select {
		case err, ok := <-closed:
			if ok && err != nil {
				return true, err
			}
		default:
		}
	}
	if ch.IsClosed() {
		return true, amqp091.ErrClosed
	}
	return true, errors.New("the broker cancelled the consumer (was the queue deleted?)")
}

// setup prepares ch and starts consuming.
func (c *Consumer) setup(ch *amqp091.Channel) (<-chan amqp091.Delivery, error) {
	refused := func(what string, err error) error {
		err = fmt.Errorf("%s: %w", what, err)
		var ae *amqp091.Error
		if errors.As(err, &ae) {
			switch ae.Code {
			case amqp091.NotFound, amqp091.AccessRefused, amqp091.PreconditionFailed, amqp091.NotAllowed:
				return &setupError{err}
			}
		}
		return err
	}
	// Checked first, so that a missing queue leaves nothing declared.
	if _, err := ch.QueueDeclarePassive(c.queue, false, false, false, false, nil); err != nil {
		return nil, refused("checking that the queue exists", err)
	}
	if err := ch.Qos(c.prefetch, 0, false); err != nil {
		return nil, refused("setting the prefetch", err)
	}
	if c.dlPub == nil {
		if _, err := ch.QueueDeclare(c.dlQueue, true, false, false, false, nil); err != nil {
			return nil, refused(fmt.Sprintf("declaring the dead-letter queue %q", c.dlQueue), err)
		}
	}
	deliveries, err := ch.Consume(c.queue, "", false, false, false, false, nil)
	if err != nil {
		return nil, refused("starting the consumer", err)
	}
	return deliveries, nil
}

// errChannelLost is the cause of a handler's context ending because its
// delivery's channel was lost.
var errChannelLost = errors.New("amqp: the channel was lost; the broker redelivers the delivery")

// work handles deliveries until they stop (the channel closed) or ctx
// ends, running handlers under hctx.
func (c *Consumer) work(ctx, hctx context.Context, ch *amqp091.Channel, deliveries <-chan amqp091.Delivery, policy, noID *consume.Policy) {
	for {
		select {
		case <-ctx.Done():
			return
		case d, ok := <-deliveries:
			if !ok {
				return
			}
			if ctx.Err() != nil {
				c.requeue(&d)
				return
			}
			if ch.IsClosed() {
				// It cannot be acknowledged any more; the broker
				// redelivers it.
				continue
			}
			c.handle(hctx, &d, policy, noID)
		}
	}
}

// handle runs the policy for one delivery, then acknowledges it, or
// requeues it if the policy gave up because ctx ended (Run's, or the
// channel's).
func (c *Consumer) handle(ctx context.Context, d *amqp091.Delivery, policy, noID *consume.Policy) {
	c.received.Add(1)
	if d.Redelivered {
		c.redelivered.Add(1)
	}
	info := DeliveryInfo{
		Queue:       c.queue,
		Exchange:    d.Exchange,
		RoutingKey:  d.RoutingKey,
		ConsumerTag: d.ConsumerTag,
		DeliveryTag: d.DeliveryTag,
		Redelivered: d.Redelivered,
	}
	hctx := context.WithValue(ctx, deliveryKey{}, info)
	msg := decode(d)
	var err error
	if msg.ID == "" {
		msg.ID = syntheticID(d)
		c.log.Error("amqp: delivery without a message id; dead-lettering it", "queue", c.queue, "routing_key", d.RoutingKey, "dead_letter_id", msg.ID)
		_, err = noID.Process(hctx, func(context.Context, *exactly.Message) error { return ErrNoID }, msg, 1, &c.stats)
	} else {
		_, err = policy.Process(hctx, c.handler, msg, 1, &c.stats)
	}
	if err != nil {
		c.requeue(d)
		return
	}
	if err := d.Ack(false); err != nil {
		c.ackFailures.Add(1)
		c.log.Warn("amqp: could not acknowledge a handled delivery (connection lost?); the broker will redeliver it",
			"queue", c.queue, "id", msg.ID, "err", err)
		if c.hooks.AckFailed != nil {
			c.hooks.AckFailed(msg, err)
		}
	}
}

func (c *Consumer) requeue(d *amqp091.Delivery) {
	if err := d.Nack(false, true); err != nil {
		c.log.Debug("amqp: could not requeue a delivery; the broker requeues it when the channel closes", "queue", c.queue, "err", err)
	}
}

// decode turns a delivery into a Message. Message.ID is empty when the
// delivery carries no id.
func decode(d *amqp091.Delivery) *exactly.Message {
	m := &exactly.Message{
		ID:      d.MessageId,
		Topic:   d.RoutingKey,
		Payload: d.Body,
	}
	if len(d.Headers) > 0 {
		m.Headers = make(map[string]string, len(d.Headers))
	}
	for k, v := range d.Headers {
		s := headerString(v)
		switch k {
		case exactly.HeaderID:
			if m.ID == "" {
				m.ID = s
			}
		case exactly.HeaderKey:
			m.Key = s
		case exactly.HeaderCreatedAt:
			if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
				m.CreatedAt = t
			}
		default:
			m.Headers[k] = s
		}
	}
	if m.CreatedAt.IsZero() && !d.Timestamp.IsZero() {
		m.CreatedAt = d.Timestamp
	}
	return m
}

// headerString renders a header value as text. Publishers of this module
// write strings; other publishers may write any AMQP table value.
func headerString(v any) string {
	switch v := v.(type) {
	case string:
		return v
	case []byte:
		return string(v)
	case nil:
		return ""
	case time.Time:
		return v.UTC().Format(time.RFC3339)
	default:
		return fmt.Sprint(v)
	}
}

// syntheticID names a delivery without an id in the dead-letter queue. It
// is derived from the delivery's content, so redeliveries of the same
// message get the same one.
func syntheticID(d *amqp091.Delivery) string {
	h := sha256.New()
	for _, s := range []string{d.Exchange, d.RoutingKey, d.Timestamp.String(), d.CorrelationId} {
		h.Write([]byte(s))
		h.Write([]byte{0})
	}
	for _, k := range slices.Sorted(maps.Keys(d.Headers)) {
		fmt.Fprintf(h, "%s=%s\x00", k, headerString(d.Headers[k]))
	}
	h.Write(d.Body)
	return "amqp-noid-" + hex.EncodeToString(h.Sum(nil)[:16])
}
