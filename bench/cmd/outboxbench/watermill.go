package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wnats "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/nats"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"

	"github.com/exactlyonce/exactly"
)

// wmTopic is the Watermill SQL topic the forwarder reads: its table is
// <schema>."watermill_outbox".
const wmTopic = "outbox"

// wmPrefillBatch is how many messages go into one Publish (one multi-row
// INSERT, one transaction) while filling Watermill's table.
const wmPrefillBatch = 1000

// wmSetup is one of Watermill's two PostgreSQL layouts, in the row's schema.
type wmSetup struct {
	schema  wsql.SchemaAdapter
	offsets wsql.OffsetsAdapter
	tables  []string // to VACUUM ANALYZE after the fill
}

// wmAdapters returns Watermill's default schema (consumer-group offsets in
// their own table, rows kept) or its queue schema (rows locked FOR UPDATE and
// deleted on ack, the same retention as our relay's default), with every
// table in pgSchema. Everything else is left at Watermill's defaults.
func wmAdapters(pgSchema string, queue bool) wmSetup {
	messages := func(topic string) string { return pgx.Identifier{pgSchema, "watermill_" + topic}.Sanitize() }
	if queue {
		return wmSetup{
			schema:  wsql.PostgreSQLQueueSchema{GenerateMessagesTableName: messages},
			offsets: wsql.PostgreSQLQueueOffsetsAdapter{DeleteOnAck: true, GenerateMessagesTableName: messages},
			tables:  []string{messages(wmTopic)},
		}
	}
	offsets := func(topic string) string { return pgx.Identifier{pgSchema, "watermill_offsets_" + topic}.Sanitize() }
	return wmSetup{
		schema:  wsql.DefaultPostgreSQLSchema{GenerateMessagesTableName: messages},
		offsets: wsql.DefaultPostgreSQLOffsetsAdapter{GenerateMessagesOffsetsTableName: offsets},
		tables:  []string{messages(wmTopic), offsets(wmTopic)},
	}
}

func runWatermillDefault(ctx context.Context, b *bench) (result, error) {
	return b.drainWatermill(ctx, "wm-default", false)
}

func runWatermillQueue(ctx context.Context, b *bench) (result, error) {
	return b.drainWatermill(ctx, "wm-queue", true)
}

// wmMessage turns a benchmark message into a Watermill one: the id becomes
// its UUID, the key and headers its metadata (which the NATS marshaler turns
// into headers, as our publisher does).
func wmMessage(m *exactly.Message) *message.Message {
	wm := message.NewMessage(m.ID, m.Payload)
	wm.Metadata.Set(exactly.HeaderKey, m.Key)
	for k, v := range m.Headers {
		wm.Metadata.Set(k, v)
	}
	return wm
}

// newSubscriber returns Watermill's SQL subscriber on the pool, defaults
// except the poll interval.
func (b *bench) newWMSubscriber(setup wmSetup, poll time.Duration) (*wsql.Subscriber, error) {
	return wsql.NewSubscriber(wsql.BeginnerFromPgx(b.pool), wsql.SubscriberConfig{
		SchemaAdapter:  setup.schema,
		OffsetsAdapter: setup.offsets,
		PollInterval:   poll,
	}, watermill.NopLogger{})
}

// newWMPublisher returns Watermill's own NATS JetStream publisher
// (watermill-nats v2) on a connection of its own, with Nats-Msg-Id set from
// the message UUID. It publishes synchronously, one message at a time,
// waiting for each PubAck.
func (b *bench) newWMPublisher() (*wnats.Publisher, error) {
	return wnats.NewPublisher(wnats.PublisherConfig{
		URL:       b.cfg.natsURL,
		Marshaler: &wnats.NATSMarshaler{},
		JetStream: wnats.JetStreamConfig{TrackMsgId: true},
	}, watermill.NopLogger{})
}

// ackRecorder wraps the forwarder's outgoing publisher and reports each
// message once the broker has acknowledged it (Publish returned nil).
type ackRecorder struct {
	message.Publisher
	handed func(msgs []*message.Message) // optional
	acked  func(msgs []*message.Message)
}

func (a ackRecorder) Publish(topic string, msgs ...*message.Message) error {
	if a.handed != nil {
		a.handed(msgs)
	}
	if err := a.Publisher.Publish(topic, msgs...); err != nil {
		return err
	}
	a.acked(msgs)
	return nil
}

