package amqp

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/consume"
	"github.com/exactlyonce/exactly/internal/pause"
)

// ErrNoID is the reason a delivery without a message id is dead-lettered:
// its AMQP message-id property and its exactly-id header are both empty, so
// the inbox could not deduplicate it. The handler never sees such a
// delivery. It is exactly.ErrNoID; see there for the rule every consumer
// follows.
var ErrNoID = exactly.ErrNoID

// errNoID is the reason a delivery without an id is dead-lettered with.
var errNoID = fmt.Errorf("amqp: the delivery has neither the AMQP message-id property nor the exactly-id header: %w", exactly.ErrNoID)

// ConsumerConfig configures a Consumer: the settings every consumer shares
// (exactly.ConsumerConfig: Handler, Retry, DeadLetter, DeadLetterTopic,
// Workers, Hooks, Logger, Tracer) and RabbitMQ's own. Queue and Handler are
// required; every other field has a default. NewConsumer checks the whole
// configuration up front and names the first bad field.
//
// On RabbitMQ the shared settings mean:
//
//   - Workers (default 1): with one, deliveries are handled one at a time in
//     queue order, and a message being retried holds back the ones after
//     it. With more, deliveries are spread over the workers by Message.Key
//     (the exactly-key header), so the messages of one key are still
//     handled one at a time in queue order, and different keys at once; a
//     slow or retrying message delays the others of its worker, including
//     other keys that hash to it. Deliveries without a key (no order
//     required) go to the workers in turn.
//   - Retry: the delivery stays unacknowledged while it is retried, and
//     RabbitMQ closes a channel whose delivery stays unacknowledged longer
//     than its consumer_timeout (30 minutes by default), which redelivers
//     it: keep MaxAttempts times MaxBackoff, plus the handler's own time,
//     well below it. Attempts are counted per delivery.
//   - DeadLetter: nil (the default) publishes dead letters to
//     DeadLetterQueue, which the Consumer declares; any exactly.Publisher
//     (an exchange, another broker) instead gets them with Message.Topic set
//     to DeadLetterTopic(msg). DeadLetterTopic is for that case only.
//   - Logger: connection events, reconnects, acknowledgements that could not
//     be sent and dead letters.
type ConsumerConfig struct {
	exactly.ConsumerConfig

	// Queue is the queue to consume. Required, at most 255 bytes. It must
	// exist: the Consumer does not declare it, since its type and arguments
	// are yours, and Run fails when it is missing.
	Queue string

	// Prefetch is how many unacknowledged deliveries the broker sends ahead
	// (basic.qos). Default 64, or Workers when that is higher. Too low a
	// value leaves the consumer waiting for the network between messages;
	// too high a value holds messages in one consumer's memory that other
	// consumers of the queue could be handling, and all of them are
	// redelivered if the connection drops. It must be at least Workers, or
	// workers would sit idle, and at most 65535.
	Prefetch int

	// DeadLetterQueue is the queue dead letters go to when DeadLetter is
	// nil. Default Queue + ".dlq". The Consumer declares it (durable, no
	// arguments) each time it connects, and publishes to it through the
	// default exchange with publisher confirms, on a connection of its own,
	// before it acknowledges the original. If a queue of that name exists
	// with other arguments the declaration fails and Run returns the error.
	// It must not be Queue, and must be empty when DeadLetter is set.
	DeadLetterQueue string

	// ReconnectBackoff and ReconnectMaxBackoff bound the wait between
	// attempts to reconnect after the connection is lost: it starts at
	// ReconnectBackoff and doubles up to ReconnectMaxBackoff, with jitter.
	// Defaults 250ms and 10s. A short maximum makes many consumers hammer a
	// broker that is restarting; a long one delays recovery by up to that
	// much. The maximum must not be below the first.
	ReconnectBackoff, ReconnectMaxBackoff time.Duration

	// DialConfig is the amqp091-go configuration of every connection the
	// Consumer opens, its default dead-letter publisher's included (TLS,
	// SASL, vhost, heartbeat, a custom Dial), as for the DialConfig option
	// of a Publisher; its Recovery must be nil. Default: amqp091-go's.
	DialConfig amqp091.Config
}

// Consumer consumes one queue with manual acknowledgements and runs
// ConsumerConfig.Handler for each delivery, through the policy every
// consumer of this module shares: a panic counts as a failure, a failure is
// retried with backoff, and after the last attempt the message goes to a
// dead-letter destination with the reason. A delivery is acknowledged only
// after its handler returned nil or it was dead-lettered; when Run's
// context ends first it is rejected with requeue, so the broker delivers it
// again. The handler's context ends when Run's does, and when the
// connection the delivery came on is lost (context.Cause then says so): the
// delivery can no longer be acknowledged and will be redelivered.
//
// RabbitMQ delivers at least once: after a lost connection it redelivers
// every unacknowledged delivery (with the Redelivered flag), so a handler
// runs more than once for the same Message.ID. Wrap it with the inbox to
// apply its effect once per ID.
type Consumer struct {
	dial    *dialer
	url     string
	conn    connOptions
	log     *slog.Logger
	cfg     ConsumerConfig // defaults applied
	dlTopic string         // the dead-letter queue, when dead letters are ours to publish

	running    atomic.Bool
	stats      consume.Stats
	reconnects atomic.Int64
}

