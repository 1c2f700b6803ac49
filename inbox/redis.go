package inbox

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/exactlyonce/exactly"
)

// Defaults of RedisConfig.
const (
	DefaultRedisPrefix = "exactly:inbox:"
	DefaultLease       = 30 * time.Second
	DefaultTTL         = 7 * 24 * time.Hour
	// MinLease is the shortest lease accepted.
	MinLease = 10 * time.Millisecond
)

// RedisConfig configures a Redis inbox.
type RedisConfig struct {
	// Prefix starts every key: a message's key is Prefix + Consumer + ":" +
	// message ID. Default "exactly:inbox:". Applications sharing a Redis
	// should use prefixes of their own.
	Prefix string
	// Consumer names the consumer whose deliveries this inbox deduplicates,
	// usually its consumer group or durable name. Required; it must not
	// contain ':' (which separates it from the message ID in keys). Two
	// consumers of the same message each apply it once; two consumers that
	// share a name suppress each other's deliveries.
	Consumer string
	// Lease is how long a runner holds a message while its handler runs.
	// Another delivery of the message meanwhile is refused with
	// ErrInProgress, to be retried. Default 30s, minimum 10ms.
	//
	// The handler's context is cancelled when the lease runs out, so a
	// handler that honours its context stops rather than overlap with a
	// second runner. Set it well above the handler's worst-case running
	// time: a handler that outlives its lease may run concurrently with a
	// redelivery, and both effects are then applied (reported by
	// Hooks.LeaseExpired and Stats.Overlapped). Too long a lease only
	// delays the retry of a message whose runner crashed.
	Lease time.Duration
	// TTL is how long the done marker of a processed message is kept.
	// Default 7 days; it must not be shorter than Lease. It must be longer
	// than the broker can redeliver a message (its retention, the longest a
	// consumer can be down before its position is reset, operator replays):
	// a redelivery after the marker expired applies the effect again. Each
	// marker costs memory for TTL.
	TTL time.Duration
	// Hooks report outcomes for metrics. All optional.
	Hooks Hooks
}

// Redis is an inbox that keeps its dedup markers in Redis: a lease while a
// handler runs, then a done marker with a TTL. It suits handlers whose
// effect is outside a database the inbox can share a transaction with (a
// call to another service, a message published elsewhere) or is idempotent
// anyway. It is not exact: see the package documentation for its limits.
type Redis struct {
	observer
	client   redis.UniversalClient
	prefix   string
	leaseDur time.Duration
	leaseMs  int64
	ttlMs    int64
	// lua is set once the server has refused SET with both NX and GET
	// (Redis before 7.0): leases and done markers are then taken and
	// written by Lua scripts instead, which tell the same cases.
	lua atomic.Bool
}

// NewRedis validates cfg. client is a *redis.Client, *redis.ClusterClient,
// a failover client or a ring; single-key commands and scripts only are
// used, so any of them works.
//
// The inbox needs Redis 7.0 or later for its native path (SET with both NX
// and GET). On an older server (6.2 and earlier refuse that SET with a
// syntax error, and write nothing) it switches, the first time a SET is
// refused, to Lua scripts that do the same, at some cost in Redis CPU.
func NewRedis(client redis.UniversalClient, cfg RedisConfig) (*Redis, error) {
	if isNil(client) {
		return nil, errors.New("inbox: nil Redis client")
	}
	if err := checkConsumer(cfg.Consumer); err != nil {
		return nil, err
	}
	if strings.Contains(cfg.Consumer, ":") {
		return nil, fmt.Errorf("inbox: Consumer %q must not contain ':', which separates it from the message ID in keys", cfg.Consumer)
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultRedisPrefix
	}
	switch {
	case cfg.Lease < 0:
		return nil, errors.New("inbox: RedisConfig.Lease must not be negative")
	case cfg.Lease == 0:
		cfg.Lease = DefaultLease
	case cfg.Lease < MinLease:
		return nil, fmt.Errorf("inbox: RedisConfig.Lease %s is below the minimum of %s", cfg.Lease, MinLease)
	}
	switch {
	case cfg.TTL < 0:
		return nil, errors.New("inbox: RedisConfig.TTL must not be negative")
	case cfg.TTL == 0:
		cfg.TTL = DefaultTTL
	case cfg.TTL < cfg.Lease:
		return nil, fmt.Errorf("inbox: RedisConfig.TTL (%s) is shorter than Lease (%s)", cfg.TTL, cfg.Lease)
	}
	return &Redis{
		observer: observer{hooks: cfg.Hooks},
		client:   client,
		prefix:   cfg.Prefix + cfg.Consumer + ":",
		leaseDur: cfg.Lease,
		leaseMs:  ceilMillis(cfg.Lease),
		ttlMs:    ceilMillis(cfg.TTL),
	}, nil
}

