package nats

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/consume"
)

// ErrNoMessageID is the reason a message that carries neither an exactly-id
// nor a Nats-Msg-Id header is dead-lettered: it is exactly.ErrNoID, the one
// error every consumer uses for id-less messages. The Consumer never hands
// such a message to the handler (the inbox could not deduplicate it); it
// dead-letters it, and the Failed and DeadLettered hooks receive an error
// matching it.
var ErrNoMessageID = exactly.ErrNoID

// ConsumerConfig configures a Consumer: the settings every consumer shares
// (exactly.ConsumerConfig: Handler, Retry, DeadLetter, DeadLetterTopic,
// Workers, Hooks, Logger, Tracer) and JetStream's own. Stream, Durable and
// Handler are required; every other field has a default. NewConsumer checks
// the whole configuration up front and names the first bad field.
//
// On NATS the shared settings mean:
//
//   - Handler: its context is the one given to Run, plus the delivery's
//     metadata (see DeliveryMetadata). When that context ends, Handler
//     should return promptly: the message is then handed back to the server
//     (Nak) for redelivery, as are the messages fetched but not started.
//   - Workers (default 1): with one, messages are handled one after the
//     other, in stream order. With more, messages are spread over the
//     workers by Message.Key (by subject when the key is empty), so messages
//     with the same key, and keyless messages on the same subject, are still
//     handled one at a time in stream order. A slow or retrying message
//     delays the others of its worker, including other keys that hash to it.
//   - Retry: attempts are counted from the server's delivery count, so they
//     add up over redeliveries (after a crash, a shutdown, a lost ack); a
//     message is always handled at least once per delivery before it is
//     dead-lettered. The consumer tells the server a retried message is in
//     progress, so retries are not bounded by AckWait.
//   - DeadLetter: default this package's Publisher on the same JetStream,
//     publishing to the subject DeadLetterTopic names (default the
//     message's subject plus ".dlq"; it must be a valid subject, no
//     wildcards, no empty tokens). A stream must capture that subject, and
//     it must not be delivered to this consumer again (it would be handled,
//     fail, and be dead-lettered again, one level deeper, for ever): Run
//     checks both for the subject of a sample message of each filter and
//     fails with an error saying what to change. A *Publisher given here is
//     used the same way, through its own JetStream and SubjectFunc. Dead
//     letters published by this package carry the Nats-Msg-Id
//     "dlq:<Durable>:<Message.ID>", not Message.ID itself: a stream dropping
//     duplicates would otherwise drop the dead letter as a copy of the
//     original message when both are in the same stream. Any other
//     exactly.Publisher is used as it is, with Message.Topic set to
//     DeadLetterTopic(msg).
//   - Hooks: AckFailed runs when the server did not confirm an
//     acknowledgement (AckSync).
type ConsumerConfig struct {
	exactly.ConsumerConfig

	// Stream is the name of the JetStream stream to consume. Required. Run
	// fails when it does not exist.
	Stream string

	// Durable names the durable pull consumer that Run creates on Stream,
	// or updates to this configuration. Required. The server keeps its
	// position between runs and across restarts of either side. Several
	// processes running a Consumer with the same Durable share its
	// messages (competing consumers) and so lose per-key order between
	// them: run one per Durable where order matters.
	Durable string

	// FilterSubjects limits the consumer to messages on these subjects
	// (wildcards allowed). Empty means every subject of the stream. More
	// than one needs nats-server 2.10 or later; an older server fails Run.
	// The server may refuse to change the filter of an existing durable:
	// delete it first, or use a new Durable.
	FilterSubjects []string

	// AckWait is how long the server waits for the acknowledgement of a
	// delivered message before it redelivers it. Default 30s; at least 1s.
	// It does not bound the handler: while the consumer holds a message
	// (queued or being handled) it tells the server, about every
	// AckWait/3, that it is still in progress, so a slow handler, a retry backoff or
	// a long queue does not cause a redelivery. It bounds how soon a
	// message held by a crashed or disconnected consumer is redelivered:
	// too long delays recovery, too short turns a network pause of that
	// length into redeliveries (duplicates the inbox absorbs).
	AckWait time.Duration

	// MaxAckPending caps the messages the server lets this consumer hold
	// unacknowledged, across every process running it. Default 0: the
	// server's default (1000). A value below Batch limits Batch to it.
	MaxAckPending int

	// Batch is the most messages the consumer holds at a time: fetched
	// and not yet acknowledged, queued or being handled. Default 100, or
	// MaxAckPending when that is lower. Larger batches save round trips;
	// every held message waits behind the ones before it of its worker,
	// and is redelivered to another process only after AckWait if this one
	// crashes. It must not exceed MaxAckPending.
	Batch int

	// Configure, when set, edits the server-side consumer configuration
	// after the fields above were applied to it and before Run creates or
	// updates the consumer: for DeliverPolicy, Replicas, MemoryStorage,
	// InactiveThreshold, Metadata and the like. NewConsumer rejects changes
	// that would break the consumer's guarantees: another Durable or Name,
	// another AckWait (set the field above), an AckPolicy other than explicit, a MaxDeliver limit or BackOff (the
	// server would stop delivering a message without dead-lettering it),
	// HeadersOnly (the handler would get no payload), or a MaxRequestBatch
	// below Batch.
	Configure func(cfg *jetstream.ConsumerConfig)
}

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

