package amqp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/exactlyonce/exactly"
)

// Errors a Publisher reports for single messages, inside a
// *exactly.BatchError. Both are worth retrying.
var (
	// ErrUnroutable: the broker returned the message (basic.return) because
	// no queue is bound to the exchange for its routing key. It is not
	// unpublishable: the queue may be declared or bound before the relay's
	// next attempt, and until then the relay keeps the message (and parks it
	// after its last attempt, with this reason).
	ErrUnroutable = errors.New("unroutable: no queue is bound for its routing key (basic.return)")
	// ErrNacked: the broker refused the message with a basic.nack, most
	// often because a queue with x-overflow=reject-publish is full.
	ErrNacked = errors.New("refused by the broker (basic.nack)")
	// ErrPublisherClosed: Publish was called after Close.
	ErrPublisherClosed = errors.New("amqp: the publisher is closed")
)

// Broker limits this package checks before sending.
const (
	// DefaultMaxMessageSize is the default of the MaxMessageSize option.
	DefaultMaxMessageSize = 16 << 20
	// brokerMaxMessageSize is RabbitMQ's hard limit on max_message_size.
	brokerMaxMessageSize = 512 << 20
	// maxShortString is AMQP's limit on names: routing keys, exchanges,
	// header names.
	maxShortString = 255
	// closeTimeout bounds the close handshake with a broker that no
	// longer answers.
	closeTimeout = 5 * time.Second
)

// Publisher publishes exactly.Messages to RabbitMQ with publisher confirms.
// Each message is published to the Exchange option's exchange (default: the
// default exchange, which routes to the queue named by the routing key) with
// the routing key Message.Topic (or what the RoutingKeyFunc option makes of
// it), as a persistent message whose AMQP message-id is Message.ID, with the
// message's headers plus exactly-id, exactly-key and exactly-created-at, and
// the mandatory flag, so that the broker returns a message no queue takes
// instead of dropping it.
//
// A Publisher owns its connection and reconnects by itself: a connection or
// channel that dies fails the batch in flight on it with retryable errors,
// and the next Publish opens a new one. It is safe for concurrent use; each
// Publish call holds one channel of a small pool (the Channels option) from
// its first message until every message of the call is confirmed, so the
// messages of one call are sent, and stored in each queue, in slice order.
// The caller must not publish the same key from two concurrent calls if it
// needs their relative order.
type Publisher struct {
	dial       *dialer
	log        *slog.Logger
	exchange   string
	routingKey func(*exactly.Message) string
	maxSize    int
	serverMax  atomic.Int64 // the broker's max_message_size once a refusal showed it; 0 until then

	slots     chan *slot
	connMu    chan struct{}       // a lock that a waiter can give up on when its ctx ends
	conn      *amqp091.Connection // guarded by connMu
	closed    chan struct{}
	closeOnce sync.Once
}

type publisherOptions struct {
	conn       connOptions
	exchange   string
	routingKey func(*exactly.Message) string
	maxSize    int
	channels   int
}

type publisherOption func(*publisherOptions)

func (o publisherOption) applyPublisher(p *publisherOptions) { o(p) }

// Exchange sets the exchange every message is published to, overriding the
// default of "" (the default exchange, which routes a message to the queue
// whose name is its routing key). The exchange must exist when Publish runs:
// publishing to a missing exchange makes the broker close the channel, and
// the whole batch fails with a retryable error until it is declared. The
// Publisher does not declare it, since its type and arguments are yours.
func Exchange(name string) PublisherOption {
	return publisherOption(func(o *publisherOptions) { o.exchange = name })
}

// RoutingKeyFunc sets the function that makes the routing key of a message,
// overriding the default of Message.Topic. It must be fast and must not
// block. A key longer than 255 bytes (AMQP's limit) fails the message as
// unpublishable. A key that no binding matches makes the broker return the
// message, which fails with ErrUnroutable (retryable) until a queue is bound
// for it; it is never silently dropped. It must map the messages of one key
// to one queue, or their order is lost across queues.
func RoutingKeyFunc(fn func(*exactly.Message) string) PublisherOption {
	return publisherOption(func(o *publisherOptions) { o.routingKey = fn })
}

