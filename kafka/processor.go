package kafka

import (
	"context"
	"crypto/sha1"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/kafkarec"
)

// ProcessFunc turns one input record into the messages to write for it. It
// runs inside the transaction that will carry its outputs and the input's
// offset: the outputs become visible to read_committed consumers if and
// only if that transaction commits, and then the input is never handed to
// a ProcessFunc of this group again.
//
// A transaction can abort (a rebalance, a broker error, a crash), and the
// input is then processed again, so a ProcessFunc runs at least once per
// input record. Whatever it does besides returning messages (a database
// write, an HTTP call) is at-least-once: make it idempotent or apply it
// through the inbox. It must return the same outputs for the same input
// to keep the output deterministic across a replay, but that is not
// required for exactly-once: only the outputs of the committed run are
// visible.
//
// An output with an empty ID gets one derived from the input's exactly-id
// (or its position when it has none) and the output's index, so a replay
// writes the same ids. Outputs must pass exactly.Message.Validate and name
// a legal topic; an output that does not, or that the broker refuses as
// too large, makes the input go to the dead-letter topic instead.
//
// A returned error is retried by the processor's RetryPolicy; after the
// last attempt the input record goes to the dead-letter topic, in the same
// transaction as its offset. A panic counts as an error.
type ProcessFunc func(ctx context.Context, rec *kgo.Record) ([]exactly.Message, error)

