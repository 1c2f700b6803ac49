package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/redis/go-redis/v9"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/inbox"
)

// keyRoot starts every Redis key the benchmark writes.
const keyRoot = "exactlybench:inbox:"

// consumer is the inbox consumer name of every row.
const consumer = "bench"

// rowCtx is what one run of a row owns: its schema and its key prefix.
type rowCtx struct {
	id      string
	schema  string // holds the effect table and the inbox table
	prefix  string // every Redis key of the run starts with it
	profile bool
	noPG    bool // a Redis-only row: no schema
	lua     bool // the inbox runs on the client that refuses SET NX GET
	// refused0 is how many SETs that client had refused when the row's
	// inbox was made.
	refused0 int64
}

func (rc *rowCtx) effect() string     { return rc.schema + ".effect" }
func (rc *rowCtx) inboxTable() string { return rc.schema + ".inbox" }

// redisKey is the key the Redis inbox uses for id, and the one the SET NX
// ceilings write: the same length, the same value.
func (rc *rowCtx) redisKey(id string) string { return rc.prefix + consumer + ":" + id }

// setup creates the row's schema: the effect table (what a handler writes,
// a typical append-only business table) and the inbox table, through the
// inbox's own migrations. Then a CHECKPOINT, so that no row pays for the
// previous row's dirty pages.
func (b *bench) setup(ctx context.Context, rc *rowCtx) error {
	if rc.noPG {
		return b.cleanupRedis(ctx, rc.prefix+"*")
	}
	stmts := []string{
		"DROP SCHEMA IF EXISTS " + rc.schema + " CASCADE",
		"CREATE SCHEMA " + rc.schema,
		"CREATE TABLE " + rc.effect() + ` (
			id         bigserial PRIMARY KEY,
			msg_id     text NOT NULL,
			msg_key    text NOT NULL,
			payload    bytea NOT NULL,
			created_at timestamptz NOT NULL DEFAULT now())`,
	}
	for _, s := range stmts {
		if _, err := b.pool.Exec(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	ib, err := b.sqlInbox(rc)
	if err != nil {
		return err
	}
	if err := ib.Migrate(ctx, b.pool); err != nil {
		return err
	}
	if err := b.cleanupRedis(ctx, rc.prefix+"*"); err != nil {
		return err
	}
	_, err = b.pool.Exec(ctx, "CHECKPOINT")
	return err
}

func (b *bench) cleanup(ctx context.Context, rc *rowCtx) error {
	if rc.noPG {
		return b.cleanupRedis(ctx, rc.prefix+"*")
	}
	_, err := b.pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+rc.schema+" CASCADE")
	return errors.Join(err, b.cleanupRedis(ctx, rc.prefix+"*"))
}

// cleanupRedis unlinks every key matching pattern.
func (b *bench) cleanupRedis(ctx context.Context, pattern string) error {
	it := b.rdb.Scan(ctx, 0, pattern, 1000).Iterator()
	var keys []string
	for it.Next(ctx) {
		keys = append(keys, it.Val())
		if len(keys) == 1000 {
			if err := b.rdb.Unlink(ctx, keys...).Err(); err != nil {
				return err
			}
			keys = keys[:0]
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	if len(keys) > 0 {
		return b.rdb.Unlink(ctx, keys...).Err()
	}
	return nil
}

// countRedis counts the keys matching pattern.
func (b *bench) countRedis(ctx context.Context, pattern string) (int, error) {
	it := b.rdb.Scan(ctx, 0, pattern, 1000).Iterator()
	n := 0
	for it.Next(ctx) {
		n++
	}
	return n, it.Err()
}

func (b *bench) sqlInbox(rc *rowCtx) (*inbox.SQL, error) {
	return inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Table: rc.inboxTable(), Consumer: consumer})
}

func (b *bench) redisInbox(rc *rowCtx) (*inbox.Redis, error) {
	// The prefix makes the keys of each run fresh; the TTL matches the
	// ceiling's EX 3600.
	client := b.rdb
	if rc.lua {
		client = b.rdbOld
		rc.refused0 = b.old.refused.Load()
	}
	return inbox.NewRedis(client, inbox.RedisConfig{Prefix: rc.prefix, Consumer: consumer, TTL: time.Hour})
}

// oldServer is a client hook that answers "ERR syntax error" to SET with
// both NX and GET, without sending it, as Redis before 7.0 does (and
// writes nothing): the Redis inbox then falls back to its Lua scripts.
type oldServer struct {
	refused atomic.Int64
}

type syntaxError struct{}

func (syntaxError) Error() string { return "ERR syntax error" }
func (syntaxError) RedisError()   {}

func (o *oldServer) refuse(cmd redis.Cmder) bool {
	if cmd.Name() != "set" {
		return false
	}
	var nx, get bool
	for _, a := range cmd.Args()[1:] {
		if s, ok := a.(string); ok {
			nx = nx || strings.EqualFold(s, "nx")
			get = get || strings.EqualFold(s, "get")
		}
	}
	if nx && get {
		o.refused.Add(1)
		cmd.SetErr(syntaxError{})
		return true
	}
	return false
}

func (o *oldServer) DialHook(next redis.DialHook) redis.DialHook { return next }

func (o *oldServer) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if o.refuse(cmd) {
			return cmd.Err()
		}
		return next(ctx, cmd)
	}
}

