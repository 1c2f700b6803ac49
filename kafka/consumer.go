package kafka

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/consume"
	"github.com/exactlyonce/exactly/internal/migrate"
	"github.com/exactlyonce/exactly/internal/offsetstore"
	"github.com/exactlyonce/exactly/internal/pause"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// ConsumerConfig configures a consumer-group Consumer: the settings every
// consumer shares (exactly.ConsumerConfig: Handler, Retry, DeadLetter,
// DeadLetterTopic, Workers, Hooks, Logger, Tracer) and Kafka's own. Group,
// Topics and Handler are required (a DB-offsets consumer takes
// DBConfig.TxHandler instead of Handler); zero values take the documented
// defaults. NewConsumer and NewDBConsumer check the whole configuration up
// front and name the first bad field.
//
// On Kafka the shared settings mean:
//
//   - Workers (default 1) is how many partitions are handled at a time.
//     The records of one partition are always handled one at a time, in
//     offset order, so order per partition (per key, with the publisher's
//     key partitioning) holds with any number of workers. With 1 the
//     partitions a member holds take turns within each poll; set it to the
//     partitions a member may hold to handle them all at once.
//   - Retry: a record is retried in place, holding back the rest of its
//     partition; a rebalance waits for the poll in hand (commit-after-effect
//     mode), so keep MaxAttempts times MaxBackoff, plus the handler's own
//     time, below RebalanceTimeout.
//   - DeadLetter: default a Publisher on the same brokers (with ClientOpts),
//     to the topic DeadLetterTopic names (default the record's topic plus
//     ".dlq"). The consumer moves on only once the dead letter is
//     confirmed.
//   - Hooks: AckFailed runs, for each record it would have committed, when
//     an offset commit to Kafka failed (commit-after-effect mode; those
//     records are delivered again unless a later commit covers them), or
//     when a record's transaction did not commit (DB offsets, see
//     DBConfig).
//   - A record without an exactly-id header is handled under the id
//     kafka:<topic>/<partition>/<offset>, the same on every redelivery
//     (the rule of exactly.ErrNoID).
type ConsumerConfig struct {
	exactly.ConsumerConfig

	// ClientOpts are applied to the consumer's client and to the default
	// dead-letter producer: pass connection options only (TLS, SASL,
	// dialer, client id). Group and topic options are set from this config.
	ClientOpts []kgo.Opt
	// Group is the consumer group. Required.
	Group string
	// Topics to consume. Required.
	Topics []string
	// StartAtEnd makes a group with no stored position start at the end of
	// the topics instead of the start. Default false (start at the start).
	StartAtEnd bool
	// MaxPollRecords bounds the records handled between two offset commits.
	// Default 500.
	MaxPollRecords int

	// InstanceID, when set, makes this consumer a static member of its
	// group (group.instance.id, KIP-345): a restarted process that joins
	// with the same InstanceID takes the place, and the partitions, of its
	// previous run, at once and without a rebalance, instead of joining as
	// one more member while the coordinator still counts the dead one until
	// its session times out. Use it under an orchestrator that restarts
	// crashed processes (a Kubernetes pod name of a StatefulSet, a host
	// name plus a slot number): the same value after every restart of the
	// same instance, a different value for every instance running at the
	// same time. Two running consumers with the same InstanceID fence each
	// other and neither makes progress; a random value is a new member at
	// every start. A static member does not leave its group when Run
	// returns: its partitions wait until it comes back or SessionTimeout
	// passes, so give SessionTimeout the length of a restart. Default ""
	// (a dynamic member, which leaves the group when Run returns). 1 to
	// 200 of a-z A-Z 0-9 . _ -.
	InstanceID string
	// SessionTimeout is how long the coordinator waits for a heartbeat
	// before it declares this member dead and gives its partitions to the
	// others. Longer: a crashed member's partitions stand still longer
	// (for a static member, a restart inside it moves nothing). Shorter:
	// a pause (GC, a slow machine, a network blip) costs a rebalance; the
	// broker refuses values outside group.min.session.timeout.ms and
	// group.max.session.timeout.ms (6s and 30min by default). Default 45s.
	SessionTimeout time.Duration
	// RebalanceTimeout is how long the coordinator waits for every member
	// to rejoin during a rebalance, and so how long one member that does
	// not rejoin (it crashed) holds up the whole group; it must also cover
	// the work of one poll, which a rebalance waits for (up to
	// MaxPollRecords handled, with their retries). Default 60s.
	RebalanceTimeout time.Duration
	// HeartbeatInterval is the time between heartbeats. Keep it a tenth of
	// SessionTimeout or less. Default 3s, or SessionTimeout/10 when
	// SessionTimeout is set and that is shorter.
	HeartbeatInterval time.Duration
}

