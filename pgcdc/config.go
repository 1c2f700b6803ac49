package pgcdc

import (
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/relaycore"
)

// Defaults of Config.
const (
	DefaultSlot          = "exactly_cdc"
	DefaultMessagePrefix = "exactly"
	// HeartbeatPrefix is the prefix of the relay's heartbeat messages; the
	// decoder skips them.
	HeartbeatPrefix = "exactly-heartbeat"
)

// Config configures a Relay. Zero values take the documented defaults.
type Config struct {
	// DSN is a PostgreSQL connection string (URL or key=value). The relay
	// opens a replication connection from it (adding replication=database)
	// and a small pool for its other statements. The role needs the
	// REPLICATION attribute (or superuser) and the right to create a
	// publication on the tables. Required.
	DSN string
	// Slot is the logical replication slot. Default "exactly_cdc". Letters,
	// digits and underscores only (PostgreSQL's rule for slot names).
	Slot string
	// Publication is the publication the slot streams. Default: Slot. It is
	// created FOR TABLE the outbox tables WITH (publish = 'insert, update')
	// when missing; the tables are added to it when it exists without them.
	Publication string

	// Table is the exactly outbox table (outbox.Config.Table), migrated with
	// outbox.Migrate. Default "exactly_outbox". Its inserts are published and
	// parked messages are recorded in it, whatever the other sources.
	Table string
	// KeepRows leaves published rows of Table in place; by default the relay
	// deletes them once the broker confirmed them.
	KeepRows bool
	// Debezium, when set, also publishes the inserts of a Debezium-layout
	// outbox table.
	Debezium *Debezium
	// Messages also publishes the logical decoding messages written by Emit
	// (pg_logical_emit_message) with MessagePrefix.
	Messages bool
	// MessagePrefix is the prefix of the messages Emit writes. Default
	// "exactly".
	MessagePrefix string

	// Publisher receives the messages. Required, unless ExactlyOnce is set
	// (then it must be nil).
	Publisher exactly.Publisher
	// ExactlyOnce publishes each batch together with the relay's position,
	// instead of through Publisher: kafka.CDCExactlyOnce does it in Kafka
	// transactions. See the package documentation.
	ExactlyOnce ExactlyOnceSink

	// BatchSize is the most messages handed to one Publish call. Default
	// 1000.
	BatchSize int
	// MaxPending bounds the messages received from the slot and not yet
	// confirmed; above it the relay stops reading the stream until the
	// broker catches up. Default 100,000.
	MaxPending int
	// MaxAttempts is how many failed publishes a message gets before it is
	// parked as dead. Default 25. Errors wrapping exactly.ErrUnpublishable
	// park it at once.
	MaxAttempts int
	// InitialBackoff is the wait after the first failure; it doubles per
	// attempt up to MaxBackoff, with jitter (a random 50-100% of the value).
	// The same backoff spaces reconnection attempts (capped at 10s).
	// Defaults 1s and 5m.
	InitialBackoff time.Duration
	MaxBackoff     time.Duration

	// HeartbeatInterval is how often the relay writes a heartbeat message,
	// so the slot advances while the outbox is idle and other tables are
	// busy. Default 10s; negative turns heartbeats off.
	HeartbeatInterval time.Duration
	// StatusInterval is how often the confirmed position is sent to
	// PostgreSQL. Default 1s. It must stay well below the server's
	// wal_sender_timeout (default 60s).
	StatusInterval time.Duration
	// LagInterval is how often the slot is checked (lag, still there, not
	// invalidated). Default 10s.
	LagInterval time.Duration
	// ShutdownTimeout bounds how long the batch being published when the
	// context is cancelled may take. Default 10s.
	ShutdownTimeout time.Duration

	// Logger receives the relay's logs. Default slog.Default().
	Logger *slog.Logger
	// Hooks receive events for metrics. All optional.
	Hooks Hooks
}