func (o *oldServer) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		pass := cmds[:0:0]
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

// timed runs the measured section: CPU meter around it, and a CPU profile
// when asked for.
func (b *bench) timed(ctx context.Context, rc *rowCtx, fn func(ctx context.Context) error) (time.Duration, string, error) {
	if rc.profile {
		f, err := os.Create(filepath.Join(b.cfg.profileDir, rc.id+".pprof"))
		if err != nil {
			return 0, "", err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return 0, "", err
		}
		defer pprof.StopCPUProfile()
	}
	before := b.sampleCPU()
	start := time.Now()
	err := fn(ctx)
	elapsed := time.Since(start)
	after := b.sampleCPU()
	return elapsed, cpuNote(before, after, runtime.NumCPU()), err
}

// eachMessage runs fn for every message on -workers goroutines, which take
// the next message from a shared counter.
func (b *bench) eachMessage(ctx context.Context, msgs []*exactly.Message, fn func(ctx context.Context, m *exactly.Message) error) error {
	return b.parallel(ctx, len(msgs), 1, func(ctx context.Context, lo, hi int) error {
		return fn(ctx, msgs[lo])
	})
}

// eachBatch runs fn for every batch of -batch messages, the same way.
func (b *bench) eachBatch(ctx context.Context, msgs []*exactly.Message, fn func(ctx context.Context, ms []*exactly.Message) error) error {
	return b.parallel(ctx, len(msgs), b.cfg.batch, func(ctx context.Context, lo, hi int) error {
		return fn(ctx, msgs[lo:hi])
	})
}

func (b *bench) parallel(ctx context.Context, n, step int, fn func(ctx context.Context, lo, hi int) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range b.cfg.workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				lo := int(next.Add(int64(step))) - step
				if lo >= n {
					return
				}
				if err := fn(ctx, lo, min(lo+step, n)); err != nil {
					cancel(err)
					return
				}
			}
		})
	}
	wg.Wait()
	return context.Cause(ctx)
}

// execer is a pgx pool or transaction.
type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// insertOne is the handler's effect: one row per message.
func insertOne(ctx context.Context, db execer, rc *rowCtx, m *exactly.Message) error {
	_, err := db.Exec(ctx, "INSERT INTO "+rc.effect()+" (msg_id, msg_key, payload) VALUES ($1, $2, $3)", m.ID, m.Key, m.Payload)
	return err
}

