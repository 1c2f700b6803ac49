package pgcdc_test

import (
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
)

// TestFailingTopicIsLogged: a topic the broker refuses every time (no
// stream for it) is not retried silently: the relay warns at once with the
// broker's reason, then at most once a minute per topic, and Stats shows the
// key held back; once the broker takes the topic, it goes out.
func TestFailingTopicIsLogged(t *testing.T) {
	t.Parallel()
	f := setup(t)
	var broken atomic.Bool
	broken.Store(true)
	rec := &exactlytest.Recorder{}
	rec.FailWhen(func(m *exactly.Message) error {
		if broken.Load() && m.Topic == "nostream" {
			return fmt.Errorf("no stream captures subject %q", m.Topic)
		}
		return nil
	})
	logs := &exactlytest.LogBuffer{}
	cfg := f.config(rec)
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg.MaxAttempts = 1000
	r, _ := start(t, cfg)
	head := &exactly.Message{Topic: "nostream", Key: "k1", Payload: []byte("k1:0")}
	behind := &exactly.Message{Topic: "nostream", Key: "k1", Payload: []byte("k1:1")}
	other := &exactly.Message{Topic: "t", Key: "k2", Payload: []byte("k2:0")}
	f.enqueue(true, head, behind, other)
	waitFor(t, "the other key to flow", 20*time.Second, func() bool { return rec.Count(other.ID) >= 1 })
	waitFor(t, "the head to be retried", 10*time.Second, func() bool { return rec.Attempts(head.ID) >= 4 })
	waitFor(t, "Stats to show the held-back key", 5*time.Second, func() bool { return r.Stats().BlockedKeys == 1 })

	var lines []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "publish failed") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || !strings.Contains(lines[0], "level=WARN") || !strings.Contains(lines[0], "topic=nostream") ||
		!strings.Contains(lines[0], "no stream captures subject") || !strings.Contains(lines[0], "key=k1") {
		t.Errorf("warn lines about the failures: %q, want one with the topic, the key and the broker's reason", lines)
	}

	broken.Store(false)
	waitFor(t, "the held-back messages", 10*time.Second, func() bool { return rec.Count(head.ID) >= 1 && rec.Count(behind.ID) >= 1 })
	exactlytest.CheckKeyOrder(t, rec.Delivered())
	waitFor(t, "Stats to show no held-back key", 5*time.Second, func() bool { return r.Stats().BlockedKeys == 0 })
}
