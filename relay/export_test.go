package relay

import "github.com/exactlyonce/exactly/internal/outboxstore"

// SetAfterPublish installs a hook that runs after the broker confirmed a
// batch and before its rows are marked sent: the crash window.
func SetAfterPublish(r *Relay, fn func(rows []outboxstore.Row)) { r.afterPublish = fn }