// NewConsumer returns a Consumer of cfg.Queue at url
// (amqp://user:password@host:port/vhost). It checks cfg and does no I/O:
// Run connects, and reconnects whenever the connection is lost, so the
// Consumer takes the URL rather than a connection.
func NewConsumer(url string, cfg ConsumerConfig) (*Consumer, error) {
	bad := func(field, format string, args ...any) (*Consumer, error) {
		return nil, fmt.Errorf("amqp: NewConsumer: %w", &exactly.ConfigError{Field: field, Err: fmt.Errorf(format, args...)})
	}
	switch {
	case cfg.Queue == "":
		return bad("Queue", "is empty")
	case len(cfg.Queue) > maxShortString:
		return bad("Queue", "is %d bytes, AMQP's limit is %d", len(cfg.Queue), maxShortString)
	case cfg.DeadLetter != nil && cfg.DeadLetterQueue != "":
		return bad("DeadLetterQueue", "is set beside DeadLetter; choose one destination")
	case cfg.DeadLetter == nil && cfg.DeadLetterTopic != nil:
		return bad("DeadLetterTopic", "is set without DeadLetter; dead letters go to DeadLetterQueue, whose name is fixed")
	}
	shared, err := cfg.ConsumerConfig.WithDefaults()
	if err != nil {
		return nil, fmt.Errorf("amqp: NewConsumer: %w", err)
	}
	cfg.ConsumerConfig = shared
	if cfg.DeadLetter == nil && cfg.DeadLetterQueue == "" {
		cfg.DeadLetterQueue = cfg.Queue + ".dlq"
	}
	if cfg.Prefetch == 0 {
		cfg.Prefetch = max(64, cfg.Workers)
	}
	switch {
	case cfg.ReconnectBackoff < 0 || cfg.ReconnectMaxBackoff < 0:
		return bad("ReconnectBackoff", "must not be negative")
	case cfg.ReconnectBackoff == 0:
		cfg.ReconnectBackoff = 250 * time.Millisecond
	}
	if cfg.ReconnectMaxBackoff == 0 {
		cfg.ReconnectMaxBackoff = max(10*time.Second, cfg.ReconnectBackoff)
	}
	switch {
	case cfg.ReconnectMaxBackoff < cfg.ReconnectBackoff:
		return bad("ReconnectMaxBackoff", "(%s) is below ReconnectBackoff (%s)", cfg.ReconnectMaxBackoff, cfg.ReconnectBackoff)
	case cfg.Prefetch < cfg.Workers || cfg.Prefetch > 65535:
		return bad("Prefetch", "is %d, it must be between Workers (%d) and 65535", cfg.Prefetch, cfg.Workers)
	case len(cfg.DeadLetterQueue) > maxShortString:
		return bad("DeadLetterQueue", "is %d bytes, AMQP's limit is %d", len(cfg.DeadLetterQueue), maxShortString)
	case cfg.DeadLetterQueue == cfg.Queue:
		return bad("DeadLetterQueue", "is the consumed queue; failing messages would come back forever")
	}
	conn := connOptions{config: cfg.DialConfig, logger: cfg.Logger}
	d, err := newDialer(url, conn, "exactly consumer "+cfg.Queue)
	if err != nil {
		return nil, fmt.Errorf("amqp: NewConsumer: %w", err)
	}
	c := &Consumer{dial: d, url: url, conn: conn, log: cfg.Logger, cfg: cfg}
	if cfg.DeadLetter == nil {
		c.dlTopic = cfg.DeadLetterQueue
	}
	return c, nil
}

// ConsumerStats are a Consumer's running totals since NewConsumer: the
// totals every consumer keeps (a delivery without a message id counts one
// in Failed; AckFailures counts acknowledgements that could not be sent
// because the connection was lost, each such delivery is redelivered), and
// RabbitMQ's own.
type ConsumerStats struct {
	exactly.ConsumerStats
	// Reconnects counts how many times Run lost a connection it was
	// consuming on, and started to reconnect.
	Reconnects int64
}

