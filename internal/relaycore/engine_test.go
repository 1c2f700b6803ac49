package relaycore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
)

// recordingSource records what the engine gives back, in order.
type recordingSource struct {
	mu         sync.Mutex
	recorded   []Outcome
	handedBack []int // Ref of each batch handed back
	refuse     map[int]bool
}

func (s *recordingSource) Publishable(b *Batch) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refuse[b.Ref.(int)] {
		s.handedBack = append(s.handedBack, b.Ref.(int))
		return false
	}
	return true
}

func (s *recordingSource) HandBack(b *Batch) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.handedBack = append(s.handedBack, b.Ref.(int))
}

func (s *recordingSource) Record(_ context.Context, outs []Outcome) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.recorded = append(s.recorded, outs...)
}

func (s *recordingSource) refs() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	var refs []int
	for _, o := range s.recorded {
		refs = append(refs, o.Ref.(int))
	}
	return refs
}

func batchOf(ref int, ids ...string) Batch {
	b := Batch{Ref: ref}
	for _, id := range ids {
		b.Msgs = append(b.Msgs, &exactly.Message{ID: id, Key: "k" + id})
	}
	return b
}

func quietEngine(p exactly.Publisher) *Engine {
	return &Engine{
		Publisher: p, Log: slog.New(slog.DiscardHandler),
		Backoff: func(int) time.Duration { return 20 * time.Millisecond },
	}
}

func feed(bs ...Batch) <-chan Batch {
	in := make(chan Batch, len(bs))
	for _, b := range bs {
		in <- b
	}
	close(in)
	return in
}

// TestEngineOneBatchAtATime: a plain Publisher never gets two calls at
// once, the outcomes come back in batch order with the per-message
// verdicts, and a batch the source refuses is not published.
func TestEngineOneBatchAtATime(t *testing.T) {
	t.Parallel()
	var calls, running, overlap atomic.Int32
	bad := errors.New("refused")
	pub := exactly.PublisherFunc(func(_ context.Context, msgs []*exactly.Message) error {
		if running.Add(1) > 1 {
			overlap.Add(1)
		}
		defer running.Add(-1)
		calls.Add(1)
		time.Sleep(time.Millisecond)
		if msgs[0].ID == "b" {
			return &exactly.BatchError{Errs: []error{bad, nil}}
		}
		return nil
	})
	src := &recordingSource{refuse: map[int]bool{3: true}}
	quietEngine(pub).Run(t.Context(), t.Context(), feed(batchOf(1, "a"), batchOf(2, "b", "c"), batchOf(3, "x"), batchOf(4, "d")), src)

	if got := fmt.Sprint(src.refs()); got != "[1 2 4]" {
		t.Fatalf("recorded batches %s, want [1 2 4]", got)
	}
	if calls.Load() != 3 || overlap.Load() != 0 {
		t.Fatalf("%d Publish calls (want 3), %d overlapping (want 0)", calls.Load(), overlap.Load())
	}
	if fmt.Sprint(src.handedBack) != "[3]" {
		t.Fatalf("handed back %v, want the refused batch 3", src.handedBack)
	}
	o := src.recorded[1]
	if o.Outage != nil || !errors.Is(o.Errs[0], bad) || o.Errs[1] != nil {
		t.Fatalf("batch 2: outage %v, errs %v; want the first message refused, the second confirmed", o.Outage, o.Errs)
	}
}

// TestEngineBacksOffAfterAnOutage: an outage is recorded as such, and the
// next batch waits for the backoff.
func TestEngineBacksOffAfterAnOutage(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var at []time.Time
	pub := exactly.PublisherFunc(func(_ context.Context, msgs []*exactly.Message) error {
		mu.Lock()
		at = append(at, time.Now())
		mu.Unlock()
		if msgs[0].ID == "a" {
			return errors.New("connection refused")
		}
		return nil
	})
	src := &recordingSource{}
	quietEngine(pub).Run(t.Context(), t.Context(), feed(batchOf(1, "a"), batchOf(2, "b")), src)
	if len(src.recorded) != 2 || src.recorded[0].Outage == nil || src.recorded[1].Outage != nil {
		t.Fatalf("recorded %+v; want an outage, then a confirmed batch", src.recorded)
	}
	if gap := at[1].Sub(at[0]); gap < 20*time.Millisecond {
		t.Fatalf("the batch after the outage went %s after it, before the 20ms backoff", gap)
	}
}

// pipe is a PipelinedPublisher that holds every Send until released, and
// logs the calls.
type pipe struct {
	mu      sync.Mutex
	log     []string
	out     int
	maxOut  int
	release chan struct{}
}

func (p *pipe) Publish(ctx context.Context, msgs []*exactly.Message) error {
	return p.Send(ctx, msgs)()
}

