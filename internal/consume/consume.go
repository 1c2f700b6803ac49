// Package consume is the handler policy every consumer adapter shares:
// panics recovered as failures, retries with backoff, and after the last
// attempt the message goes to a dead-letter destination with the reason, so
// the consumer can acknowledge it and move on without losing it.
package consume

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"runtime/debug"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/pause"
)

// Policy is a validated handler policy.
type Policy struct {
	Retry exactly.RetryPolicy
	// DeadLetter receives messages whose handler failed MaxAttempts times.
	DeadLetter exactly.Publisher
	// DeadLetterTopic names the destination; default msg.Topic + ".dlq".
	DeadLetterTopic func(msg *exactly.Message) string
	Logger          *slog.Logger
	Hooks           Hooks
	// Tracer, when set, runs each message's handling (every attempt, and
	// the dead letter if it comes to that) in a span that continues the
	// trace carried by the message's headers. Nil: no tracing.
	Tracer exactly.Tracer
}

// Hooks report outcomes for metrics: the consumers' shared hooks. Process
// calls Handled, Failed and DeadLettered; the adapter calls AckFailed
// (through Policy.AckFailed).
type Hooks = exactly.ConsumerHooks

// Stats are the running totals behind exactly.ConsumerStats. Process
// counts Handled, Failed and DeadLettered; the adapter counts the others.
type Stats struct {
	Handled, Failed, DeadLettered       atomic.Int64
	Received, AckFailures, Redeliveries atomic.Int64
}

// Load returns the totals.
func (s *Stats) Load() exactly.ConsumerStats {
	return exactly.ConsumerStats{
		Received:     s.Received.Load(),
		Handled:      s.Handled.Load(),
		Failed:       s.Failed.Load(),
		DeadLettered: s.DeadLettered.Load(),
		AckFailures:  s.AckFailures.Load(),
		Redeliveries: s.Redeliveries.Load(),
	}
}

// FromConfig is the policy of a consumer configured with cfg (defaults
// already applied, see exactly.ConsumerConfig.WithDefaults), dead-lettering
// to deadLetter: cfg.DeadLetter, or the broker's own destination when that
// is nil.
func FromConfig(cfg exactly.ConsumerConfig, deadLetter exactly.Publisher) (*Policy, error) {
	return New(Policy{
		Retry:           cfg.Retry,
		DeadLetter:      deadLetter,
		DeadLetterTopic: cfg.DeadLetterTopic,
		Logger:          cfg.Logger,
		Hooks:           cfg.Hooks,
		Tracer:          cfg.Tracer,
	})
}

// AckFailed counts an acknowledgement of msg that failed, in st when it is
// not nil, and calls the AckFailed hook.
func (p *Policy) AckFailed(msg *exactly.Message, err error, st *Stats) {
	if st != nil {
		st.AckFailures.Add(1)
	}
	if p.Hooks.AckFailed != nil {
		p.Hooks.AckFailed(msg, err)
	}
}

// New validates p and fills in defaults.
func New(p Policy) (*Policy, error) {
	r, err := p.Retry.WithDefaults()
	if err != nil {
		return nil, err
	}
	p.Retry = r
	if p.DeadLetter == nil {
		return nil, errors.New("a dead-letter publisher is required: messages that keep failing must go somewhere, never be dropped")
	}
	if p.DeadLetterTopic == nil {
		p.DeadLetterTopic = func(m *exactly.Message) string { return m.Topic + ".dlq" }
	}
	if p.Logger == nil {
		p.Logger = slog.Default()
	}
	return &p, nil
}

// Outcome says why Process let a message go.
type Outcome int

const (
	// Handled: the handler returned nil.
	Handled Outcome = iota + 1
	// DeadLettered: the handler failed every attempt and the message is now
	// in the dead-letter destination.
	DeadLettered
)

// ErrAbort, wrapped in a handler's error, stops Process at once without a
// retry or a dead letter: the consumer lost the right to process the message
// (fenced), and the message is left for its new owner.
var ErrAbort = errors.New("processing aborted")

// Call runs h and turns a panic into an error wrapping exactly.ErrPanic.
func Call(ctx context.Context, h exactly.Handler, msg *exactly.Message) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("%w: %v\n%s", exactly.ErrPanic, v, debug.Stack())
		}
	}()
	return h(ctx, msg)
}

// Process runs h for msg until it succeeds, or dead-letters msg after the
// last attempt. A nil error means the consumer may acknowledge the message.
// An error (the context ended) means it must not: the broker redelivers.
// firstAttempt lets a consumer carry attempts over from earlier deliveries
// (JetStream's delivery count); pass 1 otherwise.
func (p *Policy) Process(ctx context.Context, h exactly.Handler, msg *exactly.Message, firstAttempt int, st *Stats) (out Outcome, err error) {
	if p.Tracer != nil {
		var end func(error)
		ctx, end = p.Tracer.StartHandle(ctx, msg)
		defer func() {
			if err == nil && out == DeadLettered {
				end(fmt.Errorf("message %s dead-lettered after %d attempts", msg.ID, p.Retry.MaxAttempts))
				return
			}
			end(err)
		}()
	}
	return p.process(ctx, h, msg, firstAttempt, st)
}

