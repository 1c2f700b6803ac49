package nats

import (
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/consume"
)

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
	if err := cfg.checkNames(); err != nil {
		return nil, fmt.Errorf("nats: NewConsumer: %w", err)
	}
	shared, err := cfg.ConsumerConfig.WithDefaults()
	if err != nil {
		return nil, fmt.Errorf("nats: NewConsumer: %w", err)
	}
	cfg.ConsumerConfig = shared
	if err := cfg.withDefaults(); err != nil {
		return nil, fmt.Errorf("nats: NewConsumer: %w", err)
	}
	log := cfg.Logger.With("stream", cfg.Stream, "consumer", cfg.Durable)

	c := &Consumer{js: js, log: log, ackTimeout: min(maxAckTimeout, cfg.AckWait)}
	deadLetter := cfg.DeadLetter
	switch dl := cfg.DeadLetter.(type) {
	case nil:
		p, err := NewPublisher(js)
		if err != nil {
			return nil, fmt.Errorf("nats: NewConsumer: %w", badField("DeadLetter", "(the default) could not be built: %w", err))
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

	server, err := cfg.serverConfig()
	if err != nil {
		return nil, fmt.Errorf("nats: NewConsumer: %w", err)
	}
	c.cfg, c.server = cfg, server
	return c, nil
}

// badField is the error for a bad field of ConsumerConfig.
func badField(field, format string, args ...any) error {
	return &exactly.ConfigError{Field: field, Err: fmt.Errorf(format, args...)}
}

// checkNames checks the stream's and the durable consumer's names and the
// filter subjects.
func (cfg *ConsumerConfig) checkNames() error {
	switch {
	case cfg.Stream == "":
		return badField("Stream", "is empty")
	case cfg.Durable == "":
		return badField("Durable", "is empty; the consumer must be durable so the server keeps its position")
	}
	if err := checkName(cfg.Stream); err != nil {
		return badField("Stream", "%w", err)
	}
	if err := checkName(cfg.Durable); err != nil {
		return badField("Durable", "%w", err)
	}
	for i, f := range cfg.FilterSubjects {
		if err := checkFilter(f); err != nil {
			return badField(fmt.Sprintf("FilterSubjects[%d]", i), "%w", err)
		}
	}
	return nil
}

// withDefaults checks JetStream's own settings and fills in their defaults.
func (cfg *ConsumerConfig) withDefaults() error {
	switch {
	case cfg.AckWait == 0:
		cfg.AckWait = defaultAckWait
	case cfg.AckWait < time.Second:
		return badField("AckWait", "is %v; it must be at least 1s (the consumer extends it while it works, so it needs no tuning to the handler)", cfg.AckWait)
	}
	if cfg.MaxAckPending < 0 {
		return badField("MaxAckPending", "is %d; it must not be negative (0 takes the server's default)", cfg.MaxAckPending)
	}
	switch {
	case cfg.Batch < 0:
		return badField("Batch", "is %d; it must not be negative", cfg.Batch)
	case cfg.Batch == 0:
		cfg.Batch = defaultBatch
		if cfg.MaxAckPending > 0 {
			cfg.Batch = min(cfg.Batch, cfg.MaxAckPending)
		}
	case cfg.MaxAckPending > 0 && cfg.Batch > cfg.MaxAckPending:
		return badField("Batch", "(%d) exceeds MaxAckPending (%d); the server would never deliver a full batch", cfg.Batch, cfg.MaxAckPending)
	}
	return nil
}

// serverConfig returns the durable consumer's configuration on the server,
// after Configure, which must leave what the Consumer relies on as it is.
func (cfg *ConsumerConfig) serverConfig() (jetstream.ConsumerConfig, error) {
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
	if cfg.Configure == nil {
		return server, nil
	}
	cfg.Configure(&server)
	if err := cfg.checkConfigured(&server); err != nil {
		return server, badField("Configure", "%w", err)
	}
	if server.MaxDeliver == 0 {
		server.MaxDeliver = -1
	}
	return server, nil
}

// checkConfigured checks what Configure did to the server's configuration.
func (cfg *ConsumerConfig) checkConfigured(server *jetstream.ConsumerConfig) error {
	switch {
	case server.Durable != cfg.Durable || server.Name != "" && server.Name != cfg.Durable:
		return fmt.Errorf("changed the consumer's name (Durable %q, Name %q); set ConsumerConfig.Durable instead", server.Durable, server.Name)
	case server.AckWait != cfg.AckWait:
		return fmt.Errorf("changed AckWait to %v; set ConsumerConfig.AckWait instead (the consumer extends the deadline of the messages it holds by it)", server.AckWait)
	case server.AckPolicy != jetstream.AckExplicitPolicy:
		return fmt.Errorf("set AckPolicy %v; the consumer acknowledges each message after its handler, which needs the explicit policy", server.AckPolicy)
	case server.MaxDeliver > 0 || len(server.BackOff) > 0:
		return errors.New("set MaxDeliver or BackOff; the server would stop delivering a message after that many deliveries without dead-lettering it. Retry.MaxAttempts and DeadLetter bound retries instead")
	case server.HeadersOnly:
		return errors.New("set HeadersOnly; the handler needs the payload")
	case server.MaxRequestBatch > 0 && server.MaxRequestBatch < cfg.Batch:
		return fmt.Errorf("set MaxRequestBatch %d below Batch %d; the server would refuse every fetch", server.MaxRequestBatch, cfg.Batch)
	case server.MaxAckPending > 0 && server.MaxAckPending < cfg.Batch:
		return fmt.Errorf("set MaxAckPending %d below Batch %d", server.MaxAckPending, cfg.Batch)
	}
	for i, f := range append([]string{server.FilterSubject}, server.FilterSubjects...) {
		if err := checkFilter(f); err != nil && (i > 0 || f != "") {
			return fmt.Errorf("set a filter subject: %w", err)
		}
	}
	return nil
}
