package main

import (
	"fmt"
	"math"
	"regexp"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/pgcdc"
)

// relayTuning holds the fields of relay.Config and pgcdc.Config a
// deployment tunes; relayTunables defines their flags.
type relayTuning struct {
	batchSize, maxAttempts, partitions, maxPending          int
	pipelineDepth                                           int
	pollInterval, retention, initialBackoff, maxBackoff     time.Duration
	leaseTTL, shutdownTimeout                               time.Duration
	heartbeatInterval, statusInterval, lagInterval, txnTime time.Duration
	strictOrder                                             bool
	instanceID, publication, messagePrefix                  string
	transactionalID, checkpointTopic                        string
}

// tunable is one setting of the relay: a flag, the variable envName(name)
// and the config key name.
type tunable struct {
	name   string
	source string // sourcePoll or sourceCDC when only that source reads it
	eos    bool   // only with --kafka-exactly-once
	help   string
	ptr    any   // *int, *time.Duration, *bool or *string
	min    int64 // ints and durations; math.MinInt64 lets anything below 0 through
	max    int64 // 0: no upper limit
	why    string
	// re, for strings, is the form a value must have.
	re *regexp.Regexp
}

var pgName = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

func (t *relayTuning) tunables() []tunable {
	return []tunable{
		{name: "batch-size", ptr: &t.batchSize, max: 10000,
			help: "most messages published at once (BatchSize), 0 for the default: 2000 (poll), 1000 (cdc)"},
		{name: "poll-interval", source: sourcePoll, ptr: &t.pollInterval, max: int64(time.Hour),
			help: "how often the table is read when nothing woke the relay (PollInterval), 0 for the default: 500ms on PostgreSQL, 50ms elsewhere"},
		{name: "max-attempts", ptr: &t.maxAttempts, max: 1_000_000,
			help: "failed publishes before a message is parked as dead (MaxAttempts), 0 for the default 25"},
		{name: "initial-backoff", ptr: &t.initialBackoff, max: int64(time.Hour),
			help: "wait after a message's first failed publish, doubling up to --max-backoff (InitialBackoff), 0 for the default 1s"},
		{name: "max-backoff", ptr: &t.maxBackoff, max: int64(24 * time.Hour),
			help: "longest wait between publishes of a failing message (MaxBackoff), 0 for the default 5m"},
		{name: "strict-order", source: sourcePoll, ptr: &t.strictOrder,
			help: "at most one message per key in flight: no reordering after a failure, at one round trip per message of a hot key (StrictOrder)"},
		{name: "pipeline-depth", source: sourcePoll, ptr: &t.pipelineDepth, max: 256,
			help: "batches handed to a nats or pubsub publisher before the first has its outcome; up to this many × --batch-size rows in memory, 1 for one at a time (PipelineDepth), 0 for the default 16"},
		{name: "retention", ptr: &t.retention,
			help: "keep sent rows this long, 0 deletes them once confirmed (Retention; cdc: any value keeps them, the operator deletes them)"},
		{name: "partitions", source: sourcePoll, ptr: &t.partitions, max: 1024,
			help: "key partitions shared between relays (Partitions), 0 for the default 16; the same on every relay of the table"},
		{name: "lease-ttl", source: sourcePoll, ptr: &t.leaseTTL, min: int64(300 * time.Millisecond), max: int64(time.Hour),
			why:  "a lease is renewed every third of it",
			help: "how long a relay keeps its partitions without renewing them; a stopped relay's partitions move after this long (LeaseTTL), 0 for the default 15s"},
		{name: "instance-id", source: sourcePoll, ptr: &t.instanceID,
			help: "name of this relay in the lease table (InstanceID), default hostname-pid-random"},
		{name: "shutdown-timeout", ptr: &t.shutdownTimeout, max: int64(time.Hour),
			help: "on SIGTERM, how long the batch in flight may take to be confirmed; the rest stays pending (ShutdownTimeout), 0 for the default 10s"},
		{name: "max-pending", source: sourceCDC, ptr: &t.maxPending, max: 10_000_000,
			help: "cdc: most messages received and not yet confirmed before reading pauses (MaxPending), 0 for the default 100000"},
		{name: "heartbeat-interval", source: sourceCDC, ptr: &t.heartbeatInterval, min: math.MinInt64, max: int64(time.Hour),
			help: "cdc: how often a heartbeat moves the slot while the outbox is idle (HeartbeatInterval), 0 for the default 10s, negative for none"},
		{name: "status-interval", source: sourceCDC, ptr: &t.statusInterval, max: int64(30 * time.Second),
			why:  "it must stay well below PostgreSQL's wal_sender_timeout (default 60s)",
			help: "cdc: how often the confirmed position is sent to PostgreSQL (StatusInterval), 0 for the default 1s"},
		{name: "lag-interval", source: sourceCDC, ptr: &t.lagInterval, max: int64(time.Hour),
			help: "cdc: how often the slot's lag is measured (LagInterval), 0 for the default 10s"},
		{name: "publication", source: sourceCDC, ptr: &t.publication, re: pgName,
			why:  "1 to 63 lower-case letters, digits and underscores",
			help: "cdc: publication the slot streams (Publication), default the slot's name"},
		{name: "message-prefix", source: sourceCDC, ptr: &t.messagePrefix,
			help: "cdc: prefix of the logical messages --cdc-messages publishes (MessagePrefix), default " + pgcdc.DefaultMessagePrefix},
		{name: "kafka-transactional-id", source: sourceCDC, eos: true, ptr: &t.transactionalID,
			help: "cdc + --kafka-exactly-once: transactional id, unique per slot and stable across restarts (TransactionalID), default exactly-cdc-<slot>"},
		{name: "kafka-checkpoint-topic", source: sourceCDC, eos: true, ptr: &t.checkpointTopic,
			help: "cdc + --kafka-exactly-once: topic of the slot positions (CheckpointTopic), default " + kafka.DefaultCDCCheckpointTopic},
		{name: "kafka-transaction-timeout", source: sourceCDC, eos: true, ptr: &t.txnTime, min: int64(time.Second), max: int64(15 * time.Minute),
			why:  "Kafka brokers refuse more than transaction.max.timeout.ms (default 15m)",
			help: "cdc + --kafka-exactly-once: the broker's bound on an open transaction (TransactionTimeout), 0 for the default 60s"},
	}
}

