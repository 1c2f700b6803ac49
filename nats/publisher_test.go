package nats_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/nats"
)

// testServer is a connection to the test NATS server and the streams the
// test created on it, each deleted when the test ends.
type testServer struct {
	nc *natsgo.Conn
	js jetstream.JetStream

	mu      sync.Mutex
	streams map[string]string // subject -> stream
}

func connect(t *testing.T, opts ...jetstream.JetStreamOpt) *testServer {
	t.Helper()
	testenv.Need(t, testenv.NATS)
	nc, err := natsgo.Connect(testenv.NATSURL(), natsgo.Name(t.Name()))
	if err != nil {
		t.Fatalf("connecting to NATS at %s: %v", testenv.NATSURL(), err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc, opts...)
	if err != nil {
		t.Fatalf("jetstream.New: %v", err)
	}
	return &testServer{nc: nc, js: js, streams: make(map[string]string)}
}

// names returns a fresh stream name and a subject under the prefix the
// stream of that name captures.
func names() (stream, subject string) {
	id := strings.ReplaceAll(exactly.NewID(), "-", "")
	return "EXACTLY_TEST_" + id, "exactly-test." + id + ".events"
}

// createStream creates a memory stream capturing subject's parent prefix,
// changed by configure, and deletes it when the test ends.
func (s *testServer) createStream(t *testing.T, stream, subject string, configure func(*jetstream.StreamConfig)) {
	t.Helper()
	cfg := jetstream.StreamConfig{
		Name:     stream,
		Subjects: []string{subject[:strings.LastIndexByte(subject, '.')] + ".>"},
		Storage:  jetstream.MemoryStorage,
	}
	if configure != nil {
		configure(&cfg)
	}
	if _, err := s.js.CreateStream(t.Context(), cfg); err != nil {
		t.Fatalf("creating stream %s: %v", stream, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.js.DeleteStream(ctx, stream); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
			t.Errorf("deleting stream %s: %v", stream, err)
		}
	})
	s.mu.Lock()
	s.streams[subject] = stream
	s.mu.Unlock()
}

// topic creates a fresh stream and returns a subject it captures.
func (s *testServer) topic(t *testing.T, configure func(*jetstream.StreamConfig)) string {
	t.Helper()
	stream, subject := names()
	s.createStream(t, stream, subject, configure)
	return subject
}

func (s *testServer) publisher(t *testing.T, opts ...nats.Option) *nats.Publisher {
	t.Helper()
	p, err := nats.NewPublisher(s.js, opts...)
	if err != nil {
		t.Fatalf("NewPublisher: %v", err)
	}
	return p
}

// read returns up to n messages stored on subject, in stream order, waiting
// up to timeout for the stream to hold n.
func (s *testServer) read(t *testing.T, subject string, n int, timeout time.Duration) []exactlytest.Received {
	t.Helper()
	s.mu.Lock()
	name, ok := s.streams[subject]
	s.mu.Unlock()
	if !ok {
		t.Fatalf("no stream for subject %q", subject)
	}
	ctx, cancel := context.WithTimeout(t.Context(), timeout+30*time.Second)
	defer cancel()
	stream, err := s.js.Stream(ctx, name)
	if err != nil {
		t.Fatalf("stream %s: %v", name, err)
	}
	stored := func() int {
		info, err := stream.Info(ctx)
		if err != nil {
			t.Fatalf("stream %s info: %v", name, err)
		}
		return int(info.State.Msgs)
	}
	deadline := time.Now().Add(timeout)
	have := stored()
	for have < n && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		have = stored()
	}
	want := min(have, n)
	if want == 0 {
		return nil
	}
	cons, err := stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
	if err != nil {
		t.Fatalf("ordered consumer on %s: %v", name, err)
	}
	var out []exactlytest.Received
	for len(out) < want {
		batch, err := cons.Fetch(want-len(out), jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			t.Fatalf("fetching from %s: %v", name, err)
		}
		for m := range batch.Messages() {
			h := make(map[string]string, len(m.Headers()))
			for k, v := range m.Headers() {
				if len(v) > 0 {
					h[k] = v[0]
				}
			}
			out = append(out, exactlytest.Received{
				ID:       h[exactly.HeaderID],
				NativeID: h[jetstream.MsgIDHeader],
				Key:      h[exactly.HeaderKey],
				Payload:  m.Data(),
				Headers:  h,
			})
		}
		if err := batch.Error(); err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("fetching from %s: %v", name, err)
		}
		if ctx.Err() != nil {
			t.Fatalf("read %d of %d messages from %s", len(out), want, name)
		}
	}
	return out
}