func (p *pipe) Send(_ context.Context, msgs []*exactly.Message) func() error {
	p.mu.Lock()
	p.log = append(p.log, "send "+msgs[0].ID)
	p.out++
	p.maxOut = max(p.maxOut, p.out)
	p.mu.Unlock()
	return func() error {
		<-p.release
		p.mu.Lock()
		p.out--
		p.mu.Unlock()
		return nil
	}
}

func (p *pipe) Resume(_ context.Context, m *exactly.Message) {
	p.mu.Lock()
	p.log = append(p.log, "resume "+m.ID)
	p.mu.Unlock()
}

// TestEnginePipelines: a PipelinedPublisher gets up to Depth batches at
// once, in order, each after the Resume of its resuming messages, and the
// outcomes come back in the same order.
func TestEnginePipelines(t *testing.T) {
	t.Parallel()
	p := &pipe{release: make(chan struct{})}
	e := quietEngine(p)
	e.Pipe, e.Depth = p, 3
	b2 := batchOf(2, "b", "c")
	b2.Resume = []int{1}
	in := make(chan Batch)
	src := &recordingSource{}
	done := make(chan struct{})
	go func() { defer close(done); e.Run(t.Context(), t.Context(), in, src) }()
	for _, b := range []Batch{batchOf(1, "a"), b2, batchOf(3, "d"), batchOf(4, "e")} {
		in <- b
	}
	// Batch 4 waits for a free place: three are out.
	time.Sleep(20 * time.Millisecond)
	p.mu.Lock()
	got, maxOut := fmt.Sprint(p.log), p.maxOut
	p.mu.Unlock()
	if got != "[send a resume c send b send d]" || maxOut != 3 {
		t.Fatalf("calls %s with %d out at most; want [send a resume c send b send d], 3 out", got, maxOut)
	}
	close(p.release)
	close(in)
	<-done
	if fmt.Sprint(src.refs()) != "[1 2 3 4]" {
		t.Fatalf("recorded %v, want [1 2 3 4]", src.refs())
	}
}

// TestEngineHandsBackAfterStop: once ctx ends, a batch taken from the
// source is handed back unpublished, and the batch out is still recorded
// (published with stopCtx).
func TestEngineHandsBackAfterStop(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(t.Context())
	started := make(chan struct{})
	pub := exactly.PublisherFunc(func(pctx context.Context, msgs []*exactly.Message) error {
		if msgs[0].ID == "a" {
			close(started)
			<-ctx.Done()
			time.Sleep(5 * time.Millisecond)
			return pctx.Err() // stopCtx: still alive
		}
		return nil
	})
	in := make(chan Batch)
	src := &recordingSource{}
	done := make(chan struct{})
	go func() { defer close(done); quietEngine(pub).Run(ctx, t.Context(), in, src) }()
	in <- batchOf(1, "a")
	<-started
	cancel()
	in <- batchOf(2, "b")
	close(in)
	<-done
	if fmt.Sprint(src.refs()) != "[1]" || src.recorded[0].Outage != nil || fmt.Sprint(src.handedBack) != "[2]" {
		t.Fatalf("recorded %v (outage %v), handed back %v; want batch 1 confirmed, batch 2 handed back",
			src.refs(), src.recorded[0].Outage, src.handedBack)
	}
}

// TestTally: each report counts, calls its hook, and logs where the relay
// leaves the logging to it.
func TestTally(t *testing.T) {
	t.Parallel()
	var buf strings.Builder
	log := slog.New(slog.NewTextHandler(&buf, nil))
	var published, failed, dead int
	tally := NewTally(log, 3, Hooks{
		Published: func(msgs []*exactly.Message, _ time.Duration) { published += len(msgs) },
		Failed:    func(*exactly.Message, int, error) { failed++ },
		Dead:      func(*exactly.Message, error) { dead++ },
	})
	m := &exactly.Message{ID: "m1", Topic: "t"}
	now := time.Now()
	tally.Confirmed([]*exactly.Message{m, m}, time.Millisecond)
	tally.Confirmed(nil, time.Millisecond) // nothing confirmed: no batch
	tally.Retrying(m, 1, now.Add(time.Second), errors.New("down"), now)
	tally.FailedOnce(m, 2, errors.New("aborted"))
	tally.Parked(m, 3, errors.New("down"))
	tally.Unreadable(m, errors.New("undecodable"))
	got := fmt.Sprint(tally.Published.Load(), tally.Batches.Load(), tally.Failed.Load(), tally.Dead.Load())
	if got != "2 1 2 2" || published != 2 || failed != 2 || dead != 2 {
		t.Fatalf("published, batches, failed, dead = %s (hooks %d %d %d); want 2 1 2 2 (hooks 2 2 2)", got, published, failed, dead)
	}
	out := buf.String()
	if strings.Count(out, "parked as dead") != 1 || !strings.Contains(out, "down") {
		t.Fatalf("log:\n%s\nwant one line for the parked message and the retried failure", out)
	}
}