// ConsumerStats are a Consumer's running totals since it was created: the
// totals every consumer keeps (exactly.ConsumerStats; Received counts
// records taken from the client, redeliveries included; AckFailures counts
// records whose offset commit to Kafka failed, or whose transaction did not
// commit (DB offsets); Redeliveries stays 0, Kafka
// does not mark a redelivered record), and Kafka's own.
type ConsumerStats struct {
	exactly.ConsumerStats
	// Fenced counts records refused because another member owns the
	// partition (DB offsets).
	Fenced int64

	// Partitions is a gauge: the partitions the group coordinator assigns
	// this member, as it last described the group (every RebalanceTimeout/10,
	// at most 5s apart).
	Partitions int64
	// Stalled is a gauge: 1 while this member has held no partition, or
	// its group has not been Stable, for longer than RebalanceTimeout (a
	// warning with the group's state is logged then); 0 otherwise.
	Stalled int64
}

// Consumer consumes topics as a member of a consumer group and hands each
// record, as an exactly.Message, to a handler. Up to Workers partitions are
// handled at a time, the records of one partition in order.
//
// Create it with NewConsumer (offsets committed to Kafka after the handler's
// effect) or NewDBConsumer (offsets stored in the database, in the effect's
// own transaction).
type Consumer struct {
	cfg    ConsumerConfig // defaults applied
	cl     *kgo.Client
	policy *consume.Policy
	ownDLQ *Publisher
	log    *slog.Logger

	// process handles one record; it returns false when the rest of the
	// partition's records in this poll must be skipped (fenced, stopping).
	process func(ctx context.Context, rec *kgo.Record) bool
	// commitToKafka is true in commit-after-effect mode.
	commitToKafka bool

	st      consume.Stats
	watch   *groupWatch
	fenced  atomic.Int64
	running atomic.Bool

	// marked are the messages marked for the next offset commit to Kafka
	// since the last one: a failed commit is an AckFailed for each.
	markedMu sync.Mutex
	marked   []*exactly.Message

	// start, when set, runs before anything is consumed; its error stops Run
	// (DB offsets: the offsets table is checked).
	start func(ctx context.Context) error

	// afterHandle, when set (tests only), runs after the handler's effect
	// committed and before the offset is committed: the crash window.
	afterHandle func(rec *kgo.Record)
}

// NewConsumer returns a consumer of the brokers at seeds that runs
// cfg.Handler for each record and commits the group's offsets to Kafka after
// the handler returned: the commit-after-effect mode. A crash between the
// effect and the offset commit redelivers the record (to this member or,
// after a rebalance, to another): wrap the handler with the inbox
// (inbox.SQL.Handler, inbox.Redis.Handler) so the redelivery is absorbed and
// the effect applies once. It checks cfg and does no I/O: Run joins the
// group.
//
// Rebalances wait until the records of the current poll are handled and
// their offsets committed, so a healthy rebalance moves no work twice.
func NewConsumer(seeds []string, cfg ConsumerConfig) (*Consumer, error) {
	c, err := newConsumer("NewConsumer", seeds, cfg, true)
	if err != nil {
		return nil, err
	}
	c.process = func(ctx context.Context, rec *kgo.Record) bool {
		msg := decodeRecord(rec)
		if _, err := c.policy.Process(ctx, c.cfg.Handler, msg, 1, &c.st); err != nil {
			return false // stopping: leave the record uncommitted
		}
		if c.afterHandle != nil {
			c.afterHandle(rec)
		}
		c.cl.MarkCommitRecords(rec)
		c.markedMu.Lock()
		c.marked = append(c.marked, msg)
		c.markedMu.Unlock()
		return true
	}
	return c, nil
}

