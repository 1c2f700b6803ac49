package main

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
	hide "github.com/exactlyonce/exactly/internal/redact"
)

// attemptLog records the runs of the effect under the Redis inbox, and
// what the inbox reported about each message, so that the verdict can tell
// a double application that a documented limit of the Redis store accounts
// for from one that nothing explains. Each promotion row carries the number
// of the run that wrote it. Only the runs that failed or outlived their
// lease are kept (a run that committed in time needs no explaining), so
// the log stays small however many orders the run has.
type attemptLog struct {
	mu           sync.Mutex
	n            int64              // runs begun
	kept         map[int64]*attempt // the runs that failed or outlived their lease
	leaseExpired map[string]int     // by message ID: Hooks.LeaseExpired reports
	markFailed   map[string]int     // by message ID: Hooks.MarkFailed reports
}

// attempt is one run of the effect.
type attempt struct {
	n          int64
	member     string
	start, end time.Time
	deadline   time.Time // when its lease ran out: the handler's context deadline
	err        error     // what the effect returned; nil when it committed
	left       error     // why the member was leaving when it returned (errCrashed, errRebalanced), or nil
}

// leaseOut reports whether the run ended after its lease.
func (a *attempt) leaseOut() bool { return !a.deadline.IsZero() && !a.end.Before(a.deadline) }

func newAttemptLog() *attemptLog {
	return &attemptLog{kept: map[int64]*attempt{}, leaseExpired: map[string]int{}, markFailed: map[string]int{}}
}

func (l *attemptLog) begin(ctx context.Context, member string) *attempt {
	a := &attempt{member: member, start: time.Now()}
	a.deadline, _ = ctx.Deadline()
	l.mu.Lock()
	l.n++
	a.n = l.n
	l.mu.Unlock()
	return a
}

func (l *attemptLog) finish(a *attempt, err, left error) {
	a.end, a.err, a.left = time.Now(), err, left
	if err != nil || a.leaseOut() {
		l.mu.Lock()
		l.kept[a.n] = a
		l.mu.Unlock()
	}
}

func (l *attemptLog) hooks() inbox.Hooks {
	return inbox.Hooks{
		LeaseExpired: func(m *exactly.Message, _ bool) {
			l.mu.Lock()
			l.leaseExpired[m.ID]++
			l.mu.Unlock()
		},
		MarkFailed: func(m *exactly.Message, _ error) {
			l.mu.Lock()
			l.markFailed[m.ID]++
			l.mu.Unlock()
		},
	}
}

// doubleApplication is an order applied more than once, and what let it happen.
type doubleApplication struct {
	order     string
	times     int
	explained bool
	why       string
}

// explain accounts for the orders applied more than once. An order is
// explained when each of its applications but the last is followed by a
// window that the Redis store documents: the run's effect committed but
// its handler returned an error (the effect and the done marker are not
// atomic, and a failed run releases its lease for a retry), its lease ran
// out while it ran (another runner could take the message), or its done
// marker could not be written. The runs are in the order they started.
func (l *attemptLog) explain(apps []application) []doubleApplication {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []doubleApplication
	for i := 0; i < len(apps); {
		j := i
		for j < len(apps) && apps[j].order == apps[i].order {
			j++
		}
		d := doubleApplication{order: apps[i].order, times: j - i, explained: true}
		var whys []string
		for _, app := range apps[i : j-1] {
			why, ok := l.why(app)
			whys = append(whys, why)
			d.explained = d.explained && ok
		}
		d.why = strings.Join(whys, "; ")
		out = append(out, d)
		i = j
	}
	return out
}

// why says what let another run apply the effect again after app's.
func (l *attemptLog) why(app application) (string, bool) {
	if app.attempt < 1 || app.attempt > l.n {
		return fmt.Sprintf("a promotion by %s of no recorded run: unexplained", app.member), false
	}
	run := fmt.Sprintf("run %d (%s)", app.attempt, app.member)
	a := l.kept[app.attempt]
	if a != nil {
		run = fmt.Sprintf("run %d (%s, %s after the claim)", a.n, a.member, a.end.Sub(a.start).Round(time.Millisecond))
	}
	switch {
	case a != nil && a.err != nil:
		cause := ""
		switch {
		case a.leaseOut():
			cause = " as its lease ran out"
		case a.left != nil:
			cause = fmt.Sprintf(" as its member stopped (%v)", a.left)
		}
		return fmt.Sprintf("%s committed, yet its commit returned %q%s: the inbox released the lease and a retry applied it again", run, a.err, cause), true
	case a != nil && a.leaseOut(), l.leaseExpired[app.event] > 0:
		return fmt.Sprintf("%s outlived its lease, so another runner took the message", run), true
	case l.markFailed[app.event] > 0:
		return fmt.Sprintf("%s could not write its done marker", run), true
	}
	return fmt.Sprintf("%s committed within its lease and was marked done: unexplained", run), false
}

// applyThroughRedis applies m's promotion through the Redis inbox, in a
// transaction of its own, and records the run in attempts. ctx is the
// member's: it ends when the member leaves the group.
//
// The transaction does not end with the member: a commit cut short by it
// may still complete at the server (pgx gives up on the reply, the server
// commits), and the inbox, told that the effect failed, would release the
// lease so that the redelivery applies it again. The Redis inbox cannot
// share the effect's transaction, so the effect must know its own outcome:
// it runs to its end, bounded by the lease alone, after which a second
// runner may take the message anyway (the limit the Redis store documents).
func (d *demoDB) applyThroughRedis(ctx context.Context, in *inbox.Redis, attempts *attemptLog, m *exactly.Message, member string) (inbox.Outcome, error) {
	return in.Handle(ctx, m, func(hctx context.Context, m *exactly.Message) error {
		tctx, cancel := context.WithoutCancel(hctx), context.CancelFunc(func() {})
		if deadline, ok := hctx.Deadline(); ok {
			tctx, cancel = context.WithDeadline(tctx, deadline)
		}
		defer cancel()
		a := attempts.begin(tctx, member)
		err := d.inTx(tctx, func(tx *sql.Tx) error { return d.applyPromotion(tctx, tx, m, member, a.n) })
		var left error
		if ctx.Err() != nil {
			left = context.Cause(ctx)
		}
		attempts.finish(a, err, left)
		return err
	})
}

// inTx runs fn in a transaction of its own and commits it.
func (d *demoDB) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}

// openRedis connects to redis://... or host:port and pings it.
func openRedis(ctx context.Context, addr string) (*redis.Client, error) {
	var opts *redis.Options
	if strings.Contains(addr, "://") {
		var err error
		if opts, err = redis.ParseURL(addr); err != nil {
			return nil, fmt.Errorf("--redis: invalid URL %s: %s", hide.String(addr), scrub(err, addr))
		}
	} else {
		opts = &redis.Options{Addr: addr}
	}
	opts.DialTimeout = 5 * time.Second
	opts.MaxRetries = 1
	rc := redis.NewClient(opts)
	if err := rc.Ping(ctx).Err(); err != nil {
		rc.Close()
		return nil, fmt.Errorf("--redis: cannot reach Redis at %s: %s", hide.String(addr), scrub(err, addr))
	}
	return rc, nil
}

// deleteRedisKeys removes the run's inbox markers.
func deleteRedisKeys(rc *redis.Client, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	iter := rc.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	var keys []string
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
		if len(keys) == 500 {
			rc.Unlink(ctx, keys...)
			keys = keys[:0]
		}
	}
	if len(keys) > 0 {
		rc.Unlink(ctx, keys...)
	}
}
