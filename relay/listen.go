package relay

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// listen holds one connection in LISTEN on the outbox's channel and wakes the
// relay on every notification (the insert trigger sends one per statement, at
// commit). Polling goes on beside it, so a lost connection only costs latency.
func (r *Relay) listen(ctx context.Context) {
	channel := r.store.Channel()
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := r.listenOnce(ctx, channel)
		if ctx.Err() != nil {
			return
		}
		r.log.Warn("LISTEN connection lost; polling until it is back", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 10*time.Second)
	}
}

func (r *Relay) listenOnce(ctx context.Context, channel string) error {
	return r.onPgxConn(ctx, func(pc *pgx.Conn) error {
		if _, err := pc.Exec(ctx, `LISTEN "`+channel+`"`); err != nil {
			return err
		}
		// The connection goes back to the pool afterwards: stop listening.
		defer func() {
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			defer cancel()
			pc.Exec(uctx, "UNLISTEN *")
		}()
		r.Wake() // rows may have committed while no one was listening
		for {
			if _, err := pc.WaitForNotification(ctx); err != nil {
				return err
			}
			r.Wake()
		}
	})
}