const (
	defaultAckWait = 30 * time.Second
	defaultBatch   = 100
	// fetchWait is how long one pull request waits for messages: the
	// longest Run waits for the one in progress when its context ends,
	// and how soon a pull lost to a server restart or a network cut is
	// replaced (short pulls need no heartbeats). An idle consumer sends a
	// pull request this often.
	fetchWait = 2 * time.Second
	// maxAckTimeout bounds the wait for the server's confirmation of an ack.
	maxAckTimeout = 5 * time.Second
)

// NewConsumer checks cfg, fills in its defaults and returns a Consumer for
// js. It does no I/O: Run creates or updates the durable consumer.
func NewConsumer(js jetstream.JetStream, cfg ConsumerConfig) (*Consumer, error) {
	if js == nil {
		return nil, errors.New("nats: NewConsumer: the jetstream.JetStream is nil")
	}
	bad := func(field, format string, args ...any) (*Consumer, error) {
		return nil, fmt.Errorf("nats: NewConsumer: %w", &exactly.ConfigError{Field: field, Err: fmt.Errorf(format, args...)})
	}
	switch {
	case cfg.Stream == "":
		return bad("Stream", "is empty")
	case cfg.Durable == "":
		return bad("Durable", "is empty; the consumer must be durable so the server keeps its position")
	}
	if err := checkName(cfg.Stream); err != nil {
		return bad("Stream", "%w", err)
	}
	if err := checkName(cfg.Durable); err != nil {
		return bad("Durable", "%w", err)
	}
	for i, f := range cfg.FilterSubjects {
		if err := checkFilter(f); err != nil {
			return bad(fmt.Sprintf("FilterSubjects[%d]", i), "%w", err)
		}
	}
	shared, err := cfg.ConsumerConfig.WithDefaults()
	if err != nil {
		return nil, fmt.Errorf("nats: NewConsumer: %w", err)
	}
	cfg.ConsumerConfig = shared
	switch {
	case cfg.AckWait == 0:
		cfg.AckWait = defaultAckWait
	case cfg.AckWait < time.Second:
		return bad("AckWait", "is %v; it must be at least 1s (the consumer extends it while it works, so it needs no tuning to the handler)", cfg.AckWait)
	}
	if cfg.MaxAckPending < 0 {
		return bad("MaxAckPending", "is %d; it must not be negative (0 takes the server's default)", cfg.MaxAckPending)
	}
	switch {
	case cfg.Batch < 0:
		return bad("Batch", "is %d; it must not be negative", cfg.Batch)
	case cfg.Batch == 0:
		cfg.Batch = defaultBatch
		if cfg.MaxAckPending > 0 {
			cfg.Batch = min(cfg.Batch, cfg.MaxAckPending)
		}
	case cfg.MaxAckPending > 0 && cfg.Batch > cfg.MaxAckPending:
		return bad("Batch", "(%d) exceeds MaxAckPending (%d); the server would never deliver a full batch", cfg.Batch, cfg.MaxAckPending)
	}
	log := cfg.Logger.With("stream", cfg.Stream, "consumer", cfg.Durable)

	c := &Consumer{js: js, log: log, ackTimeout: min(maxAckTimeout, cfg.AckWait)}
	deadLetter := cfg.DeadLetter
	switch dl := cfg.DeadLetter.(type) {
	case nil:
		p, err := NewPublisher(js)
		if err != nil {
			return bad("DeadLetter", "(the default) could not be built: %w", err)
		}
		c.deadLetter = &deadLetterPublisher{p: p, durable: cfg.Durable}
		deadLetter = c.deadLetter
	case *Publisher:
		c.deadLetter = &deadLetterPublisher{p: dl, durable: cfg.Durable}
		deadLetter = c.deadLetter
	}
	shared.Logger = log
	policy, err := consume.FromConfig(shared, deadLetter)
	if err != nil {
		return nil, fmt.Errorf("nats: NewConsumer: %w", err)
	}
	c.policy = policy

	server := jetstream.ConsumerConfig{
		Durable:       cfg.Durable,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       cfg.AckWait,
		MaxDeliver:    -1,
		MaxAckPending: cfg.MaxAckPending,
	}
	switch len(cfg.FilterSubjects) {
	case 0:
	case 1:
		server.FilterSubject = cfg.FilterSubjects[0]
	default:
		server.FilterSubjects = append([]string(nil), cfg.FilterSubjects...)
	}
	if cfg.Configure != nil {
		cfg.Configure(&server)
		switch {
		case server.Durable != cfg.Durable || server.Name != "" && server.Name != cfg.Durable:
			return bad("Configure", "changed the consumer's name (Durable %q, Name %q); set ConsumerConfig.Durable instead", server.Durable, server.Name)
		case server.AckWait != cfg.AckWait:
			return bad("Configure", "changed AckWait to %v; set ConsumerConfig.AckWait instead (the consumer extends the deadline of the messages it holds by it)", server.AckWait)
		case server.AckPolicy != jetstream.AckExplicitPolicy:
			return bad("Configure", "set AckPolicy %v; the consumer acknowledges each message after its handler, which needs the explicit policy", server.AckPolicy)
		case server.MaxDeliver > 0 || len(server.BackOff) > 0:
			return bad("Configure", "set MaxDeliver or BackOff; the server would stop delivering a message after that many deliveries without dead-lettering it. Retry.MaxAttempts and DeadLetter bound retries instead")
		case server.HeadersOnly:
			return bad("Configure", "set HeadersOnly; the handler needs the payload")
		case server.MaxRequestBatch > 0 && server.MaxRequestBatch < cfg.Batch:
			return bad("Configure", "set MaxRequestBatch %d below Batch %d; the server would refuse every fetch", server.MaxRequestBatch, cfg.Batch)
		case server.MaxAckPending > 0 && server.MaxAckPending < cfg.Batch:
			return bad("Configure", "set MaxAckPending %d below Batch %d", server.MaxAckPending, cfg.Batch)
		}
		if server.MaxDeliver == 0 {
			server.MaxDeliver = -1
		}
		for i, f := range append([]string{server.FilterSubject}, server.FilterSubjects...) {
			if err := checkFilter(f); err != nil && (i > 0 || f != "") {
				return bad("Configure", "set a filter subject: %w", err)
			}
		}
	}
	c.cfg, c.server = cfg, server
	return c, nil
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
		sleep(ctx, wait)
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

// delivery is a message the consumer holds: fetched, not yet acknowledged
// or handed back.
type delivery struct {
	msg      jetstream.Msg
	signaled time.Time // last time the server heard about it; guarded by runner.mu
}

// runner is one Run: a fetch loop on Run's goroutine feeding Workers
// goroutines, and a keeper extending the AckWait of the held messages.
type runner struct {
	c      *Consumer
	ctx    context.Context // ends when Run's context ends or on a failure
	failed context.Context // ends only on a failure
	abort  func(error)     // ends ctx and failed with the failure
	cons   jetstream.Consumer
	// fetchEnded is closed once no pull request of this run is open.
	fetchEnded chan struct{}
	window     *window
	queues     []chan *delivery
	wg         sync.WaitGroup

	mu       sync.Mutex
	held     map[*delivery]struct{}
	stopKeep chan struct{}
}

func (r *runner) start() {
	r.queues = make([]chan *delivery, r.c.cfg.Workers)
	for i := range r.queues {
		// The window bounds the messages held, so dispatch never blocks.
		q := make(chan *delivery, r.window.size)
		r.queues[i] = q
		r.wg.Go(func() { r.work(q) })
	}
	r.stopKeep = make(chan struct{})
	r.wg.Go(r.keepAlive)
}

// finish waits for the workers to settle every held message.
func (r *runner) finish() {
	for _, q := range r.queues {
		close(q)
	}
	close(r.stopKeep)
	r.wg.Wait()
}

// fetchLoop pulls messages while the window has room, until the run ends
// or a failure no retry fixes.
func (r *runner) fetchLoop() error {
	backoff := exactly.RetryPolicy{InitialBackoff: 100 * time.Millisecond, MaxBackoff: 5 * time.Second}
	failures := 0
	conn := r.c.js.Conn()
	for {
		n, ok := r.window.acquire(r.ctx)
		if !ok {
			return context.Cause(r.ctx)
		}
		// A pull request sent while disconnected waits in the reconnect
		// buffer with its unsubscription, and the server could deliver to
		// it in between, stranding messages until AckWait.
		for wait := 1; !conn.IsConnected() && !conn.IsClosed() && r.ctx.Err() == nil; wait++ {
			sleep(r.ctx, backoff.Backoff(wait))
		}
		got, err := r.fetch(n)
		r.window.release(n - got)
		if r.ctx.Err() != nil {
			return context.Cause(r.ctx)
		}
		if err == nil {
			failures = 0
			continue
		}
		if err := r.fatal(err); err != nil {
			r.abort(err)
			return err
		}
		failures++
		wait := backoff.Backoff(failures)
		r.c.log.Warn("fetching messages failed; retrying", "err", err, "failures", failures, "retry_in", wait)
		sleep(r.ctx, wait)
	}
}

// fetch runs one pull request for up to n messages and dispatches what
// arrives. It returns how many arrived.
//
// The pull is not cut short when Run's context ends: the library would
// drop the messages it received and had not passed on yet, and the server
// would redeliver them only after AckWait. It ends by itself within
// fetchWait, and dispatch hands back what it brings. Only a failure (the
// connection closed) cuts it short, when nothing can be handed back anyway.
func (r *runner) fetch(n int) (int, error) {
	ctx, cancel := context.WithTimeout(r.failed, fetchWait)
	defer cancel()
	batch, err := r.cons.Fetch(n, jetstream.FetchContext(ctx))
	if err != nil {
		return 0, err
	}
	got := 0
	for m := range batch.Messages() {
		got++
		r.dispatch(m)
	}
	err = batch.Error()
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return got, nil // the pull expired, or Run failed: the caller knows
	}
	return got, err
}

