package inbox

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync/atomic"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/inboxstore"
)

// Outcome says what became of one delivery, and so whether the consumer may
// acknowledge it.
type Outcome int

const (
	// Retry means the effect was not applied by this delivery: the handler
	// failed, the store could not be reached, or (Redis) another runner is
	// processing the message right now. Do not acknowledge; let the broker
	// redeliver. It is the zero Outcome, returned with every error.
	Retry Outcome = iota
	// Processed means the handler ran and its effect is recorded as done.
	Processed
	// Duplicate means the effect had already been applied for this message
	// ID and consumer; the handler did not run. Acknowledge it.
	Duplicate
)

// Ack reports whether the consumer may acknowledge the delivery.
func (o Outcome) Ack() bool { return o == Processed || o == Duplicate }

func (o Outcome) String() string {
	switch o {
	case Retry:
		return "retry"
	case Processed:
		return "processed"
	case Duplicate:
		return "duplicate"
	}
	return fmt.Sprintf("Outcome(%d)", int(o))
}

// ErrNoID is returned for a message without an ID: it cannot be
// deduplicated, so it is never handled. Returned through a Handler it makes
// the consumer retry and then dead-letter the message, with this reason. It
// is exactly.ErrNoID, the error every consumer gives such a message.
var ErrNoID = exactly.ErrNoID

// ErrInProgress means another runner holds the lease on the message: it is
// being processed elsewhere right now (Redis store). The delivery must not
// be acknowledged; retry it later, when the other runner has either marked
// it done (the retry is then a duplicate) or released its lease.
var ErrInProgress = errors.New("inbox: message is being processed by another runner")

// Hooks report what the inbox does, for metrics and logs. All are optional
// and called synchronously on the handling goroutine: keep them fast.
type Hooks struct {
	// Processed is called after a message's effect is recorded as done,
	// with the time from the claim to the commit (or done marker).
	Processed func(msg *exactly.Message, took time.Duration)
	// Duplicate is called for each delivery suppressed because the message
	// was already processed.
	Duplicate func(msg *exactly.Message)
	// Failed is called when a delivery is not processed because the
	// handler returned an error or panicked, or the store failed. The
	// message is left for a retry; it is never marked done.
	Failed func(msg *exactly.Message, err error)

	// InProgress (Redis only) is called when a delivery finds the message
	// leased by another runner and is refused with ErrInProgress.
	InProgress func(msg *exactly.Message)
	// LeaseExpired (Redis only) is called when a handler succeeded after its
	// lease had run out. overlapped is true when another runner claimed or
	// finished the message meanwhile: the effect may then have been applied
	// twice. It means RedisConfig.Lease is shorter than the handler's
	// running time (or the process was paused).
	LeaseExpired func(msg *exactly.Message, overlapped bool)
	// MarkFailed (Redis only) is called when the handler succeeded but the
	// done marker could not be written. The delivery is still reported as
	// processed (its effect is applied, acknowledging it is right), but a
	// later redelivery would run it again once the lease expires.
	MarkFailed func(msg *exactly.Message, err error)
}

// Stats are running totals since the inbox was created, one per message.
type Stats struct {
	Processed  int64 // effects applied and recorded as done
	Duplicates int64 // deliveries suppressed
	Failed     int64 // deliveries not processed (handler or store failure)

	InProgress   int64 // Redis: deliveries refused with ErrInProgress
	LeaseExpired int64 // Redis: handlers that outlived their lease
	Overlapped   int64 // Redis: of those, messages another runner claimed meanwhile (possible double effect)
	MarkFailed   int64 // Redis: done markers that could not be written
}

type counters struct {
	processed, duplicates, failed             atomic.Int64
	inProgress, leaseExpired, overlapped, mfd atomic.Int64
}

func (c *counters) snapshot() Stats {
	return Stats{
		Processed: c.processed.Load(), Duplicates: c.duplicates.Load(), Failed: c.failed.Load(),
		InProgress: c.inProgress.Load(), LeaseExpired: c.leaseExpired.Load(),
		Overlapped: c.overlapped.Load(), MarkFailed: c.mfd.Load(),
	}
}

// observer counts outcomes and calls the hooks; both stores embed it.
type observer struct {
	hooks Hooks
	stats counters
}

func (o *observer) processed(msg *exactly.Message, took time.Duration) {
	o.stats.processed.Add(1)
	if o.hooks.Processed != nil {
		o.hooks.Processed(msg, took)
	}
}

func (o *observer) duplicate(msg *exactly.Message) {
	o.stats.duplicates.Add(1)
	if o.hooks.Duplicate != nil {
		o.hooks.Duplicate(msg)
	}
}

func (o *observer) failed(msg *exactly.Message, err error) {
	o.stats.failed.Add(1)
	if o.hooks.Failed != nil {
		o.hooks.Failed(msg, err)
	}
}

// panicError describes a recovered panic for the Failed hook.
func panicError(v any) error {
	if v == nil { // runtime.Goexit, as t.FailNow does
		return fmt.Errorf("%w: the handler's goroutine exited", exactly.ErrPanic)
	}
	return fmt.Errorf("%w: %v", exactly.ErrPanic, v)
}

// checkConsumer validates a consumer name.
func checkConsumer(name string) error {
	switch {
	case strings.TrimSpace(name) == "":
		return errors.New("inbox: Consumer is required: name the consumer (for example its consumer group), " +
			"so that two consumers of one message are deduplicated separately")
	case len(name) > inboxstore.MaxConsumerLen:
		return fmt.Errorf("inbox: Consumer is %d bytes, the limit is %d", len(name), inboxstore.MaxConsumerLen)
	}
	return nil
}

// checkMessage refuses what cannot be deduplicated. maxID is 0 for no limit.
func checkMessage(msg *exactly.Message, maxID int) error {
	switch {
	case msg == nil:
		return errors.New("inbox: nil message")
	case msg.ID == "":
		return ErrNoID
	case maxID > 0 && len(msg.ID) > maxID:
		return fmt.Errorf("inbox: message ID is %d bytes, the limit is %d", len(msg.ID), maxID)
	}
	return nil
}

// isNil catches nil interfaces and typed nil pointers (a nil *pgxpool.Pool
// in a PgxBeginner).
func isNil(v any) bool {
	if v == nil {
		return true
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.Pointer, reflect.Map, reflect.Slice, reflect.Func, reflect.Interface, reflect.Chan:
		return rv.IsNil()
	}
	return false
}