// insertMany is the batched handler's effect: the same rows, one statement.
func insertMany(ctx context.Context, db execer, rc *rowCtx, ms []*exactly.Message) error {
	ids, keys, payloads := make([]string, len(ms)), make([]string, len(ms)), make([][]byte, len(ms))
	for i, m := range ms {
		ids[i], keys[i], payloads[i] = m.ID, m.Key, m.Payload
	}
	_, err := db.Exec(ctx, "INSERT INTO "+rc.effect()+" (msg_id, msg_key, payload) SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])", ids, keys, payloads)
	return err
}

// txOne is the per-message handler without dedup: BEGIN; INSERT; COMMIT.
func (b *bench) txOne(ctx context.Context, rc *rowCtx, m *exactly.Message) error {
	tx, err := b.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after Commit
	if err := insertOne(ctx, tx, rc, m); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// txMany is the batched handler without dedup: BEGIN; INSERT n; COMMIT.
func (b *bench) txMany(ctx context.Context, rc *rowCtx, ms []*exactly.Message) error {
	tx, err := b.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after Commit
	if err := insertMany(ctx, tx, rc, ms); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// checkEffects verifies that the effect table holds one row per message.
func (b *bench) checkEffects(ctx context.Context, rc *rowCtx, want int) error {
	var rowsN, distinct int
	if err := b.pool.QueryRow(ctx, "SELECT count(*), count(DISTINCT msg_id) FROM "+rc.effect()).Scan(&rowsN, &distinct); err != nil {
		return err
	}
	if rowsN != want || distinct != want {
		return fmt.Errorf("effect table holds %d rows (%d distinct messages), want %d", rowsN, distinct, want)
	}
	return nil
}

func (b *bench) countInbox(ctx context.Context, rc *rowCtx) (int, error) {
	var n int
	err := b.pool.QueryRow(ctx, "SELECT count(*) FROM "+rc.inboxTable()).Scan(&n)
	return n, err
}

func (b *bench) redeliverN() int { return min(b.cfg.redeliver, b.cfg.n) }

// --- ceilings ---

func runInsert(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachMessage(ctx, b.msgs, func(ctx context.Context, m *exactly.Message) error {
			return insertOne(ctx, b.pool, rc, m)
		})
	})
	if err == nil {
		err = b.checkEffects(ctx, rc, len(b.msgs))
	}
	return result{msgs: len(b.msgs), elapsed: el, note: fmt.Sprintf("%d workers; %s", b.cfg.workers, cpu)}, err
}

func runInsertBatch(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachBatch(ctx, b.msgs, func(ctx context.Context, ms []*exactly.Message) error {
			return insertMany(ctx, b.pool, rc, ms)
		})
	})
	if err == nil {
		err = b.checkEffects(ctx, rc, len(b.msgs))
	}
	return result{msgs: len(b.msgs), elapsed: el, note: fmt.Sprintf("INSERT … SELECT FROM unnest($1,$2,$3); %d workers; %s", b.cfg.workers, cpu)}, err
}

func runSetNX(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachMessage(ctx, b.msgs, func(ctx context.Context, m *exactly.Message) error {
			ok, err := b.rdb.SetNX(ctx, rc.redisKey(m.ID), "done", time.Hour).Result()
			if err == nil && !ok {
				err = fmt.Errorf("SET NX of fresh key %s refused", rc.redisKey(m.ID))
			}
			return err
		})
	})
	return b.redisResult(ctx, rc, el, fmt.Sprintf("%d workers; %s", b.cfg.workers, cpu), err)
}

func runSetNXPipe(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachBatch(ctx, b.msgs, func(ctx context.Context, ms []*exactly.Message) error {
			cmds := make([]*redis.BoolCmd, len(ms))
			_, err := b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
				for i, m := range ms {
					cmds[i] = p.SetNX(ctx, rc.redisKey(m.ID), "done", time.Hour)
				}
				return nil
			})
			if err != nil {
				return err
			}
			for i, c := range cmds {
				if !c.Val() {
					return fmt.Errorf("SET NX of fresh key %s refused", rc.redisKey(ms[i].ID))
				}
			}
			return nil
		})
	})
	return b.redisResult(ctx, rc, el, fmt.Sprintf("%d workers, pipelines of %d; %s", b.cfg.workers, b.cfg.batch, cpu), err)
}

