package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/exactlyonce/exactly/relay"
)

// The sources a relay reads the outbox from (`exactly relay --source`,
// `exactly demo --relay`).
const (
	sourcePoll = "poll" // relay.Relay: reads the table, woken by NOTIFY on PostgreSQL
	sourceCDC  = "cdc"  // logical replication (pgoutput) on PostgreSQL
)

// errCDCUnavailable is returned for --source cdc until the CDC source is
// wired into the binary.
var errCDCUnavailable = errors.New("the cdc source (logical replication) is not available in this build yet; use poll")

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
			return fmt.Errorf("the cdc source needs PostgreSQL, the database is %s; use poll", dialect)
		}
		return errCDCUnavailable
	case "":
		return errors.New("no source given (want poll or cdc)")
	}
	return fmt.Errorf("unknown source %q (want poll or cdc)", source)
}

// newRelayRunner builds the relay for source from cfg: the one place where
// a source is chosen. The CDC source plugs in here (and reports its slot
// lag through relayMetrics.cdcSlotLag).
func newRelayRunner(source string, cfg relay.Config) (relayRunner, error) {
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
	}
	return nil, fmt.Errorf("unknown source %q", source)
}

type pollRunner struct{ *relay.Relay }

func (p pollRunner) Partitions() int { return p.Stats().Partitions }
