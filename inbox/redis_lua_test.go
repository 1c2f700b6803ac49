package inbox_test

import (
	"context"
	"errors"
	"regexp"
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

// oldRedis makes a client behave as if its server were older than 7.0: it
// answers "ERR syntax error" to SET with both NX and GET (Redis 6.2) or, if
// noGet, to SET with GET at all (Redis 6.0 and before), without sending the
// command, as those servers refuse it without writing anything. Scripts
// pass: their SETs run on the server, out of the hook's sight.
type oldRedis struct {
	noGet   bool
	refused atomic.Int64
}

type syntaxError struct{}

func (syntaxError) Error() string { return "ERR syntax error" }
func (syntaxError) RedisError()   {}

func (o *oldRedis) refuse(cmd redis.Cmder) bool {
	args := cmd.Args()
	if len(args) == 0 || !strings.EqualFold(cmd.Name(), "set") {
		return false
	}
	var nx, get bool
	for _, a := range args[3:] {
		s, _ := a.(string)
		nx = nx || strings.EqualFold(s, "nx")
		get = get || strings.EqualFold(s, "get")
	}
	if get && (nx || o.noGet) {
		o.refused.Add(1)
		cmd.SetErr(syntaxError{})
		return true
	}
	return false
}

func (o *oldRedis) DialHook(next redis.DialHook) redis.DialHook { return next }

func (o *oldRedis) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if o.refuse(cmd) {
			return cmd.Err()
		}
		return next(ctx, cmd)
	}
}

func (o *oldRedis) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		pass := make([]redis.Cmder, 0, len(cmds))
		for _, c := range cmds {
			if !o.refuse(c) {
				pass = append(pass, c)
			}
		}
		if len(pass) == 0 {
			return nil
		}
		return next(ctx, pass)
	}
}

func newOldRedisClient(t *testing.T, noGet bool) (*redis.Client, *oldRedis) {
	c := newRedisClient(t)
	o := &oldRedis{noGet: noGet}
	c.AddHook(o)
	return c, o
}

// TestRedisBefore7 runs the conformance suite against a server that refuses
// SET with NX and GET: the inbox falls back to its Lua scripts.
func TestRedisBefore7(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		noGet bool
	}{{"6.2", false}, {"6.0", true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			client, old := newOldRedisClient(t, tc.noGet)
			exactlytest.RunInboxSuite(t, redisSuiteHarness(client))
			t.Cleanup(func() {
				if old.refused.Load() == 0 {
					t.Error("the server never refused a SET: the fallback was not exercised")
				}
			})
		})
	}
}

// redisSuiteHarness is TestRedis's harness, for a client of its own.
func redisSuiteHarness(client *redis.Client) exactlytest.InboxHarness {
	return exactlytest.InboxHarness{
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
	}
}

var leaseLeft = regexp.MustCompile(`lease expires in ([^)]+)\)`)

// TestRedisKeys checks what the keys hold, and for how long, on the native
// path and on the fallback: the lease (with the lease's expiry) while the
// handler runs, the done marker (with the TTL) after it, the remaining
// lease in the in-progress error; and that the fallback is chosen once.
func TestRedisKeys(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		server string // "7": native; "6.2", "6.0": refused, Lua
	}{{"native", "7"}, {"before7.0", "6.2"}, {"before6.2", "6.0"}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			testenv.Need(t, testenv.Redis)
			client := newRedisClient(t)
			var old *oldRedis
			if tc.server != "7" {
				client, old = newOldRedisClient(t, tc.server == "6.0")
			}
			const lease, ttl = 5 * time.Second, time.Minute
			r, err := inbox.NewRedis(client, inbox.RedisConfig{Prefix: uniquePrefix(t, client), Consumer: "c", Lease: lease, TTL: ttl})
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			pttl := func(id string) time.Duration {
				d, err := client.PTTL(ctx, r.Key(id)).Result()
				if err != nil {
					t.Fatal(err)
				}
				return d
			}
			msg, other := &exactly.Message{ID: exactly.NewID()}, &exactly.Message{ID: exactly.NewID()}
			out, err := r.Handle(ctx, msg, func(ctx context.Context, m *exactly.Message) error {
				v, err := client.Get(ctx, r.Key(m.ID)).Result()
				if err != nil || !strings.HasPrefix(v, "lease:") {
					t.Errorf("while the handler runs the key holds %q, %v; want a lease", v, err)
				}
				if d := pttl(m.ID); d <= lease-2*time.Second || d > lease {
					t.Errorf("the lease expires in %s, want about %s", d, lease)
				}
				// A copy arrives meanwhile, alone and in a batch.
				_, err = r.Handle(ctx, m, func(context.Context, *exactly.Message) error {
					t.Error("the copy ran")
					return nil
				})
				if !errors.Is(err, inbox.ErrInProgress) {
					t.Errorf("copy: %v, want ErrInProgress", err)
				}
				outs, berr := r.HandleBatch(ctx, []*exactly.Message{m, other}, func(_ context.Context, fresh []*exactly.Message) error {
					if len(fresh) != 1 || fresh[0] != other {
						t.Errorf("fresh = %v, want only the free message", fresh)
					}
					return nil
				})
				var be *exactly.BatchError
				if !errors.As(berr, &be) || !errors.Is(be.Errs[0], inbox.ErrInProgress) || outs[0] != inbox.Retry || outs[1] != inbox.Processed {
					t.Errorf("batch while in progress: %v, %v", outs, berr)
				} else {
					err = errors.Join(err, be.Errs[0])
				}
				for _, mm := range leaseLeft.FindAllStringSubmatch(err.Error(), -1) {
					if d, perr := time.ParseDuration(mm[1]); perr != nil || d <= lease-2*time.Second || d > lease {
						t.Errorf("in-progress error %q: want the lease's remaining time, about %s", err, lease)
					}
				}
				if n := len(leaseLeft.FindAllString(err.Error(), -1)); n != 2 {
					t.Errorf("in-progress errors %q: want both to give the remaining lease", err)
				}
				return nil
			})
			if err != nil || out != inbox.Processed {
				t.Fatalf("%v, %v", out, err)
			}
			for _, id := range []string{msg.ID, other.ID} {
				if v, err := client.Get(ctx, r.Key(id)).Result(); err != nil || v != "done" {
					t.Errorf("after the handler the key holds %q, %v; want the done marker", v, err)
				}
				if d := pttl(id); d <= ttl-5*time.Second || d > ttl {
					t.Errorf("the done marker expires in %s, want about %s", d, ttl)
				}
			}
			outs, err := r.HandleBatch(ctx, []*exactly.Message{msg, other, msg}, func(context.Context, []*exactly.Message) error {
				t.Error("the batch of duplicates ran")
				return nil
			})
			if err != nil || outs[0] != inbox.Duplicate || outs[1] != inbox.Duplicate || outs[2] != inbox.Duplicate {
				t.Errorf("redelivered batch: %v, %v", outs, err)
			}
			if st := r.Stats(); st.Processed != 2 || st.InProgress != 2 || st.Duplicates != 3 || st.LeaseExpired != 0 {
				t.Errorf("stats %+v", st)
			}
			if old != nil {
				if n := old.refused.Load(); n != 1 {
					t.Errorf("the server refused %d SETs, want 1: the fallback is chosen once", n)
				}
			}
		})
	}
}