func ceilMillis(d time.Duration) int64 { return int64((d + time.Millisecond - 1) / time.Millisecond) }

// Stats returns the running totals since the inbox was created.
func (r *Redis) Stats() Stats { return r.stats.snapshot() }

// Key returns the Redis key that holds the lease or done marker of the
// message with this ID.
func (r *Redis) Key(id string) string { return r.prefix + id }

// The values a key holds: the done marker, or a runner's lease token
// ("lease:" + 128 random bits), which can never equal it.
const (
	doneMarker  = "done"
	leasePrefix = "lease:"
)

func newToken() string { return leasePrefix + rand.Text() }

// The hot path uses native commands, one per message and step:
//
//   - claim: SET key token NX PX lease GET. It writes only when the key is
//     free, and its reply is what the key held: nil when the lease is now
//     ours, the done marker when the message is a duplicate, anything else
//     (another runner's token) when it is in progress elsewhere; a PTTL then
//     tells how long that lease has left, for the error.
//   - done: SET key done PX ttl GET. It writes the marker whatever the key
//     held, and its reply tells what that was: our token (the normal case),
//     nil (our lease expired and nobody claimed the message since), another
//     token (another runner claimed it: overlap) or the done marker (another
//     runner finished first: overlap).
//
// Redis accepts NX together with GET since 7.0. Lua remains for the release
// of a lease on failure (compare the token, then delete), which no native
// command of Redis 7 does atomically, and as the fallback for older servers:
// claimScript and doneScript answer with the codes below.

// Claim outcomes, as claimScript returns them.
const (
	claimDone  = 0  // the message is done: a duplicate
	claimTaken = 1  // the lease is ours
	claimBusy  = -1 // another runner holds the lease
)

// Done outcomes, as doneScript returns them.
const (
	doneAlready  = 0 // another runner had marked it done (overlap)
	doneOurs     = 1 // our lease was still there
	doneExpired  = 2 // our lease had expired, nobody claimed it since
	doneReplaced = 3 // another runner's lease was replaced (overlap)
)

// claimScript takes the lease when the key is free. It returns {1, 0} when
// it did, {0, 0} when the message is done, {-1, pttl} when another runner
// holds it. It is the fallback for servers before 7.0.
var claimScript = redis.NewScript(`
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, 0}
end
if redis.call('GET', KEYS[1]) == ARGV[3] then
  return {0, 0}
end
return {-1, redis.call('PTTL', KEYS[1])}
`)

// doneScript records that the effect is applied. It returns 1 when the
// runner still held its lease, 2 when the lease had expired and nobody had
// claimed the message since, 3 when another runner's lease was replaced
// and 0 when another runner had already marked it done. It is the fallback
// for servers before 7.0; the native SET ... GET tells the same four cases,
// and differs only in the last one, where it rewrites the marker (the same
// value) and so restarts its TTL from this runner's finish: a later expiry,
// never an earlier one.
//
// It writes the marker whenever the message is not already done, not only
// when the lease is still ours: the effect is applied, which is what the
// marker records. Refusing would only make things worse when the other
// runner fails: it would then release the key and its retry would apply the
// effect a third time. With the marker in place the other runner's release
// is a no-op and its retry is a duplicate.
var doneScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v == ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if v == ARGV[1] then
  return 1
