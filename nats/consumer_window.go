package nats

import (
	"context"
	"sync"
)

// window bounds the messages a run holds, and makes fetches wait until
// half of it is free so they are not one message each.
type window struct {
	size  int
	mu    sync.Mutex
	held  int
	freed chan struct{}
}

func newWindow(size int) *window {
	return &window{size: size, freed: make(chan struct{}, 1)}
}

// acquire waits until at least half the window (and at least one) is
// free, takes all that is free and returns how much.
func (w *window) acquire(ctx context.Context) (int, bool) {
	need := max(1, w.size/2)
	for {
		w.mu.Lock()
		if free := w.size - w.held; free >= need {
			w.held = w.size
			w.mu.Unlock()
			return free, true
		}
		w.mu.Unlock()
		select {
		case <-w.freed:
		case <-ctx.Done():
			return 0, false
		}
	}
}

func (w *window) release(n int) {
	if n <= 0 {
		return
	}
	w.mu.Lock()
	w.held -= n
	w.mu.Unlock()
	select {
	case w.freed <- struct{}{}:
	default:
	}
}