func newConsumer(fn string, seeds []string, cfg ConsumerConfig, commitToKafka bool, extra ...kgo.Opt) (*Consumer, error) {
	bad := func(field, format string, args ...any) (*Consumer, error) {
		return nil, fmt.Errorf("kafka: %s: %w", fn, &exactly.ConfigError{Field: field, Err: fmt.Errorf(format, args...)})
	}
	switch {
	case len(seeds) == 0:
		return nil, fmt.Errorf("kafka: %s: no seed brokers: pass the addresses of one or more brokers", fn)
	case cfg.Group == "":
		return bad("Group", "is empty")
	case len(cfg.Topics) == 0:
		return bad("Topics", "is empty")
	case cfg.MaxPollRecords < 0:
		return bad("MaxPollRecords", "is %d; it must not be negative (0 takes the default, 500)", cfg.MaxPollRecords)
	}
	group := cfg.membership()
	if err := group.check(); err != nil {
		return nil, err
	}
	shared, err := cfg.ConsumerConfig.WithDefaults()
	if err != nil {
		return nil, fmt.Errorf("kafka: %s: %w", fn, err)
	}
	cfg.ConsumerConfig = shared
	if cfg.MaxPollRecords == 0 {
		cfg.MaxPollRecords = 500
	}
	log := cfg.Logger.With("component", "kafka-consumer", "group", cfg.Group)
	if cfg.InstanceID != "" {
		log = log.With("instance_id", cfg.InstanceID)
	}
	c := &Consumer{cfg: cfg, commitToKafka: commitToKafka, log: log, watch: &groupWatch{group: cfg.Group, log: log}}
	deadLetter := cfg.DeadLetter
	if deadLetter == nil {
		p, err := NewClientPublisher(seeds, cfg.ClientOpts...)
		if err != nil {
			return nil, fmt.Errorf("kafka: %s: the default DeadLetter producer: %w", fn, err)
		}
		c.ownDLQ = p
		deadLetter = p
	}
	shared.Logger = log
	policy, err := consume.FromConfig(shared, deadLetter)
	if err != nil {
		c.closeDLQ()
		return nil, fmt.Errorf("kafka: %s: %w", fn, err)
	}
	c.policy = policy
	reset := kgo.NewOffset().AtStart()
	if cfg.StartAtEnd {
		reset = kgo.NewOffset().AtEnd()
	}
	opts := append([]kgo.Opt{
		kgo.SeedBrokers(seeds...),
		kgo.ConsumerGroup(cfg.Group),
		kgo.ConsumeTopics(cfg.Topics...),
		kgo.ConsumeResetOffset(reset),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
	}, cfg.ClientOpts...)
	opts = append(opts, group.opts()...)
	opts = append(opts, extra...)
	if commitToKafka {
		// Only records marked after their effect are committed: by the
		// commit at the end of each poll, by the periodic autocommit and
		// when partitions are revoked. (With autocommit disabled instead,
		// franz-go ignores marks and nothing would ever be committed.)
		opts = append(opts, kgo.AutoCommitMarks(), kgo.BlockRebalanceOnPoll(), kgo.RequireStableFetchOffsets())
	} else {
		opts = append(opts, kgo.DisableAutoCommit())
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		c.closeDLQ()
		return nil, fmt.Errorf("kafka: %s: consumer client: %w", fn, err)
	}
	c.cl = cl
	return c, nil
}

func (cfg *ConsumerConfig) membership() membership {
	return membership{field: "ConsumerConfig", instanceID: cfg.InstanceID, sessionTimeout: cfg.SessionTimeout,
		rebalanceTimeout: cfg.RebalanceTimeout, heartbeatInterval: cfg.HeartbeatInterval}
}

