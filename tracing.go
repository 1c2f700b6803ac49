package exactly

import "context"

// Tracer carries a trace from the code that enqueues a message to the code
// that handles it, across the outbox, the relay and the broker: Enqueue
// stores the caller's trace context in the message's headers (W3C
// traceparent), and the consumers start the handler's span as a child of
// the context the headers carry, so one trace spans the producer's
// transaction, the relay's publish and the consumer's effect.
//
// Tracing is off unless a Tracer is configured (outbox.Config.Tracer, the
// consumers' Tracer settings); a nil Tracer costs nothing. The
// OpenTelemetry implementation is exactlyotel.New; no exporter is chosen
// for you.
type Tracer interface {
	// Inject stores the trace context of ctx in msg.Headers, creating the
	// map if needed. It leaves a message that already carries a trace
	// context, and does nothing when ctx carries none.
	Inject(ctx context.Context, msg *Message)
	// StartHandle starts the span of handling msg, whose parent is the
	// trace context in msg.Headers (or ctx's span when it carries none),
	// and returns the context to run the handler with and the function
	// that ends the span with the handling's outcome.
	StartHandle(ctx context.Context, msg *Message) (context.Context, func(err error))
}
