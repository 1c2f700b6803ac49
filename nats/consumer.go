package nats

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/consume"
	"github.com/exactlyonce/exactly/internal/pause"
)

// ErrNoMessageID is the reason a message that carries neither an exactly-id
// nor a Nats-Msg-Id header is dead-lettered: it is exactly.ErrNoID, the one
// error every consumer uses for id-less messages. The Consumer never hands
// such a message to the handler (the inbox could not deduplicate it); it
// dead-letters it, and the Failed and DeadLettered hooks receive an error
// matching it.
var ErrNoMessageID = exactly.ErrNoID

// ConsumerStats are a Consumer's running totals since NewConsumer: the
// totals every consumer keeps (exactly.ConsumerStats; AckFailures counts
// acknowledgements the server did not confirm, each such message is
// redelivered after AckWait unless the ack did arrive; Redeliveries counts
// deliveries the server marked as not the first).
type ConsumerStats struct {
	exactly.ConsumerStats
}

// Consumer consumes a JetStream stream through a durable pull consumer and
// runs a handler for each message: at least once per message, with
// retries and dead-lettering from the package-wide policy, and an
// acknowledgement confirmed by the server (AckSync) only after the handler
// succeeded. See the package documentation for its guarantees.
type Consumer struct {
	js         jetstream.JetStream
	cfg        ConsumerConfig
	server     jetstream.ConsumerConfig
	policy     *consume.Policy
	deadLetter *deadLetterPublisher // nil when DeadLetter is not published by this package
	log        *slog.Logger
	ackTimeout time.Duration

	running atomic.Bool
	stats   consume.Stats
}

// Stats returns the running totals. It is safe to call at any time.
func (c *Consumer) Stats() ConsumerStats {
	return ConsumerStats{ConsumerStats: c.stats.Load()}
}

type metadataKey struct{}

// DeliveryMetadata returns the JetStream metadata (stream and consumer
// sequences, delivery count, store time) of the delivery a Consumer's
// handler is running for, from the handler's context. It reports false
// outside a handler, or when the server sent no metadata.
func DeliveryMetadata(ctx context.Context) (*jetstream.MsgMetadata, bool) {
	md, ok := ctx.Value(metadataKey{}).(*jetstream.MsgMetadata)
	return md, ok && md != nil
}

// Run creates the durable consumer on the stream, or updates it to the
// configuration, then fetches and handles messages until ctx ends or a
// failure no retry can fix.
//
// When ctx ends, Run stops fetching, lets the handlers see the ended
// context, acknowledges what they handled, hands every other message it
// holds back to the server (Nak) for prompt redelivery, and returns nil.
// That takes up to 2 seconds beyond the handlers: the pull request in
// progress is left to end by itself, so that no message it brings is
// stranded until AckWait, and messages are handed back only after it
// ended, so they do not bounce back to this consumer.
//
// Transient failures (a server restart, a lost connection, a leader
// election) are logged and retried with backoff, for ever. Run returns an
// error when the stream or the consumer does not exist or was deleted,
// when the connection was closed (it cannot reconnect), or when the
// configuration cannot work: a dead-letter subject no stream captures, or
// one this consumer would consume again. Calling Run again creates the
// consumer again.
//
// A Consumer runs at most one Run at a time; a second concurrent call
// fails.
func (c *Consumer) Run(ctx context.Context) error {
	if !c.running.CompareAndSwap(false, true) {
		return fmt.Errorf("nats: consumer %q: Run is already running; start another Consumer with the same Durable to share its messages", c.cfg.Durable)
	}
	defer c.running.Store(false)

	cons, batch, err := c.setupRetrying(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}

	// runCtx ends with ctx or on a failure; failed only on a failure.
	runCtx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	failed, fail := context.WithCancelCause(context.Background())
	defer fail(nil)
	r := &runner{
		c:          c,
		ctx:        runCtx,
		failed:     failed,
		abort:      func(err error) { fail(err); stop(err) },
		cons:       cons,
		window:     newWindow(batch),
		held:       make(map[*delivery]struct{}),
		fetchEnded: make(chan struct{}),
	}
	conn := c.js.Conn()
	status := conn.StatusChanged(natsgo.CLOSED)
	defer conn.RemoveStatusListener(status)
	go func() {
		for s := range status {
			if s == natsgo.CLOSED {
				r.abort(errConnClosed(natsgo.ErrConnectionClosed))
			}
		}
	}()
	if conn.IsClosed() {
		return errConnClosed(natsgo.ErrConnectionClosed)
	}

	r.start()
	err = r.fetchLoop()
	stop(err)
	close(r.fetchEnded)
	r.finish()
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func errConnClosed(err error) error {
	return fmt.Errorf("nats: the NATS connection is closed, the consumer cannot go on; connect again and call Run: %w", err)
}

// setupRetrying runs setup until it succeeds, fails for good, or ctx ends.
// A server restarting, a connection reconnecting or a JetStream leader
// election makes setup fail for a while; a missing stream, a closed
// connection or a configuration the server refuses does not heal.
func (c *Consumer) setupRetrying(ctx context.Context) (jetstream.Consumer, int, error) {
	backoff := exactly.RetryPolicy{InitialBackoff: 100 * time.Millisecond, MaxBackoff: 5 * time.Second}
	for failures := 1; ; failures++ {
		cons, batch, err := c.setup(ctx)
		if err == nil || ctx.Err() != nil || !setupTransient(err) {
			return cons, batch, err
		}
		wait := backoff.Backoff(failures)
		c.log.Warn("setting up the consumer failed; retrying", "err", err, "failures", failures, "retry_in", wait)
		pause.For(ctx, wait)
	}
}

// setupTransient reports whether a setup failure may heal by itself.
func setupTransient(err error) bool {
	var apiErr *jetstream.APIError
	switch {
	case errors.Is(err, natsgo.ErrConnectionClosed), errors.Is(err, jetstream.ErrConnectionClosed),
		errors.Is(err, jetstream.ErrStreamNotFound), errors.Is(err, jetstream.ErrConsumerNotFound):
		return false
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, natsgo.ErrTimeout),
		errors.Is(err, natsgo.ErrNoResponders), errors.Is(err, natsgo.ErrConnectionReconnecting),
		errors.Is(err, natsgo.ErrDisconnected), errors.Is(err, jetstream.ErrJetStreamNotEnabled),
		errors.Is(err, jetstream.ErrServerShutdown):
		return true
	case errors.As(err, &apiErr):
		return apiErr.Code >= 500 // the JetStream system is unavailable for now
	}
	return false
}