func (p *Policy) process(ctx context.Context, h exactly.Handler, msg *exactly.Message, firstAttempt int, st *Stats) (Outcome, error) {
	attempt := max(firstAttempt, 1)
	for {
		start := time.Now()
		err := Call(ctx, h, msg)
		if err == nil {
			if st != nil {
				st.Handled.Add(1)
			}
			if p.Hooks.Handled != nil {
				p.Hooks.Handled(msg, time.Since(start))
			}
			return Handled, nil
		}
		if ctx.Err() != nil {
			return 0, fmt.Errorf("message %s not handled: %w", msg.ID, ctx.Err())
		}
		if errors.Is(err, ErrAbort) {
			return 0, err
		}
		if st != nil {
			st.Failed.Add(1)
		}
		if p.Hooks.Failed != nil {
			p.Hooks.Failed(msg, attempt, err)
		}
		if attempt >= p.Retry.MaxAttempts {
			if err := p.deadLetter(ctx, msg, attempt, err); err != nil {
				return 0, err
			}
			if st != nil {
				st.DeadLettered.Add(1)
			}
			return DeadLettered, nil
		}
		p.Logger.Debug("handler failed; retrying", "id", msg.ID, "attempt", attempt, "err", err)
		if !pause.For(ctx, p.Retry.Backoff(attempt)) {
			return 0, fmt.Errorf("message %s not handled: %w", msg.ID, ctx.Err())
		}
		attempt++
	}
}

// deadLetter publishes a copy of msg with the reason to the dead-letter
// destination, retrying until the broker confirms or ctx ends: a message is
// acknowledged only once it is safe somewhere.
//
// When the destination refuses the copy itself (exactly.ErrUnpublishable:
// a message near the size limit does not fit with the reason headers), the
// copy is sent again at once with the reason cut to shortReason bytes. If
// that is refused too, nothing more can be done without dropping data: the
// message stays unacknowledged, the error names the way out, and the
// retries go on at the slowest backoff until the destination accepts it.
func (p *Policy) deadLetter(ctx context.Context, msg *exactly.Message, attempts int, cause error) error {
	dl := DeadLetterCopy(msg, p.DeadLetterTopic(msg), attempts, cause)
	short := false
	for try := 1; ; try++ {
		err := exactly.PerMessage(p.DeadLetter.Publish(ctx, []*exactly.Message{&dl}), 1)[0]
		if err == nil {
			p.Logger.Warn("message dead-lettered", "id", msg.ID, "topic", msg.Topic, "to", dl.Topic, "attempts", attempts, "err", cause, "reason_cut", short)
			if p.Hooks.DeadLettered != nil {
				p.Hooks.DeadLettered(msg, cause)
			}
			return nil
		}
		wait := p.Retry.Backoff(try)
		switch {
		case errors.Is(err, exactly.ErrUnpublishable) && !short:
			short = true
			if r := dl.Headers[exactly.HeaderDeadReason]; len(r) > shortReason {
				dl.Headers[exactly.HeaderDeadReason] = r[:shortReason]
			}
			p.Logger.Warn("the dead-letter destination refused the copy; sending it again with the reason cut short", "id", msg.ID, "to", dl.Topic, "err", err)
			try--
			continue
		case errors.Is(err, exactly.ErrUnpublishable):
			p.Logger.Error("the dead-letter destination refuses this message itself; it stays unacknowledged (nothing is lost) and this consumer waits on it: "+
				"raise the destination's message size limit or fix the destination, or remove the message from the source by hand",
				"id", msg.ID, "topic", msg.Topic, "to", dl.Topic, "bytes", len(dl.Payload), "err", err)
			wait = p.Retry.MaxBackoff
		default:
			p.Logger.Error("dead-letter publish failed; retrying", "id", msg.ID, "to", dl.Topic, "err", err)
		}
		if !pause.For(ctx, wait) {
			return fmt.Errorf("message %s failed %d times and could not be dead-lettered (%v): %w", msg.ID, attempts, err, ctx.Err())
		}
	}
}

// shortReason is how much of the failure reason a dead letter keeps when the
// destination refused the copy with the whole reason.
const shortReason = 200

// DeadLetterCopy is the copy of msg sent to the dead-letter destination
// topic: the same id, key and payload, its headers plus the reason (cut to
// 2000 bytes), the attempts, the original topic and the time.
func DeadLetterCopy(msg *exactly.Message, topic string, attempts int, cause error) exactly.Message {
	dl := *msg
	dl.Headers = maps.Clone(msg.Headers)
	if dl.Headers == nil {
		dl.Headers = map[string]string{}
	}
	reason := cause.Error()
	if len(reason) > 2000 {
		reason = reason[:2000]
	}
	dl.Headers[exactly.HeaderDeadReason] = reason
	dl.Headers[exactly.HeaderDeadAttempts] = strconv.Itoa(attempts)
	dl.Headers[exactly.HeaderDeadTopic] = msg.Topic
	dl.Headers[exactly.HeaderDeadAt] = time.Now().UTC().Format(time.RFC3339Nano)
	dl.Topic = topic
	return dl
}
