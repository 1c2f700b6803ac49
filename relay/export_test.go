package relay

import (
	"time"

	"github.com/exactlyonce/exactly/internal/outboxstore"
)

// SetAfterPublish installs a hook that runs after the broker confirmed a
// batch and before its rows are marked sent: the crash window.
func SetAfterPublish(r *Relay, fn func(rows []outboxstore.Row)) { r.afterPublish = fn }

// SetBeforeLeaseCheck installs a hook that runs when the publish stage takes
// a batch, before it checks the lease.
func SetBeforeLeaseCheck(r *Relay, fn func()) { r.beforeLeaseCheck = fn }

// LeaseExpired reports whether the relay's leases ran out without renewal.
func LeaseExpired(r *Relay) bool { return time.Now().UnixNano() > r.leaseUntil.Load() }