// Debezium describes a table with the layout of Debezium's outbox event
// router: id (uuid), aggregatetype, aggregateid, type, payload, and any
// other columns (ignored). DebeziumTableSQL creates one.
type Debezium struct {
	// Table is the table, optionally schema-qualified. Required.
	Table string
	// TopicPrefix is put before aggregatetype to form the topic, like the
	// router's route.topic.replacement "outbox.event.${routedByValue}".
	// Default "outbox.event.".
	TopicPrefix string
	// Topic, when set, names the topic instead of TopicPrefix.
	Topic func(aggregateType string) string
	// TypeHeader, when set, carries the type column in a header of that
	// name (the router's table.fields.additional.placement=type:header:...).
	// Default: not placed, as in the router.
	TypeHeader string
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
	// Lag is called every LagInterval with the WAL the slot retains
	// (bytes) and the age of the oldest unconfirmed transaction.
	Lag func(bytes int64, seconds float64)
	// Confirmed is called when the position confirmed to PostgreSQL moves.
	Confirmed func(lsn LSN)
}

var slotName = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

func (c *Config) withDefaults() (Config, error) {
	cfg := *c
	if cfg.DSN == "" {
		return cfg, errors.New("pgcdc: Config.DSN is required")
	}
	if _, err := pgx.ParseConfig(cfg.DSN); err != nil {
		return cfg, fmt.Errorf("pgcdc: Config.DSN: %w", err)
	}
	switch {
	case cfg.Publisher == nil && cfg.ExactlyOnce == nil:
		return cfg, errors.New("pgcdc: Config.Publisher is required (or Config.ExactlyOnce)")
	case cfg.Publisher != nil && cfg.ExactlyOnce != nil:
		return cfg, errors.New("pgcdc: set Config.Publisher or Config.ExactlyOnce, not both")
	}
	if cfg.Slot == "" {
		cfg.Slot = DefaultSlot
	}
	if !slotName.MatchString(cfg.Slot) {
		return cfg, fmt.Errorf("pgcdc: Config.Slot %q: use 1 to 63 lower-case letters, digits and underscores", cfg.Slot)
	}
	if cfg.Publication == "" {
		cfg.Publication = cfg.Slot
	}
	if !slotName.MatchString(cfg.Publication) {
		return cfg, fmt.Errorf("pgcdc: Config.Publication %q: use 1 to 63 lower-case letters, digits and underscores", cfg.Publication)
	}
	if cfg.Table == "" {
		cfg.Table = "exactly_outbox"
	}
	if d := cfg.Debezium; d != nil {
		if d.Table == "" {
			return cfg, errors.New("pgcdc: Config.Debezium.Table is required")
		}
		dd := *d
		if dd.TopicPrefix == "" {
			dd.TopicPrefix = "outbox.event."
		}
		cfg.Debezium = &dd
	}
	if cfg.MessagePrefix == "" {
		cfg.MessagePrefix = DefaultMessagePrefix
	}
	if cfg.MessagePrefix == HeartbeatPrefix {
		return cfg, fmt.Errorf("pgcdc: Config.MessagePrefix %q is the heartbeat's", HeartbeatPrefix)
	}
	if err := relaycore.NonNegative(relaycore.Fields{
		{"BatchSize", int64(cfg.BatchSize)}, {"MaxPending", int64(cfg.MaxPending)}, {"MaxAttempts", int64(cfg.MaxAttempts)},
		{"InitialBackoff", int64(cfg.InitialBackoff)}, {"MaxBackoff", int64(cfg.MaxBackoff)},
		{"StatusInterval", int64(cfg.StatusInterval)}, {"LagInterval", int64(cfg.LagInterval)}, {"ShutdownTimeout", int64(cfg.ShutdownTimeout)},
	}); err != nil {
		return cfg, fmt.Errorf("pgcdc: %w", err)
	}
	if cfg.BatchSize == 0 {
		cfg.BatchSize = 1000
	}
	if cfg.MaxPending == 0 {
		cfg.MaxPending = 100_000
	}
	if cfg.MaxPending < cfg.BatchSize {
		return cfg, fmt.Errorf("pgcdc: Config.MaxPending (%d) is below BatchSize (%d)", cfg.MaxPending, cfg.BatchSize)
	}
	if err := relaycore.RetryDefaults(&cfg.MaxAttempts, &cfg.InitialBackoff, &cfg.MaxBackoff); err != nil {
		return cfg, fmt.Errorf("pgcdc: %w", err)
	}
	if cfg.HeartbeatInterval == 0 {
		cfg.HeartbeatInterval = 10 * time.Second
	}
	if cfg.StatusInterval == 0 {
		cfg.StatusInterval = time.Second
	}
	if cfg.LagInterval == 0 {
		cfg.LagInterval = 10 * time.Second
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return cfg, nil
}
