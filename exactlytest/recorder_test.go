package exactlytest_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
)

// recorderHarness runs the publisher suite against Recorders, one per test.
func recorderHarness(dedup bool) exactlytest.PublisherHarness {
	var recorders sync.Map // topic -> *exactlytest.Recorder
	return exactlytest.PublisherHarness{
		New: func(t *testing.T) (exactly.Publisher, string) {
			r := &exactlytest.Recorder{MaxPayload: 64 << 10, Dedup: dedup}
			topic := "topic." + exactly.NewID()
			recorders.Store(topic, r)
			return r, topic
		},
		Read: func(t *testing.T, topic string, n int, _ time.Duration) []exactlytest.Received {
			v, ok := recorders.Load(topic)
			if !ok {
				t.Fatalf("no recorder for topic %q", topic)
			}
			var out []exactlytest.Received
			for _, m := range v.(*exactlytest.Recorder).Delivered() {
				if m.Topic != topic || len(out) == n {
					continue
				}
				h := map[string]string{exactly.HeaderID: m.ID}
				for k, v := range m.Headers {
					h[k] = v
				}
				native := ""
				if dedup {
					native = m.ID
				}
				out = append(out, exactlytest.Received{ID: m.ID, NativeID: native, Key: m.Key, Payload: m.Payload, Headers: h})
			}
			return out
		},
		MaxMessageSize: 64 << 10,
		NativeDedup:    dedup,
		Settle:         10 * time.Millisecond,
	}
}

func TestRecorderPublisherSuite(t *testing.T) {
	t.Parallel()
	t.Run("Copies", func(t *testing.T) {
		t.Parallel()
		exactlytest.RunPublisherSuite(t, recorderHarness(false))
	})
	t.Run("Dedup", func(t *testing.T) {
		t.Parallel()
		exactlytest.RunPublisherSuite(t, recorderHarness(true))
	})
}

func batch(n int) []*exactly.Message {
	msgs := make([]*exactly.Message, n)
	for i := range msgs {
		msgs[i] = &exactly.Message{ID: exactly.NewID(), Topic: "t", Key: fmt.Sprint(i % 2), Payload: []byte{byte(i)}}
	}
	return msgs
}

func TestRecorderFailIndex(t *testing.T) {
	t.Parallel()
	var r exactlytest.Recorder
	msgs := batch(4)
	r.FailIndex(1, nil)
	r.FailIndex(3, exactly.Unpublishable(errors.New("too big")))
	errs := exactly.PerMessage(r.Publish(t.Context(), msgs), len(msgs))
	if errs[0] != nil || errs[2] != nil {
		t.Fatalf("healthy messages failed: %v", errs)
	}
	if !errors.Is(errs[1], exactlytest.ErrInjected) || errors.Is(errs[1], exactly.ErrUnpublishable) {
		t.Fatalf("errs[1] = %v, want ErrInjected, retryable", errs[1])
	}
	if !errors.Is(errs[3], exactly.ErrUnpublishable) {
		t.Fatalf("errs[3] = %v, want unpublishable", errs[3])
	}
	if got := r.Count(msgs[1].ID); got != 0 {
		t.Fatalf("failed message delivered %d times", got)
	}
	if got := r.Attempts(msgs[1].ID); got != 1 {
		t.Fatalf("Attempts = %d, want 1", got)
	}

	r.Heal()
	if err := r.Publish(t.Context(), []*exactly.Message{msgs[1]}); err != nil {
		t.Fatalf("after Heal: %v", err)
	}
	if got := r.Count(msgs[1].ID); got != 1 {
		t.Fatalf("Count after retry = %d, want 1", got)
	}
	if got := r.Attempts(msgs[1].ID); got != 2 {
		t.Fatalf("Attempts after retry = %d, want 2", got)
	}
}

func TestRecorderFailWhen(t *testing.T) {
	t.Parallel()
	var r exactlytest.Recorder
	boom := errors.New("key 1 is down")
	r.FailWhen(func(m *exactly.Message) error {
		if m.Key == "1" {
			return boom
		}
		return nil
	})
	msgs := batch(6)
	errs := exactly.PerMessage(r.Publish(t.Context(), msgs), len(msgs))
	for i, err := range errs {
		if want := i%2 == 1; (err != nil) != want || (want && !errors.Is(err, boom)) {
			t.Fatalf("errs[%d] = %v, want failure %v", i, err, want)
		}
	}
	var keys []string
	for _, m := range r.Delivered() {
		keys = append(keys, m.Key)
	}
	if !slices.Equal(keys, []string{"0", "0", "0"}) {
		t.Fatalf("delivered keys %v, want only key 0", keys)
	}
}