func TestPublisherSuite(t *testing.T) {
	t.Parallel()
	s := connect(t)
	for _, tt := range []struct {
		name string
		opts []nats.Option
	}{
		{"Default", nil},
		{"StrictKeyOrder", []nats.Option{nats.StrictKeyOrder()}},
		{"MaxInFlight3", []nats.Option{nats.MaxInFlight(3)}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			exactlytest.RunPublisherSuite(t, exactlytest.PublisherHarness{
				New: func(t *testing.T) (exactly.Publisher, string) {
					return s.publisher(t, tt.opts...), s.topic(t, nil)
				},
				Read:           s.read,
				MaxMessageSize: int(s.nc.MaxPayload()),
				NativeDedup:    true,
				// Read sees the stream's message count, so a message that
				// should not exist would show at once.
				Settle: 200 * time.Millisecond,
			})
		})
	}
}

// batch builds n messages for subject over the given keys, payload
// "key/seq".
func batch(subject string, keys []string, n int) []*exactly.Message {
	msgs := make([]*exactly.Message, n)
	for i := range msgs {
		k := keys[i%len(keys)]
		msgs[i] = &exactly.Message{
			ID: exactly.NewID(), Topic: subject, Key: k,
			Payload: fmt.Appendf(nil, "%s/%d", k, i/len(keys)),
		}
	}
	return msgs
}

// checkStored fails unless subject holds every message of msgs exactly
// once and, if ordered, each key's messages in slice order.
func (s *testServer) checkStored(t *testing.T, subject string, msgs []*exactly.Message, ordered bool) {
	t.Helper()
	got := s.read(t, subject, len(msgs)+1, 200*time.Millisecond)
	if len(got) != len(msgs) {
		t.Fatalf("stream holds %d messages, want %d", len(got), len(msgs))
	}
	count := make(map[string]int)
	next := make(map[string]int)
	rank := make(map[string]int)
	seq := make(map[string]int)
	for _, m := range msgs {
		seq[m.ID] = rank[m.Key]
		rank[m.Key]++
	}
	for _, r := range got {
		count[r.ID]++
		if ordered {
			if seq[r.ID] != next[r.Key] {
				t.Fatalf("key %s: #%d stored where #%d was due", r.Key, seq[r.ID], next[r.Key])
			}
			next[r.Key]++
		}
	}
	for _, m := range msgs {
		if count[m.ID] != 1 {
			t.Fatalf("message %s stored %d times, want 1", m.ID, count[m.ID])
		}
	}
}

