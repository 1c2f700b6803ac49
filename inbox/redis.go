package inbox

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
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
}

// NewRedis validates cfg. client is a *redis.Client, *redis.ClusterClient,
// a failover client or a ring; single-key commands and scripts only are
// used, so any of them works.
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

// claimScript takes the lease when the key is free. It returns {1, 0} when
// it did, {0, 0} when the message is done, {-1, pttl} when another runner
// holds it.
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
// and 0 when another runner had already marked it done.
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

// Handle runs h for msg at most once at a time and, once it succeeded,
// never again for the same ID and consumer while the done marker lives.
//
//   - It takes a lease on the message (SET NX PX Lease). A message already
//     done is a Duplicate: h does not run and the error is nil. A message
//     leased by another runner is refused with an error wrapping
//     ErrInProgress: retry it later, never acknowledge it.
//   - h runs with a context that ends when the lease does.
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
	res, err := claimScript.Run(ctx, r.client, []string{key}, token, r.leaseMs, doneMarker).Int64Slice()
	if err == nil && len(res) != 2 {
		err = fmt.Errorf("unexpected reply %v", res)
	}
	if err != nil {
		err = fmt.Errorf("inbox: claim message %s in Redis: %w", msg.ID, err)
		r.failed(msg, err)
		return Retry, err
	}
	switch res[0] {
	case 0:
		r.duplicate(msg)
		return Duplicate, nil
	case -1:
		r.inProgress(msg)
		return Retry, inProgressError(msg.ID, res[1])
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
	err = h(hctx, msg)
	running = false
	if err != nil {
		r.failed(msg, err)
		if rerr := r.release(ctx, []string{key}, token); rerr != nil {
			return Retry, errors.Join(err, rerr)
		}
		return Retry, err
	}
	code, err := doneScript.Run(context.WithoutCancel(ctx), r.client, []string{key}, token, doneMarker, r.ttlMs).Int64()
	r.markedDone(msg, code, err, time.Since(start))
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
// round trip. fn's context ends when the leases do.
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
	claims := r.evalEach(ctx, claimScript, keys, token, r.leaseMs, doneMarker)
	var fresh []*exactly.Message
	var freshKeys []string
	var freshIdx []int
	for j, i := range uniq {
		m := msgs[i]
		res, err := claims[j].Int64Slice()
		if err == nil && len(res) != 2 {
			err = fmt.Errorf("unexpected reply %v", res)
		}
		switch {
		case err != nil:
			errs[i] = fmt.Errorf("inbox: claim message %s in Redis: %w", m.ID, err)
			r.failed(m, errs[i])
		case res[0] == 0:
			out[i] = Duplicate
			r.duplicate(m)
		case res[0] == -1:
			errs[i] = inProgressError(m.ID, res[1])
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
			dones := r.evalEach(context.WithoutCancel(ctx), doneScript, freshKeys, token, doneMarker, r.ttlMs)
			took := time.Since(start)
			for k, i := range freshIdx {
				code, err := dones[k].Int64()
				r.markedDone(msgs[i], code, err, took)
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
	if len(keys) == 1 {
		err = releaseScript.Run(ctx, r.client, keys, token).Err()
	} else {
		for _, c := range r.evalEach(ctx, releaseScript, keys, token) {
			if c.Err() != nil {
				err = c.Err()
				break
			}
		}
	}
	if err != nil {
		return fmt.Errorf("inbox: release the lease (it expires by itself after %s): %w", r.leaseDur, err)
	}
	return nil
}

// markedDone reports the result of doneScript for one message.
func (r *Redis) markedDone(msg *exactly.Message, code int64, err error, took time.Duration) {
	switch {
	case err != nil:
		r.stats.mfd.Add(1)
		if r.hooks.MarkFailed != nil {
			r.hooks.MarkFailed(msg, fmt.Errorf("inbox: mark message %s done in Redis: %w", msg.ID, err))
		}
	case code == 2, code == 3, code == 0:
		overlapped := code != 2
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

func inProgressError(id string, pttl int64) error {
	return fmt.Errorf("%w: message %s (its lease expires in %s)", ErrInProgress, id, time.Duration(max(pttl, 0))*time.Millisecond)
}
