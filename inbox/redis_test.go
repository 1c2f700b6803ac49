package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/testenv"
)

func newRedisClient(t *testing.T) *redis.Client {
	t.Helper()
	testenv.Need(t, testenv.Redis)
	c := redis.NewClient(&redis.Options{Addr: testenv.Redis.Addr, PoolSize: 20})
	t.Cleanup(func() { c.Close() })
	return c
}

var prefixSeq atomic.Int64

// uniquePrefix returns a key prefix for one test, and deletes every key
// under it when the test ends.
func uniquePrefix(t *testing.T, c *redis.Client) string {
	p := fmt.Sprintf("exactly-test:%d:%d:", time.Now().UnixNano(), prefixSeq.Add(1))
	t.Cleanup(func() {
		ctx := context.Background()
		iter := c.Scan(ctx, 0, p+"*", 500).Iterator()
		var keys []string
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
		if err := iter.Err(); err != nil {
			t.Errorf("scan %s*: %v", p, err)
		}
		if len(keys) > 0 {
			if err := c.Del(ctx, keys...).Err(); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	return p
}

func TestRedis(t *testing.T) {
	t.Parallel()
	client := newRedisClient(t)
	exactlytest.RunInboxSuite(t, exactlytest.InboxHarness{
		Setup: func(t *testing.T, opts exactlytest.InboxOptions) *exactlytest.InboxFixture {
			prefix := uniquePrefix(t, client)
			ttl := opts.TTL
			if ttl == 0 {
				ttl = time.Hour
			}
			var mu sync.Mutex
			inboxes := map[string]*inbox.Redis{}
			get := func(consumer string) *inbox.Redis {
				mu.Lock()
				defer mu.Unlock()
				if r, ok := inboxes[consumer]; ok {
					return r
				}
				r, err := inbox.NewRedis(client, inbox.RedisConfig{Prefix: prefix + "ib:", Consumer: consumer, Lease: min(10*time.Second, ttl), TTL: ttl})
				if err != nil {
					t.Fatal(err)
				}
				inboxes[consumer] = r
				return r
			}
			// The effect: a per-consumer hash of counters, one field per ID.
			effects := func(consumer string) string { return prefix + "fx:" + consumer }
			apply := func(ctx context.Context, consumer string, msgs []*exactly.Message, work exactlytest.InboxWork) error {
				if err := work(ctx, exactlytest.BeforeEffect); err != nil {
					return err
				}
				for _, m := range msgs {
					if err := client.HIncrBy(ctx, effects(consumer), m.ID, 1).Err(); err != nil {
						return err
					}
				}
				return work(ctx, exactlytest.AfterEffect)
			}
			return &exactlytest.InboxFixture{
				Deliver: func(ctx context.Context, consumer string, msg *exactly.Message, work exactlytest.InboxWork) (inbox.Outcome, error) {
					return get(consumer).Handle(ctx, msg, func(ctx context.Context, m *exactly.Message) error {
						return apply(ctx, consumer, []*exactly.Message{m}, work)
					})
				},
				DeliverBatch: func(ctx context.Context, consumer string, msgs []*exactly.Message, work exactlytest.InboxWork) ([]inbox.Outcome, error) {
					return get(consumer).HandleBatch(ctx, msgs, func(ctx context.Context, fresh []*exactly.Message) error {
						return apply(ctx, consumer, fresh, work)
					})
				},
				Effects: func(t *testing.T, consumer string) map[string]int {
					all, err := client.HGetAll(context.Background(), effects(consumer)).Result()
					if err != nil {
						t.Fatal(err)
					}
					out := map[string]int{}
					for id, v := range all {
						n, err := strconv.Atoi(v)
						if err != nil {
							t.Fatal(err)
						}
						out[id] = n
					}
					return out
				},
			}
		},
	})
}

func TestNewRedisBadInput(t *testing.T) {
	t.Parallel()
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"}) // never dialled
	defer client.Close()
	for _, tc := range []struct {
		client redis.UniversalClient
		cfg    inbox.RedisConfig
		want   string
	}{
		{nil, inbox.RedisConfig{Consumer: "c"}, "nil Redis client"},
		{(*redis.Client)(nil), inbox.RedisConfig{Consumer: "c"}, "nil Redis client"},
		{client, inbox.RedisConfig{}, "Consumer is required"},
		{client, inbox.RedisConfig{Consumer: "group:v2"}, "must not contain ':'"},
		{client, inbox.RedisConfig{Consumer: "c", Lease: -time.Second}, "Lease must not be negative"},
		{client, inbox.RedisConfig{Consumer: "c", Lease: time.Millisecond}, "below the minimum"},
		{client, inbox.RedisConfig{Consumer: "c", TTL: -time.Second}, "TTL must not be negative"},
		{client, inbox.RedisConfig{Consumer: "c", Lease: time.Minute, TTL: time.Second}, "shorter than Lease"},
	} {
		if _, err := inbox.NewRedis(tc.client, tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: got %v, want an error containing %q", tc.cfg, err, tc.want)
		}
	}
	r, err := inbox.NewRedis(client, inbox.RedisConfig{Consumer: "billing"})
	if err != nil {
		t.Fatal(err)
	}
	if k := r.Key("m1"); k != "exactly:inbox:billing:m1" {
		t.Errorf("default key %q", k)
	}
	ctx := context.Background()
	ran := false
	h := func(context.Context, *exactly.Message) error { ran = true; return nil }
	if out, err := r.Handle(ctx, &exactly.Message{Topic: "t"}, h); !errors.Is(err, inbox.ErrNoID) || out != inbox.Retry {
		t.Errorf("empty ID: %v, %v", out, err)
	}
	if out, err := r.Handle(ctx, nil, h); err == nil || out != inbox.Retry {
		t.Errorf("nil message: %v, %v", out, err)
	}
	if _, err := r.Handle(ctx, &exactly.Message{ID: "m"}, nil); err == nil || !strings.Contains(err.Error(), "nil handler") {
		t.Errorf("nil handler: %v", err)
	}
	if ran {
		t.Error("the handler ran on bad input")
	}
}

// redisFixture is one Redis inbox with a short lease, and an effect counter.
type redisFixture struct {
	client  *redis.Client
	r       *inbox.Redis
	effects atomic.Int64
	mu      sync.Mutex
	events  []string
}

func newRedisFixture(t *testing.T, lease time.Duration) *redisFixture {
	f := &redisFixture{client: newRedisClient(t)}
	prefix := uniquePrefix(t, f.client)
	var err error
	f.r, err = inbox.NewRedis(f.client, inbox.RedisConfig{Prefix: prefix, Consumer: "c", Lease: lease, TTL: time.Minute,
		Hooks: inbox.Hooks{
			LeaseExpired: func(m *exactly.Message, overlapped bool) { f.event("lease expired %s overlapped=%v", m.ID, overlapped) },
			InProgress:   func(m *exactly.Message) { f.event("in progress %s", m.ID) },
			MarkFailed:   func(m *exactly.Message, err error) { f.event("mark failed %s", m.ID) },
		}})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *redisFixture) event(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.events = append(f.events, fmt.Sprintf(format, args...))
}

func (f *redisFixture) Events() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.events...)
}

// waitLeaseGone waits until the message's key has expired.
func (f *redisFixture) waitLeaseGone(t *testing.T, id string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, err := f.client.Exists(context.Background(), f.r.Key(id)).Result()
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the lease did not expire")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (f *redisFixture) value(t *testing.T, id string) string {
	v, err := f.client.Get(context.Background(), f.r.Key(id)).Result()
	if err != nil && err != redis.Nil {
		t.Fatal(err)
	}
	return v
}

// stalledRunner starts a delivery whose handler blocks until resume is
// closed, ignoring its context (a handler stuck in a call without a
// timeout, or a paused process), then applies the effect and returns
// result. It returns once the handler has started.
func (f *redisFixture) stalledRunner(t *testing.T, msg *exactly.Message, result error) (resume chan struct{}, done chan runResult) {
	resume, done = make(chan struct{}), make(chan runResult, 1)
	started := make(chan struct{})
	go func() {
		var ctxErr error
		out, err := f.r.Handle(context.Background(), msg, func(ctx context.Context, _ *exactly.Message) error {
			close(started)
			<-resume
			ctxErr = ctx.Err()
			if result == nil {
				f.effects.Add(1)
			}
			return result
		})
		done <- runResult{out, err, ctxErr}
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the stalled runner did not start")
	}
	return resume, done
}

type runResult struct {
	out    inbox.Outcome
	err    error
	ctxErr error // the handler's context when it resumed
}

// TestRedisLeaseExpiresWhileHandlerRuns documents what happens when a
// handler outlives its lease.
func TestRedisLeaseExpiresWhileHandlerRuns(t *testing.T) {
	t.Parallel()
	const lease = 300 * time.Millisecond
	ctx := context.Background()
	effect := func(f *redisFixture) exactly.Handler {
		return func(context.Context, *exactly.Message) error { f.effects.Add(1); return nil }
	}

	// A second runner claims the expired message and finishes first; the
	// stalled one then finishes too. Both effects are applied: the case
	// the lease exists to make rare, reported, never hidden.
	t.Run("SecondRunnerFinishesFirst", func(t *testing.T) {
		t.Parallel()
		f := newRedisFixture(t, lease)
		msg := &exactly.Message{ID: exactly.NewID()}
		resume, done := f.stalledRunner(t, msg, nil)
		if out, err := f.r.Handle(ctx, msg, effect(f)); !errors.Is(err, inbox.ErrInProgress) || out != inbox.Retry {
			t.Fatalf("while the lease is held: %v, %v; want ErrInProgress", out, err)
		}
		f.waitLeaseGone(t, msg.ID)
		if out, err := f.r.Handle(ctx, msg, effect(f)); err != nil || out != inbox.Processed {
			t.Fatalf("second runner after the lease expired: %v, %v; want processed", out, err)
		}
		close(resume)
		res := <-done
		if res.err != nil || res.out != inbox.Processed {
			t.Fatalf("stalled runner: %v, %v; want processed (its effect is applied)", res.out, res.err)
		}
		if !errors.Is(res.ctxErr, context.DeadlineExceeded) {
			t.Errorf("the stalled handler's context: %v, want it ended with the lease", res.ctxErr)
		}
		if n := f.effects.Load(); n != 2 {
			t.Errorf("effects: %d, want 2 (documented: an overlap applies both)", n)
		}
		st := f.r.Stats()
		if st.LeaseExpired != 1 || st.Overlapped != 1 || st.Processed != 2 || st.InProgress != 1 {
			t.Errorf("stats %+v", st)
		}
		if ev := f.Events(); !slices.Contains(ev, "lease expired "+msg.ID+" overlapped=true") {
			t.Errorf("hooks: %v", ev)
		}
		if out, err := f.r.Handle(ctx, msg, effect(f)); err != nil || out != inbox.Duplicate {
			t.Errorf("later redelivery: %v, %v; want duplicate", out, err)
		}
	})

	// The stalled runner finishes while the second one is still running:
	// it writes the done marker over the second's lease. When the second
	// then fails, its release is a no-op and its retry is a duplicate: the
	// effect is applied once, instead of a third time.
	t.Run("StalledRunnerFinishesFirst", func(t *testing.T) {
		t.Parallel()
		f := newRedisFixture(t, lease)
		msg := &exactly.Message{ID: exactly.NewID()}
		resumeA, doneA := f.stalledRunner(t, msg, nil)
		f.waitLeaseGone(t, msg.ID)
		errB := errors.New("second runner failed")
		resumeB, doneB := f.stalledRunner(t, msg, errB)
		if v := f.value(t, msg.ID); !strings.HasPrefix(v, "lease:") {
			t.Fatalf("key holds %q, want the second runner's lease", v)
		}
		close(resumeA)
		if res := <-doneA; res.err != nil || res.out != inbox.Processed {
			t.Fatalf("stalled runner: %v, %v", res.out, res.err)
		}
		if v := f.value(t, msg.ID); v != "done" {
			t.Fatalf("key holds %q after the stalled runner finished, want the done marker", v)
		}
		close(resumeB)
		if res := <-doneB; !errors.Is(res.err, errB) || res.out != inbox.Retry {
			t.Fatalf("second runner: %v, %v; want its failure", res.out, res.err)
		}
		if v := f.value(t, msg.ID); v != "done" {
			t.Fatalf("the failed runner's release removed the done marker (key holds %q)", v)
		}
		if out, err := f.r.Handle(ctx, msg, effect(f)); err != nil || out != inbox.Duplicate {
			t.Fatalf("retry of the failed runner: %v, %v; want duplicate", out, err)
		}
		if n := f.effects.Load(); n != 1 {
			t.Errorf("effects: %d, want 1", n)
		}
		if st := f.r.Stats(); st.Overlapped != 1 || st.LeaseExpired != 1 {
			t.Errorf("stats %+v", st)
		}
	})

	// Nobody else came while the lease was expired: the marker is written,
	// the expiry reported without an overlap.
	t.Run("NobodyElseCame", func(t *testing.T) {
		t.Parallel()
		f := newRedisFixture(t, lease)
		msg := &exactly.Message{ID: exactly.NewID()}
		resume, done := f.stalledRunner(t, msg, nil)
		f.waitLeaseGone(t, msg.ID)
		close(resume)
		if res := <-done; res.err != nil || res.out != inbox.Processed {
			t.Fatalf("%v, %v", res.out, res.err)
		}
		if out, err := f.r.Handle(ctx, msg, effect(f)); err != nil || out != inbox.Duplicate {
			t.Fatalf("redelivery: %v, %v; want duplicate", out, err)
		}
		if st := f.r.Stats(); st.LeaseExpired != 1 || st.Overlapped != 0 || f.effects.Load() != 1 {
			t.Errorf("stats %+v, effects %d", st, f.effects.Load())
		}
		if ev := f.Events(); !slices.Contains(ev, "lease expired "+msg.ID+" overlapped=false") {
			t.Errorf("hooks: %v", ev)
		}
	})

	// A handler that honours its context stops when the lease ends: a
	// failure, released, retried once, applied once.
	t.Run("HandlerHonoursContext", func(t *testing.T) {
		t.Parallel()
		f := newRedisFixture(t, lease)
		msg := &exactly.Message{ID: exactly.NewID()}
		out, err := f.r.Handle(ctx, msg, func(ctx context.Context, _ *exactly.Message) error {
			<-ctx.Done()
			return ctx.Err()
		})
		if !errors.Is(err, context.DeadlineExceeded) || out != inbox.Retry {
			t.Fatalf("%v, %v; want the handler's deadline error", out, err)
		}
		if out, err := f.r.Handle(ctx, msg, effect(f)); err != nil || out != inbox.Processed {
			t.Fatalf("retry: %v, %v", out, err)
		}
		if st := f.r.Stats(); st.LeaseExpired != 0 || st.Failed != 1 || f.effects.Load() != 1 {
			t.Errorf("stats %+v, effects %d", st, f.effects.Load())
		}
	})
}

// TestRedisInProgress: a copy that arrives while another runner holds the
// lease is refused with ErrInProgress, through Handle, Handler and
// HandleBatch, and becomes a duplicate once the first runner is done.
func TestRedisInProgress(t *testing.T) {
	t.Parallel()
	f := newRedisFixture(t, 10*time.Second)
	ctx := context.Background()
	busy, other := &exactly.Message{ID: exactly.NewID()}, &exactly.Message{ID: exactly.NewID()}
	resume, done := f.stalledRunner(t, busy, nil)
	ran := false
	h := func(context.Context, *exactly.Message) error { ran = true; return nil }
	if err := f.r.Handler(h)(ctx, busy); !errors.Is(err, inbox.ErrInProgress) || !strings.Contains(err.Error(), "lease expires in") {
		t.Errorf("Handler while in progress: %v", err)
	}
	outs, err := f.r.HandleBatch(ctx, []*exactly.Message{busy, other}, func(_ context.Context, fresh []*exactly.Message) error {
		if len(fresh) != 1 || fresh[0] != other {
			t.Errorf("fresh = %v, want only the free message", fresh)
		}
		return nil
	})
	var be *exactly.BatchError
	if !errors.As(err, &be) || !errors.Is(be.Errs[0], inbox.ErrInProgress) || be.Errs[1] != nil {
		t.Errorf("batch: %v, want a BatchError naming the message in progress", err)
	}
	if outs[0] != inbox.Retry || outs[1] != inbox.Processed {
		t.Errorf("batch outcomes %v", outs)
	}
	if ran {
		t.Error("the handler ran for a message in progress")
	}
	close(resume)
	if res := <-done; res.err != nil || res.out != inbox.Processed {
		t.Fatal(res.out, res.err)
	}
	if err := f.r.Handler(h)(ctx, busy); err != nil || ran {
		t.Errorf("after the first runner finished: %v (ran %v), want a silent duplicate", err, ran)
	}
	if st := f.r.Stats(); st.InProgress != 2 || st.Duplicates != 1 {
		t.Errorf("stats %+v", st)
	}
}

// TestRedisStoreFailures: Redis down at the claim means the handler does
// not run; Redis gone after the effect still reports the effect as
// processed (acknowledging it is what prevents a redelivery) and says the
// marker is missing.
func TestRedisStoreFailures(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	down := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialTimeout: 200 * time.Millisecond})
	defer down.Close()
	var failed atomic.Int64
	r, err := inbox.NewRedis(down, inbox.RedisConfig{Consumer: "c", Hooks: inbox.Hooks{
		Failed: func(*exactly.Message, error) { failed.Add(1) },
	}})
	if err != nil {
		t.Fatal(err)
	}
	ran := false
	out, err := r.Handle(ctx, &exactly.Message{ID: "m"}, func(context.Context, *exactly.Message) error { ran = true; return nil })
	if err == nil || out != inbox.Retry || ran || !strings.Contains(err.Error(), "claim message m") || failed.Load() != 1 {
		t.Errorf("Redis down: %v, %v, ran %v, failed hook %d", out, err, ran, failed.Load())
	}

	testenv.Need(t, testenv.Redis)
	lost := redis.NewClient(&redis.Options{Addr: testenv.Redis.Addr, MaxRetries: -1})
	f := newRedisFixture(t, time.Minute)
	r2, err := inbox.NewRedis(lost, inbox.RedisConfig{Prefix: strings.TrimSuffix(f.r.Key(""), "c:"), Consumer: "c",
		Hooks: inbox.Hooks{MarkFailed: func(m *exactly.Message, err error) { f.event("mark failed %s", m.ID) }}})
	if err != nil {
		t.Fatal(err)
	}
	msg := &exactly.Message{ID: exactly.NewID()}
	out, err = r2.Handle(ctx, msg, func(context.Context, *exactly.Message) error {
		f.effects.Add(1)
		return lost.Close() // the connection to Redis is gone before the marker
	})
	if err != nil || out != inbox.Processed {
		t.Errorf("marker not written: %v, %v; want processed", out, err)
	}
	if st := r2.Stats(); st.MarkFailed != 1 || st.Processed != 1 {
		t.Errorf("stats %+v", st)
	}
	if ev := f.Events(); !slices.Contains(ev, "mark failed "+msg.ID) {
		t.Errorf("hooks: %v", ev)
	}
	if v := f.value(t, msg.ID); !strings.HasPrefix(v, "lease:") {
		t.Errorf("key holds %q, want the lease left to expire", v)
	}
}