// Stats returns the running totals. It is safe to call at any time.
func (c *Consumer) Stats() ConsumerStats {
	return ConsumerStats{ConsumerStats: c.stats.Load(), Reconnects: c.reconnects.Load()}
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

	dl := c.cfg.DeadLetter
	if dl == nil {
		pub, err := NewPublisher(c.url, DialConfig(c.conn.config), Logger(c.log), Channels(1))
		if err != nil {
			return fmt.Errorf("amqp: the dead-letter publisher: %w", err)
		}
		defer pub.Close()
		dl = pub
	}
	shared := c.cfg.ConsumerConfig
	if c.cfg.DeadLetter == nil {
		shared.DeadLetterTopic = func(*exactly.Message) string { return c.dlTopic }
	}
	policy, err := consume.FromConfig(shared, dl)
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
			return fmt.Errorf("amqp: consuming %q: %w", c.cfg.Queue, se.err)
		}
		if consumed {
			attempt = 1
		}
		wait := c.reconnectBackoff(attempt)
		if consumed {
			c.reconnects.Add(1)
		}
		c.log.Warn("amqp: consumer connection lost; reconnecting", "queue", c.cfg.Queue, "broker", c.dial.where, "err", err, "in", wait)
		if !pause.For(ctx, wait) {
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
	c.log.Info("amqp: consuming", "queue", c.cfg.Queue, "broker", c.dial.where, "prefetch", c.cfg.Prefetch, "workers", c.cfg.Workers)

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
	if c.cfg.Workers == 1 {
		wg.Go(func() { c.work(ctx, hctx, ch, deliveries, policy, noID) })
	} else {
		// One queue per worker, each as deep as the prefetch: the broker
		// sends no more than that unacknowledged, so dispatching never
		// blocks on a busy worker.
		queues := make([]chan amqp091.Delivery, c.cfg.Workers)
		for i := range queues {
			q := make(chan amqp091.Delivery, c.cfg.Prefetch)
			queues[i] = q
			wg.Go(func() { c.work(ctx, hctx, ch, q, policy, noID) })
		}
		wg.Go(func() { c.dispatch(ctx, deliveries, queues) })
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
	if _, err := ch.QueueDeclarePassive(c.cfg.Queue, false, false, false, false, nil); err != nil {
		return nil, refused("checking that the queue exists", err)
	}
	if err := ch.Qos(c.cfg.Prefetch, 0, false); err != nil {
		return nil, refused("setting the prefetch", err)
	}
	if c.cfg.DeadLetter == nil {
		if _, err := ch.QueueDeclare(c.dlTopic, true, false, false, false, nil); err != nil {
			return nil, refused(fmt.Sprintf("declaring the dead-letter queue %q", c.dlTopic), err)
		}
	}
	deliveries, err := ch.Consume(c.cfg.Queue, "", false, false, false, false, nil)
	if err != nil {
		return nil, refused("starting the consumer", err)
	}
	return deliveries, nil
}

// errChannelLost is the cause of a handler's context ending because its
// delivery's channel was lost.
var errChannelLost = errors.New("amqp: the channel was lost; the broker redelivers the delivery")

// dispatch hands each delivery to the worker of its key, so the messages
// of one key are handled one at a time, in queue order; a delivery without
// a key (no order required) goes to the next worker in turn. It closes the
// queues when the deliveries stop or ctx ends.
func (c *Consumer) dispatch(ctx context.Context, deliveries <-chan amqp091.Delivery, queues []chan amqp091.Delivery) {
	defer func() {
		for _, q := range queues {
			close(q)
		}
	}()
	next := 0
	for {
		select {
		case <-ctx.Done():
			return
		case d, ok := <-deliveries:
			if !ok {
				return
			}
			i := next
			if key := headerString(d.Headers[exactly.HeaderKey]); key != "" {
				h := fnv.New32a()
				h.Write([]byte(key))
				i = int(h.Sum32() % uint32(len(queues)))
			} else {
				next = (next + 1) % len(queues)
			}
			queues[i] <- d
		}
	}
}

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
	c.stats.Received.Add(1)
	if d.Redelivered {
		c.stats.Redeliveries.Add(1)
	}
	info := DeliveryInfo{
		Queue:       c.cfg.Queue,
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
		c.log.Error("amqp: delivery without a message id; dead-lettering it", "queue", c.cfg.Queue, "routing_key", d.RoutingKey, "dead_letter_id", msg.ID)
		_, err = noID.Process(hctx, func(context.Context, *exactly.Message) error { return errNoID }, msg, 1, &c.stats)
	} else {
		_, err = policy.Process(hctx, c.cfg.Handler, msg, 1, &c.stats)
	}
	if err != nil {
		c.requeue(d)
		return
	}
	if err := d.Ack(false); err != nil {
		c.log.Warn("amqp: could not acknowledge a handled delivery (connection lost?); the broker will redeliver it",
			"queue", c.cfg.Queue, "id", msg.ID, "err", err)
		policy.AckFailed(msg, err, &c.stats)
	}
}

// reconnectBackoff is the wait before the given attempt to reconnect.
func (c *Consumer) reconnectBackoff(attempt int) time.Duration {
	return exactly.RetryPolicy{InitialBackoff: c.cfg.ReconnectBackoff, MaxBackoff: c.cfg.ReconnectMaxBackoff}.Backoff(attempt)
}

func (c *Consumer) requeue(d *amqp091.Delivery) {
	if err := d.Nack(false, true); err != nil {
		c.log.Debug("amqp: could not requeue a delivery; the broker requeues it when the channel closes", "queue", c.cfg.Queue, "err", err)
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
