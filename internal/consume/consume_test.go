package consume_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/consume"
)

func policy(t *testing.T, dlq exactly.Publisher) *consume.Policy {
	p, err := consume.New(consume.Policy{DeadLetter: dlq,
		Retry: exactly.RetryPolicy{MaxAttempts: 3, InitialBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRetriesThenSucceeds(t *testing.T) {
	dlq := &exactlytest.Recorder{}
	p := policy(t, dlq)
	calls := 0
	h := func(ctx context.Context, m *exactly.Message) error {
		calls++
		if calls == 1 {
			panic("boom")
		}
		if calls == 2 {
			return errors.New("transient")
		}
		return nil
	}
	var st consume.Stats
	out, err := p.Process(context.Background(), h, &exactly.Message{ID: "a", Topic: "t"}, 1, &st)
	if err != nil || out != consume.Handled || calls != 3 {
		t.Fatalf("out %v err %v calls %d", out, err, calls)
	}
	if st.Failed.Load() != 2 || st.Handled.Load() != 1 || len(dlq.Delivered()) != 0 {
		t.Fatalf("stats %d failed %d handled, dlq %d", st.Failed.Load(), st.Handled.Load(), len(dlq.Delivered()))
	}
}

func TestDeadLettersAfterMaxAttempts(t *testing.T) {
	dlq := &exactlytest.Recorder{}
	p := policy(t, dlq)
	h := func(ctx context.Context, m *exactly.Message) error { panic("always") }
	msg := &exactly.Message{ID: "a", Topic: "orders", Payload: []byte("p"), Headers: map[string]string{"x": "y"}}
	out, err := p.Process(context.Background(), h, msg, 1, nil)
	if err != nil || out != consume.DeadLettered {
		t.Fatalf("out %v err %v", out, err)
	}
	got := dlq.Delivered()
	if len(got) != 1 {
		t.Fatalf("dead-lettered %d", len(got))
	}
	d := got[0]
	if d.ID != "a" || d.Topic != "orders.dlq" || string(d.Payload) != "p" || d.Headers["x"] != "y" ||
		d.Headers[exactly.HeaderDeadAttempts] != "3" || d.Headers[exactly.HeaderDeadTopic] != "orders" ||
		!strings.Contains(d.Headers[exactly.HeaderDeadReason], "handler panicked: always") {
		t.Fatalf("dead letter = %+v", d)
	}
	if msg.Headers[exactly.HeaderDeadReason] != "" {
		t.Fatal("the original message was modified")
	}
}

// A dead-letter destination that is down keeps the message unacknowledged:
// Process returns an error when the context ends, never success.
func TestDeadLetterDownIsNotSuccess(t *testing.T) {
	dlq := &exactlytest.Recorder{}
	dlq.FailCalls(-1, errors.New("dlq down"))
	p := policy(t, dlq)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := p.Process(ctx, func(context.Context, *exactly.Message) error { return errors.New("no") },
		&exactly.Message{ID: "a", Topic: "t"}, 1, nil)
	if err == nil || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "could not be dead-lettered") {
		t.Fatalf("err = %v", err)
	}
}

func TestPolicyNeedsDeadLetter(t *testing.T) {
	if _, err := consume.New(consume.Policy{}); err == nil || !strings.Contains(err.Error(), "dead-letter") {
		t.Fatalf("err = %v", err)
	}
	if _, err := consume.New(consume.Policy{DeadLetter: &exactlytest.Recorder{}, Retry: exactly.RetryPolicy{MaxAttempts: -1}}); err == nil {
		t.Fatal("negative MaxAttempts accepted")
	}
}

type ctxKey struct{}

// fakeTracer records what the policy asks of a Tracer.
type fakeTracer struct {
	started []string
	ended   []error
}

func (f *fakeTracer) Inject(context.Context, *exactly.Message) {}

func (f *fakeTracer) StartHandle(ctx context.Context, m *exactly.Message) (context.Context, func(error)) {
	f.started = append(f.started, m.ID)
	return context.WithValue(ctx, ctxKey{}, "span of "+m.ID), func(err error) { f.ended = append(f.ended, err) }
}

// With a Tracer, every handling runs in one span, ended with its outcome;
// the handler's context is the span's.
func TestTracer(t *testing.T) {
	tr := &fakeTracer{}
	p, err := consume.New(consume.Policy{DeadLetter: &exactlytest.Recorder{}, Tracer: tr,
		Retry: exactly.RetryPolicy{MaxAttempts: 2, InitialBackoff: time.Millisecond, MaxBackoff: time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	var seen []any
	h := func(ctx context.Context, m *exactly.Message) error {
		seen = append(seen, ctx.Value(ctxKey{}))
		if m.ID == "bad" {
			return errors.New("no")
		}
		return nil
	}
	if out, err := p.Process(context.Background(), h, &exactly.Message{ID: "good", Topic: "t"}, 1, nil); err != nil || out != consume.Handled {
		t.Fatalf("good: %v %v", out, err)
	}
	if out, err := p.Process(context.Background(), h, &exactly.Message{ID: "bad", Topic: "t"}, 1, nil); err != nil || out != consume.DeadLettered {
		t.Fatalf("bad: %v %v", out, err)
	}
	if len(tr.started) != 2 || tr.started[0] != "good" || tr.started[1] != "bad" {
		t.Fatalf("spans started for %v", tr.started)
	}
	if len(tr.ended) != 2 || tr.ended[0] != nil || tr.ended[1] == nil || !strings.Contains(tr.ended[1].Error(), "dead-lettered") {
		t.Fatalf("spans ended with %v", tr.ended)
	}
	if len(seen) != 3 || seen[0] != "span of good" || seen[1] != "span of bad" || seen[2] != "span of bad" {
		t.Fatalf("handler contexts: %v", seen)
	}
}

// A message close to the dead-letter destination's size limit does not fit
// with a long reason: the copy goes again with the reason cut short.
func TestDeadLetterCutsTheReasonWhenRefused(t *testing.T) {
	dlq := &exactlytest.Recorder{}
	dlq.FailWhen(func(m *exactly.Message) error {
		size := len(m.Payload)
		for k, v := range m.Headers {
			size += len(k) + len(v)
		}
		if size > 1500 {
			return exactly.Unpublishable(errors.New("message too large"))
		}
		return nil
	})
	p := policy(t, dlq)
	long := strings.Repeat("x", 5000)
	h := func(ctx context.Context, m *exactly.Message) error { return errors.New(long) }
	msg := &exactly.Message{ID: "a", Topic: "orders", Payload: []byte(strings.Repeat("p", 1000))}
	out, err := p.Process(context.Background(), h, msg, 1, nil)
	if err != nil || out != consume.DeadLettered {
		t.Fatalf("out %v err %v", out, err)
	}
	got := dlq.Delivered()
	if len(got) != 1 || len(got[0].Headers[exactly.HeaderDeadReason]) != 200 || string(got[0].Payload) != string(msg.Payload) {
		t.Fatalf("dead letters %d, reason %d bytes; want 1 with the payload and a 200-byte reason", len(got), len(got[0].Headers[exactly.HeaderDeadReason]))
	}
}

// A message the destination refuses even with the reason cut short is never
// acknowledged: Process keeps trying until its context ends, and says so.
func TestDeadLetterRefusedStaysUnacknowledged(t *testing.T) {
	dlq := &exactlytest.Recorder{}
	dlq.FailWhen(func(m *exactly.Message) error { return exactly.Unpublishable(errors.New("message too large")) })
	p := policy(t, dlq)
	h := func(ctx context.Context, m *exactly.Message) error { return errors.New("fails") }
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	var st consume.Stats
	out, err := p.Process(ctx, h, &exactly.Message{ID: "a", Topic: "orders"}, 1, &st)
	if err == nil || out == consume.DeadLettered || !strings.Contains(err.Error(), "could not be dead-lettered") {
		t.Fatalf("out %v err %v: want an error, the message must not be acknowledged", out, err)
	}
	if st.DeadLettered.Load() != 0 || dlq.Calls() < 3 {
		t.Fatalf("dead-lettered %d, publish calls %d", st.DeadLettered.Load(), dlq.Calls())
	}
}