end
if not v then
  return 2
end
return 3
`)

// releaseScript deletes the key only if it still holds the runner's lease.
var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
`)

// claim is what the claim of one key came to.
type claim struct {
	code    int64 // claimTaken, claimDone or claimBusy
	pttl    int64 // claimBusy: what PTTL said of the other runner's lease
	pttlErr error // claimBusy: PTTL failed, the lease's remaining time is unknown
	err     error // the claim itself failed
}

// mark is what writing the done marker of one key came to.
type mark struct {
	code int64 // doneOurs, doneExpired, doneReplaced or doneAlready
	err  error
}

// claimAll tries to take the lease on each of keys for token, in one round
// trip (a pipeline when there are several), plus one more for the PTTL of
// the keys found in progress.
func (r *Redis) claimAll(ctx context.Context, keys []string, token string) []claim {
	res := make([]claim, len(keys))
	var viaLua, busy []int
	if r.lua.Load() {
		viaLua = allIndexes(len(keys))
	} else {
		cmds := r.doEach(ctx, keys, func(c doer, key string) *redis.Cmd {
			return c.Do(ctx, "set", key, token, "nx", "px", r.leaseMs, "get")
		})
		for i, c := range cmds {
			v, err := c.Text()
			switch {
			case err == redis.Nil:
				res[i].code = claimTaken
			case r.unsupported(err):
				viaLua = append(viaLua, i)
			case err != nil:
				res[i].err = err
			case v == doneMarker:
				res[i].code = claimDone
			default:
				res[i].code = claimBusy
				busy = append(busy, i)
			}
		}
	}
	if len(busy) > 0 {
		// Only for the messages in progress elsewhere: how long their lease
		// has left, for the error. Not atomic with the claim (the lease may
		// have expired or turned into the done marker in between), which
		// only affects the figure in the message.
		bkeys := pick(keys, busy)
		cmds := r.doEach(ctx, bkeys, func(c doer, key string) *redis.Cmd { return c.Do(ctx, "pttl", key) })
		for j, i := range busy {
			res[i].pttl, res[i].pttlErr = cmds[j].Int64()
		}
	}
	if len(viaLua) > 0 {
		for j, c := range r.runEach(ctx, claimScript, pick(keys, viaLua), token, r.leaseMs, doneMarker) {
			i := viaLua[j]
			v, err := c.Int64Slice()
			if err == nil && (len(v) != 2 || v[0] < claimBusy || v[0] > claimTaken) {
				err = fmt.Errorf("unexpected reply %v", v)
			}
			if err != nil {
				res[i].err = err
				continue
			}
			res[i].code, res[i].pttl = v[0], v[1]
		}
	}
	return res
}

// markAll writes the done marker on each of keys, held by token's leases,
// in one round trip (a pipeline when there are several).
func (r *Redis) markAll(ctx context.Context, keys []string, token string) []mark {
	res := make([]mark, len(keys))
	var viaLua []int
	if r.lua.Load() {
		viaLua = allIndexes(len(keys))
	} else {
		cmds := r.doEach(ctx, keys, func(c doer, key string) *redis.Cmd {
			return c.Do(ctx, "set", key, doneMarker, "px", r.ttlMs, "get")
		})
		for i, c := range cmds {
			v, err := c.Text()
			switch {
			case err == redis.Nil:
				res[i].code = doneExpired
			case r.unsupported(err):
				viaLua = append(viaLua, i)
			case err != nil:
				res[i].err = err
			case v == token:
				res[i].code = doneOurs
			case v == doneMarker:
				res[i].code = doneAlready
			default:
				res[i].code = doneReplaced
			}
		}
	}
	if len(viaLua) > 0 {
		for j, c := range r.runEach(ctx, doneScript, pick(keys, viaLua), token, doneMarker, r.ttlMs) {
			i := viaLua[j]
			res[i].code, res[i].err = c.Int64()
		}
	}
	return res
}