// MaxMessageSize sets the largest payload, in bytes, that Publish sends,
// overriding the default of DefaultMaxMessageSize (16 MiB). A larger message
// fails alone as unpublishable before anything is sent, so the relay parks
// it with the reason. Set it to the broker's max_message_size or below
// (RabbitMQ's default is 128 MiB and its hard limit 512 MiB): AMQP does not
// advertise the limit, and a message above it makes the broker close the
// channel, which fails the whole batch in flight. When that happens the
// Publisher reads the limit from the broker's error, fails the messages
// above it as unpublishable and the others as retryable, and applies the
// lower limit from then on. Very large messages hold broker memory and
// block the channel while they are sent; keep them small and store large
// payloads elsewhere. n must be between 1 and 512 MiB.
func MaxMessageSize(n int) PublisherOption {
	return publisherOption(func(o *publisherOptions) { o.maxSize = n })
}

// Channels sets how many AMQP channels Publish calls share, overriding the
// default of 4: up to that many calls have messages in flight at once, the
// others wait for a channel (or for their context). One call holds one
// channel until all its confirms are in, which is what keeps a call's
// messages in order and makes returned messages attributable to it. More
// channels help many concurrent callers; a single relay needs one. n must
// be between 1 and 64.
func Channels(n int) PublisherOption {
	return publisherOption(func(o *publisherOptions) { o.channels = n })
}

// NewPublisher returns a Publisher for the broker at url
// (amqp://user:password@host:port/vhost). It does not connect: the first
// Publish does, so a broker that is down at start-up delays publishing
// instead of failing it. Close the Publisher to close its connection.
func NewPublisher(url string, opts ...PublisherOption) (*Publisher, error) {
	o := publisherOptions{maxSize: DefaultMaxMessageSize, channels: 4}
	for _, opt := range opts {
		opt.applyPublisher(&o)
	}
	switch {
	case o.maxSize < 1 || o.maxSize > brokerMaxMessageSize:
		return nil, fmt.Errorf("amqp: NewPublisher: MaxMessageSize is %d, it must be between 1 and %d (RabbitMQ's hard limit)", o.maxSize, brokerMaxMessageSize)
	case o.channels < 1 || o.channels > 64:
		return nil, fmt.Errorf("amqp: NewPublisher: Channels is %d, it must be between 1 and 64", o.channels)
	case len(o.exchange) > maxShortString:
		return nil, fmt.Errorf("amqp: NewPublisher: the Exchange name is %d bytes, AMQP's limit is %d", len(o.exchange), maxShortString)
	}
	d, err := newDialer(url, o.conn, "exactly publisher")
	if err != nil {
		return nil, fmt.Errorf("amqp: NewPublisher: %w", err)
	}
	p := &Publisher{
		dial:       d,
		log:        o.conn.logger,
		exchange:   o.exchange,
		routingKey: o.routingKey,
		maxSize:    o.maxSize,
		slots:      make(chan *slot, o.channels),
		connMu:     make(chan struct{}, 1),
		closed:     make(chan struct{}),
	}
	if p.log == nil {
		p.log = slog.Default()
	}
	for range o.channels {
		p.slots <- &slot{}
	}
	return p, nil
}

// Close closes the connection. Batches in flight fail with retryable errors
// (their messages may or may not be stored). Publish after Close fails with
// ErrPublisherClosed. Close is safe to call more than once; it always
// returns nil, the error is for io.Closer.
func (p *Publisher) Close() error {
	p.closeOnce.Do(func() { close(p.closed) })
	p.connMu <- struct{}{}
	conn := p.conn
	p.conn = nil
	<-p.connMu
	if conn != nil {
		_ = conn.CloseDeadline(time.Now().Add(closeTimeout)) // an error means it was closed already
	}
	return nil
}

func (p *Publisher) isClosed() bool {
	select {
	case <-p.closed:
		return true
	default:
		return false
	}
}

