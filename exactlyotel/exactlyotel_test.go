package exactlyotel_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"github.com/twmb/franz-go/pkg/kfake"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/amqp"
	"github.com/exactlyonce/exactly/exactlyotel"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// setup returns a tracer recording into an in-memory span recorder.
func setup(t *testing.T) (*exactlyotel.Tracer, *tracetest.SpanRecorder, trace.Tracer) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	return exactlyotel.New(exactlyotel.WithTracerProvider(tp)), rec, tp.Tracer("app")
}

func sqliteDB(t *testing.T) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "t.db")+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func spanNamed(rec *tracetest.SpanRecorder, name string) sdktrace.ReadOnlySpan {
	for _, s := range rec.Ended() {
		if s.Name() == name {
			return s
		}
	}
	return nil
}

// enqueue writes one message through an outbox with the tracer, inside the
// span "place order", and returns the message and that span's context.
func enqueue(t *testing.T, db *sql.DB, ob *outbox.Outbox, app trace.Tracer, topic string) (*exactly.Message, trace.SpanContext) {
	t.Helper()
	ctx, span := app.Start(context.Background(), "place order")
	defer span.End()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	msg := &exactly.Message{Topic: topic, Key: "customer-1", Payload: []byte(`{"order":1}`)}
	if err := ob.Enqueue(ctx, tx, msg); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("00-%s-%s-01", span.SpanContext().TraceID(), span.SpanContext().SpanID())
	if got := msg.Headers["traceparent"]; got != want {
		t.Fatalf("Enqueue wrote traceparent %q, want %q", got, want)
	}
	return msg, span.SpanContext()
}