// unsupported reports whether err is the server refusing SET with both NX
// and GET (or with GET at all): Redis before 7.0 (before 6.2) answers "ERR
// syntax error" and writes nothing. The inbox then switches to the Lua
// scripts for good.
func (r *Redis) unsupported(err error) bool {
	var rerr redis.Error
	if err == nil || !errors.As(err, &rerr) || !strings.Contains(strings.ToLower(rerr.Error()), "syntax error") {
		return false
	}
	r.lua.Store(true)
	return true
}

// doer is a client or a pipeline.
type doer interface {
	Do(ctx context.Context, args ...any) *redis.Cmd
}

// doEach sends one command per key: directly for a single key, in one
// pipeline otherwise. Each command carries its own error.
func (r *Redis) doEach(ctx context.Context, keys []string, cmd func(c doer, key string) *redis.Cmd) []*redis.Cmd {
	cmds := make([]*redis.Cmd, len(keys))
	if len(keys) == 1 {
		cmds[0] = cmd(r.client, keys[0])
		return cmds
	}
	_, _ = r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = cmd(p, k)
		}
		return nil
	})
	return cmds
}

// runEach runs script once per key: directly for a single key, with
// evalEach otherwise.
func (r *Redis) runEach(ctx context.Context, script *redis.Script, keys []string, args ...any) []*redis.Cmd {
	if len(keys) == 1 {
		return []*redis.Cmd{script.Run(ctx, r.client, keys, args...)}
	}
	return r.evalEach(ctx, script, keys, args...)
}

func allIndexes(n int) []int {
	idx := make([]int, n)
	for i := range idx {
		idx[i] = i
	}
	return idx
}

func pick(keys []string, idx []int) []string {
	out := make([]string, len(idx))
	for j, i := range idx {
		out[j] = keys[i]
	}
	return out
}

// Handle runs h for msg at most once at a time and, once it succeeded,
// never again for the same ID and consumer while the done marker lives.
//
//   - It takes a lease on the message (SET NX PX Lease GET). A message already
//     done is a Duplicate: h does not run and the error is nil. A message
//     leased by another runner is refused with an error wrapping
//     ErrInProgress: retry it later, never acknowledge it.
//   - h runs with a context that ends when the lease does, or when ctx does.
//   - When h succeeds the done marker replaces the lease, with the TTL, and
//     the outcome is Processed. If the lease had run out meanwhile, the
//     marker is still written (h's effect is applied) and
//     Hooks.LeaseExpired reports it; if another runner had claimed the
//     message in the meantime the effect may have been applied twice,
//     counted in Stats.Overlapped. If the marker cannot be written (Redis
//     unreachable), the outcome is still Processed, since the effect is
//     applied and acknowledging the delivery is what prevents its
//     redelivery; Hooks.MarkFailed reports it.
//   - When h fails, the lease is released (only if still ours) so a retry
//     can run at once, and h's error is returned; the message is never
//     marked done. A panic in h releases the lease the same way and is then
//     re-raised, for the consumer's policy to recover and retry.
//   - A message with an empty ID is refused with ErrNoID; h never runs.
func (r *Redis) Handle(ctx context.Context, msg *exactly.Message, h exactly.Handler) (Outcome, error) {
	if err := checkMessage(msg, 0); err != nil {
		return Retry, err
	}
	if h == nil {
		return Retry, errNilFn
	}
	key, token := r.Key(msg.ID), newToken()
	start := time.Now()
	c := r.claimAll(ctx, []string{key}, token)[0]
	if c.err != nil {
		err := fmt.Errorf("inbox: claim message %s in Redis: %w", msg.ID, c.err)
		r.failed(msg, err)
		return Retry, err
	}
	switch c.code {
	case claimDone:
		r.duplicate(msg)
		return Duplicate, nil
	case claimBusy:
		r.inProgress(msg)
		return Retry, inProgressError(msg.ID, c)
	}

	hctx, cancel := context.WithDeadline(ctx, start.Add(r.leaseDur))
	defer cancel()
	running := true
	defer func() {
		if !running {
			return
		}
		v := recover()
		r.failed(msg, errors.Join(panicError(v), r.release(ctx, []string{key}, token)))
		if v != nil {
			panic(v)
		}
	}()
	err := h(hctx, msg)
	running = false
	if err != nil {
		r.failed(msg, err)
		if rerr := r.release(ctx, []string{key}, token); rerr != nil {
			return Retry, errors.Join(err, rerr)
		}
		return Retry, err
	}
	m := r.markAll(context.WithoutCancel(ctx), []string{key}, token)[0]
	r.markedDone(msg, m, time.Since(start))
	return Processed, nil
}

