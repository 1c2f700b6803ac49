// Package exactlyotel traces messages with OpenTelemetry, from the
// transaction that enqueues them to the handler that applies them.
//
// Tracing is off by default everywhere in exactly. To turn it on, create a
// Tracer and hand it to the parts that should take part:
//
//	tr := exactlyotel.New()                                                  // global TracerProvider, W3C trace context
//	ob, _ := outbox.New(outbox.Config{Dialect: outbox.Postgres, Tracer: tr})   // Enqueue writes traceparent
//	r, _ := relay.New(relay.Config{..., Publisher: tr.Publisher(pub)})        // a "send" span per message
//	c, _ := kafka.NewConsumer(seeds, kafka.ConsumerConfig{ConsumerConfig: exactly.ConsumerConfig{Handler: h, Tracer: tr}, ...}) // h runs in a "process" span
//
// Enqueue stores the trace context of its ctx (the span of the business
// transaction) in the message's headers as W3C traceparent and tracestate.
// The headers travel through the outbox table and the broker unchanged,
// re-sends included. The relay's send span and the consumer's process span
// are both children of that context, so one trace shows the request that
// wrote the order, the relay's publish and every delivery's handling; the
// handler's own spans (database calls, HTTP calls) nest under the process
// span. A duplicate delivery gets a process span of its own in the same
// trace, which is how a redelivery shows up.
//
// The package chooses no exporter and sets no global: it uses the
// TracerProvider you registered with otel.SetTracerProvider (or the one
// given with WithTracerProvider). With none registered the spans are
// no-ops, and the trace context still travels in the headers.
package exactlyotel

import (
	"context"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/exactlyonce/exactly"
)

// ScopeName is the instrumentation scope of the spans this package starts.
const ScopeName = "github.com/exactlyonce/exactly/exactlyotel"

// Tracer implements exactly.Tracer with OpenTelemetry.
type Tracer struct {
	provider   trace.TracerProvider // nil: the global one, looked up per span
	propagator propagation.TextMapPropagator
	system     string
}

var _ exactly.Tracer = (*Tracer)(nil)

// Option configures a Tracer.
type Option func(*Tracer)

// WithTracerProvider sets the provider of the spans, overriding the default
// of the global one (otel.GetTracerProvider, looked up at each span, so a
// provider registered after New is used).
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(t *Tracer) { t.provider = tp }
}

// WithPropagator sets how the trace context is written into and read from
// message headers, overriding the default of W3C Trace Context
// (traceparent, tracestate). Producers and consumers must agree.
func WithPropagator(p propagation.TextMapPropagator) Option {
	return func(t *Tracer) { t.propagator = p }
}

// WithMessagingSystem sets the messaging.system attribute of the spans
// ("kafka", "nats", "rabbitmq"); by default it is left out.
func WithMessagingSystem(name string) Option {
	return func(t *Tracer) { t.system = name }
}

// New returns a Tracer with the defaults above, changed by opts.
func New(opts ...Option) *Tracer {
	t := &Tracer{propagator: propagation.TraceContext{}}
	for _, o := range opts {
		o(t)
	}
	if t.propagator == nil {
		t.propagator = propagation.TraceContext{}
	}
	return t
}

func (t *Tracer) tracer() trace.Tracer {
	tp := t.provider
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	return tp.Tracer(ScopeName)
}

// Inject implements exactly.Tracer: it writes the trace context of ctx
// into msg.Headers, unless ctx has no valid span context or the message
// already carries one of the propagator's fields.
func (t *Tracer) Inject(ctx context.Context, msg *exactly.Message) {
	if msg == nil || !trace.SpanContextFromContext(ctx).IsValid() {
		return
	}
	for _, f := range t.propagator.Fields() {
		if _, ok := msg.Headers[f]; ok {
			return // the message carries a trace of its own
		}
	}
	if msg.Headers == nil {
		msg.Headers = make(map[string]string, 2)
	}
	t.propagator.Inject(ctx, propagation.MapCarrier(msg.Headers))
}

// Extract returns ctx with the trace context carried by msg's headers as
// its remote parent; ctx itself when they carry none.
func (t *Tracer) Extract(ctx context.Context, msg *exactly.Message) context.Context {
	if msg == nil || len(msg.Headers) == 0 {
		return ctx
	}
	return t.propagator.Extract(ctx, propagation.MapCarrier(msg.Headers))
}

func (t *Tracer) attrs(msg *exactly.Message, op string) []attribute.KeyValue {
	kv := []attribute.KeyValue{
		attribute.String("messaging.operation.type", op),
		attribute.String("messaging.destination.name", msg.Topic),
		attribute.String("messaging.message.id", msg.ID),
	}
	if msg.Key != "" {
		kv = append(kv, attribute.String("exactly.key", msg.Key))
	}
	if t.system != "" {
		kv = append(kv, attribute.String("messaging.system", t.system))
	}
	return kv
}

// StartHandle implements exactly.Tracer: a span of kind consumer named
// "process <topic>", child of the trace context in msg's headers, ended
// with an error status when the handling failed.
func (t *Tracer) StartHandle(ctx context.Context, msg *exactly.Message) (context.Context, func(error)) {
	ctx, span := t.tracer().Start(t.Extract(ctx, msg), "process "+msg.Topic,
		trace.WithSpanKind(trace.SpanKindConsumer), trace.WithAttributes(t.attrs(msg, "process")...))
	return ctx, func(err error) { end(span, err) }
}

func end(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// Publisher wraps p so that each message it publishes gets a span of kind
// producer named "send <topic>", child of the trace context in the
// message's headers, from the call to the broker's confirmation (or
// failure). Give it to the relay. The headers are not changed: the
// consumer's span stays a child of the enqueuing code's span. When p is an
// exactly.PipelinedPublisher, so is the Publisher returned, and a span ends
// when the outcome of its Send is awaited.
func (t *Tracer) Publisher(p exactly.Publisher) exactly.Publisher {
	w := &publisher{t: t, inner: p}
	if pp, ok := p.(exactly.PipelinedPublisher); ok {
		return &pipelinedPublisher{publisher: w, pipe: pp}
	}
	return w
}

type publisher struct {
	t     *Tracer
	inner exactly.Publisher
}

func (p *publisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	spans := p.start(ctx, msgs)
	err := p.inner.Publish(ctx, msgs)
	p.end(spans, err)
	return err
}

func (p *publisher) start(ctx context.Context, msgs []*exactly.Message) []trace.Span {
	tr := p.t.tracer()
	spans := make([]trace.Span, len(msgs))
	for i, m := range msgs {
		_, spans[i] = tr.Start(p.t.Extract(ctx, m), "send "+m.Topic,
			trace.WithSpanKind(trace.SpanKindProducer), trace.WithAttributes(p.t.attrs(m, "send")...))
	}
	return spans
}

func (p *publisher) end(spans []trace.Span, err error) {
	for i, e := range exactly.PerMessage(err, len(spans)) {
		end(spans[i], e)
	}
}

type pipelinedPublisher struct {
	*publisher
	pipe exactly.PipelinedPublisher
}

func (p *pipelinedPublisher) Send(ctx context.Context, msgs []*exactly.Message) func() error {
	spans := p.start(ctx, msgs)
	wait := p.pipe.Send(ctx, msgs)
	return func() error {
		err := wait()
		p.end(spans, err)
		return err
	}
}

func (p *pipelinedPublisher) Resume(ctx context.Context, m *exactly.Message) { p.pipe.Resume(ctx, m) }