// A subject whose stream does not exist yet fails with a retryable "no
// responders" error, never unpublishable. A relay that retries the failed
// messages delivers all of them, once, after the stream appears.
func TestStreamUnavailableThenCreated(t *testing.T) {
	t.Parallel()
	for _, strict := range []bool{false, true} {
		t.Run(fmt.Sprintf("StrictKeyOrder=%v", strict), func(t *testing.T) {
			t.Parallel()
			s := connect(t)
			var opts []nats.Option
			if strict {
				opts = append(opts, nats.StrictKeyOrder())
			}
			p := s.publisher(t, opts...)
			stream, subject := names()
			msgs := batch(subject, []string{"a", "b", "c"}, 60)

			err := p.Publish(t.Context(), msgs)
			errs := exactly.PerMessage(err, len(msgs))
			for i, e := range errs {
				if e == nil {
					t.Fatalf("message %d confirmed without a stream", i)
				}
				if errors.Is(e, exactly.ErrUnpublishable) {
					t.Fatalf("message %d unpublishable for a missing stream (the relay would park it): %v", i, e)
				}
			}
			if !errors.Is(errs[0], jetstream.ErrNoStreamResponse) {
				t.Fatalf("first error %v, want jetstream.ErrNoStreamResponse", errs[0])
			}
			t.Logf("without a stream: %v", errs[0])

			// The relay keeps retrying the failed messages, in order; the
			// stream appears after its third attempt.
			pendingIdx := make([]int, len(msgs))
			for i := range pendingIdx {
				pendingIdx[i] = i
			}
			attempts := 1
			for len(pendingIdx) > 0 {
				if attempts == 3 {
					s.createStream(t, stream, subject, nil)
				}
				if attempts > 50 {
					t.Fatalf("%d messages still failing after %d attempts", len(pendingIdx), attempts)
				}
				time.Sleep(20 * time.Millisecond)
				retry := make([]*exactly.Message, len(pendingIdx))
				for j, i := range pendingIdx {
					retry[j] = msgs[i]
				}
				attempts++
				errs := exactly.PerMessage(p.Publish(t.Context(), retry), len(retry))
				var still []int
				for j, e := range errs {
					if errors.Is(e, exactly.ErrUnpublishable) {
						t.Fatalf("message %d unpublishable on retry: %v", pendingIdx[j], e)
					}
					if e != nil {
						still = append(still, pendingIdx[j])
					}
				}
				pendingIdx = still
			}
			if attempts < 4 {
				t.Fatalf("delivered after %d attempts, before the stream existed", attempts)
			}
			t.Logf("delivered after %d attempts", attempts)
			// Pipelined sends can store a later message of a key before the
			// retry of an earlier one when the stream appears mid-batch;
			// StrictKeyOrder must not.
			s.checkStored(t, subject, msgs, strict)
		})
	}
}

// A message under the server's max_payload but over the stream's
// max_msg_size is refused by the stream, alone, as unpublishable.
func TestStreamMaxMsgSize(t *testing.T) {
	t.Parallel()
	s := connect(t)
	for _, strict := range []bool{false, true} {
		t.Run(fmt.Sprintf("StrictKeyOrder=%v", strict), func(t *testing.T) {
			t.Parallel()
			subject := s.topic(t, func(c *jetstream.StreamConfig) { c.MaxMsgSize = 1024 })
			var opts []nats.Option
			if strict {
				opts = append(opts, nats.StrictKeyOrder())
			}
			p := s.publisher(t, opts...)
			msgs := batch(subject, []string{"a"}, 5)
			const big = 2
			msgs[big].Payload = make([]byte, 2000)

			errs := exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs))
			for i, e := range errs {
				if i == big {
					var apiErr *jetstream.APIError
					if !errors.Is(e, exactly.ErrUnpublishable) || !errors.As(e, &apiErr) {
						t.Fatalf("message %d: %v, want unpublishable with the stream's APIError", i, e)
					}
					t.Logf("refused: %v", e)
					continue
				}
				if e != nil {
					t.Fatalf("message %d failed beside a too large one: %v", i, e)
				}
			}
			good := append(append([]*exactly.Message{}, msgs[:big]...), msgs[big+1:]...)
			s.checkStored(t, subject, good, true)
		})
	}
}