// Handler wraps h so that it runs through Handle: a duplicate returns nil,
// so the consumer acknowledges it; an error (h's, ErrInProgress, ErrNoID, a
// Redis failure) makes it retry.
func (r *Redis) Handler(h exactly.Handler) exactly.Handler {
	return func(ctx context.Context, msg *exactly.Message) error {
		_, err := r.Handle(ctx, msg, h)
		return err
	}
}

// HandleBatch is the pipelined form of Handle, for throughput: it takes the
// leases of all of msgs in one round trip, runs fn once with the fresh ones
// (each ID once, in input order) and writes their done markers in one more
// round trip (plus one to read the remaining leases of messages found in
// progress, if any). fn's context ends when the leases do.
//
// The batch succeeds or fails as a whole: when fn fails or panics, the
// leases of every fresh message are released and none is marked done, so
// they are all retried, including the ones fn had handled. An fn whose
// effect is not idempotent per message should prefer Handle.
//
// The result has one Outcome per message. Duplicates (already done, or a
// repeat of an ID within msgs) are Duplicate; fresh messages are Processed,
// or Retry when fn failed. Messages leased by another runner, or whose
// claim failed, are Retry. The error is nil when every message may be
// acknowledged, and an *exactly.BatchError otherwise, with one error per
// message that may not (wrapping ErrInProgress for the ones in progress).
// Any message without an ID fails the whole call before anything runs.
func (r *Redis) HandleBatch(ctx context.Context, msgs []*exactly.Message, fn func(ctx context.Context, fresh []*exactly.Message) error) ([]Outcome, error) {
	out := make([]Outcome, len(msgs))
	if fn == nil {
		return out, errNilFn
	}
	for i, m := range msgs {
		if err := checkMessage(m, 0); err != nil {
			return out, fmt.Errorf("inbox: message %d of the batch: %w", i, err)
		}
	}
	if len(msgs) == 0 {
		return out, nil
	}
	errs := make([]error, len(msgs))
	first := map[string]int{} // ID -> index of its first copy
	var uniq []int            // indexes of first copies
	for i, m := range msgs {
		if _, ok := first[m.ID]; !ok {
			first[m.ID] = i
			uniq = append(uniq, i)
		}
	}
	keys := make([]string, len(uniq))
	for j, i := range uniq {
		keys[j] = r.Key(msgs[i].ID)
	}
	token := newToken()
	start := time.Now()
	claims := r.claimAll(ctx, keys, token)
	var fresh []*exactly.Message
	var freshKeys []string
	var freshIdx []int
	for j, i := range uniq {
		m, c := msgs[i], claims[j]
		switch {
		case c.err != nil:
			errs[i] = fmt.Errorf("inbox: claim message %s in Redis: %w", m.ID, c.err)
			r.failed(m, errs[i])
		case c.code == claimDone:
			out[i] = Duplicate
			r.duplicate(m)
		case c.code == claimBusy:
			errs[i] = inProgressError(m.ID, c)
			r.inProgress(m)
		default:
			fresh = append(fresh, m)
			freshKeys = append(freshKeys, keys[j])
			freshIdx = append(freshIdx, i)
		}
	}
	if len(fresh) > 0 {
		if err := r.runBatch(ctx, start, fresh, freshKeys, token, fn); err != nil {
			for _, i := range freshIdx {
				errs[i] = err
			}
		} else {
			marks := r.markAll(context.WithoutCancel(ctx), freshKeys, token)
			took := time.Since(start)
			for k, i := range freshIdx {
				r.markedDone(msgs[i], marks[k], took)
				out[i] = Processed
			}
		}
	}
	for i, m := range msgs {
		if f := first[m.ID]; f != i { // a repeat follows its first copy
			errs[i] = errs[f]
			if out[f].Ack() {
				out[i] = Duplicate
				r.duplicate(m)
			}
		}
	}
	return out, exactly.NewBatchError(errs)
}

