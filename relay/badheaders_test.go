package relay_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/relay"
)

// A row a plain-SQL writer stored with headers that are not a JSON object
// of strings is parked at once, never published, and reported like any
// message parked as dead: the Dead hook with the reason, the Dead count,
// the warning in the log; the rows of its key around it go on.
func TestBadHeadersParkedLikeAnyDeadMessage(t *testing.T) {
	t.Parallel()
	pool, ob := pgOutbox(t)
	msgs := keyed("t", 1, 3)
	enqueue(t, pool, ob, msgs[0])
	var badID string
	if err := pool.QueryRow(context.Background(), "INSERT INTO "+ob.Table()+
		` (topic, msg_key, payload, headers) VALUES ('t', $1, 'x', '{"n": 1}') RETURNING id`, msgs[0].Key).Scan(&badID); err != nil {
		t.Fatal(err)
	}
	enqueue(t, pool, ob, msgs[1:]...)
	var (
		mu   sync.Mutex
		dead = map[string]error{}
	)
	logs := &exactlytest.LogBuffer{}
	rec := &exactlytest.Recorder{}
	r := run(t, relay.Config{Outbox: ob, DB: pool, Publisher: rec,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Hooks: relay.Hooks{Dead: func(m *exactly.Message, err error) {
			mu.Lock()
			dead[m.ID] = err
			mu.Unlock()
		}}})
	waitFor(t, "the good rows published and the bad one parked", 20*time.Second, func() bool {
		return len(rec.Delivered()) == len(msgs) && r.Stats().Dead == 1
	})
	exactlytest.CheckExactlyOnce(t, msgs, rec.Delivered())
	exactlytest.CheckKeyOrder(t, rec.Delivered())
	mu.Lock()
	err, ok := dead[badID]
	n := len(dead)
	mu.Unlock()
	if !ok || n != 1 || !strings.Contains(err.Error(), `not publishable as stored: headers: header "n" is a JSON number`) {
		t.Errorf("the Dead hook saw %v, want the plain row %s once with its reason", dead, badID)
	}
	if !errors.Is(err, exactly.ErrUnpublishable) {
		t.Errorf("the Dead hook's error %v is not marked unpublishable", err)
	}
	if out := logs.String(); !strings.Contains(out, "message parked as dead") || !strings.Contains(out, badID) {
		t.Errorf("no warning for the parked row in the log:\n%s", out)
	}
}