// fatal returns the error Run should end with, or nil when err is worth
// retrying.
func (r *runner) fatal(err error) error {
	name, stream := r.c.cfg.Durable, r.c.cfg.Stream
	switch {
	case errors.Is(err, natsgo.ErrConnectionClosed), errors.Is(err, jetstream.ErrConnectionClosed):
		return errConnClosed(err)
	case errors.Is(err, jetstream.ErrConsumerDeleted), errors.Is(err, jetstream.ErrConsumerNotFound):
		return fmt.Errorf("nats: consumer %q on stream %q was deleted; Run again to create it (it then starts from its DeliverPolicy): %w", name, stream, err)
	case errors.Is(err, jetstream.ErrStreamNotFound):
		return fmt.Errorf("nats: stream %q of consumer %q was deleted: %w", stream, name, err)
	case errors.Is(err, jetstream.ErrBadRequest):
		return fmt.Errorf("nats: the server refused the pull request of consumer %q on stream %q (does its configuration allow Batch %d?): %w", name, stream, r.window.size, err)
	case errors.Is(err, natsgo.ErrNoResponders):
		// Nothing answers pulls for the consumer: it is gone, or the
		// server is still starting. Only the first is for good.
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		defer cancel()
		if _, infoErr := r.cons.Info(ctx); errors.Is(infoErr, jetstream.ErrConsumerNotFound) || errors.Is(infoErr, jetstream.ErrStreamNotFound) {
			return r.fatal(infoErr)
		}
	}
	return nil
}

