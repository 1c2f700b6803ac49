package relay

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/relaycore"
	"github.com/exactlyonce/exactly/outbox"
)

// Config configures a Relay. Zero values take the documented defaults.
type Config struct {
	// Outbox names the table to drain. Required.
	Outbox *outbox.Outbox
	// DB is the database holding the outbox: a *sql.DB or a *pgxpool.Pool.
	// On PostgreSQL it must come from pgx (pgxpool, or database/sql with the
	// "pgx" driver), which gives array arguments and LISTEN. Required.
	DB any
	// Publisher receives the messages. Required.
	Publisher exactly.Publisher

	// BatchSize is the most rows fetched and published at once. Default
	// 2000. Larger batches raise throughput and the latency of each batch
	// under a backlog; at low rates a batch holds what committed since the
	// last read, so the size does not matter there.
	BatchSize int
	// PollInterval is how often the table is read when nothing woke the
	// relay. On PostgreSQL a NOTIFY from the insert trigger wakes it at once,
	// so this is only a fallback; on MySQL and SQLite it bounds the latency.
	// Default 500ms on PostgreSQL, 50ms elsewhere.
	PollInterval time.Duration

	// MaxAttempts is how many failed publishes a message gets before it is
	// parked as dead (kept in the table, status dead, with its last error;
	// re-drivable with Outbox.RetryDead or `exactly outbox dead retry`).
	// Default 25, which with the default backoff rides out an outage of
	// about an hour and a half. Errors wrapping exactly.ErrUnpublishable park
	// the message at once.
	MaxAttempts int
	// InitialBackoff is the wait after the first failure; it doubles per
	// attempt up to MaxBackoff, with jitter (a random 50-100% of the value).
	// Defaults 1s and 5m.
	InitialBackoff time.Duration
	MaxBackoff     time.Duration

	// StrictOrder keeps at most one message per key in flight. By default a
	// batch may hold several messages of a key, and a key may be in two
	// pipelined batches, which is what makes the relay fast on hot keys.
	// Messages of a key are always handed to the broker in order, and after
	// a failure the ones behind the failed message are published again after
	// it; but if the broker had already accepted some of them, a consumer
	// sees those before the failed one's retry. With StrictOrder that cannot
	// happen, at the cost of one round trip per message of a hot key.
	StrictOrder bool

	// PipelineDepth is how many batches an exactly.PipelinedPublisher (nats,
	// pubsub) is handed before the first of them has its outcome: the
	// relay keeps up to PipelineDepth × BatchSize rows in memory. 1 hands
	// over one batch at a time, as to other publishers. Default 16, at most
	// 256. Other publishers get one batch at a time whatever its value.
	PipelineDepth int

	// Retention keeps sent rows for this long (status sent) before deleting
	// them in small batches. Zero, the default, deletes a row as soon as the
	// broker confirmed it.
	Retention time.Duration

	// Partitions splits the keys between relay instances: each row belongs
	// to partition hash(key) mod Partitions, and each partition is leased
	// to one relay at a time through the <table>_leases table. Every relay
	// of one table must use the same value. A smaller count than the
	// table's is refused at start. A larger one grows the table and stops
	// with ErrPartitionMismatch (start it again); relays still running with
	// the old count notice within LeaseTTL/3, finish their batch in flight,
	// hand their partitions back and stop with ErrPartitionMismatch too; the
	// added partitions stay held for one LeaseTTL meanwhile, so that two
	// counts never publish the same key at once. Restart them all with the
	// new count. It caps how many relays can share the work.
	// Default 16.
	Partitions int
	// LeaseTTL is how long a relay keeps its partitions without renewing
	// them; a relay that stops renewing loses them to the others after this
	// long. Renewed every LeaseTTL/3. Default 15s.
	LeaseTTL time.Duration
	// InstanceID names this relay in the lease table. Default
	// hostname-pid-random; it must be unique among running relays.
	InstanceID string

	// ShutdownTimeout bounds how long the batch being published when the
	// context is cancelled may take to be confirmed and marked; rows not
	// marked by then stay pending and are published again later, with the
	// same ids. Default 10s.
	ShutdownTimeout time.Duration

	// Logger receives the relay's logs. Default slog.Default().
	Logger *slog.Logger
	// Hooks receive events for metrics. All optional.
	Hooks Hooks
}