// addTunables defines the flag of every tunable.
func addTunables(fl *pflag.FlagSet, ts []tunable) {
	for _, t := range ts {
		help := fmt.Sprintf("%s (env %s)", t.help, envName(t.name))
		switch p := t.ptr.(type) {
		case *int:
			fl.IntVar(p, t.name, 0, help)
		case *time.Duration:
			fl.DurationVar(p, t.name, 0, help)
		case *bool:
			fl.BoolVar(p, t.name, false, help)
		case *string:
			fl.StringVar(p, t.name, "", help)
		default:
			panic("tunable " + t.name + ": unsupported type")
		}
	}
}

// checkTunables validates every tunable's value for the chosen source, each
// error naming the setting and where it came from.
func (f *relayFlags) checkTunables(fl *pflag.FlagSet) error {
	for _, t := range f.tune.tunables() {
		given := fl.Changed(t.name)
		if given && t.source != "" && t.source != f.source {
			return fmt.Errorf("%s is for --source %s, not %s", f.setting(t.name), t.source, f.source)
		}
		if given && t.eos && !f.kafkaExactlyOnce {
			return fmt.Errorf("%s is for --kafka-exactly-once", f.setting(t.name))
		}
		var v int64
		show := func(int64) string { return "" }
		switch p := t.ptr.(type) {
		case *int:
			v, show = int64(*p), func(n int64) string { return fmt.Sprint(n) }
		case *time.Duration:
			v, show = int64(*p), func(n int64) string { return time.Duration(n).String() }
		case *string:
			if *p != "" && t.re != nil && !t.re.MatchString(*p) {
				return fmt.Errorf("%s %q: use %s", f.setting(t.name), cut(*p), t.why)
			}
			continue
		default:
			continue
		}
		why := ""
		if t.why != "" {
			why = ": " + t.why
		}
		switch {
		case v == 0:
		case v < 0 && t.min != math.MinInt64:
			return fmt.Errorf("%s must not be negative", f.setting(t.name))
		case v > 0 && v < t.min:
			return fmt.Errorf("%s %s is below the minimum of %s%s", f.setting(t.name), show(v), show(t.min), why)
		case t.max > 0 && v > t.max:
			return fmt.Errorf("%s %s is above the limit of %s%s", f.setting(t.name), show(v), show(t.max), why)
		}
	}
	tu := &f.tune
	initial, maxB := tu.initialBackoff, tu.maxBackoff
	if initial == 0 {
		initial = time.Second
	}
	if maxB == 0 {
		maxB = 5 * time.Minute
	}
	if maxB < initial {
		return fmt.Errorf("%s %s is below %s %s", f.setting("max-backoff"), maxB, f.setting("initial-backoff"), initial)
	}
	if f.source == sourceCDC && tu.maxPending > 0 {
		batch := tu.batchSize
		if batch == 0 {
			batch = 1000
		}
		if tu.maxPending < batch {
			return fmt.Errorf("%s %d is below the batch size %d", f.setting("max-pending"), tu.maxPending, batch)
		}
	}
	if tu.messagePrefix == pgcdc.HeartbeatPrefix {
		return fmt.Errorf("%s %q is the heartbeat's prefix", f.setting("message-prefix"), tu.messagePrefix)
	}
	return nil
}

// setting names a setting in an error: its flag, and where its value came
// from when not the command line.
func (f *relayFlags) setting(name string) string {
	if o := f.origin[name]; o != "" {
		return "--" + name + " (" + o + ")"
	}
	return "--" + name
}

// given returns, as log attributes, the tunables set by a flag, the
// environment or the config file, with their values.
func (t *relayTuning) given(fl *pflag.FlagSet) []any {
	var attrs []any
	for _, tu := range t.tunables() {
		if f := fl.Lookup(tu.name); f != nil && f.Changed {
			attrs = append(attrs, strings.ReplaceAll(tu.name, "-", "_"), f.Value.String())
		}
	}
	return attrs
}