// dispatch hands a fetched message to its worker, which hands it back to
// the server if the run is ending.
func (r *runner) dispatch(m jetstream.Msg) {
	r.c.stats.Received.Add(1)
	d := &delivery{msg: m}
	r.mu.Lock()
	d.signaled = time.Now()
	r.held[d] = struct{}{}
	r.mu.Unlock()
	r.queues[r.worker(m)] <- d
}

// worker picks the worker of a message: by key, or by subject when it has
// none, so each key's messages are handled in order by one worker.
func (r *runner) worker(m jetstream.Msg) int {
	if len(r.queues) == 1 {
		return 0
	}
	key := m.Headers().Get(exactly.HeaderKey)
	if key == "" {
		key = "\x00" + m.Subject()
	}
	h := fnv.New32a()
	h.Write([]byte(key))
	return int(h.Sum32() % uint32(len(r.queues)))
}

func (r *runner) work(q <-chan *delivery) {
	conn := r.c.js.Conn()
	for d := range q {
		if conn.IsClosed() {
			// The status event that ends the run comes asynchronously;
			// a handler must not run for a message that cannot be acked.
			r.abort(errConnClosed(natsgo.ErrConnectionClosed))
		}
		if r.ctx.Err() != nil {
			r.handBack(d, context.Cause(r.ctx).Error())
			continue
		}
		r.handle(d)
	}
}