// Publish sends every message and waits for the broker's confirm of each.
//
// It returns nil when every message is confirmed: the broker routed it to
// at least one queue and, for durable queues, wrote it to disk. Otherwise it
// returns a *exactly.BatchError with one entry per message. Entries matching
// exactly.ErrUnpublishable will never succeed: an invalid message (no ID, no
// topic, a routing key or header name over 255 bytes), or a payload above
// MaxMessageSize or the broker's max_message_size. Every other failure is
// worth retrying: ErrUnroutable (no queue bound yet), ErrNacked, an exchange
// that does not exist (yet), and exactly.ErrOutcomeUnknown when the channel
// or connection closed, or ctx ended, before the confirm came. RabbitMQ does
// not drop re-published duplicates; a re-published message carries the same
// message-id and exactly-id, which the inbox deduplicates on.
//
// When ctx ends, Publish returns at once: messages not yet sent fail, and
// messages sent but unconfirmed are reported as exactly.ErrOutcomeUnknown. Their
// channel stays with them until their confirms are in, then serves the
// next call.
//
// Publish does not copy payloads; do not modify them until Publish
// returns. After an early return (ctx ended), the message being written at
// that moment may still be read until the write completes.
func (p *Publisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("amqp: publish not started: %w", err)
	}
	if p.isClosed() {
		return ErrPublisherClosed
	}
	errs := make([]error, len(msgs))
	out := make([]outgoing, len(msgs))
	todo := make([]int, 0, len(msgs))
	for i, m := range msgs {
		if out[i], errs[i] = p.outgoing(m); errs[i] == nil {
			todo = append(todo, i)
		}
	}
	if len(todo) == 0 {
		return exactly.NewBatchError(errs)
	}
	s, err := p.acquire(ctx)
	if err != nil {
		for _, i := range todo {
			errs[i] = fmt.Errorf("amqp: message %s not sent: %w", msgs[i].ID, err)
		}
		return exactly.NewBatchError(errs)
	}
	b := newBatch(len(msgs), len(todo))
	go p.send(s, b, out, todo)
	select {
	case <-b.done:
	case <-ctx.Done():
		b.abandon()
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, i := range todo {
		if b.settled[i] {
			errs[i] = b.errs[i]
		} else {
			errs[i] = fmt.Errorf("amqp: message %s: the context ended before its confirm; publishing it again is safe: %w: %w",
				msgs[i].ID, exactly.ErrOutcomeUnknown, ctx.Err())
		}
	}
	return exactly.NewBatchError(errs)
}

// outgoing is a message ready to send.
type outgoing struct {
	id  string
	key string
	pub amqp091.Publishing
}

// outgoing converts m, or returns why it can never be published.
func (p *Publisher) outgoing(m *exactly.Message) (outgoing, error) {
	if err := m.Validate(); err != nil {
		return outgoing{}, exactly.Unpublishable(fmt.Errorf("amqp: %w", err))
	}
	if m.ID == "" {
		return outgoing{}, exactly.Unpublishable(errors.New("amqp: message has an empty ID; outbox.Enqueue assigns one, a direct caller must set it (exactly.NewID)"))
	}
	key := m.Topic
	if p.routingKey != nil {
		key = p.routingKey(m)
	}
	if len(key) > maxShortString {
		return outgoing{}, exactly.Unpublishable(fmt.Errorf("amqp: message %s: routing key is %d bytes, AMQP's limit is %d", m.ID, len(key), maxShortString))
	}
	if limit := p.limit(); len(m.Payload) > limit {
		return outgoing{}, exactly.Unpublishable(fmt.Errorf("amqp: message %s: payload of %d bytes exceeds the limit of %d bytes (MaxMessageSize, or the broker's max_message_size)",
			m.ID, len(m.Payload), limit))
	}
	h := make(amqp091.Table, len(m.Headers)+3)
	for k, v := range m.Headers {
		switch k {
		case exactly.HeaderID, exactly.HeaderKey, exactly.HeaderCreatedAt:
			continue // ours win, so a stale copy cannot mislabel the message
		}
		if len(k) > maxShortString {
			return outgoing{}, exactly.Unpublishable(fmt.Errorf("amqp: message %s: header name %.40q... is %d bytes, AMQP's limit is %d", m.ID, k, len(k), maxShortString))
		}
		h[k] = v
	}
	h[exactly.HeaderID] = m.ID
	if m.Key != "" {
		h[exactly.HeaderKey] = m.Key
	}
	pub := amqp091.Publishing{
		Headers:      h,
		DeliveryMode: amqp091.Persistent,
		MessageId:    m.ID,
		Body:         m.Payload,
	}
	if !m.CreatedAt.IsZero() {
		h[exactly.HeaderCreatedAt] = m.CreatedAt.UTC().Format(time.RFC3339Nano)
		pub.Timestamp = m.CreatedAt // AMQP keeps whole seconds; the header keeps the rest
	}
	return outgoing{id: m.ID, key: key, pub: pub}, nil
}