// ProcessorConfig configures a Processor. Zero values take the documented
// defaults.
type ProcessorConfig struct {
	// Seeds are the bootstrap brokers. Required.
	Seeds []string
	// ClientOpts are applied to the processor's clients before its own
	// options: pass connection options only (TLS, SASL, dialer, client id,
	// retry backoff). Group, topic, isolation, transaction and rebalance
	// callback options are set from this config and override any given
	// here.
	ClientOpts []kgo.Opt
	// Group is the consumer group. Required.
	Group string
	// Topics are the input topics. Required.
	Topics []string
	// InstanceID names this instance, stably: the same value after every
	// restart of the same instance, a different value for every instance
	// that runs at the same time. The transactional ID is
	// TransactionalIDPrefix + "-" + InstanceID. A restarted instance uses
	// it to abort the transaction its previous run left open at once
	// instead of after TransactionTimeout; two live instances with the
	// same value fence each other (the older one's Run returns ErrFenced).
	// Use a pod ordinal, a host name plus a slot number, never a random
	// value. Required; 1 to 200 of a-z A-Z 0-9 . _ -.
	InstanceID string
	// TransactionalIDPrefix is the first part of the transactional ID.
	// Default Group. Two applications that share a group name on the same
	// cluster must use different prefixes.
	TransactionalIDPrefix string
	// StartAtEnd makes a group with no committed offset start at the end
	// of the topics instead of the start. Default false.
	StartAtEnd bool

	// CommitInterval is the longest time between the first record of a
	// transaction and its commit. Each commit costs a few round trips to
	// the transaction and group coordinators; a longer interval raises
	// throughput and the latency of the output together. Default 100ms.
	CommitInterval time.Duration
	// MaxBatchRecords ends a transaction early once it holds this many
	// input records: it bounds the work an abort throws away and the
	// records one transaction holds. Below the records that arrive in one
	// CommitInterval it adds commits, each a few milliseconds during which
	// no record is processed. Default 50,000.
	MaxBatchRecords int
	// MaxPollRecords bounds the records taken from the client at once;
	// they are processed concurrently across partitions, in order within
	// a partition. Default 500.
	MaxPollRecords int
	// TransactionTimeout is the broker's limit on one transaction
	// (transaction.timeout.ms; it must not exceed the broker's
	// transaction.max.timeout.ms, 15 minutes by default). A transaction
	// open longer is aborted by the broker. It must exceed CommitInterval
	// plus the longest run of a ProcessFunc including its retries. It is
	// also how long an instance that crashed and does not come back keeps
	// the partitions it had from being read by the others. Default 30s.
	TransactionTimeout time.Duration

	// Retry is the policy for a failing ProcessFunc; see
	// exactly.RetryPolicy for the defaults. The retries run inside the
	// open transaction: keep the total backoff well below
	// TransactionTimeout.
	Retry exactly.RetryPolicy
	// DeadLetterTopic names the dead-letter topic of an input record that
	// failed every attempt. Default msg.Topic+".dlq". The dead letter is
	// a copy of the input record with the exactly-dead-* headers, written
	// in the transaction that advances the input's offset.
	DeadLetterTopic func(msg *exactly.Message) string

	// StaticMembership makes the processor a static member of its group
	// with InstanceID as its group.instance.id (KIP-345): a restarted
	// instance takes the place, and the partitions, of its previous run at
	// once and without a rebalance, instead of joining as one more member
	// while the coordinator still counts the dead one until its session
	// times out. Use it under an orchestrator that restarts crashed
	// processes. A static member does not leave its group when Run
	// returns: its partitions wait until it comes back or SessionTimeout
	// passes (a scale-down costs that wait), so give SessionTimeout the
	// length of a restart. Default false (a dynamic member, which leaves
	// the group when Run returns).
	StaticMembership bool
	// SessionTimeout is how long the coordinator waits for a heartbeat
	// before it declares this member dead and gives its partitions to the
	// others. Longer: a crashed instance's partitions stand still longer.
	// Shorter: a pause costs a rebalance and an abort; the broker refuses
	// values outside group.min.session.timeout.ms and
	// group.max.session.timeout.ms (6s and 30min by default). Default 45s.
	SessionTimeout time.Duration
	// RebalanceTimeout is how long the coordinator waits for every member
	// to rejoin during a rebalance, and so how long one instance that does
	// not rejoin (it crashed) holds up the whole group. Default 60s.
	RebalanceTimeout time.Duration
	// HeartbeatInterval is the time between heartbeats. Keep it a tenth of
	// SessionTimeout or less. Default 3s, or SessionTimeout/10 when
	// SessionTimeout is set and that is shorter.
	HeartbeatInterval time.Duration

	// Logger receives the processor's logs. Default slog.Default().
	Logger *slog.Logger
	// Hooks receive outcomes for metrics: the hooks every consumer takes.
	// Handled and Failed run when the ProcessFunc returns, before the
	// transaction ends; DeadLettered runs when the dead letter is produced,
	// also before the commit; AckFailed is not called (an aborted
	// transaction counts in ProcessorStats.Aborts). All optional; called
	// synchronously from the processing goroutines.
	Hooks exactly.ConsumerHooks
}

// ProcessorStats are running totals. The first three count work of
// committed transactions only.
type ProcessorStats struct {
	Processed    int64 // input records whose transaction committed
	Outputs      int64 // output records that became visible
	DeadLettered int64 // input records committed to the dead-letter topic
	Failed       int64 // failed ProcessFunc attempts, in any transaction
	Commits      int64 // transactions committed
	Aborts       int64 // transactions aborted (their input is processed again)
	Restarts     int64 // transactional sessions replaced after an error

	// Partitions is a gauge: the input partitions the group coordinator
	// assigns this instance, as it last described the group.
	Partitions int64
	// Stalled is a gauge: 1 while this instance has held no partition, or
	// its group has not been Stable, for longer than RebalanceTimeout (a
	// warning with the group's state is logged then); 0 otherwise.
	Stalled int64
}

// ErrFenced is returned by Processor.Run when another producer took over
// this processor's transactional ID (an instance with the same InstanceID
// started): this instance is a zombie, its open transaction was aborted
// and nothing it wrote since becomes visible.
var ErrFenced = errors.New("kafka: fenced by another instance with the same transactional ID")