// handle runs the policy for one delivery, then acknowledges it, or hands
// it back when the run ended first.
func (r *runner) handle(d *delivery) {
	c := r.c
	msg, md, decodeErr := c.decode(d.msg)
	first := 1
	if md != nil {
		if md.NumDelivered > 1 {
			c.stats.Redeliveries.Add(1)
		}
		first = int(min(md.NumDelivered, uint64(c.policy.Retry.MaxAttempts)))
	}
	h := c.cfg.Handler
	if decodeErr != nil {
		// Never handled: straight to the dead-letter destination, through
		// the same policy (hooks, stats, confirmation) as a failed handler.
		h = func(context.Context, *exactly.Message) error { return decodeErr }
		first = c.policy.Retry.MaxAttempts
	}
	ctx := context.WithValue(r.ctx, metadataKey{}, md)
	if _, err := c.policy.Process(ctx, h, msg, first, &c.stats); err != nil {
		r.handBack(d, err.Error())
		return
	}
	r.ack(d, msg)
}

// ack acknowledges a handled or dead-lettered message and waits for the
// server to confirm it, even when the run is ending.
func (r *runner) ack(d *delivery, msg *exactly.Message) {
	defer r.settled(d)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.ctx), r.c.ackTimeout)
	defer cancel()
	err := d.msg.DoubleAck(ctx)
	if err == nil {
		return
	}
	r.c.policy.AckFailed(msg, err, &r.c.stats)
	r.c.log.Warn("acknowledgement not confirmed; unless it reached the server, the message is redelivered after AckWait and the inbox must absorb the copy",
		"id", msg.ID, "subject", msg.Topic, "err", err)
}

// handBack returns a message to the server (Nak) for prompt redelivery,
// once no pull request of the run is open. A Nak while one is open makes
// the server redeliver the message into it at once: back to this consumer,
// which would hand it back again, each round adding a delivery (and so an
// attempt) until the pull ends. Handed back after, messages go ahead of
// the stream's new ones, each key's in order. If the Nak is lost, the
// server redelivers the message after AckWait.
func (r *runner) handBack(d *delivery, why string) {
	defer r.settled(d)
	<-r.fetchEnded
	if err := d.msg.Nak(); err != nil {
		r.c.log.Debug("could not hand a message back; it is redelivered after AckWait", "subject", d.msg.Subject(), "why", why, "err", err)
	}
}