func (c *Consumer) closeDLQ() {
	if c.ownDLQ != nil {
		c.ownDLQ.Close()
	}
}

// Stats returns the running totals. It is safe to call at any time.
func (c *Consumer) Stats() ConsumerStats {
	return ConsumerStats{
		ConsumerStats: c.st.Load(),
		Fenced:        c.fenced.Load(),
		Partitions:    c.watch.partitions.Load(), Stalled: c.watch.stalled.Load(),
	}
}

// Run consumes until ctx is cancelled, then finishes the record in hand,
// commits what was handled, leaves the group and returns nil. A Consumer
// runs once.
func (c *Consumer) Run(ctx context.Context) error {
	if !c.running.CompareAndSwap(false, true) {
		return errors.New("kafka: Consumer.Run called twice")
	}
	defer c.closeDLQ()
	defer c.cl.Close()
	if c.start != nil {
		if err := c.start(ctx); err != nil {
			return err
		}
	}
	wctx, stopWatch := context.WithCancel(ctx)
	var watching sync.WaitGroup
	watching.Go(func() { c.watch.run(wctx, c.cl, func() *kgo.Client { return c.cl }, 0) })
	defer watching.Wait()
	defer stopWatch()
	workers := make(chan struct{}, c.cfg.Workers)
	for ctx.Err() == nil {
		fs := c.cl.PollRecords(ctx, c.cfg.MaxPollRecords)
		if fs.IsClientClosed() {
			break
		}
		fs.EachError(func(topic string, part int32, err error) {
			if !errors.Is(err, context.Canceled) {
				c.log.Warn("fetch error", "topic", topic, "partition", part, "err", err)
			}
		})
		var wg sync.WaitGroup
		fs.EachPartition(func(p kgo.FetchTopicPartition) {
			if len(p.Records) == 0 {
				return
			}
			c.st.Received.Add(int64(len(p.Records)))
			wg.Go(func() {
				workers <- struct{}{}
				defer func() { <-workers }()
				for _, rec := range p.Records {
					if ctx.Err() != nil || !c.process(ctx, rec) {
						return
					}
				}
			})
		})
		wg.Wait()
		if c.commitToKafka {
			c.commit(ctx)
		}
		c.cl.AllowRebalance()
	}
	if c.commitToKafka {
		c.commit(ctx)
	}
	return nil
}

// commit commits the offsets of the handled records. A failure is logged,
// and counted with an AckFailed for each record marked since the last
// commit: those records are delivered again (unless a later commit covers
// them), and the inbox absorbs them.
func (c *Consumer) commit(ctx context.Context) {
	c.markedMu.Lock()
	marked := c.marked
	c.marked = nil
	c.markedMu.Unlock()
	// Not cut short by Run's end: what was handled is committed on the way out.
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := c.cl.CommitMarkedOffsets(cctx); err != nil {
		c.log.Warn("offset commit failed; the handled records will be delivered again", "records", len(marked), "err", err)
		for _, m := range marked {
			c.policy.AckFailed(m, err, &c.st)
		}
	}
}

// decodeRecord turns a record into a Message. A record without an
// exactly-id header (produced outside exactly) gets a stable id from its
// position, so its redeliveries are still recognised.
func decodeRecord(rec *kgo.Record) *exactly.Message {
	m := &exactly.Message{ID: recordID(rec), Topic: rec.Topic, Key: string(rec.Key), Payload: rec.Value, CreatedAt: rec.Timestamp}
	for _, h := range rec.Headers {
		switch h.Key {
		case exactly.HeaderID:
		case exactly.HeaderCreatedAt:
			if t, err := time.Parse(time.RFC3339Nano, string(h.Value)); err == nil {
				m.CreatedAt = t
			}
		default:
			if strings.HasPrefix(h.Key, "exactly-") && h.Key != exactly.HeaderKey {
				// reserved names stay reserved; dead-letter headers are kept
				if !strings.HasPrefix(h.Key, "exactly-dead-") {
					continue
				}
			}
			if m.Headers == nil {
				m.Headers = map[string]string{}
			}
			m.Headers[h.Key] = string(h.Value)
		}
	}
	return m
}