// A retryable failure in the middle of a key: with the default pipelining
// the key's later messages are stored anyway; with StrictKeyOrder they are
// not sent, so the key's confirmed messages stay a prefix.
func TestStrictKeyOrderStopsAKeyAtItsFirstFailure(t *testing.T) {
	t.Parallel()
	s := connect(t)
	for _, strict := range []bool{false, true} {
		t.Run(fmt.Sprintf("StrictKeyOrder=%v", strict), func(t *testing.T) {
			t.Parallel()
			subject := s.topic(t, nil)
			_, nowhere := names() // a valid subject no stream captures
			opts := []nats.Option{nats.SubjectFunc(func(m *exactly.Message) string {
				if m.Headers["route"] == "nowhere" {
					return nowhere
				}
				return m.Topic
			})}
			if strict {
				opts = append(opts, nats.StrictKeyOrder())
			}
			p := s.publisher(t, opts...)
			msgs := batch(subject, []string{"a", "b"}, 10) // a0 b0 a1 b1 ...
			const failing = 2                              // a1
			msgs[failing].Headers = map[string]string{"route": "nowhere"}

			errs := exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs))
			if !errors.Is(errs[failing], jetstream.ErrNoStreamResponse) {
				t.Fatalf("message %d: %v, want no responders", failing, errs[failing])
			}
			for i, e := range errs {
				if i == failing {
					continue
				}
				laterOfKeyA := msgs[i].Key == "a" && i > failing
				switch {
				case laterOfKeyA && strict:
					if e == nil || errors.Is(e, exactly.ErrUnpublishable) || !strings.Contains(e.Error(), "not sent") {
						t.Fatalf("message %d after the failure of key a: %v, want a retryable \"not sent\"", i, e)
					}
				case e != nil:
					t.Fatalf("message %d: %v, want it stored", i, e)
				}
			}
			var stored []*exactly.Message
			for i, e := range errs {
				if e == nil {
					stored = append(stored, msgs[i])
				}
			}
			got := s.read(t, subject, len(stored)+1, 200*time.Millisecond)
			if len(got) != len(stored) {
				t.Fatalf("stream holds %d messages, %d were confirmed", len(got), len(stored))
			}
			for i, r := range got {
				if r.ID != stored[i].ID {
					t.Fatalf("stored message %d is %s, want %s", i, r.ID, stored[i].ID)
				}
			}
		})
	}
}

// A JetStream context whose pending-ack limit is far below MaxInFlight
// stalls; Publish waits for its own acks and goes on, losing nothing.
func TestSharedPendingAckLimit(t *testing.T) {
	t.Parallel()
	s := connect(t, jetstream.WithPublishAsyncMaxPending(4))
	subject := s.topic(t, nil)
	p := s.publisher(t)
	msgs := batch(subject, []string{"a", "b", "c"}, 300)
	var wg sync.WaitGroup
	other := batch(subject, []string{"x"}, 100) // a second publisher on the same context
	wg.Go(func() {
		if err := s.publisher(t).Publish(t.Context(), other); err != nil {
			t.Errorf("second publisher: %v", err)
		}
	})
	if err := p.Publish(t.Context(), msgs); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	wg.Wait()
	s.checkStored(t, subject, append(msgs, other...), true)
}

func TestInvalidHeaderAndSubject(t *testing.T) {
	t.Parallel()
	s := connect(t)
	subject := s.topic(t, nil)
	p := s.publisher(t)
	msgs := batch(subject, []string{"a"}, 5)
	msgs[1].Headers = map[string]string{"bad name": "x"}
	msgs[3].Topic = subject[:strings.LastIndexByte(subject, '.')] + ".*"
	errs := exactly.PerMessage(p.Publish(t.Context(), msgs), len(msgs))
	for i, e := range errs {
		if want := i == 1 || i == 3; want != errors.Is(e, exactly.ErrUnpublishable) || !want && e != nil {
			t.Fatalf("message %d: %v, want unpublishable %v", i, e, want)
		}
	}
	s.checkStored(t, subject, []*exactly.Message{msgs[0], msgs[2], msgs[4]}, true)
}

func TestNewPublisherValidation(t *testing.T) {
	t.Parallel()
	if _, err := nats.NewPublisher(nil); err == nil {
		t.Error("NewPublisher(nil) = nil error")
	}
	s := connect(t)
	if _, err := nats.NewPublisher(s.js, nats.MaxInFlight(0)); err == nil {
		t.Error("MaxInFlight(0) accepted")
	}
	if _, err := nats.NewPublisher(s.js, nats.AckWait(0)); err == nil {
		t.Error("AckWait(0) accepted")
	}
}