func TestRecorderFailCalls(t *testing.T) {
	t.Parallel()
	var r exactlytest.Recorder
	r.FailCalls(2, nil)
	msgs := batch(3)
	for i := range 2 {
		err := r.Publish(t.Context(), msgs)
		var be *exactly.BatchError
		if !errors.Is(err, exactlytest.ErrInjected) || errors.As(err, &be) {
			t.Fatalf("call %d: %v, want ErrInjected for the whole call", i, err)
		}
	}
	if len(r.Delivered()) != 0 {
		t.Fatal("a failed call delivered messages")
	}
	if err := r.Publish(t.Context(), msgs); err != nil {
		t.Fatalf("third call: %v", err)
	}
	if r.Calls() != 3 || r.Attempts(msgs[0].ID) != 3 || r.Count(msgs[0].ID) != 1 {
		t.Fatalf("Calls=%d Attempts=%d Count=%d, want 3 3 1", r.Calls(), r.Attempts(msgs[0].ID), r.Count(msgs[0].ID))
	}
}

func TestRecorderLoseAcksMakesDuplicates(t *testing.T) {
	t.Parallel()
	var r exactlytest.Recorder
	timeout := errors.New("ack lost")
	r.LoseAcks(1, timeout)
	msgs := batch(2)
	if err := r.Publish(t.Context(), msgs); !errors.Is(err, timeout) {
		t.Fatalf("first call = %v, want the lost-ack error", err)
	}
	if err := r.Publish(t.Context(), msgs); err != nil { // the relay's retry
		t.Fatalf("retry: %v", err)
	}
	want := []string{msgs[0].ID, msgs[1].ID}
	slices.Sort(want)
	if got := r.Duplicates(); !slices.Equal(got, want) {
		t.Fatalf("Duplicates = %v, want %v", got, want)
	}

	var dedup exactlytest.Recorder
	dedup.Dedup = true
	dedup.LoseAcks(1, timeout)
	_ = dedup.Publish(t.Context(), msgs)
	if err := dedup.Publish(t.Context(), msgs); err != nil {
		t.Fatalf("dedup retry: %v", err)
	}
	if got := dedup.Duplicates(); len(got) != 0 || len(dedup.Delivered()) != 2 {
		t.Fatalf("with Dedup: duplicates %v, %d delivered, want none and 2", got, len(dedup.Delivered()))
	}
}

func TestRecorderDelayRespectsContext(t *testing.T) {
	t.Parallel()
	var r exactlytest.Recorder
	r.SetDelay(time.Hour)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := r.Publish(ctx, batch(2))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Publish = %v, want the context's deadline error", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("Publish took %v despite the deadline", took)
	}
	if len(r.Delivered()) != 0 {
		t.Fatal("an abandoned call delivered messages")
	}

	r.SetDelay(10 * time.Millisecond)
	start = time.Now()
	if err := r.Publish(t.Context(), batch(1)); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < 10*time.Millisecond {
		t.Fatalf("Publish took %v, want at least the 10ms delay", took)
	}
}

func TestRecorderRecordsCopies(t *testing.T) {
	t.Parallel()
	var r exactlytest.Recorder
	m := &exactly.Message{ID: "1", Topic: "t", Payload: []byte("before"), Headers: map[string]string{"h": "before"}}
	if err := r.Publish(t.Context(), []*exactly.Message{m}); err != nil {
		t.Fatal(err)
	}
	m.Payload[0] = 'X'
	m.Headers["h"] = "after"
	got := r.Delivered()[0]
	if string(got.Payload) != "before" || got.Headers["h"] != "before" {
		t.Fatalf("recorded message changed with the caller's: %q %v", got.Payload, got.Headers)
	}
}

func TestRecorderConcurrent(t *testing.T) {
	t.Parallel()
	var r exactlytest.Recorder
	r.FailIndex(0, nil)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 50 {
				_ = r.Publish(context.Background(), batch(4))
				_ = r.Duplicates()
			}
		})
	}
	wg.Wait()
	if got, want := len(r.Delivered()), 8*50*3; got != want {
		t.Fatalf("delivered %d, want %d", got, want)
	}
	if r.Calls() != 8*50 {
		t.Fatalf("Calls = %d, want %d", r.Calls(), 8*50)
	}
}