// recordID is the id of the message rec carries: its last exactly-id
// header, or its position when that is missing or empty.
func recordID(rec *kgo.Record) string {
	var buf [maxPositionID]byte
	return string(appendRecordID(buf[:0], rec))
}

// appendRecordID returns recordID(rec) as bytes without allocating: the
// exactly-id header's value itself (not to be written), or the position
// appended to dst.
func appendRecordID(dst []byte, rec *kgo.Record) []byte {
	for i := len(rec.Headers) - 1; i >= 0; i-- {
		if h := rec.Headers[i]; h.Key == exactly.HeaderID {
			if len(h.Value) > 0 {
				return h.Value
			}
			break
		}
	}
	return appendPositionID(dst, rec)
}

// maxPositionID is the longest position id: Kafka's longest topic name, an
// int32 and an int64.
const maxPositionID = len("kafka:") + 249 + 1 + 11 + 1 + 20

// positionID is "kafka:topic/partition/offset", built in one allocation:
// it is the id of every record produced outside exactly.
func positionID(rec *kgo.Record) string {
	var buf [maxPositionID]byte
	return string(appendPositionID(buf[:0], rec))
}

func appendPositionID(b []byte, rec *kgo.Record) []byte {
	b = append(b, "kafka:"...)
	b = append(b, rec.Topic...)
	b = append(b, '/')
	b = strconv.AppendInt(b, int64(rec.Partition), 10)
	b = append(b, '/')
	return strconv.AppendInt(b, rec.Offset, 10)
}

// DBConfig configures a consumer that stores its offsets in the database:
// a ConsumerConfig whose Handler is left nil (NewDBConsumer sets it to the
// transaction around TxHandler), TxHandler, and the database.
//
// In this mode the acknowledgement is the record's transaction: the
// compare-and-set of the partition's offset and the commit, after
// TxHandler returned nil. The Handled hook runs when TxHandler returned
// nil; a compare-and-set that finds another member's offset (fenced, also
// counted in ConsumerStats.Fenced) or a commit that fails is an AckFailed,
// the transaction is rolled back with the effect, and the record is
// handled again from the stored offset (by its new owner, when fenced).
type DBConfig struct {
	ConsumerConfig
	// TxHandler applies a message's effect inside the transaction that
	// advances the partition's offset. Required. It runs under the shared
	// policy (Retry, DeadLetter, Hooks), one transaction per attempt.
	TxHandler TxHandler
	// DB holds the offsets table and the handler's effects: a *sql.DB or a
	// *pgxpool.Pool. Required.
	DB any
	// Dialect is "postgres", "mysql" or "sqlite". Required.
	Dialect string
	// OffsetsTable is the offsets table. Default "exactly_kafka_offsets".
	OffsetsTable string
}

// TxHandler applies a message's effect inside tx; the consumer advances the
// partition's offset in the same transaction.
type TxHandler func(ctx context.Context, tx *sql.Tx, msg *exactly.Message) error