// limit is the largest payload Publish sends.
func (p *Publisher) limit() int {
	if s := p.serverMax.Load(); s > 0 && s < int64(p.maxSize) {
		return int(s)
	}
	return p.maxSize
}

// learnLimit lowers the limit to what the broker said its max_message_size is.
func (p *Publisher) learnLimit(n int) {
	for {
		cur := p.serverMax.Load()
		if cur > 0 && cur <= int64(n) {
			return
		}
		if p.serverMax.CompareAndSwap(cur, int64(n)) {
			p.log.Warn("amqp: the broker's max_message_size is below MaxMessageSize; larger messages are refused from now on",
				"max_message_size", n, "MaxMessageSize", p.maxSize)
			return
		}
	}
}

// acquire returns a slot with an open confirm-mode channel.
func (p *Publisher) acquire(ctx context.Context) (*slot, error) {
	var s *slot
	select {
	case s = <-p.slots:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-p.closed:
		return nil, ErrPublisherClosed
	}
	if err := p.open(ctx, s); err != nil {
		p.slots <- s
		return nil, err
	}
	return s, nil
}

// open gives s an open channel in confirm mode, with a tracker reading its
// confirms and returns.
func (p *Publisher) open(ctx context.Context, s *slot) error {
	if s.ch != nil && !s.ch.IsClosed() {
		return nil
	}
	s.ch, s.tr = nil, nil
	var ch *amqp091.Channel
	for try := 1; ; try++ {
		conn, err := p.connection(ctx)
		if err != nil {
			return err
		}
		if ch, err = conn.Channel(); err == nil {
			break
		}
		// A connection that died since it was last used is noticed here:
		// dial a new one, once.
		if !conn.IsClosed() || try == 2 {
			return fmt.Errorf("amqp: opening a channel: %w", err)
		}
	}
	// Registered before confirm mode, so that nothing is missed; the
	// tracker drains them at once, because amqp091-go drops a notification
	// a listener leaves waiting for 5 seconds.
	returns := ch.NotifyReturn(make(chan amqp091.Return, 64))
	confirms := ch.NotifyPublish(make(chan amqp091.Confirmation, 256))
	closes := ch.NotifyClose(make(chan *amqp091.Error, 1))
	if err := ch.Confirm(false); err != nil {
		_ = ch.Close()
		return fmt.Errorf("amqp: putting the channel in confirm mode: %w", err)
	}
	s.ch = ch
	s.tr = &tracker{p: p, pending: make(map[uint64]*entry)}
	go s.tr.run(returns, confirms, closes)
	return nil
}

// connection returns the open connection, dialing a new one when there is
// none or it died.
func (p *Publisher) connection(ctx context.Context) (*amqp091.Connection, error) {
	select {
	case p.connMu <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-p.connMu }()
	if p.isClosed() {
		return nil, ErrPublisherClosed
	}
	if p.conn != nil && !p.conn.IsClosed() {
		return p.conn, nil
	}
	reconnect := p.conn != nil
	conn, err := p.dial.dial(ctx)
	if err != nil {
		return nil, err
	}
	p.conn = conn
	if reconnect {
		p.log.Info("amqp: publisher reconnected", "broker", p.dial.where)
	}
	go p.watch(conn)
	return conn, nil
}

