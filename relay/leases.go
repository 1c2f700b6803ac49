package relay

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
)

// waitDrained blocks until no batch is in flight.
func (r *Relay) waitDrained() {
	r.mu.Lock()
	for len(r.order.inflight) > 0 {
		r.drained.Wait()
	}
	r.mu.Unlock()
}

// maintainLeases heartbeats, renews the partitions held, takes a fair share
// of the free ones and gives back any above it. Partitions are given back
// only when nothing is in flight, so their rows are never published by two
// relays at once because of a hand-over.
func (r *Relay) maintainLeases(ctx context.Context) error {
	// Leases renewed now run until at least start+TTL on the database clock;
	// count from before the round trips, less a margin for clock rate.
	start := time.Now()
	live, parts, err := r.store.Heartbeat(ctx, r.db, r.cfg.InstanceID, r.cfg.LeaseTTL)
	if err != nil {
		return err
	}
	if parts != r.cfg.Partitions {
		// Another relay grew the table: the two counts map keys to
		// partitions differently, so this relay and the new ones could
		// publish the same key at once. Stop taking work.
		return fmt.Errorf("%w: %s now has %d partitions, this relay runs with %d; restart it with Partitions = %d",
			outboxstore.ErrPartitionMismatch, r.store.LeaseTable(), parts, r.cfg.Partitions, parts)
	}
	held, err := r.store.Renew(ctx, r.db, r.cfg.InstanceID, r.cfg.LeaseTTL)
	if err != nil {
		return err
	}
	r.leaseUntil.Store(start.Add(r.cfg.LeaseTTL - r.cfg.LeaseTTL/10).UnixNano())
	live = max(live, 1)
	share := (r.cfg.Partitions + live - 1) / live
	switch {
	case len(held) < share:
		got, err := r.store.Acquire(ctx, r.db, r.cfg.InstanceID, share-len(held), r.cfg.LeaseTTL)
		held = append(held, got...)
		slices.Sort(held)
		if err != nil {
			r.setOwned(held)
			return err
		}
	case len(held) > share:
		extra := held[share:]
		held = held[:share]
		r.setOwned(held) // stop fetching them
		r.waitDrained()
		if err := r.store.Release(ctx, r.db, r.cfg.InstanceID, extra); err != nil {
			return err
		}
		r.log.Info("released partitions to other relays", "released", len(extra), "held", len(held), "relays", live)
	}
	r.setOwned(held)
	return nil
}

func (r *Relay) setOwned(held []int64) {
	if len(held) != len(r.owned) {
		r.log.Debug("partitions held", "count", len(held), "of", r.cfg.Partitions)
	}
	if !slices.Equal(held, r.owned) {
		r.mu.Lock()
		r.order.rescan = true // rows of new partitions may lie below the cursor
		for _, p := range held {
			if !slices.Contains(r.owned, p) {
				r.order.cursorStale = true
				break
			}
		}
		r.mu.Unlock()
	}
	r.owned = held
	r.allOwned = len(held) == r.cfg.Partitions
	r.partitions.Store(int64(len(held)))
	// Forget held-back keys of partitions now elsewhere: their new owner
	// reads the backoff from the table.
	r.mu.Lock()
	if !r.allOwned {
		r.order.forget(func(key string) bool {
			return !slices.Contains(held, int64(outboxstore.KeyHash(&exactly.Message{Key: key})%int32(r.cfg.Partitions)))
		})
	}
	r.mu.Unlock()
}