// NewDBConsumer returns a consumer of the brokers at seeds that stores the
// group's positions in the database: for each record it opens a
// transaction, runs cfg.TxHandler in it, advances the partition's offset by
// compare-and-set (UPDATE ... WHERE next_offset = expected) and commits.
// The effect and the position commit together, so no record is applied
// twice and none is skipped, without a dedup table. A member that lost its
// partition (a zombie: paused, or still busy after a rebalance) fails the
// compare-and-set and rolls back; its new owner's effect stands. On
// assignment the consumer seeks to the stored offset. Nothing is committed
// to Kafka.
//
// Apply the offsets table's migrations first with MigrateOffsets.
func NewDBConsumer(seeds []string, cfg DBConfig) (*Consumer, error) {
	bad := func(field, why string) (*Consumer, error) {
		return nil, fmt.Errorf("kafka: NewDBConsumer: %w", &exactly.ConfigError{Field: field, Err: errors.New(why)})
	}
	switch {
	case cfg.TxHandler == nil:
		return bad("TxHandler", "is nil: the consumer has nothing to run in a record's transaction")
	case cfg.Handler != nil:
		return bad("Handler", "is set: a DB-offsets consumer runs TxHandler, in the transaction that advances the offset; set that instead")
	}
	store, err := offsetstore.New(cfg.Dialect, cfg.OffsetsTable)
	if err != nil {
		return nil, fmt.Errorf("kafka: NewDBConsumer: %w", err)
	}
	db, closeDB, err := sqldb.Open(cfg.DB)
	if err != nil {
		return nil, fmt.Errorf("kafka: NewDBConsumer: %w", err)
	}
	d := &dbOffsets{store: store, db: db, group: cfg.Group, next: map[tp]int64{}, owned: map[tp]bool{}}
	cfg.Handler = d.handler(cfg.TxHandler)
	c, err := newConsumer("NewDBConsumer", seeds, cfg.ConsumerConfig, false,
		kgo.AdjustFetchOffsetsFn(d.adjust),
		kgo.OnPartitionsRevoked(d.drop), kgo.OnPartitionsLost(d.drop))
	if err != nil {
		closeDB()
		return nil, err
	}
	d.log = c.log
	c.start = d.check
	c.process = func(ctx context.Context, rec *kgo.Record) bool {
		return d.process(ctx, c, rec)
	}
	go func() {
		// closeDB when the client is closed by Run.
		<-c.cl.Context().Done()
		closeDB()
	}()
	return c, nil
}

type tp struct {
	topic string
	part  int32
}

// dbOffsets is the offsets-in-database mode.
type dbOffsets struct {
	store *offsetstore.Store
	db    *sql.DB
	group string
	log   *slog.Logger

	mu    sync.Mutex
	next  map[tp]int64 // expected stored offset per owned partition; -1: none stored
	owned map[tp]bool
}

// adjust runs on assignment: it loads the stored offsets and makes the
// client fetch from them.
func (d *dbOffsets) adjust(ctx context.Context, assigned map[string]map[int32]kgo.Offset) (map[string]map[int32]kgo.Offset, error) {
	for topic, parts := range assigned {
		for part := range parts {
			next, err := d.store.Load(ctx, d.db, d.group, topic, part)
			if err != nil {
				return nil, fmt.Errorf("loading the stored offset of %s/%d: %w", topic, part, err)
			}
			d.mu.Lock()
			d.next[tp{topic, part}] = next
			d.owned[tp{topic, part}] = true
			d.mu.Unlock()
			if next >= 0 {
				parts[part] = kgo.NewOffset().At(next).WithEpoch(-1)
			}
		}
	}
	return assigned, nil
}

func (d *dbOffsets) drop(_ context.Context, _ *kgo.Client, lost map[string][]int32) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for topic, parts := range lost {
		for _, p := range parts {
			delete(d.owned, tp{topic, p})
		}
	}
}

func (d *dbOffsets) expected(k tp) (int64, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n, ok := d.next[k]
	return n, ok && d.owned[k]
}

// position is where a record's transaction moves its partition's stored
// offset, from expected to next, and the transaction once its handler
// succeeded.
type position struct {
	k              tp
	expected, next int64
	tx             *sql.Tx // set by the handler that returned nil; ended by process
}

type positionKey struct{}

// handler is the Handler of a DB-offsets consumer: it opens the record's
// transaction and runs h in it, leaving the acknowledgement of this mode
// (the compare-and-set of the offset, which process puts in the context,
// and the commit) to process. A failed attempt is rolled back.
func (d *dbOffsets) handler(h TxHandler) exactly.Handler {
	return func(ctx context.Context, m *exactly.Message) error {
		pos, ok := ctx.Value(positionKey{}).(*position)
		if !ok {
			return errors.New("kafka: the DB-offsets handler ran without its record's position")
		}
		// Not ended by Run's end: a handler that returned nil is committed
		// on the way out. h's own statements run under ctx.
		tx, err := d.db.BeginTx(context.WithoutCancel(ctx), nil)
		if err != nil {
			return err
		}
		if err := h(ctx, tx, m); err != nil {
			tx.Rollback()
			return err
		}
		pos.tx = tx
		return nil
	}
}