// watch logs what happens to a connection: resource alarms that block
// publishing, and its end.
func (p *Publisher) watch(conn *amqp091.Connection) {
	closes := conn.NotifyClose(make(chan *amqp091.Error, 1))
	for b := range conn.NotifyBlocked(make(chan amqp091.Blocking, 4)) {
		if b.Active {
			p.log.Warn("amqp: the broker blocks publishing (resource alarm); Publish waits until it clears or its context ends",
				"broker", p.dial.where, "reason", b.Reason)
		} else {
			p.log.Info("amqp: the broker unblocked publishing", "broker", p.dial.where)
		}
	}
	if err, ok := <-closes; ok && err != nil && !p.isClosed() {
		p.log.Warn("amqp: publisher connection lost; the next Publish reconnects", "broker", p.dial.where, "err", err)
	}
}

// slot is one confirm-mode channel of the pool. A Publish call holds it
// from its first message until every message of the call is settled, so
// the confirms and returns on the channel belong to that call alone.
type slot struct {
	ch *amqp091.Channel // nil or closed: open a new one
	tr *tracker
}

// batch collects the outcome of each message of one Publish call.
type batch struct {
	mu      sync.Mutex
	errs    []error
	settled []bool
	left    int
	done    chan struct{} // closed when every message is settled

	stopOnce sync.Once
	stop     chan struct{} // closed when the caller gave up: send no more
}

func newBatch(n, todo int) *batch {
	return &batch{
		errs:    make([]error, n),
		settled: make([]bool, n),
		left:    todo,
		done:    make(chan struct{}),
		stop:    make(chan struct{}),
	}
}

// settle records the outcome of message i; the first outcome wins.
func (b *batch) settle(i int, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.settled[i] {
		return
	}
	b.settled[i], b.errs[i] = true, err
	if b.left--; b.left == 0 {
		close(b.done)
	}
}

func (b *batch) abandon() { b.stopOnce.Do(func() { close(b.stop) }) }

func (b *batch) stopped() bool {
	select {
	case <-b.stop:
		return true
	default:
		return false
	}
}

// send publishes the messages of todo in order on s, then waits until
// each is settled (by its confirm, or by the channel's end) and hands s
// back to the pool. It runs in its own goroutine so that Publish can return
// when its context ends even if a write blocks (a broker that blocks
// publishers stops reading).
func (p *Publisher) send(s *slot, b *batch, out []outgoing, todo []int) {
	defer func() {
		<-b.done
		p.slots <- s
	}()
	notSent := func(rest []int, err error) {
		for _, i := range rest {
			b.settle(i, fmt.Errorf("amqp: message %s not sent: %w", out[i].id, err))
		}
	}
	for n, i := range todo {
		if b.stopped() {
			notSent(todo[n:], errors.New("the context ended first"))
			return
		}
		o := &out[i]
		// Registered before it is sent: its return may come back before
		// Publish does.
		tag := s.ch.GetNextPublishSeqNo()
		e := &entry{b: b, i: i, id: o.id, exchange: p.exchange, key: o.key, size: len(o.pub.Body)}
		if !s.tr.register(tag, e) {
			notSent(todo[n:], s.tr.closedErr())
			return
		}
		if err := s.ch.Publish(p.exchange, o.key, true, false, o.pub); err != nil {
			s.tr.unregister(tag)
			notSent(todo[n:], err)
			return
		}
	}
}

// entry is a sent message awaiting its confirm.
type entry struct {
	b             *batch
	i             int
	id            string
	exchange, key string
	size          int
	returned      *amqp091.Return
}

// tracker reads the confirms and returns of one channel and settles the
// messages they are about.
type tracker struct {
	p        *Publisher
	mu       sync.Mutex
	pending  map[uint64]*entry // by delivery tag
	closed   bool
	closeErr *amqp091.Error
}

func (t *tracker) register(tag uint64, e *entry) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.pending[tag] = e
	return true
}

// unregister forgets a message whose publish failed; the caller settles it.
func (t *tracker) unregister(tag uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.pending, tag)
}

func (t *tracker) closedErr() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closeErr != nil {
		return fmt.Errorf("the channel closed: %w", t.closeErr)
	}
	return errors.New("the channel closed")
}

