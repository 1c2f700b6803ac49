package relay

import (
	"context"
	"time"

	"github.com/exactlyonce/exactly/outbox"
)

// retain deletes sent rows older than Retention, in small batches.
func (r *Relay) retain(ctx context.Context) {
	every := min(max(r.cfg.Retention/4, time.Second), time.Minute)
	for {
		cutoff := time.Now().Add(-r.cfg.Retention).UnixMilli()
		for ctx.Err() == nil {
			n, err := r.store.DeleteSentBefore(ctx, r.db, cutoff, 5000)
			if err != nil {
				if ctx.Err() == nil {
					r.log.Warn("deleting old sent rows failed", "err", err)
				}
				break
			}
			if n < 5000 {
				break
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

func (r *Relay) backlog(ctx context.Context) {
	for {
		st, err := r.store.Backlog(ctx, r.db)
		if err == nil {
			if h := r.cfg.Hooks.Backlog; h != nil {
				h(st.Pending, st.OldestAge)
			}
			if h := r.cfg.Hooks.Failing; h != nil {
				rs := r.Stats()
				h(FailingReport{Table: outbox.Failing(st.Failing), BlockedKeys: rs.BlockedKeys, OldestBlocked: rs.OldestBlocked})
			}
		} else if ctx.Err() == nil {
			r.log.Warn("reading the backlog failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(r.cfg.Hooks.BacklogInterval):
		}
	}
}