// One trace from the producer's transaction to the consumer's effect:
// SQLite outbox -> relay -> Kafka (kfake) -> kafka.Consumer.
func TestTraceOutboxRelayKafkaConsumer(t *testing.T) {
	tr, rec, app := setup(t)
	db := sqliteDB(t)
	ob, err := outbox.New(outbox.Config{Dialect: outbox.SQLite, Tracer: tr})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ob.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "orders", "orders.dlq"))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	pub, err := kafka.NewClientPublisher(cluster.ListenAddrs())
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()

	msg, parent := enqueue(t, db, ob, app, "orders")

	r, err := relay.New(relay.Config{Outbox: ob, DB: db, Publisher: tr.Publisher(pub), PollInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	rctx, stopRelay := context.WithCancel(ctx)
	relayDone := make(chan error, 1)
	go func() { relayDone <- r.Run(rctx) }()

	handled := make(chan trace.SpanContext, 1)
	c, err := kafka.NewConsumer(cluster.ListenAddrs(), kafka.ConsumerConfig{Group: "g", Topics: []string{"orders"},
		ConsumerConfig: exactly.ConsumerConfig{Tracer: tr, Handler: func(ctx context.Context, m *exactly.Message) error {
			// The effect's own span nests under the consumer's.
			_, s := app.Start(ctx, "apply promotion")
			s.End()
			if m.ID == msg.ID {
				handled <- trace.SpanContextFromContext(ctx)
			}
			return nil
		}}})
	if err != nil {
		t.Fatal(err)
	}
	cctx, stopConsumer := context.WithCancel(ctx)
	consumerDone := make(chan error, 1)
	go func() { consumerDone <- c.Run(cctx) }()

	var inHandler trace.SpanContext
	select {
	case inHandler = <-handled:
	case <-ctx.Done():
		t.Fatal("the message was not consumed")
	}
	stopConsumer()
	stopRelay()
	<-consumerDone
	<-relayDone

	process := spanNamed(rec, "process orders")
	send := spanNamed(rec, "send orders")
	apply := spanNamed(rec, "apply promotion")
	if process == nil || send == nil || apply == nil {
		t.Fatalf("spans missing: process %v, send %v, apply %v", process != nil, send != nil, apply != nil)
	}
	if process.Parent().SpanID() != parent.SpanID() || process.SpanContext().TraceID() != parent.TraceID() {
		t.Errorf("the consumer's span has parent %s in trace %s, want the enqueuing span %s in trace %s",
			process.Parent().SpanID(), process.SpanContext().TraceID(), parent.SpanID(), parent.TraceID())
	}
	if !process.Parent().IsRemote() || process.SpanKind() != trace.SpanKindConsumer {
		t.Errorf("process span: remote parent %v, kind %v", process.Parent().IsRemote(), process.SpanKind())
	}
	if inHandler.SpanID() != process.SpanContext().SpanID() {
		t.Errorf("the handler's context holds span %s, not the process span %s", inHandler.SpanID(), process.SpanContext().SpanID())
	}
	if apply.Parent().SpanID() != process.SpanContext().SpanID() {
		t.Errorf("the effect's span is not a child of the process span")
	}
	if send.Parent().SpanID() != parent.SpanID() || send.SpanKind() != trace.SpanKindProducer {
		t.Errorf("the relay's send span has parent %s (kind %v), want %s", send.Parent().SpanID(), send.SpanKind(), parent.SpanID())
	}
	attrs := map[string]string{}
	for _, kv := range process.Attributes() {
		attrs[string(kv.Key)] = kv.Value.Emit()
	}
	if attrs["messaging.message.id"] != msg.ID || attrs["messaging.destination.name"] != "orders" || attrs["messaging.operation.type"] != "process" {
		t.Errorf("process span attributes: %v", attrs)
	}
}

// The NATS and AMQP consumers continue the trace the same way.
func TestTraceConsumers(t *testing.T) {
	t.Run("NATS", func(t *testing.T) {
		testenv.Need(t, testenv.NATS)
		tr, rec, app := setup(t)
		nc, err := natsgo.Connect(testenv.NATSURL())
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		name := fmt.Sprintf("OTEL_%d", time.Now().UnixNano())
		subject := strings.ToLower(name) + ".orders"
		if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{subject, subject + ".dlq"}, Storage: jetstream.MemoryStorage}); err != nil {
			t.Fatal(err)
		}
		defer js.DeleteStream(context.Background(), name)
		pub, err := nats.NewPublisher(js)
		if err != nil {
			t.Fatal(err)
		}
		msg, parent := traced(t, tr, app, subject)
		if err := tr.Publisher(pub).Publish(ctx, []*exactly.Message{msg}); err != nil {
			t.Fatal(err)
		}
		got := make(chan trace.SpanContext, 1)
		c, err := nats.NewConsumer(js, nats.ConsumerConfig{Stream: name, Durable: "d", FilterSubjects: []string{subject},
			ConsumerConfig: exactly.ConsumerConfig{Tracer: tr, Handler: func(ctx context.Context, m *exactly.Message) error {
				got <- trace.SpanContextFromContext(ctx)
				return nil
			}}})
		if err != nil {
			t.Fatal(err)
		}
		checkConsumed(t, ctx, rec, parent, "process "+subject, got, c.Run)
	})
	t.Run("AMQP", func(t *testing.T) {
		testenv.Need(t, testenv.RabbitMQ)
		tr, rec, app := setup(t)
		url := "amqp://guest:guest@" + testenv.RabbitMQ.Addr + "/"
		queue := fmt.Sprintf("exactlyotel-%d", time.Now().UnixNano())
		conn, err := amqp091.Dial(url)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ch.QueueDeclare(queue, false, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		defer ch.QueueDelete(queue, false, false, false)
		defer ch.QueueDelete(queue+".dlq", false, false, false) // the consumer declares it
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		pub, err := amqp.NewPublisher(url)
		if err != nil {
			t.Fatal(err)
		}
		defer pub.Close()
		msg, parent := traced(t, tr, app, queue)
		if err := pub.Publish(ctx, []*exactly.Message{msg}); err != nil {
			t.Fatal(err)
		}
		got := make(chan trace.SpanContext, 1)
		c, err := amqp.NewConsumer(url, amqp.ConsumerConfig{
			ConsumerConfig: exactly.ConsumerConfig{
				Handler: func(ctx context.Context, m *exactly.Message) error {
					got <- trace.SpanContextFromContext(ctx)
					return nil
				},
				Tracer: tr,
			},
			Queue: queue,
		})
		if err != nil {
			t.Fatal(err)
		}
		checkConsumed(t, ctx, rec, parent, "process "+queue, got, c.Run)
	})
}

// traced returns a message carrying the trace context of a fresh span.
func traced(t *testing.T, tr *exactlyotel.Tracer, app trace.Tracer, topic string) (*exactly.Message, trace.SpanContext) {
	t.Helper()
	ctx, span := app.Start(context.Background(), "place order")
	defer span.End()
	msg := &exactly.Message{ID: exactly.NewID(), Topic: topic, Payload: []byte("x")}
	tr.Inject(ctx, msg)
	return msg, span.SpanContext()
}

func checkConsumed(t *testing.T, ctx context.Context, rec *tracetest.SpanRecorder, parent trace.SpanContext, name string,
	got <-chan trace.SpanContext, run func(context.Context) error) {
	t.Helper()
	rctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	runErr := make(chan error, 1)
	wg.Go(func() { runErr <- run(rctx) })
	var inHandler trace.SpanContext
	select {
	case inHandler = <-got:
	case err := <-runErr:
		t.Fatalf("the consumer stopped: %v", err)
	case <-ctx.Done():
		t.Fatal("the message was not consumed")
	}
	stop()
	wg.Wait()
	s := spanNamed(rec, name)
	if s == nil {
		t.Fatalf("no span %q", name)
	}
	if s.Parent().SpanID() != parent.SpanID() || s.SpanContext().TraceID() != parent.TraceID() {
		t.Errorf("%s: parent %s, want %s", name, s.Parent().SpanID(), parent.SpanID())
	}
	if inHandler.SpanID() != s.SpanContext().SpanID() {
		t.Errorf("%s: the handler's context holds span %s, not %s", name, inHandler.SpanID(), s.SpanContext().SpanID())
	}
}

