package outboxstore

import (
	"time"

	"github.com/exactlyonce/exactly"
)

// Prepare is what every writer of messages (outbox.Enqueue, pgcdc.Emit)
// does before it writes them: CheckWrite, then, in place, a fresh UUIDv7 for
// each message without an ID and now for each CreatedAt that is zero. On an
// error nothing of msgs is changed.
func Prepare(msgs []*exactly.Message, now time.Time) error {
	if err := CheckWrite(msgs); err != nil {
		return err
	}
	for _, m := range msgs {
		if m.ID == "" {
			m.ID = exactly.NewID()
		}
		if m.CreatedAt.IsZero() {
			m.CreatedAt = now
		}
	}
	return nil
}