// ack advances the stored offset in the handled record's transaction and
// commits it.
func (d *dbOffsets) ack(ctx context.Context, pos *position) error {
	defer pos.tx.Rollback() // after a commit, a no-op
	if err := d.advance(ctx, pos.tx, pos.k, pos.expected, pos.next); err != nil {
		return err
	}
	return pos.tx.Commit()
}

func (d *dbOffsets) process(ctx context.Context, c *Consumer, rec *kgo.Record) bool {
	k := tp{rec.Topic, rec.Partition}
	expected, owned := d.expected(k)
	if !owned {
		return false // revoked: the new owner takes it from the stored offset
	}
	if expected >= 0 && rec.Offset < expected {
		return true // already applied (a stale fetch after a reload)
	}
	msg := decodeRecord(rec)
	for try := 1; ; try++ {
		err := d.apply(ctx, c, msg, k, expected, rec.Offset+1)
		switch {
		case err == nil:
			d.mu.Lock()
			d.next[k] = rec.Offset + 1
			d.mu.Unlock()
			return true
		case errors.Is(err, offsetstore.ErrFenced):
			c.fenced.Add(1)
			d.log.Warn("fenced: another member advanced this partition; rolled back", "topic", rec.Topic, "partition", rec.Partition, "offset", rec.Offset)
			d.reload(ctx, c, k)
			return false
		case ctx.Err() != nil:
			return false // stopping: the next owner takes it from the stored offset
		}
		// Neither the effect nor the offset was stored (the database
		// failed the commit): the record is handled again, in place, so
		// nothing after it in the partition overtakes it. (Had the commit
		// applied after all, the compare-and-set fences the second run.)
		wait := c.policy.Retry.Backoff(try)
		d.log.Warn("storing a record's effect and offset failed; handling it again", "topic", rec.Topic, "partition", rec.Partition,
			"offset", rec.Offset, "err", err, "retry_in", wait)
		if !pause.For(ctx, wait) {
			return false
		}
	}
}

// apply handles msg once under the policy and stores the outcome: the
// record's transaction commits with the offset (handled), or the offset
// alone moves past the message's confirmed dead letter.
func (d *dbOffsets) apply(ctx context.Context, c *Consumer, msg *exactly.Message, k tp, expected, next int64) error {
	pos := &position{k: k, expected: expected, next: next}
	out, err := c.policy.Process(context.WithValue(ctx, positionKey{}, pos), c.cfg.Handler, msg, 1, &c.st)
	if err != nil {
		return err
	}
	if out == consume.DeadLettered {
		// The message is safe in the dead-letter destination: advance past
		// it, without dead-lettering it again.
		for try := 1; ; try++ {
			err := d.finish(ctx, func(ctx context.Context) error {
				return d.inTx(ctx, k, expected, next, func(*sql.Tx) error { return nil })
			})
			if err == nil || errors.Is(err, offsetstore.ErrFenced) {
				return err
			}
			wait := c.policy.Retry.Backoff(try)
			d.log.Warn("advancing past a dead-lettered record failed; retrying", "topic", k.topic, "partition", k.part, "err", err, "retry_in", wait)
			if !pause.For(ctx, wait) {
				return err
			}
		}
	}
	if err := d.finish(ctx, func(ctx context.Context) error { return d.ack(ctx, pos) }); err != nil {
		// The effect and the offset went together, or neither did.
		c.policy.AckFailed(msg, err, &c.st)
		return err
	}
	return nil
}

// finish runs one write of a record's outcome. It is not cut short by
// Run's end: what was handled is stored on the way out.
func (d *dbOffsets) finish(ctx context.Context, write func(context.Context) error) error {
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	return write(wctx)
}

