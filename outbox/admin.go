package outbox

import (
	"context"
	"fmt"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// Status is the state of the outbox as operators look at it.
type Status struct {
	Pending   int64
	Dead      int64
	OldestAge time.Duration // age of the oldest pending message
	Topics    []TopicStatus
	// Failing counts the pending messages whose last publish failed and the
	// keys they hold back, from the attempts the polling relay stores in the
	// table. (The CDC relay keeps its attempts in memory until it parks a
	// message: its failures show in its logs and metrics, not here.)
	Failing Failing
	// Blocked lists the oldest of the failing messages (up to
	// StatusBlockedLimit; ListBlocked returns more).
	Blocked []Blocked
}

// Failing summarises the pending messages whose last publish failed:
// attempts above 0, a last error and a next attempt are stored in them. (A
// whole publisher outage spends no attempt, so its messages are not among
// them.)
type Failing struct {
	// Messages is how many pending messages failed at least once.
	Messages int64
	// BlockedKeys is how many keys have such a message at their head: the
	// messages of the key behind it wait until it is published or parked.
	BlockedKeys int64
	// OldestAge is the age (since it was enqueued) of the oldest of those
	// messages; 0 when none is failing.
	OldestAge time.Duration
}

// Blocked is a pending message whose last publish failed, with its attempts,
// last error and next attempt. It is the head of its key: the key's later
// messages wait until it is published or parked as dead.
type Blocked struct {
	ID            string
	Topic         string
	Key           string // "" for an unkeyed message, which holds back only itself
	Attempts      int
	LastError     string
	NextAttemptAt time.Time
	Age           time.Duration // since it was enqueued
	// Waiting is how many pending messages the key has, this one included.
	Waiting int64
}

// StatusBlockedLimit is how many failing messages Status lists.
const StatusBlockedLimit = 20

// TopicStatus is the backlog of one topic.
type TopicStatus struct {
	Topic     string
	Pending   int64
	Dead      int64
	OldestAge time.Duration // of its oldest pending message
}

// Status reads the backlog per topic, the oldest pending age, the dead
// count and the failing messages. db is a *sql.DB or a *pgxpool.Pool.
func (o *Outbox) Status(ctx context.Context, db any) (Status, error) {
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		return Status{}, fmt.Errorf("outbox: %w", err)
	}
	defer done()
	b, err := o.store.Backlog(ctx, sdb)
	if err != nil {
		return Status{}, fmt.Errorf("outbox: status: %w", err)
	}
	topics, err := o.store.StatusByTopic(ctx, sdb)
	if err != nil {
		return Status{}, fmt.Errorf("outbox: status: %w", err)
	}
	st := Status{Pending: b.Pending, Dead: b.Dead, OldestAge: b.OldestAge, Failing: Failing(b.Failing)}
	for _, t := range topics {
		st.Topics = append(st.Topics, TopicStatus(t))
	}
	if b.Failing.Messages > 0 {
		blocked, err := o.store.ListBlocked(ctx, sdb, StatusBlockedLimit)
		if err != nil {
			return Status{}, fmt.Errorf("outbox: status: %w", err)
		}
		st.Blocked = blockedOf(blocked)
	}
	return st, nil
}

// ListBlocked returns up to limit pending messages whose last publish
// failed, oldest first.
func (o *Outbox) ListBlocked(ctx context.Context, db any, limit int) ([]Blocked, error) {
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	defer done()
	if limit <= 0 {
		limit = StatusBlockedLimit
	}
	out, err := o.store.ListBlocked(ctx, sdb, limit)
	if err != nil {
		return nil, fmt.Errorf("outbox: list blocked: %w", err)
	}
	return blockedOf(out), nil
}

func blockedOf(bs []outboxstore.Blocked) []Blocked {
	if bs == nil {
		return nil
	}
	out := make([]Blocked, len(bs))
	for i, b := range bs {
		out[i] = Blocked(b)
	}
	return out
}

// DeadFilter selects parked messages; zero fields match all.
type DeadFilter struct {
	IDs   []string
	Topic string
	Key   string
	Limit int // ListDead only
}

// DeadMessage is a message parked after its last failed attempt.
type DeadMessage struct {
	Message   exactly.Message
	Attempts  int
	LastError string
	DeadAt    time.Time
}

func (f DeadFilter) store() outboxstore.DeadFilter {
	return outboxstore.DeadFilter{IDs: f.IDs, Topic: f.Topic, Key: f.Key, Limit: f.Limit}
}

// ListDead returns parked messages, oldest first.
func (o *Outbox) ListDead(ctx context.Context, db any, f DeadFilter) ([]DeadMessage, error) {
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	defer done()
	rows, err := o.store.ListDead(ctx, sdb, f.store())
	if err != nil {
		return nil, fmt.Errorf("outbox: list dead: %w", err)
	}
	out := make([]DeadMessage, len(rows))
	for i, r := range rows {
		out[i] = DeadMessage{Message: r.Msg, Attempts: r.Attempts, LastError: r.LastError, DeadAt: r.DeadAt}
	}
	return out, nil
}

// RetryDead re-drives parked messages: they become pending again, with their
// ids and a fresh attempt count, and the relay publishes them. It returns how
// many it re-drove.
func (o *Outbox) RetryDead(ctx context.Context, db any, f DeadFilter) (int64, error) {
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		return 0, fmt.Errorf("outbox: %w", err)
	}
	defer done()
	n, err := o.store.RetryDead(ctx, sdb, f.store())
	if err != nil {
		return 0, fmt.Errorf("outbox: retry dead: %w", err)
	}
	return n, nil
}

// PurgeDead deletes parked messages for good: the only way a message leaves
// the outbox unpublished, and only when an operator says so.
func (o *Outbox) PurgeDead(ctx context.Context, db any, f DeadFilter) (int64, error) {
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		return 0, fmt.Errorf("outbox: %w", err)
	}
	defer done()
	n, err := o.store.PurgeDead(ctx, sdb, f.store())
	if err != nil {
		return 0, fmt.Errorf("outbox: purge dead: %w", err)
	}
	return n, nil
}

// Check reports whether the outbox's tables can be used by Enqueue and the
// relays: they must exist and have every column the code reads and writes.
// The error names the table and the missing or mistyped columns, and says
// what to do: apply the migrations, or, for a table dropped or changed by
// hand while its migrations are recorded in exactly_migrations, how to
// reset them. A database that cannot be reached is reported as it is. The
// relays run it when they start. db is a *sql.DB or a *pgxpool.Pool.
func (o *Outbox) Check(ctx context.Context, db any) error {
	sdb, done, err := sqldb.Open(db)
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	defer done()
	return o.store.CheckTables(ctx, sdb)
}