// setup creates or updates the durable consumer and checks where its dead
// letters would go. It returns the batch size the consumer allows.
func (c *Consumer) setup(ctx context.Context) (jetstream.Consumer, int, error) {
	stream, err := c.js.Stream(ctx, c.cfg.Stream)
	if err != nil {
		return nil, 0, fmt.Errorf("nats: consumer %q: looking up stream %q: %w", c.cfg.Durable, c.cfg.Stream, err)
	}
	if c.deadLetter != nil {
		filters := slices.Clone(c.server.FilterSubjects)
		if f := c.server.FilterSubject; f != "" {
			filters = append(filters, f)
		}
		if err := c.checkDeadLetterRoute(ctx, filters, stream.CachedInfo().Config.Subjects); err != nil {
			return nil, 0, err
		}
	}
	cons, err := stream.CreateOrUpdateConsumer(ctx, c.server)
	if err != nil {
		return nil, 0, fmt.Errorf("nats: creating or updating durable consumer %q on stream %q: %w", c.cfg.Durable, c.cfg.Stream, err)
	}
	batch := c.cfg.Batch
	if m := cons.CachedInfo().Config.MaxAckPending; m > 0 && batch > m {
		c.log.Warn("Batch exceeds the consumer's MaxAckPending on the server; using MaxAckPending", "batch", batch, "max_ack_pending", m)
		batch = m
	}
	return cons, batch, nil
}

// checkDeadLetterRoute applies DeadLetterTopic to a sample message of
// each filter (or of each subject of the stream when there is no filter)
// and fails unless a stream captures the result and this consumer would
// not consume it again. A dead letter that no stream captures would stall
// its worker, retried for ever; one this consumer consumes again would be
// dead-lettered again, one level deeper, for ever.
func (c *Consumer) checkDeadLetterRoute(ctx context.Context, filters, streamSubjects []string) error {
	patterns := filters
	if len(patterns) == 0 {
		patterns = streamSubjects
	}
	for _, pattern := range patterns {
		sample := &exactly.Message{ID: "sample", Topic: sampleSubject(pattern)}
		subject := c.cfg.DeadLetterTopic(sample)
		if c.deadLetter.p.subject != nil {
			dl := *sample
			dl.Topic = subject
			subject = c.deadLetter.p.subject(&dl)
		}
		if err := checkSubject(subject); err != nil {
			return fmt.Errorf("nats: consumer %q: the dead-letter subject of a message on %q is not valid: %w", c.cfg.Durable, sample.Topic, err)
		}
		name, err := c.deadLetter.p.js.StreamNameBySubject(ctx, subject)
		switch {
		case errors.Is(err, jetstream.ErrStreamNotFound):
			return fmt.Errorf("nats: consumer %q: no stream captures the dead-letter subject %q (where a failing message on %q would go): "+
				"add it to a stream's subjects, or set DeadLetterTopic or DeadLetter: %w", c.cfg.Durable, subject, sample.Topic, err)
		case err != nil:
			return fmt.Errorf("nats: consumer %q: finding the stream of dead-letter subject %q: %w", c.cfg.Durable, subject, err)
		}
		if name == c.cfg.Stream && (len(filters) == 0 || matchesAny(filters, subject)) {
			return fmt.Errorf("nats: consumer %q: dead letters of messages on %q would go to %q, which this consumer consumes again "+
				"(it would fail and dead-letter them again, without end): set DeadLetterTopic to a subject outside its filter %q, or narrow the filter",
				c.cfg.Durable, sample.Topic, subject, strings.Join(filters, ", "))
		}
	}
	return nil
}

