package main

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/pgcdc"
	"github.com/exactlyonce/exactly/relay"
)

// The sources a relay reads the outbox from (`exactly relay --source`,
// `exactly demo --relay`).
const (
	sourcePoll = "poll" // relay.Relay: reads the table, woken by NOTIFY on PostgreSQL
	sourceCDC  = "cdc"  // pgcdc.Relay: logical replication (pgoutput) on PostgreSQL
)

// relayRunner is a running relay of any source.
type relayRunner interface {
	// Run publishes until ctx ends, then finishes or hands back its
	// in-flight batch and returns.
	Run(ctx context.Context) error
	// Partitions is the number of outbox partitions (or, for CDC, slots)
	// this runner holds; 0 means it is not doing any work yet.
	Partitions() int
}

// checkSource validates a source name before anything is opened.
func checkSource(source, dialect string) error {
	switch source {
	case sourcePoll:
		return nil
	case sourceCDC:
		if dialect != "" && dialect != "postgres" {
			return fmt.Errorf("the cdc source needs PostgreSQL (logical replication), the database is %s; use poll", dialect)
		}
		return nil
	case "":
		return errors.New("no source given (want poll or cdc)")
	}
	return fmt.Errorf("unknown source %q (want poll or cdc)", source)
}

// cdcSettings are what the cdc source needs beyond the polling relay's
// settings: the DSN (it opens its own replication connection), the slot,
// and optionally the other layouts and the exactly-once Kafka mode.
type cdcSettings struct {
	DSN           string
	Slot          string
	Messages      bool   // also pgcdc.Emit's logical messages
	DebeziumTable string // also a Debezium-layout outbox table
	KeepRows      bool   // retention > 0: leave the rows, the operator deletes them
	// KafkaEOS, when set, replaces the publisher: messages and the slot
	// position commit in one Kafka transaction.
	KafkaEOS *kafka.CDCExactlyOnce
	Hooks    pgcdc.Hooks

	// The tunings of pgcdc.Config, zero for its defaults.
	Publication, MessagePrefix                     string
	MaxPending                                     int
	HeartbeatInterval, StatusInterval, LagInterval time.Duration
}

// newRelayRunner builds the relay for source from cfg (and, for cdc, from
// cdc): the one place where a source is chosen.
func newRelayRunner(source string, cfg relay.Config, cdc cdcSettings) (relayRunner, error) {
	if err := checkSource(source, cfg.Outbox.Dialect()); err != nil {
		return nil, err
	}
	switch source {
	case sourcePoll:
		r, err := relay.New(cfg)
		if err != nil {
			return nil, err
		}
		return pollRunner{r}, nil
	case sourceCDC:
		r, err := pgcdc.New(cdcConfig(cfg, cdc))
		if err != nil {
			return nil, err
		}
		return &cdcRunner{Relay: r}, nil
	}
	return nil, fmt.Errorf("unknown source %q", source)
}

// cdcConfig is the CDC relay's configuration: the settings both relays
// have, from cfg (TestCDCConfigCarriesTheSharedSettings checks that none
// is left out), and the CDC relay's own, from cdc.
func cdcConfig(cfg relay.Config, cdc cdcSettings) pgcdc.Config {
	pc := pgcdc.Config{
		DSN: cdc.DSN, Slot: cdc.Slot, Table: cfg.Outbox.Table(), KeepRows: cdc.KeepRows, Messages: cdc.Messages,
		BatchSize: cfg.BatchSize, MaxAttempts: cfg.MaxAttempts,
		InitialBackoff: cfg.InitialBackoff, MaxBackoff: cfg.MaxBackoff,
		ShutdownTimeout: cfg.ShutdownTimeout, Logger: cfg.Logger, Hooks: cdc.Hooks,
		Publication: cdc.Publication, MessagePrefix: cdc.MessagePrefix, MaxPending: cdc.MaxPending,
		HeartbeatInterval: cdc.HeartbeatInterval, StatusInterval: cdc.StatusInterval, LagInterval: cdc.LagInterval,
	}
	if cdc.KafkaEOS != nil { // the Kafka transactions replace the publisher
		pc.ExactlyOnce = cdc.KafkaEOS
	} else {
		pc.Publisher = cfg.Publisher
	}
	if cdc.DebeziumTable != "" {
		pc.Debezium = &pgcdc.Debezium{Table: cdc.DebeziumTable}
	}
	return pc
}

type pollRunner struct{ *relay.Relay }

func (p pollRunner) Partitions() int { return p.Stats().Partitions }

// cdcRunner holds one slot while Run runs.
type cdcRunner struct {
	*pgcdc.Relay
	running atomic.Bool
}

func (c *cdcRunner) Run(ctx context.Context) error {
	c.running.Store(true)
	defer c.running.Store(false)
	return c.Relay.Run(ctx)
}

func (c *cdcRunner) Partitions() int {
	if c.running.Load() {
		return 1
	}
	return 0
}