func (t *tracker) run(returns <-chan amqp091.Return, confirms <-chan amqp091.Confirmation, closes <-chan *amqp091.Error) {
	for returns != nil || confirms != nil {
		select {
		case r, ok := <-returns:
			if !ok {
				returns = nil
				continue
			}
			t.markReturned(r)
		case c, ok := <-confirms:
			if !ok {
				confirms = nil
				continue
			}
			// The broker sends a message's basic.return before its
			// basic.ack, and amqp091-go hands both over from one goroutine
			// in that order: a return of this message is already buffered.
			for drained := false; !drained && returns != nil; {
				select {
				case r, ok := <-returns:
					if ok {
						t.markReturned(r)
					} else {
						returns = nil
					}
				default:
					drained = true
				}
			}
			t.confirm(c)
		}
	}
	// The channel is closed: every message still pending is lost or not.
	var cerr *amqp091.Error
	select {
	case err, ok := <-closes:
		if ok {
			cerr = err
		}
	default:
	}
	t.mu.Lock()
	t.closed, t.closeErr = true, cerr
	pending := t.pending
	t.pending = nil
	t.mu.Unlock()
	limit := 0
	if cerr != nil && cerr.Code == amqp091.PreconditionFailed {
		if m := tooLarge.FindStringSubmatch(cerr.Reason); m != nil {
			limit, _ = strconv.Atoi(m[1])
		}
	}
	if limit > 0 {
		t.p.learnLimit(limit)
	}
	for _, e := range pending {
		e.b.settle(e.i, lost(e, cerr, limit))
	}
}

// tooLarge matches RabbitMQ's refusal of a message above max_message_size:
// "PRECONDITION_FAILED - message size 2000 is larger than configured max
// size 1024".
var tooLarge = regexp.MustCompile(`larger than (?:configured )?max size (\d+)`)

// markReturned flags the pending messages the broker returned. A return
// carries no delivery tag: it is matched on message-id, exchange and routing
// key, and when several pending messages share them (the same message twice
// in a batch) all of them are flagged. Reporting a routed duplicate as
// failed is safe (the relay re-publishes it, the inbox drops the copy);
// reporting a returned message as confirmed would lose it.
func (t *tracker) markReturned(r amqp091.Return) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.pending {
		if e.returned == nil && e.id == r.MessageId && e.exchange == r.Exchange && e.key == r.RoutingKey {
			e.returned = &r
		}
	}
}

func (t *tracker) confirm(c amqp091.Confirmation) {
	t.mu.Lock()
	e := t.pending[c.DeliveryTag]
	delete(t.pending, c.DeliveryTag)
	t.mu.Unlock()
	if e == nil {
		return
	}
	var err error
	switch {
	case !c.Ack:
		err = fmt.Errorf("amqp: message %s to exchange %q, routing key %q: %w; a queue may be full (x-overflow=reject-publish) or failing; publishing it again is safe",
			e.id, e.exchange, e.key, ErrNacked)
	case e.returned != nil:
		err = fmt.Errorf("amqp: message %s to exchange %q, routing key %q: %w (%d %s); declare and bind a queue for it, then publish it again",
			e.id, e.exchange, e.key, ErrUnroutable, e.returned.ReplyCode, e.returned.ReplyText)
	}
	e.b.settle(e.i, err)
}

// lost describes a message whose channel closed before its confirm.
func lost(e *entry, cerr *amqp091.Error, limit int) error {
	switch {
	case limit > 0 && e.size > limit:
		return exactly.Unpublishable(fmt.Errorf("amqp: message %s: payload of %d bytes exceeds the broker's max_message_size of %d bytes: %w",
			e.id, e.size, limit, cerr))
	case cerr != nil && cerr.Code == amqp091.NotFound:
		return fmt.Errorf("amqp: message %s: the broker closed the channel (does exchange %q exist?); declare it, then publish again: %w",
			e.id, e.exchange, cerr)
	case cerr != nil:
		return fmt.Errorf("amqp: message %s: the channel closed before its confirm; publishing it again is safe: %w: %w", e.id, exactly.ErrOutcomeUnknown, cerr)
	default:
		return fmt.Errorf("amqp: message %s: the channel closed before its confirm; publishing it again is safe: %w: %w", e.id, exactly.ErrOutcomeUnknown, amqp091.ErrClosed)
	}
}