// decode turns a delivery into a Message. It returns an error matching
// exactly.ErrNoID, and a Message with a stand-in ID derived from the
// stream sequence, when the delivery carries no id.
func (c *Consumer) decode(m jetstream.Msg) (*exactly.Message, *jetstream.MsgMetadata, error) {
	md, err := m.Metadata()
	if err != nil {
		c.log.Warn("a delivery has no JetStream metadata; counting it as a first delivery", "subject", m.Subject(), "err", err)
		md = nil
	}
	h := m.Headers()
	msg := &exactly.Message{
		ID:      h.Get(exactly.HeaderID),
		Topic:   m.Subject(),
		Key:     h.Get(exactly.HeaderKey),
		Payload: m.Data(),
	}
	if msg.ID == "" {
		msg.ID = h.Get(jetstream.MsgIDHeader)
	}
	for k, v := range h {
		if len(v) == 0 || k == exactly.HeaderID || k == exactly.HeaderKey || k == exactly.HeaderCreatedAt ||
			len(k) >= 5 && strings.EqualFold(k[:5], "nats-") {
			// Nats-* headers belong to the server and would change the
			// meaning of a republished copy (Nats-Msg-Id, Nats-Rollup,
			// Nats-Expected-*); Message fields carry the exactly-* ones.
			continue
		}
		if msg.Headers == nil {
			msg.Headers = make(map[string]string, len(h))
		}
		msg.Headers[k] = v[0]
	}
	if s := h.Get(exactly.HeaderCreatedAt); s != "" {
		t, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			c.log.Warn("unreadable exactly-created-at header; using the time the stream stored the message", "id", msg.ID, "value", s, "err", err)
		}
		msg.CreatedAt = t
	}
	if msg.CreatedAt.IsZero() && md != nil {
		msg.CreatedAt = md.Timestamp
	}
	if msg.ID != "" {
		return msg, md, nil
	}
	where := "of unknown stream sequence"
	msg.ID = "nats:" + c.cfg.Stream + ":unknown"
	if md != nil {
		where = fmt.Sprintf("at stream sequence %d", md.Sequence.Stream)
		msg.ID = "nats:" + md.Stream + ":" + strconv.FormatUint(md.Sequence.Stream, 10)
	}
	if len(msg.ID) > exactly.MaxIDLen {
		msg.ID = msg.ID[len(msg.ID)-exactly.MaxIDLen:]
	}
	return msg, md, fmt.Errorf("nats: the message on %q %s has neither an %s nor a %s header, so no inbox could deduplicate it; "+
		"it was not handled. Publish through nats.Publisher, or set the header. Its dead letter has the stand-in id %s: %w",
		msg.Topic, where, exactly.HeaderID, jetstream.MsgIDHeader, msg.ID, exactly.ErrNoID)
}

// deadLetterPublisher publishes dead letters through a Publisher's
// conversion, with a Nats-Msg-Id of their own: with Message.ID as its
// Nats-Msg-Id, a stream holding both the original and the dead-letter
// subject would drop the dead letter as a duplicate within its window.
type deadLetterPublisher struct {
	p       *Publisher
	durable string
}

func (d *deadLetterPublisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	errs := make([]error, len(msgs))
	for i, m := range msgs {
		nm, err := d.p.message(m)
		if err != nil {
			errs[i] = err
			continue
		}
		nm.Header.Set(jetstream.MsgIDHeader, "dlq:"+d.durable+":"+m.ID)
		pctx, cancel := context.WithTimeout(ctx, d.p.ackWait)
		_, err = d.p.js.PublishMsg(pctx, nm, jetstream.WithRetryAttempts(0))
		cancel()
		if err != nil {
			errs[i] = describe(m, nm.Subject, err)
		}
	}
	return exactly.NewBatchError(errs)
}