// prefillWatermill creates Watermill's tables and fills them through
// Watermill's own forwarder publisher over its SQL publisher: the exact rows
// an application using the forwarder writes (an envelope naming the
// destination subject).
func (b *bench) prefillWatermill(ctx context.Context, setup wmSetup, sub *wsql.Subscriber, subject string) error {
	start := time.Now()
	if err := sub.SubscribeInitialize(wmTopic); err != nil {
		return fmt.Errorf("watermill schema: %w", err)
	}
	sqlPub, err := wsql.NewPublisher(wsql.BeginnerFromPgx(b.pool), wsql.PublisherConfig{SchemaAdapter: setup.schema}, watermill.NopLogger{})
	if err != nil {
		return err
	}
	pub := forwarder.NewPublisher(sqlPub, forwarder.PublisherConfig{ForwarderTopic: wmTopic})
	gen := b.messages(subject)
	batch := make([]*message.Message, 0, wmPrefillBatch)
	for i := 0; i < b.cfg.n; i++ {
		m := wmMessage(gen.get(i))
		m.SetContext(ctx)
		batch = append(batch, m)
		if len(batch) == wmPrefillBatch || i == b.cfg.n-1 {
			if err := pub.Publish(subject, batch...); err != nil {
				return fmt.Errorf("watermill fill: %w", err)
			}
			batch = batch[:0]
		}
	}
	if err := b.settle(ctx, setup.tables...); err != nil {
		return err
	}
	b.log.Info("watermill table filled", "table", setup.tables[0], "rows", b.cfg.n, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// drainWatermill fills Watermill's table, then times its forwarder from Run
// until the broker acknowledged every message.
func (b *bench) drainWatermill(ctx context.Context, id string, queue bool) (result, error) {
	schema, drop, err := b.freshSchema(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer drop()
	br, closeBroker, err := b.freshStream(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer closeBroker()
	setup := wmAdapters(schema, queue)
	// The drain never finds the table empty, so the poll interval (default
	// 1s) does not come into it.
	sub, err := b.newWMSubscriber(setup, 0)
	if err != nil {
		return result{}, err
	}
	defer sub.Close()
	if err := b.prefillWatermill(ctx, setup, sub, br.subject); err != nil {
		return result{}, err
	}
	natsPub, err := b.newWMPublisher()
	if err != nil {
		return result{}, err
	}
	defer natsPub.Close()

	n := int64(b.cfg.n)
	var confirmed atomic.Int64
	done := make(chan struct{})
	var once sync.Once
	out := ackRecorder{Publisher: natsPub, acked: func(msgs []*message.Message) {
		if confirmed.Add(int64(len(msgs))) >= n {
			once.Do(func() { close(done) })
		}
	}}
	fwd, err := forwarder.NewForwarder(sub, out, watermill.NopLogger{}, forwarder.Config{ForwarderTopic: wmTopic})
	if err != nil {
		return result{}, err
	}

	runErr := make(chan error, 1)
	watch := b.watchOtherTransactions(ctx)
	defer watch()
	tm := b.startTimer(id)
	go func() { runErr <- fwd.Run(ctx) }()
	select {
	case <-done:
	case err := <-runErr:
		tm.stop()
		if err == nil {
			err = errors.New("forwarder stopped before draining its table")
		}
		return result{}, err
	case <-ctx.Done():
		tm.stop()
		fwd.Close()
		return result{}, fmt.Errorf("forwarder confirmed %d of %d messages: %w", confirmed.Load(), n, ctx.Err())
	}
	elapsed := tm.stop()
	oldestOther := watch()
	if err := fwd.Close(); err != nil {
		return result{}, err
	}
	<-runErr
	if err := br.checkStream(ctx, b.cfg.n); err != nil {
		return result{}, err
	}
	note := "watermill v1.5.1, watermill-sql v4.1.2 (default schema, consumer-group offsets), watermill-nats v2.1.3"
	if queue {
		note = "watermill v1.5.1, watermill-sql v4.1.2 (queue schema, DeleteOnAck), watermill-nats v2.1.3"
	}
	if !queue {
		note += otherTxNote(oldestOther)
	}
	note += "; " + tm.cpu()
	return result{msgs: int(confirmed.Load()), elapsed: elapsed, note: note}, nil
}

// runLatencyWatermill writes one message per transaction through
// Watermill's forwarder publisher at a steady rate while the forwarder (the
// default schema, polling every -wm-poll) moves them to JetStream, and
// measures commit → broker ack.
func runLatencyWatermill(ctx context.Context, b *bench) (result, error) {
	const id = "lat-wm"
	schema, drop, err := b.freshSchema(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer drop()
	br, closeBroker, err := b.freshStream(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer closeBroker()
	setup := wmAdapters(schema, false)
	sub, err := b.newWMSubscriber(setup, b.cfg.wmPoll)
	if err != nil {
		return result{}, err
	}
	defer sub.Close()
	if err := sub.SubscribeInitialize(wmTopic); err != nil {
		return result{}, err
	}
	natsPub, err := b.newWMPublisher()
	if err != nil {
		return result{}, err
	}
	defer natsPub.Close()
	probe := newLatencyProbe()
	ids := func(msgs []*message.Message) []string {
		out := make([]string, len(msgs))
		for i, m := range msgs {
			out[i] = m.UUID
		}
		return out
	}
	out := ackRecorder{
		Publisher: natsPub,
		handed:    func(msgs []*message.Message) { probe.hand(time.Now(), ids(msgs)...) },
		acked:     func(msgs []*message.Message) { probe.ack(time.Now(), ids(msgs)...) },
	}
	fwd, err := forwarder.NewForwarder(sub, out, watermill.NopLogger{}, forwarder.Config{ForwarderTopic: wmTopic})
	if err != nil {
		return result{}, err
	}
	runErr := make(chan error, 1)
	go func() { runErr <- fwd.Run(ctx) }()
	defer func() { fwd.Close(); <-runErr }()
	select {
	case <-fwd.Running():
	case err := <-runErr:
		runErr <- err
		return result{}, fmt.Errorf("forwarder did not start: %v", err)
	}
	time.Sleep(500 * time.Millisecond) // let the subscription settle into its poll loop

	prod, err := b.producerPool(ctx)
	if err != nil {
		return result{}, err
	}
	defer prod.Close()
	gen := b.messages(br.subject)
	watch := b.watchOtherTransactions(ctx)
	defer watch()
	sent, took, tm, err := b.measureLatency(ctx, id, br, probe, nil, func(ctx context.Context, i int) (string, error) {
		tx, err := prod.Begin(ctx)
		if err != nil {
			return "", err
		}
		sqlPub, err := wsql.NewPublisher(wsql.TxFromPgx(tx), wsql.PublisherConfig{SchemaAdapter: setup.schema}, watermill.NopLogger{})
		if err != nil {
			tx.Rollback(ctx)
			return "", err
		}
		m := wmMessage(gen.get(i))
		m.SetContext(ctx)
		if err := forwarder.NewPublisher(sqlPub, forwarder.PublisherConfig{ForwarderTopic: wmTopic}).Publish(br.subject, m); err != nil {
			tx.Rollback(ctx)
			return "", err
		}
		return m.UUID, tx.Commit(ctx)
	})
	if err != nil {
		return result{}, err
	}
	return latencyResult(probe, sent, took, fmt.Sprintf("one tx per message; poll %s%s; %s", b.cfg.wmPoll, otherTxNote(watch()), tm.cpu())), nil
}

// watchOtherTransactions samples, until stop is called, the age of the
// oldest transaction holding an xid in the cluster outside the benchmark's
// own connections. Watermill's default schema reads only rows of
// transactions older than every running one
// (transaction_id < pg_snapshot_xmin(pg_current_snapshot())), so another
// session's long transaction stalls it; the row's note says so when it
// happened, instead of blaming Watermill for the machine.
func (b *bench) watchOtherTransactions(ctx context.Context) (stop func() time.Duration) {
	ctx, cancel := context.WithCancel(ctx)
	var oldest atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			var age float64
			ours := b.pgBackends.List()
			pids := make([]int32, len(ours))
			for i, p := range ours {
				pids[i] = int32(p)
			}
			err := b.pool.QueryRow(ctx, `SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)::float8
				FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND NOT (pid = ANY($1))`, pids).Scan(&age)
			if err == nil {
				if d := int64(age * float64(time.Second)); d > oldest.Load() {
					oldest.Store(d)
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(250 * time.Millisecond):
			}
		}
	}()
	return func() time.Duration {
		cancel()
		<-done
		return time.Duration(oldest.Load())
	}
}

// otherTxNote describes a long foreign transaction seen during a row.
func otherTxNote(oldest time.Duration) string {
	if oldest < 100*time.Millisecond {
		return ""
	}
	return fmt.Sprintf("; another session held a transaction open for up to %s during the row (the default schema waits for it)", fmtDur(oldest))
}