// runRedisFloor sends, per batch, the two writes per message the Redis
// inbox sends (the lease, then the done marker, with the same arguments),
// as two pipelines, and checks the replies as simply as possible: the least
// a lease-then-mark design costs in Redis and in the client library.
func runRedisFloor(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	const lease, ttl = int64(30_000), int64(3_600_000) // the inbox's DefaultLease, row 5's TTL
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachBatch(ctx, b.msgs, func(ctx context.Context, ms []*exactly.Message) error {
			token := "lease:" + rand.Text()
			cmds := make([]*redis.Cmd, len(ms))
			if _, err := b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
				for i, m := range ms {
					cmds[i] = p.Do(ctx, "set", rc.redisKey(m.ID), token, "nx", "px", lease, "get")
				}
				return nil
			}); err != nil && err != redis.Nil {
				return err
			}
			for i, c := range cmds {
				if c.Err() != redis.Nil {
					return fmt.Errorf("lease on fresh key %s: %v", rc.redisKey(ms[i].ID), c.Err())
				}
			}
			if _, err := b.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
				for i, m := range ms {
					cmds[i] = p.Do(ctx, "set", rc.redisKey(m.ID), "done", "px", ttl, "get")
				}
				return nil
			}); err != nil {
				return err
			}
			for i, c := range cmds {
				if v, err := c.Text(); err != nil || v != token {
					return fmt.Errorf("done marker on %s replaced %q (%v), want the lease", rc.redisKey(ms[i].ID), v, err)
				}
			}
			return nil
		})
	})
	return b.redisResult(ctx, rc, el, fmt.Sprintf("%d workers, two pipelines of %d per batch; %s", b.cfg.workers, b.cfg.batch, cpu), err)
}

// redisResult checks that every message left one key.
func (b *bench) redisResult(ctx context.Context, rc *rowCtx, el time.Duration, note string, err error) (result, error) {
	res := result{msgs: len(b.msgs), elapsed: el, note: note}
	if err != nil {
		return res, err
	}
	n, err := b.countRedis(ctx, rc.prefix+"*")
	if err == nil && n != len(b.msgs) {
		err = fmt.Errorf("%d keys in Redis, want %d", n, len(b.msgs))
	}
	return res, err
}

// --- SQL: baselines and the inbox ---

func runTx(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachMessage(ctx, b.msgs, func(ctx context.Context, m *exactly.Message) error {
			return b.txOne(ctx, rc, m)
		})
	})
	if err == nil {
		err = b.checkEffects(ctx, rc, len(b.msgs))
	}
	return result{msgs: len(b.msgs), elapsed: el, note: fmt.Sprintf("%d workers; %s", b.cfg.workers, cpu)}, err
}

func runTxBatch(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachBatch(ctx, b.msgs, func(ctx context.Context, ms []*exactly.Message) error {
			return b.txMany(ctx, rc, ms)
		})
	})
	if err == nil {
		err = b.checkEffects(ctx, rc, len(b.msgs))
	}
	return result{msgs: len(b.msgs), elapsed: el, note: fmt.Sprintf("%d workers; %s", b.cfg.workers, cpu)}, err
}

// runClaimFloor is the least a batched dedup can add to row 3b: the same
// transaction plus one multi-row INSERT of the batch's ids into a table
// whose only index is the unique key on them (no consumer column, no
// timestamp, no second index, no ON CONFLICT, no RETURNING).
func runClaimFloor(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	return claimFloor(ctx, b, rc, "(id varchar(128) PRIMARY KEY)", "", "(id) SELECT unnest($1::text[])", "INSERT INTO claim_floor (id) SELECT unnest($1)")
}

