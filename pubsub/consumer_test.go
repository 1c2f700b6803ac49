package pubsub_test

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	_ "github.com/jackc/pgx/v5/stdlib"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/effecttest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/pubsub"
)

// suiteAckDeadline is the subscriptions' ack deadline in the consumer
// suite: pstest's minimum, and the client library's shortest lease
// extension, so a handler running three times as long is kept only by the
// library's extensions.
const suiteAckDeadline = 10 * time.Second

// TestConsumerSuite holds the Consumer to the contract every consumer
// keeps, on pstest with ordered subscriptions and the SQL inbox on
// PostgreSQL.
func TestConsumerSuite(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(40)
	t.Cleanup(func() { db.Close() })
	f := newFake(t)
	exactlytest.RunConsumerSuite(t, exactlytest.ConsumerHarness{
		DB: db,
		Setup: func(t *testing.T) exactlytest.ConsumerSource {
			topic := f.topicWith(t, int32(suiteAckDeadline/time.Second))
			return exactlytest.ConsumerSource{
				Topic:     topic,
				Publisher: f.publisher(t, pubsub.PublisherConfig{}),
				PublishWithoutID: func(t *testing.T, payload []byte) {
					f.srv.PublishOrdered(f.name(topic), payload, map[string]string{"x-from": "legacy"}, "legacy")
				},
				New: func(t *testing.T, cfg exactly.ConsumerConfig) exactlytest.TestConsumer {
					return f.consumer(t, topic, cfg)
				},
			}
		},
		Ordering: exactlytest.OrderPerKey,
		// Pub/Sub's message ID stays the same across redeliveries.
		NoID:        exactlytest.NoIDDerived,
		AckDeadline: suiteAckDeadline,
		Timeout:     90 * time.Second,
	})
}