// Hooks are called synchronously from the relay's goroutines; keep them fast.
type Hooks struct {
	// Published is called after a batch is confirmed by the broker, with the
	// confirmed messages and how long Publish took.
	Published func(msgs []*exactly.Message, took time.Duration)
	// Failed is called for each failed publish of a message that will be
	// retried, with the attempt number (1 for the first failure).
	Failed func(msg *exactly.Message, attempt int, err error)
	// Dead is called when a message is parked as dead.
	Dead func(msg *exactly.Message, err error)
	// Backlog reports the pending rows and the age of the oldest, every
	// BacklogInterval (default 10s) when set.
	Backlog         func(pending int64, oldest time.Duration)
	BacklogInterval time.Duration
	// Failing reports the failing publishes every BacklogInterval when set,
	// read with the backlog (one scan of the pending rows).
	Failing func(FailingReport)
}

// FailingReport is what Hooks.Failing receives.
type FailingReport struct {
	// Table covers the whole outbox table, every relay's partitions, from
	// the attempts stored in it: failing messages, the keys they hold back,
	// the age of the oldest (as outbox.Status reports them).
	Table outbox.Failing
	// BlockedKeys and OldestBlocked are this relay's, as in Stats.
	BlockedKeys   int
	OldestBlocked time.Duration
}

func (c *Config) withDefaults() (Config, error) {
	cfg := *c
	switch {
	case cfg.Outbox == nil:
		return cfg, errors.New("relay: Config.Outbox is required")
	case cfg.DB == nil:
		return cfg, errors.New("relay: Config.DB is required (*sql.DB or *pgxpool.Pool)")
	case cfg.Publisher == nil:
		return cfg, errors.New("relay: Config.Publisher is required")
	}
	if err := relaycore.NonNegative(relaycore.Fields{
		{"BatchSize", int64(cfg.BatchSize)}, {"MaxAttempts", int64(cfg.MaxAttempts)}, {"Partitions", int64(cfg.Partitions)},
		{"PollInterval", int64(cfg.PollInterval)}, {"InitialBackoff", int64(cfg.InitialBackoff)}, {"MaxBackoff", int64(cfg.MaxBackoff)},
		{"Retention", int64(cfg.Retention)}, {"LeaseTTL", int64(cfg.LeaseTTL)}, {"ShutdownTimeout", int64(cfg.ShutdownTimeout)},
		{"PipelineDepth", int64(cfg.PipelineDepth)},
	}); err != nil {
		return cfg, fmt.Errorf("relay: %w", err)
	}
	if cfg.BatchSize == 0 {
		cfg.BatchSize = 2000
	}
	if cfg.BatchSize > 10000 {
		return cfg, fmt.Errorf("relay: Config.BatchSize %d is above the limit of 10000", cfg.BatchSize)
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 50 * time.Millisecond
		if cfg.Outbox.Dialect() == outbox.Postgres {
			cfg.PollInterval = 500 * time.Millisecond
		}
	}
	if err := relaycore.RetryDefaults(&cfg.MaxAttempts, &cfg.InitialBackoff, &cfg.MaxBackoff); err != nil {
		return cfg, fmt.Errorf("relay: %w", err)
	}
	if cfg.PipelineDepth == 0 {
		cfg.PipelineDepth = defaultPipelineDepth
	}
	if cfg.PipelineDepth > 256 {
		return cfg, fmt.Errorf("relay: Config.PipelineDepth %d is above the limit of 256", cfg.PipelineDepth)
	}
	if cfg.Partitions == 0 {
		cfg.Partitions = 16
	}
	if cfg.Partitions > 1024 {
		return cfg, fmt.Errorf("relay: Config.Partitions %d is above the limit of 1024", cfg.Partitions)
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = 15 * time.Second
	}
	if cfg.LeaseTTL < 300*time.Millisecond {
		return cfg, fmt.Errorf("relay: Config.LeaseTTL %s is too short (minimum 300ms)", cfg.LeaseTTL)
	}
	if cfg.InstanceID == "" {
		host, _ := os.Hostname()
		cfg.InstanceID = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), exactly.NewID()[24:])
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Hooks.BacklogInterval == 0 {
		cfg.Hooks.BacklogInterval = 10 * time.Second
	}
	return cfg, nil
}

// ErrPartitionMismatch is wrapped by the error Run returns when relays of one
// outbox table disagree on Partitions: at start, or when another relay grew
// the lease table while this one ran.
var ErrPartitionMismatch = outboxstore.ErrPartitionMismatch