// runBatch runs fn under the leases, releasing them when it fails or panics.
func (r *Redis) runBatch(ctx context.Context, start time.Time, fresh []*exactly.Message, keys []string, token string,
	fn func(context.Context, []*exactly.Message) error) (err error) {
	hctx, cancel := context.WithDeadline(ctx, start.Add(r.leaseDur))
	defer cancel()
	running := true
	defer func() {
		if !running {
			return
		}
		v := recover()
		r.failedAll(fresh, errors.Join(panicError(v), r.release(ctx, keys, token)))
		if v != nil {
			panic(v)
		}
	}()
	err = fn(hctx, fresh)
	running = false
	if err != nil {
		r.failedAll(fresh, err)
		if rerr := r.release(ctx, keys, token); rerr != nil {
			return errors.Join(err, rerr)
		}
	}
	return err
}

// evalEach runs script once per key in one pipeline (one key per call, so
// it works on Redis Cluster too), falling back to EVAL for the calls that
// found the script missing from the server's cache.
func (r *Redis) evalEach(ctx context.Context, script *redis.Script, keys []string, args ...any) []*redis.Cmd {
	cmds := make([]*redis.Cmd, len(keys))
	_, _ = r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = script.EvalSha(ctx, p, []string{k}, args...)
		}
		return nil
	})
	var missing []int
	for i, c := range cmds {
		if redis.HasErrorPrefix(c.Err(), "NOSCRIPT") {
			missing = append(missing, i)
		}
	}
	if len(missing) > 0 {
		_, _ = r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, i := range missing {
				cmds[i] = script.Eval(ctx, p, []string{keys[i]}, args...)
			}
			return nil
		})
	}
	return cmds // each command carries its own error
}

// release gives the leases on keys back, where they are still token's, so
// that a retry does not wait for them to expire. It runs even when ctx is
// cancelled (a consumer shutting down).
func (r *Redis) release(ctx context.Context, keys []string, token string) error {
	ctx = context.WithoutCancel(ctx)
	var err error
	for _, c := range r.runEach(ctx, releaseScript, keys, token) {
		if c.Err() != nil {
			err = c.Err()
			break
		}
	}
	if err != nil {
		return fmt.Errorf("inbox: release the lease (it expires by itself after %s): %w", r.leaseDur, err)
	}
	return nil
}

// markedDone reports what writing the done marker of one message came to.
func (r *Redis) markedDone(msg *exactly.Message, m mark, took time.Duration) {
	switch {
	case m.err != nil:
		r.stats.mfd.Add(1)
		if r.hooks.MarkFailed != nil {
			r.hooks.MarkFailed(msg, fmt.Errorf("inbox: mark message %s done in Redis: %w", msg.ID, m.err))
		}
	case m.code == doneExpired, m.code == doneReplaced, m.code == doneAlready:
		overlapped := m.code != doneExpired
		r.stats.leaseExpired.Add(1)
		if overlapped {
			r.stats.overlapped.Add(1)
		}
		if r.hooks.LeaseExpired != nil {
			r.hooks.LeaseExpired(msg, overlapped)
		}
	}
	r.processed(msg, took)
}

func (r *Redis) inProgress(msg *exactly.Message) {
	r.stats.inProgress.Add(1)
	if r.hooks.InProgress != nil {
		r.hooks.InProgress(msg)
	}
}

func inProgressError(id string, c claim) error {
	if c.pttlErr != nil {
		return fmt.Errorf("%w: message %s (its lease's remaining time is unknown: %v)", ErrInProgress, id, c.pttlErr)
	}
	return fmt.Errorf("%w: message %s (its lease expires in %s)", ErrInProgress, id, time.Duration(max(c.pttl, 0))*time.Millisecond)
}