// consumer is one consumer process of the suite: a client of its own,
// which Crash closes, so nothing it holds can be acknowledged any more and
// pstest redelivers it once its lease runs out (MaxLeaseExtension after the
// last extension at most).
//
// LoseAcks swallows the next Acknowledge call, as if it vanished on the
// way (the library reports no outcome for acks outside exactly-once
// delivery, so the consumer believes it sent), then drops the connection.
func (f *fake) consumer(t *testing.T, sub string, shared exactly.ConsumerConfig) exactlytest.TestConsumer {
	t.Helper()
	var (
		lose   atomic.Bool
		client *gpubsub.Client
	)
	swallow := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if strings.HasSuffix(method, "/Acknowledge") && lose.CompareAndSwap(true, false) {
			go func() { _ = client.Close() }()
			return nil
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	client, err := gpubsub.NewClient(context.Background(), project,
		option.WithEndpoint(f.srv.Addr),
		option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
		option.WithGRPCDialOption(grpc.WithUnaryInterceptor(swallow)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	c, err := pubsub.NewConsumer(client, pubsub.ConsumerConfig{ConsumerConfig: shared, Subscription: sub,
		MaxLeaseExtension: suiteAckDeadline})
	if err != nil {
		t.Fatalf("NewConsumer: %v", err)
	}
	return exactlytest.TestConsumer{
		Run:      c.Run,
		Stats:    func() exactly.ConsumerStats { return c.Stats().ConsumerStats },
		Crash:    func() { _ = client.Close() },
		LoseAcks: func() { lose.Store(true) },
	}
}

// topicWith is topic with the subscription's ack deadline in seconds.
func (f *fake) topicWith(t *testing.T, ackDeadline int32) string {
	t.Helper()
	id := f.topic(t)
	ctx := context.Background()
	sub := "projects/" + project + "/subscriptions/" + id
	if err := f.client.SubscriptionAdminClient.DeleteSubscription(ctx, &pb.DeleteSubscriptionRequest{Subscription: sub}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.SubscriptionAdminClient.CreateSubscription(ctx, &pb.Subscription{
		Name: sub, Topic: f.name(id), EnableMessageOrdering: true, AckDeadlineSeconds: ackDeadline,
	}); err != nil {
		t.Fatal(err)
	}
	return id
}

func TestNewConsumerRefusesBadConfig(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	h := func(context.Context, *exactly.Message) error { return nil }
	for _, tc := range []struct {
		cfg   pubsub.ConsumerConfig
		field string
	}{
		{pubsub.ConsumerConfig{Subscription: "s"}, "Handler"},
		{pubsub.ConsumerConfig{ConsumerConfig: exactly.ConsumerConfig{Handler: h}}, "Subscription"},
		{pubsub.ConsumerConfig{ConsumerConfig: exactly.ConsumerConfig{Handler: h}, Subscription: "s", MaxExtension: -time.Second}, "MaxExtension"},
		{pubsub.ConsumerConfig{ConsumerConfig: exactly.ConsumerConfig{Handler: h}, Subscription: "s", AckTimeout: -time.Second}, "AckTimeout"},
		{pubsub.ConsumerConfig{ConsumerConfig: exactly.ConsumerConfig{Handler: h}, Subscription: "s", MaxLeaseExtension: time.Second}, "MaxLeaseExtension"},
	} {
		_, err := pubsub.NewConsumer(f.client, tc.cfg)
		var ce *exactly.ConfigError
		if !errors.As(err, &ce) || ce.Field != tc.field {
			t.Errorf("NewConsumer(%+v) = %v, want a *exactly.ConfigError naming %s", tc.cfg, err, tc.field)
		}
	}
}

// failAck is a pstest reactor that fails the first Acknowledge call with
// code once armed.
type failAck struct {
	code  codes.Code
	armed atomic.Bool
	hits  atomic.Int32
}

func (r *failAck) React(req any) (bool, any, error) {
	if _, ok := req.(*pb.AcknowledgeRequest); !ok || !r.armed.CompareAndSwap(true, false) {
		return false, nil, nil
	}
	r.hits.Add(1)
	return true, nil, status.Error(r.code, "injected ack failure")
}

// On a subscription with exactly-once delivery the consumer awaits each
// ack's outcome: an ack the service refuses is counted as an ack failure
// (Stats, the AckFailed hook), and the message comes again, handled a
// second time, and the SQL inbox absorbs it: each effect applied once.
// (pstest passes the subscription's exactly-once setting to the client, so
// the library takes its exactly-once ack path; it does not emulate the
// service's side of exactly-once delivery.)
func TestExactlyOnceAckFailure(t *testing.T) {
	t.Parallel()
	fail := &failAck{code: codes.FailedPrecondition}
	f := newFake(t, pstest.ServerReactorOption{FuncName: "Acknowledge", Reactor: fail})
	id := f.topic(t)
	ctx := context.Background()
	sub := "projects/" + project + "/subscriptions/" + id
	if err := f.client.SubscriptionAdminClient.DeleteSubscription(ctx, &pb.DeleteSubscriptionRequest{Subscription: sub}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.SubscriptionAdminClient.CreateSubscription(ctx, &pb.Subscription{
		Name: sub, Topic: f.name(id), EnableMessageOrdering: true, EnableExactlyOnceDelivery: true, AckDeadlineSeconds: 10,
	}); err != nil {
		t.Fatal(err)
	}
	msgs := messages(id, []string{"a", "b", "c"}, 1)
	if err := f.publisher(t, pubsub.PublisherConfig{}).Publish(ctx, msgs); err != nil {
		t.Fatal(err)
	}

	ef := effecttest.New(t, "exactly_ps_", "pubsub-faults")
	var (
		mu        sync.Mutex
		runs      = map[string]int{}
		ackFailed []string
	)
	apply := ef.Handler(nil, nil)
	fail.armed.Store(true)
	c, err := pubsub.NewConsumer(f.client, pubsub.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: func(ctx context.Context, m *exactly.Message) error {
				if err := apply(ctx, m); err != nil {
					return err
				}
				mu.Lock()
				runs[m.ID]++
				mu.Unlock()
				return nil
			},
			DeadLetter: &exactlytest.Recorder{},
			Hooks: exactly.ConsumerHooks{AckFailed: func(m *exactly.Message, err error) {
				mu.Lock()
				ackFailed = append(ackFailed, m.ID)
				mu.Unlock()
			}},
		},
		Subscription:      id,
		MaxLeaseExtension: 10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	// The library extends leases on exactly-once subscriptions by at least
	// 60s, so the redelivery comes up to a minute after the failed ack.
	waitWithin(t, 100*time.Second, "every message handled and the one whose ack failed handled again", func() bool {
		mu.Lock()
		defer mu.Unlock()
		total := 0
		for _, n := range runs {
			total += n
		}
		return len(runs) == len(msgs) && total > len(msgs) && len(ackFailed) > 0
	})
	st := c.Stats()
	mu.Lock()
	defer mu.Unlock()
	if fail.hits.Load() != 1 || st.AckFailures != int64(len(ackFailed)) || st.AckFailures < 1 {
		t.Fatalf("injected %d ack failures; Stats %+v; AckFailed hook for %v", fail.hits.Load(), st, ackFailed)
	}
	for _, id := range ackFailed {
		if runs[id] < 2 {
			t.Fatalf("message %s: ack failed, handled %d times, want it delivered again", id, runs[id])
		}
	}
	ef.CheckOnce(msgs)
	if d := ef.In.Stats().Duplicates; d < 1 {
		t.Fatalf("the inbox absorbed %d duplicates, want the redelivery after the failed ack", d)
	}
}

// With no DeadLetter, a message that keeps failing goes to the Pub/Sub topic
// DeadLetterTopic names (the topic plus ".dlq"), with the same id and key and
// the reason, and is acknowledged once that topic stored it.
func TestConsumerDeadLettersToTopic(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	topic := f.topic(t)
	ctx := context.Background()
	if _, err := f.client.TopicAdminClient.CreateTopic(ctx, &pb.Topic{Name: f.name(topic + ".dlq")}); err != nil {
		t.Fatal(err)
	}
	msgs := messages(topic, []string{"k"}, 2)
	if err := f.publisher(t, pubsub.PublisherConfig{}).Publish(ctx, msgs); err != nil {
		t.Fatal(err)
	}
	c, err := pubsub.NewConsumer(f.client, pubsub.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: func(_ context.Context, m *exactly.Message) error {
				if m.ID == msgs[0].ID {
					return errors.New("cannot apply")
				}
				return nil
			},
			Retry: exactly.RetryPolicy{MaxAttempts: 2, InitialBackoff: 10 * time.Millisecond},
		},
		Subscription: topic,
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx) }()
	waitUntil(t, "the dead letter stored and both messages done", func() bool {
		st := c.Stats()
		return len(f.stored(topic+".dlq")) == 1 && st.DeadLettered == 1 && st.Handled == 1
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	dl := f.stored(topic + ".dlq")[0]
	if dl.ID != msgs[0].ID || dl.Key != "k" || dl.Headers[exactly.HeaderDeadReason] != "cannot apply" || dl.Headers[exactly.HeaderDeadTopic] != topic {
		t.Fatalf("dead letter %+v", dl)
	}
	for _, m := range f.srv.Messages() {
		if m.Topic == f.name(topic) && m.Acks == 0 {
			t.Fatalf("message %s not acknowledged", m.Attributes[exactly.HeaderID])
		}
	}
}

// A publish the service accepted whose response was lost: the client
// library sends the request again and Pub/Sub stores a second copy, with
// the same exactly-id; Publish confirms the message, and a consumer with
// the SQL inbox applies it once.
func TestLostPublishResponseAbsorbed(t *testing.T) {
	t.Parallel()
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	f := newFake(t)
	topic := f.topic(t)
	ctx := context.Background()

	// A client whose first Publish call reaches the server and then fails
	// as if the answer were lost on the way back.
	var lost atomic.Bool
	loseAnswer := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		err := invoker(ctx, method, req, reply, cc, opts...)
		if err == nil && strings.HasSuffix(method, "/Publish") && lost.CompareAndSwap(false, true) {
			return status.Error(codes.Unavailable, "injected: the answer was lost")
		}
		return err
	}
	client, err := gpubsub.NewClient(ctx, project, option.WithEndpoint(f.srv.Addr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
		option.WithGRPCDialOption(grpc.WithUnaryInterceptor(loseAnswer)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	p, err := pubsub.NewPublisher(client, pubsub.PublisherConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	msgs := messages(topic, []string{"k"}, 1)
	if err := p.Publish(ctx, msgs); err != nil {
		t.Fatalf("Publish after a lost answer: %v (the library retries it)", err)
	}
	if got := f.stored(topic); len(got) != 2 || got[0].ID != msgs[0].ID || got[1].ID != msgs[0].ID {
		t.Fatalf("the server holds %d copies, want 2 of id %s: %+v", len(got), msgs[0].ID, got)
	}

	table := strings.ReplaceAll("exactly_ps_lost_"+exactly.NewID()[:13], "-", "_")
	in, err := inbox.NewSQL(inbox.Config{Dialect: inbox.Postgres, Table: table, Consumer: "lost-answer"})
	if err != nil {
		t.Fatal(err)
	}
	if err := in.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, "CREATE TABLE "+table+"_effects (id TEXT NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = db.ExecContext(ctx, "DROP TABLE IF EXISTS "+table+", "+table+"_effects")
		_, _ = db.ExecContext(ctx, "DELETE FROM exactly_migrations WHERE scope = $1", "inbox:"+table)
	})
	c, err := pubsub.NewConsumer(f.client, pubsub.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: in.Handler(db, func(ctx context.Context, tx *sql.Tx, m *exactly.Message) error {
				_, err := tx.ExecContext(ctx, "INSERT INTO "+table+"_effects (id) VALUES ($1)", m.ID)
				return err
			}),
			DeadLetter: &exactlytest.Recorder{},
		},
		Subscription: topic,
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx) }()
	waitUntil(t, "both copies handled", func() bool { return c.Stats().Handled == 2 })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	var n int
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM "+table+"_effects WHERE id = $1", msgs[0].ID).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("the effect of %s applied %d times from two copies, want 1", msgs[0].ID, n)
	}
}