// Processor consumes input topics as a member of a consumer group, calls
// a ProcessFunc for each record and writes the outputs, the dead letters
// and the group's input offsets in one Kafka transaction per batch, so a
// read_committed consumer of the outputs sees each input's outputs
// exactly once, in input order per partition. See the package
// documentation for the guarantees and their limits.
type Processor struct {
	cfg   ProcessorConfig
	fn    ProcessFunc
	txnID string
	log   *slog.Logger

	running atomic.Bool
	watch   *groupWatch

	processed, outputs, deadLettered  atomic.Int64
	failed, commits, aborts, restarts atomic.Int64

	// revoked is set by the group's revoke and lost callbacks: the open
	// transaction cannot commit, stop working on it.
	revoked atomic.Bool
	// owned are the partitions the group assigned to the current session.
	ownedMu sync.Mutex
	owned   map[tp]bool

	// poison holds the input records whose outputs the broker refused as
	// unpublishable; when they come again they go to the dead-letter topic.
	poisonMu sync.Mutex
	poison   map[inputPos]suspect
	suspects atomic.Int64 // len(poison), read without the lock

	// Test hooks.
	abortHook func() bool // forces an abort when it returns true
	cur       atomic.Pointer[sessionHandle]
	crashed   atomic.Bool
}

type inputPos struct {
	topic  string
	part   int32
	offset int64
}

// NewProcessor checks cfg and returns a Processor that calls fn. Nothing
// connects until Run.
func NewProcessor(cfg ProcessorConfig, fn ProcessFunc) (*Processor, error) {
	if fn == nil {
		return nil, errors.New("kafka: NewProcessor: the ProcessFunc is nil")
	}
	switch {
	case len(cfg.Seeds) == 0:
		return nil, errors.New("kafka: ProcessorConfig.Seeds is required")
	case cfg.Group == "":
		return nil, errors.New("kafka: ProcessorConfig.Group is required")
	case len(cfg.Topics) == 0:
		return nil, errors.New("kafka: ProcessorConfig.Topics is required")
	case cfg.InstanceID == "":
		return nil, errors.New("kafka: ProcessorConfig.InstanceID is required: a stable name for this instance (pod ordinal, host name plus slot), the same after a restart, unique among running instances")
	case cfg.CommitInterval < 0, cfg.MaxBatchRecords < 0, cfg.MaxPollRecords < 0, cfg.TransactionTimeout < 0:
		return nil, errors.New("kafka: ProcessorConfig: CommitInterval, MaxBatchRecords, MaxPollRecords and TransactionTimeout must not be negative")
	}
	if err := checkIDPart("ProcessorConfig", "InstanceID", cfg.InstanceID); err != nil {
		return nil, err
	}
	if err := cfg.membership().check(); err != nil {
		return nil, err
	}
	if cfg.TransactionalIDPrefix == "" {
		cfg.TransactionalIDPrefix = cfg.Group
	} else if err := checkIDPart("ProcessorConfig", "TransactionalIDPrefix", cfg.TransactionalIDPrefix); err != nil {
		return nil, err
	}
	for _, t := range cfg.Topics {
		if err := kafkarec.CheckTopic(t); err != nil {
			return nil, fmt.Errorf("kafka: ProcessorConfig.Topics: %w", err)
		}
	}
	if cfg.CommitInterval == 0 {
		cfg.CommitInterval = 100 * time.Millisecond
	}
	if cfg.MaxBatchRecords == 0 {
		cfg.MaxBatchRecords = 50_000
	}
	if cfg.MaxPollRecords == 0 {
		cfg.MaxPollRecords = 500
	}
	if cfg.TransactionTimeout == 0 {
		cfg.TransactionTimeout = 30 * time.Second
	}
	if cfg.TransactionTimeout < time.Second || cfg.TransactionTimeout <= 2*cfg.CommitInterval {
		return nil, fmt.Errorf("kafka: ProcessorConfig.TransactionTimeout (%s) must be at least 1s and well above CommitInterval (%s)", cfg.TransactionTimeout, cfg.CommitInterval)
	}
	retry, err := cfg.Retry.WithDefaults()
	if err != nil {
		return nil, fmt.Errorf("kafka: ProcessorConfig.Retry: %w", err)
	}
	cfg.Retry = retry
	if cfg.DeadLetterTopic == nil {
		cfg.DeadLetterTopic = func(m *exactly.Message) string { return m.Topic + ".dlq" }
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	txnID := cfg.TransactionalIDPrefix + "-" + cfg.InstanceID
	log := cfg.Logger.With("component", "kafka-processor", "group", cfg.Group, "transactional_id", txnID)
	return &Processor{
		cfg: cfg, fn: fn, txnID: txnID, log: log,
		watch:  &groupWatch{group: cfg.Group, log: log},
		poison: map[inputPos]suspect{},
		owned:  map[tp]bool{},
	}, nil
}

func (cfg *ProcessorConfig) membership() membership {
	m := membership{field: "ProcessorConfig", sessionTimeout: cfg.SessionTimeout,
		rebalanceTimeout: cfg.RebalanceTimeout, heartbeatInterval: cfg.HeartbeatInterval}
	if cfg.StaticMembership {
		m.instanceID = cfg.InstanceID
	}
	return m
}

// checkIDPart keeps transactional IDs readable and free of separators
// that could make two configurations derive the same ID by accident.
func checkIDPart(config, field, s string) error {
	if len(s) > 200 {
		return fmt.Errorf("kafka: %s.%s is %d bytes, the limit is 200", config, field, len(s))
	}
	for _, c := range []byte(s) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("kafka: %s.%s %q has %q; use only a-z A-Z 0-9 . _ -", config, field, s, c)
		}
	}
	return nil
}