func (r *runner) settled(d *delivery) {
	r.mu.Lock()
	delete(r.held, d)
	r.mu.Unlock()
	r.window.release(1)
}

// keepAlive tells the server that the held messages are in progress, so it
// does not redeliver a message that is queued or being handled.
func (r *runner) keepAlive() {
	ackWait := r.c.cfg.AckWait
	tick := time.NewTicker(ackWait / 6)
	defer tick.Stop()
	var due []*delivery
	for {
		select {
		case <-r.stopKeep:
			return
		case now := <-tick.C:
			due = due[:0]
			r.mu.Lock()
			for d := range r.held {
				if now.Sub(d.signaled) >= ackWait/3 {
					d.signaled = now
					due = append(due, d)
				}
			}
			r.mu.Unlock()
			for _, d := range due {
				if err := d.msg.InProgress(); err != nil && !errors.Is(err, jetstream.ErrMsgAlreadyAckd) {
					r.c.log.Debug("could not extend AckWait", "subject", d.msg.Subject(), "err", err)
				}
			}
		}
	}
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

// window bounds the messages a run holds, and makes fetches wait until
// half of it is free so they are not one message each.
type window struct {
	size  int
	mu    sync.Mutex
	held  int
	freed chan struct{}
}

func newWindow(size int) *window {
	return &window{size: size, freed: make(chan struct{}, 1)}
}

// acquire waits until at least half the window (and at least one) is
// free, takes all that is free and returns how much.
func (w *window) acquire(ctx context.Context) (int, bool) {
	need := max(1, w.size/2)
	for {
		w.mu.Lock()
		if free := w.size - w.held; free >= need {
			w.held = w.size
			w.mu.Unlock()
			return free, true
		}
		w.mu.Unlock()
		select {
		case <-w.freed:
		case <-ctx.Done():
			return 0, false
		}
	}
}

func (w *window) release(n int) {
	if n <= 0 {
		return
	}
	w.mu.Lock()
	w.held -= n
	w.mu.Unlock()
	select {
	case w.freed <- struct{}{}:
	default:
	}
}

// checkName applies the server's rules for stream and consumer names.
func checkName(s string) error {
	if strings.ContainsAny(s, " \t\r\n.*>/\\") {
		return fmt.Errorf("%q must not contain whitespace, '.', '*', '>', '/' or '\\'", s)
	}
	return nil
}

// checkFilter applies NATS's rules for a subscription subject.
func checkFilter(s string) error {
	if s == "" {
		return errors.New("empty subject")
	}
	if strings.ContainsAny(s, " \t\r\n") {
		return fmt.Errorf("subject %q contains whitespace", s)
	}
	toks := strings.Split(s, ".")
	for i, tok := range toks {
		switch {
		case tok == "":
			return fmt.Errorf("subject %q has an empty token", s)
		case tok == ">" && i != len(toks)-1:
			return fmt.Errorf("subject %q has '>' before its last token", s)
		}
	}
	return nil
}

// sampleSubject returns a literal subject that pattern matches.
func sampleSubject(pattern string) string {
	toks := strings.Split(pattern, ".")
	for i, tok := range toks {
		if tok == "*" || tok == ">" {
			toks[i] = "sample"
		}
	}
	return strings.Join(toks, ".")
}

// subjectMatches reports whether the literal subject matches pattern,
// with NATS wildcards.
func subjectMatches(pattern, subject string) bool {
	p := strings.Split(pattern, ".")
	s := strings.Split(subject, ".")
	for i, tok := range p {
		switch {
		case tok == ">":
			return len(s) > i
		case i >= len(s):
			return false
		case tok != "*" && tok != s[i]:
			return false
		}
	}
	return len(p) == len(s)
}

func matchesAny(patterns []string, subject string) bool {
	for _, p := range patterns {
		if subjectMatches(p, subject) {
			return true
		}
	}
	return false
}