// runClaimShape is row 3f into a table of the inbox's own shape (the
// columns, the primary key on (consumer, id) and the second index on
// (consumer, processed_at), COLLATE "C" as migration 2 leaves them), still
// a plain INSERT with no ON CONFLICT and no RETURNING: what the table's
// shape costs beyond the floor's one-column table, apart from what the
// inbox's statement adds to it.
func runClaimShape(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	return claimFloor(ctx, b, rc,
		`(consumer varchar(128) COLLATE "C" NOT NULL, id varchar(128) COLLATE "C" NOT NULL, processed_at bigint NOT NULL, PRIMARY KEY (consumer, id))`,
		"(consumer, processed_at)",
		"(consumer, id, processed_at) SELECT 'bench', unnest($1::text[]), (extract(epoch from now()) * 1000)::bigint",
		"INSERT INTO claim_floor (consumer, id, processed_at) SELECT 'bench', unnest($1), now, on the inbox's table shape and indexes")
}

func claimFloor(ctx context.Context, b *bench, rc *rowCtx, columns, index, insert, what string) (result, error) {
	floor := rc.schema + ".claim_floor"
	if _, err := b.pool.Exec(ctx, "CREATE TABLE "+floor+" "+columns); err != nil {
		return result{}, err
	}
	if index != "" {
		if _, err := b.pool.Exec(ctx, "CREATE INDEX ON "+floor+" "+index); err != nil {
			return result{}, err
		}
	}
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachBatch(ctx, b.msgs, func(ctx context.Context, ms []*exactly.Message) error {
			tx, err := b.pool.Begin(ctx)
			if err != nil {
				return err
			}
			defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after Commit
			ids := make([]string, len(ms))
			for i, m := range ms {
				ids[i] = m.ID
			}
			if _, err := tx.Exec(ctx, "INSERT INTO "+floor+" "+insert, ids); err != nil {
				return err
			}
			if err := insertMany(ctx, tx, rc, ms); err != nil {
				return err
			}
			return tx.Commit(ctx)
		})
	})
	if err == nil {
		err = b.checkEffects(ctx, rc, len(b.msgs))
	}
	if err == nil {
		var n int
		if err = b.pool.QueryRow(ctx, "SELECT count(*) FROM "+floor).Scan(&n); err == nil && n != len(b.msgs) {
			err = fmt.Errorf("%s holds %d ids, want %d", floor, n, len(b.msgs))
		}
	}
	return result{msgs: len(b.msgs), elapsed: el, note: fmt.Sprintf("%s, then row 3b's INSERT; %d workers; %s", what, b.cfg.workers, cpu)}, err
}

func runSQLInbox(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	ib, err := b.sqlInbox(rc)
	if err != nil {
		return result{}, err
	}
	handle := func(ctx context.Context, m *exactly.Message) (inbox.Outcome, error) {
		return ib.HandlePgx(ctx, b.pool, m, func(ctx context.Context, tx pgx.Tx) error {
			return insertOne(ctx, tx, rc, m)
		})
	}
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachMessage(ctx, b.msgs, func(ctx context.Context, m *exactly.Message) error {
			o, err := handle(ctx, m)
			if err == nil && o != inbox.Processed {
				err = fmt.Errorf("message %s: %s, want processed", m.ID, o)
			}
			return err
		})
	})
	res := result{msgs: len(b.msgs), elapsed: el}
	if err != nil {
		return res, err
	}
	// Redeliver some (untimed): every one must be a duplicate.
	again := b.msgs[:b.redeliverN()]
	err = b.eachMessage(ctx, again, func(ctx context.Context, m *exactly.Message) error {
		o, err := handle(ctx, m)
		if err == nil && o != inbox.Duplicate {
			err = fmt.Errorf("redelivery of %s: %s, want duplicate", m.ID, o)
		}
		return err
	})
	res.note, err = b.sqlInboxNote(ctx, rc, ib, len(again), err)
	res.note += "; " + fmt.Sprintf("%d workers; %s", b.cfg.workers, cpu)
	return res, err
}