// inTx runs fn and the offset compare-and-set in one transaction.
func (d *dbOffsets) inTx(ctx context.Context, k tp, expected, next int64, fn func(*sql.Tx) error) error {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	if err := d.advance(ctx, tx, k, expected, next); err != nil {
		return err
	}
	return tx.Commit()
}

// advance moves the stored offset of k from expected to next in tx; a
// fence aborts the record's processing.
func (d *dbOffsets) advance(ctx context.Context, tx *sql.Tx, k tp, expected, next int64) error {
	if err := d.store.Advance(ctx, tx, d.group, k.topic, k.part, expected, next); err != nil {
		if errors.Is(err, offsetstore.ErrFenced) {
			return fmt.Errorf("%w: %w", consume.ErrAbort, err)
		}
		return err
	}
	return nil
}

// reload re-reads a fenced partition's stored offset and, if this member
// still owns the partition, seeks there.
//
// It retries until the offset is read or ctx ends: the caller skips the
// rest of the partition's records in this poll, and only the seek brings
// them back.
func (d *dbOffsets) reload(ctx context.Context, c *Consumer, k tp) {
	backoff := exactly.RetryPolicy{InitialBackoff: 100 * time.Millisecond, MaxBackoff: 5 * time.Second}
	var next int64
	for try := 1; ; try++ {
		var err error
		if next, err = d.store.Load(ctx, d.db, d.group, k.topic, k.part); err == nil {
			break
		}
		wait := backoff.Backoff(try)
		d.log.Warn("reloading a fenced partition's offset failed; retrying", "topic", k.topic, "partition", k.part, "err", err, "retry_in", wait)
		if !pause.For(ctx, wait) {
			return // stopping: the next owner reads it
		}
	}
	d.mu.Lock()
	owned := d.owned[k]
	d.next[k] = next
	d.mu.Unlock()
	if owned && next >= 0 {
		c.cl.SetOffsets(map[string]map[int32]kgo.EpochOffset{k.topic: {k.part: {Epoch: -1, Offset: next}}})
	}
}

// DefaultOffsetsTable is the offsets table used when DBConfig.OffsetsTable
// is empty.
const DefaultOffsetsTable = offsetstore.DefaultTable

// MigrateOffsets creates or upgrades the offsets table of NewDBConsumer.
// db is a *sql.DB or a *pgxpool.Pool; table "" means the default.
func MigrateOffsets(ctx context.Context, db any, dialect, table string) error {
	t, err := NewOffsetsTable(dialect, table)
	if err != nil {
		return err
	}
	_, err = t.ApplyMigrations(ctx, db)
	return err
}

// OffsetsTable is the offsets table of NewDBConsumer, for applying or
// printing its migrations (MigrateOffsets is the short form).
type OffsetsTable struct{ store *offsetstore.Store }

// NewOffsetsTable validates the dialect ("postgres", "mysql" or "sqlite")
// and the table name ("" means DefaultOffsetsTable).
func NewOffsetsTable(dialect, table string) (*OffsetsTable, error) {
	store, err := offsetstore.New(dialect, table)
	if err != nil {
		return nil, fmt.Errorf("kafka: %w", err)
	}
	return &OffsetsTable{store: store}, nil
}

// Table returns the table name as configured.
func (t *OffsetsTable) Table() string { return t.store.Table.String() }

// ApplyMigrations creates or upgrades the table, idempotently and safely
// from several processes at once, and returns the versions this call
// applied, in order. db is a *sql.DB or a *pgxpool.Pool.
func (t *OffsetsTable) ApplyMigrations(ctx context.Context, db any) ([]int, error) {
	return migrate.ApplyOn(ctx, db, "kafka", t.store.Migrator)
}

// MigrationSQL returns the SQL that ApplyMigrations would run now on db,
// without running it (a dry run). With db nil it returns every migration.
func (t *OffsetsTable) MigrationSQL(ctx context.Context, db any) (string, error) {
	return migrate.ScriptOn(ctx, db, "kafka", t.store.Migrator)
}