// TransactionalID is the transactional ID the processor produces with:
// TransactionalIDPrefix + "-" + InstanceID.
func (p *Processor) TransactionalID() string { return p.txnID }

// Stats returns the running totals.
func (p *Processor) Stats() ProcessorStats {
	return ProcessorStats{
		Processed: p.processed.Load(), Outputs: p.outputs.Load(), DeadLettered: p.deadLettered.Load(),
		Failed: p.failed.Load(), Commits: p.commits.Load(), Aborts: p.aborts.Load(), Restarts: p.restarts.Load(),
		Partitions: p.watch.partitions.Load(), Stalled: p.watch.stalled.Load(),
	}
}

// DecodeRecord returns the exactly.Message a record carries: the
// exactly-id header as ID (or "kafka:topic/partition/offset" when it has
// none), the key, the value as Payload, the other headers, and the
// exactly-created-at header (or the record's timestamp) as CreatedAt.
func DecodeRecord(rec *kgo.Record) *exactly.Message { return decodeRecord(rec) }

// outputIDSpace is the UUID namespace of the ids derived for outputs.
var outputIDSpace = uuid.MustParse("6f1c7c2e-5d1b-4b8e-9a43-3c2f0e9d7a10")

// outputID derives the id of the i-th output of the input message with
// id inID: a name-based UUID (version 5), the same on every replay.
//
// It computes what uuid.NewSHA1(outputIDSpace, []byte(inID+"\x00"+strconv.Itoa(i)))
// does, with one allocation (the string) in place of five: it runs for
// every output.
func outputID[ID string | []byte](inID ID, i int) string {
	var buf [16 + exactly.MaxIDLen + 1 + 20]byte // namespace, id, NUL, index
	b := append(buf[:0], outputIDSpace[:]...)
	b = append(b, inID...)
	b = append(b, 0)
	b = strconv.AppendInt(b, int64(i), 10)
	sum := sha1.Sum(b)
	var u uuid.UUID
	copy(u[:], sum[:])
	u[6] = u[6]&0x0f | 0x50 // version 5
	u[8] = u[8]&0x3f | 0x80 // RFC 4122 variant
	return u.String()
}