func runSQLInboxBatch(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	ib, err := b.sqlInbox(rc)
	if err != nil {
		return result{}, err
	}
	handle := func(ctx context.Context, ms []*exactly.Message, want inbox.Outcome) error {
		out, err := ib.HandleBatchPgx(ctx, b.pool, ms, func(ctx context.Context, tx pgx.Tx, fresh []*exactly.Message) error {
			return insertMany(ctx, tx, rc, fresh)
		})
		if err != nil {
			return err
		}
		for i, o := range out {
			if o != want {
				return fmt.Errorf("message %s: %s, want %s", ms[i].ID, o, want)
			}
		}
		return nil
	}
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachBatch(ctx, b.msgs, func(ctx context.Context, ms []*exactly.Message) error {
			return handle(ctx, ms, inbox.Processed)
		})
	})
	res := result{msgs: len(b.msgs), elapsed: el}
	if err != nil {
		return res, err
	}
	again := b.msgs[:b.redeliverN()]
	err = b.eachBatch(ctx, again, func(ctx context.Context, ms []*exactly.Message) error {
		return handle(ctx, ms, inbox.Duplicate)
	})
	res.note, err = b.sqlInboxNote(ctx, rc, ib, len(again), err)
	res.note += "; " + fmt.Sprintf("%d workers; %s", b.cfg.workers, cpu)
	return res, err
}

// sqlInboxNote checks the effect and inbox tables and the inbox's stats
// after the redelivery.
func (b *bench) sqlInboxNote(ctx context.Context, rc *rowCtx, ib *inbox.SQL, again int, err error) (string, error) {
	if err != nil {
		return "", fmt.Errorf("redelivery: %w", err)
	}
	if err := b.checkEffects(ctx, rc, len(b.msgs)); err != nil {
		return "", fmt.Errorf("after the redelivery: %w", err)
	}
	n, err := b.countInbox(ctx, rc)
	if err != nil {
		return "", err
	}
	st := ib.Stats()
	if n != len(b.msgs) || st.Processed != int64(len(b.msgs)) || st.Duplicates != int64(again) {
		return "", fmt.Errorf("inbox holds %d rows, stats processed %d duplicates %d; want %d, %d, %d",
			n, st.Processed, st.Duplicates, len(b.msgs), len(b.msgs), again)
	}
	return fmt.Sprintf("checked: %d effect rows, %d inbox rows; %d redelivered (untimed): all duplicates, no effect applied twice",
		len(b.msgs), n, again), nil
}

// --- Redis inbox ---

func runRedisTx(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	return b.redisPerMessage(ctx, rc, func(ctx context.Context, m *exactly.Message) error { return b.txOne(ctx, rc, m) }, true)
}

func runRedisMem(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	var counter atomic.Int64
	res, err := b.redisPerMessage(ctx, rc, func(ctx context.Context, m *exactly.Message) error {
		counter.Add(1)
		return nil
	}, false)
	if err == nil && counter.Load() != int64(len(b.msgs)) {
		err = fmt.Errorf("counter is %d, want %d", counter.Load(), len(b.msgs))
	}
	return res, err
}

func (b *bench) redisPerMessage(ctx context.Context, rc *rowCtx, effect exactly.Handler, inSQL bool) (result, error) {
	ib, err := b.redisInbox(rc)
	if err != nil {
		return result{}, err
	}
	handle := func(ctx context.Context, m *exactly.Message, want inbox.Outcome) error {
		o, err := ib.Handle(ctx, m, effect)
		if err == nil && o != want {
			err = fmt.Errorf("message %s: %s, want %s", m.ID, o, want)
		}
		return err
	}
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachMessage(ctx, b.msgs, func(ctx context.Context, m *exactly.Message) error {
			return handle(ctx, m, inbox.Processed)
		})
	})
	res := result{msgs: len(b.msgs), elapsed: el}
	if err != nil {
		return res, err
	}
	again := b.msgs[:b.redeliverN()]
	err = b.eachMessage(ctx, again, func(ctx context.Context, m *exactly.Message) error {
		return handle(ctx, m, inbox.Duplicate)
	})
	res.note, err = b.redisInboxNote(ctx, rc, ib, len(again), inSQL, err)
	res.note += "; " + fmt.Sprintf("%d workers; %s", b.cfg.workers, cpu)
	return res, err
}