// Off by default: an outbox without a Tracer adds no header, even when the
// caller's context carries a span.
func TestOffByDefault(t *testing.T) {
	_, _, app := setup(t)
	db := sqliteDB(t)
	ob := exactlytest.MigratedOutbox(t, db, outbox.SQLite, "otel_off")
	ctx, span := app.Start(context.Background(), "place order")
	defer span.End()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	msg := &exactly.Message{Topic: "t"}
	if err := ob.Enqueue(ctx, tx, msg); err != nil {
		t.Fatal(err)
	}
	if msg.Headers != nil {
		t.Fatalf("headers added without a Tracer: %v", msg.Headers)
	}
}

func TestInject(t *testing.T) {
	tr, _, app := setup(t)
	// No span in ctx: nothing to carry.
	msg := &exactly.Message{Topic: "t"}
	tr.Inject(context.Background(), msg)
	if msg.Headers != nil {
		t.Fatalf("headers without a span: %v", msg.Headers)
	}
	// A message that carries a trace keeps it.
	ctx, span := app.Start(context.Background(), "s")
	defer span.End()
	own := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	msg = &exactly.Message{Topic: "t", Headers: map[string]string{"traceparent": own, "x": "y"}}
	tr.Inject(ctx, msg)
	if msg.Headers["traceparent"] != own || msg.Headers["x"] != "y" {
		t.Fatalf("headers changed: %v", msg.Headers)
	}
}

// A failed send and a failed handling end their spans with an error.
func TestErrorStatus(t *testing.T) {
	tr, rec, app := setup(t)
	ok, _ := traced(t, tr, app, "a")
	failing, _ := traced(t, tr, app, "b")
	boom := errors.New("broker refused it")
	p := tr.Publisher(exactly.PublisherFunc(func(_ context.Context, msgs []*exactly.Message) error {
		return exactly.NewBatchError([]error{nil, boom})
	}))
	if err := p.Publish(context.Background(), []*exactly.Message{ok, failing}); err == nil {
		t.Fatal("the batch error was swallowed")
	}
	_, end := tr.StartHandle(context.Background(), ok)
	end(errors.New("handler failed"))
	for name, wantErr := range map[string]bool{"send a": false, "send b": true, "process a": true} {
		s := spanNamed(rec, name)
		if s == nil {
			t.Fatalf("no span %q", name)
		}
		if got := s.Status().Code.String() == "Error"; got != wantErr {
			t.Errorf("%s: status %v, want error %v", name, s.Status(), wantErr)
		}
	}
}

// pipe is a PipelinedPublisher whose outcomes the test releases.
type pipe struct {
	outcome chan error
	resumed []string
}

func (p *pipe) Publish(ctx context.Context, msgs []*exactly.Message) error {
	return p.Send(ctx, msgs)()
}
func (p *pipe) Send(context.Context, []*exactly.Message) func() error {
	return func() error { return <-p.outcome }
}
func (p *pipe) Resume(_ context.Context, m *exactly.Message) { p.resumed = append(p.resumed, m.ID) }

// Wrapping a PipelinedPublisher keeps it one, so the relay still overlaps
// its batches; a send span ends when the Send's outcome is awaited.
func TestPipelinedPublisherStaysPipelined(t *testing.T) {
	tr, rec, app := setup(t)
	ok, _ := traced(t, tr, app, "a")
	failing, _ := traced(t, tr, app, "b")
	inner := &pipe{outcome: make(chan error, 1)}
	pp, isPipe := tr.Publisher(inner).(exactly.PipelinedPublisher)
	if !isPipe {
		t.Fatal("the traced publisher of a PipelinedPublisher is not one")
	}
	pp.Resume(context.Background(), ok)
	if len(inner.resumed) != 1 || inner.resumed[0] != ok.ID {
		t.Fatalf("Resume reached the publisher with %v", inner.resumed)
	}
	wait := pp.Send(context.Background(), []*exactly.Message{ok, failing})
	if s := spanNamed(rec, "send a"); s != nil {
		t.Fatal("the send span ended before the outcome was known")
	}
	inner.outcome <- exactly.NewBatchError([]error{nil, errors.New("broker refused it")})
	if err := wait(); err == nil {
		t.Fatal("the batch error was swallowed")
	}
	for name, wantErr := range map[string]bool{"send a": false, "send b": true} {
		s := spanNamed(rec, name)
		if s == nil {
			t.Fatalf("no span %q", name)
		}
		if got := s.Status().Code.String() == "Error"; got != wantErr {
			t.Errorf("%s: status %v, want error %v", name, s.Status(), wantErr)
		}
	}
}