func runRedisBatchMem(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	var counter atomic.Int64
	res, err := b.redisBatch(ctx, rc, func(ctx context.Context, fresh []*exactly.Message) error {
		counter.Add(int64(len(fresh)))
		return nil
	}, false)
	if err == nil && counter.Load() != int64(len(b.msgs)) {
		err = fmt.Errorf("counter is %d, want %d", counter.Load(), len(b.msgs))
	}
	return res, err
}

func runRedisMemLua(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	rc.lua = true
	return runRedisMem(ctx, b, rc)
}

func runRedisBatchMemLua(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	rc.lua = true
	return runRedisBatchMem(ctx, b, rc)
}

func runRedisBatchTx(ctx context.Context, b *bench, rc *rowCtx) (result, error) {
	return b.redisBatch(ctx, rc, func(ctx context.Context, fresh []*exactly.Message) error {
		return b.txMany(ctx, rc, fresh)
	}, true)
}

func (b *bench) redisBatch(ctx context.Context, rc *rowCtx, effect func(context.Context, []*exactly.Message) error, inSQL bool) (result, error) {
	ib, err := b.redisInbox(rc)
	if err != nil {
		return result{}, err
	}
	handle := func(ctx context.Context, ms []*exactly.Message, want inbox.Outcome) error {
		out, err := ib.HandleBatch(ctx, ms, effect)
		if err != nil {
			return err
		}
		for i, o := range out {
			if o != want {
				return fmt.Errorf("message %s: %s, want %s", ms[i].ID, o, want)
			}
		}
		return nil
	}
	el, cpu, err := b.timed(ctx, rc, func(ctx context.Context) error {
		return b.eachBatch(ctx, b.msgs, func(ctx context.Context, ms []*exactly.Message) error {
			return handle(ctx, ms, inbox.Processed)
		})
	})
	res := result{msgs: len(b.msgs), elapsed: el}
	if err != nil {
		return res, err
	}
	again := b.msgs[:b.redeliverN()]
	err = b.eachBatch(ctx, again, func(ctx context.Context, ms []*exactly.Message) error {
		return handle(ctx, ms, inbox.Duplicate)
	})
	res.note, err = b.redisInboxNote(ctx, rc, ib, len(again), inSQL, err)
	res.note += "; " + fmt.Sprintf("%d workers, batches of %d; %s", b.cfg.workers, b.cfg.batch, cpu)
	return res, err
}

func (b *bench) redisInboxNote(ctx context.Context, rc *rowCtx, ib *inbox.Redis, again int, inSQL bool, err error) (string, error) {
	if err != nil {
		return "", fmt.Errorf("redelivery: %w", err)
	}
	if inSQL {
		if err := b.checkEffects(ctx, rc, len(b.msgs)); err != nil {
			return "", fmt.Errorf("after the redelivery: %w", err)
		}
	}
	keys, err := b.countRedis(ctx, rc.prefix+"*")
	if err != nil {
		return "", err
	}
	st := ib.Stats()
	if keys != len(b.msgs) || st.Processed != int64(len(b.msgs)) || st.Duplicates != int64(again) ||
		st.LeaseExpired != 0 || st.MarkFailed != 0 {
		return "", fmt.Errorf("Redis holds %d keys; stats %+v; want %d keys, %d processed, %d duplicates",
			keys, st, len(b.msgs), len(b.msgs), again)
	}
	what := "effects (counter)"
	if inSQL {
		what = "effect rows"
	}
	path := "native SET NX PX GET / SET PX GET"
	if rc.lua {
		// The inbox's first calls (one per worker at most) are refused,
		// then it uses the scripts.
		path = fmt.Sprintf("Lua fallback (%d SET NX GET commands refused in this run, all before the switch)", b.old.refused.Load()-rc.refused0)
	}
	return fmt.Sprintf("%s; checked: %d %s, %d done markers; %d redelivered (untimed): all duplicates, no effect applied twice",
		path, len(b.msgs), what, keys, again), nil
}
