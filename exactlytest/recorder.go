package exactlytest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/exactlyonce/exactly"
)

// ErrInjected is the error a Recorder fault returns when none is given.
var ErrInjected = errors.New("exactlytest: injected failure")

// Recorder is an in-memory exactly.Publisher for tests. It records every
// message it confirms, counts deliveries and attempts per ID, and injects
// faults on demand. It is safe for concurrent use; the zero value is ready.
//
// A call to Publish goes through these steps, in order:
//
//  1. a done context fails the whole call, nothing delivered;
//  2. the delay (SetDelay) is waited out, and a context that ends meanwhile
//     fails the whole call, nothing delivered;
//  3. a pending call fault (FailCalls) fails the whole call, nothing
//     delivered;
//  4. each message is checked in slice order: an invalid message (nil, no
//     ID, no topic) or one larger than MaxPayload fails as unpublishable,
//     then FailIndex and FailWhen faults apply; the others are delivered;
//  5. a pending lost-ack fault (LoseAcks) returns its error although every
//     message of step 4 was delivered: the ambiguous outcome of a timeout
//     after the broker accepted.
//
// Per-message failures come back as a *exactly.BatchError. Messages after a
// failed one with the same key are still delivered, as a pipelining broker
// client would do.
type Recorder struct {
	// MaxPayload, when positive, makes a message whose payload is larger
	// than this many bytes fail as unpublishable, as a broker refuses it.
	// Set it before the first Publish.
	MaxPayload int
	// Dedup makes the Recorder confirm a message whose ID it has already
	// delivered without storing a second copy, as NATS JetStream does with
	// Nats-Msg-Id. Set it before the first Publish.
	Dedup bool

	mu        sync.Mutex
	delivered []exactly.Message
	count     map[string]int // deliveries per ID
	attempts  map[string]int // messages handed to Publish per ID
	calls     int

	delay      time.Duration
	failIndex  map[int]error
	failWhen   []func(*exactly.Message) error
	failCalls  int // calls left to fail; -1 means every call
	failErr    error
	loseAcks   int // calls left to lose the ack of; -1 means every call
	loseAckErr error
}

// FailIndex makes the message at index i of every later Publish call fail
// with err (ErrInjected when nil), until Heal. Wrap err with
// exactly.Unpublishable to simulate a message the broker refuses for good.
func (r *Recorder) FailIndex(i int, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.failIndex == nil {
		r.failIndex = make(map[int]error)
	}
	r.failIndex[i] = orInjected(err)
}

// FailWhen makes every later message for which fn returns a non-nil error
// fail with that error, until Heal. fn runs with the Recorder's lock held:
// it must not call the Recorder.
func (r *Recorder) FailWhen(fn func(*exactly.Message) error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failWhen = append(r.failWhen, fn)
}

// FailCalls makes the next n Publish calls fail whole with err (ErrInjected
// when nil), delivering nothing; n < 0 fails every call until Heal.
func (r *Recorder) FailCalls(n int, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failCalls, r.failErr = n, orInjected(err)
}

// LoseAcks makes the next n Publish calls deliver their messages and then
// return err (ErrInjected when nil), as when the broker accepted a batch but
// its acknowledgement was lost; n < 0 does it for every call until Heal.
// A caller that retries then delivers duplicates with the same IDs.
func (r *Recorder) LoseAcks(n int, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.loseAcks, r.loseAckErr = n, orInjected(err)
}

// SetDelay makes every later Publish call wait d before doing anything, or
// fail whole with the context's error if it ends first. Zero removes it.
func (r *Recorder) SetDelay(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.delay = d
}

// Heal removes every fault and the delay. What was recorded stays.
func (r *Recorder) Heal() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.delay, r.failIndex, r.failWhen = 0, nil, nil
	r.failCalls, r.failErr, r.loseAcks, r.loseAckErr = 0, nil, 0, nil
}

// Publish implements exactly.Publisher.
func (r *Recorder) Publish(ctx context.Context, msgs []*exactly.Message) error {
	r.mu.Lock()
	r.calls++
	delay := r.delay
	r.mu.Unlock()

	if err := ctx.Err(); err != nil {
		return fmt.Errorf("exactlytest: publish not started: %w", err)
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("exactlytest: publish abandoned during the injected delay: %w", ctx.Err())
		case <-t.C:
		}
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if r.attempts == nil {
		r.attempts = make(map[string]int)
		r.count = make(map[string]int)
	}
	for _, m := range msgs {
		if m != nil {
			r.attempts[m.ID]++
		}
	}
	if r.failCalls != 0 {
		if r.failCalls > 0 {
			r.failCalls--
		}
		return r.failErr
	}
	if len(msgs) == 0 {
		return nil
	}
	errs := make([]error, len(msgs))
	for i, m := range msgs {
		if errs[i] = r.check(i, m); errs[i] != nil {
			continue
		}
		if r.Dedup && r.count[m.ID] > 0 {
			continue
		}
		r.count[m.ID]++
		r.delivered = append(r.delivered, *clone(m))
	}
	if r.loseAcks != 0 {
		if r.loseAcks > 0 {
			r.loseAcks--
		}
		return r.loseAckErr
	}
	return exactly.NewBatchError(errs)
}

// check returns why message i fails, or nil. r.mu is held.
func (r *Recorder) check(i int, m *exactly.Message) error {
	if err := m.Validate(); err != nil {
		return exactly.Unpublishable(err)
	}
	if m.ID == "" {
		return exactly.Unpublishable(errors.New("exactlytest: message has an empty ID"))
	}
	if r.MaxPayload > 0 && len(m.Payload) > r.MaxPayload {
		return exactly.Unpublishable(fmt.Errorf("exactlytest: payload of %d bytes exceeds MaxPayload %d", len(m.Payload), r.MaxPayload))
	}
	if err, ok := r.failIndex[i]; ok {
		return err
	}
	for _, fn := range r.failWhen {
		if err := fn(m); err != nil {
			return err
		}
	}
	return nil
}

// Delivered returns copies of the delivered messages, in delivery order.
func (r *Recorder) Delivered() []exactly.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]exactly.Message, len(r.delivered))
	for i := range r.delivered {
		out[i] = *clone(&r.delivered[i])
	}
	return out
}

// Count returns how many copies of the message with this ID were delivered.
func (r *Recorder) Count(id string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.count[id]
}

// Attempts returns how many times a message with this ID was handed to
// Publish, whatever the outcome.
func (r *Recorder) Attempts(id string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.attempts[id]
}

// Duplicates returns the IDs delivered more than once, sorted.
func (r *Recorder) Duplicates() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for id, n := range r.count {
		if n > 1 {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// Calls returns how many times Publish was called.
func (r *Recorder) Calls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls
}

func orInjected(err error) error {
	if err == nil {
		return ErrInjected
	}
	return err
}

// clone copies m deeply enough that later changes by the caller do not
// reach what was recorded.
func clone(m *exactly.Message) *exactly.Message {
	c := *m
	c.Payload = slices.Clone(m.Payload)
	c.Headers = maps.Clone(m.Headers)
	return &c
}

// SendCounter wraps an exactly.PipelinedPublisher and counts the Send calls
// whose outcome is not awaited yet, to show that a relay overlaps its
// batches. It is safe for concurrent use.
type SendCounter struct {
	exactly.PipelinedPublisher
	mu       sync.Mutex
	now, max int
}

// Send counts the call as outstanding until its wait returns.
func (c *SendCounter) Send(ctx context.Context, msgs []*exactly.Message) func() error {
	c.mu.Lock()
	c.now++
	c.max = max(c.max, c.now)
	c.mu.Unlock()
	wait := c.PipelinedPublisher.Send(ctx, msgs)
	return func() error {
		err := wait()
		c.mu.Lock()
		c.now--
		c.mu.Unlock()
		return err
	}
}

// MaxOutstanding is the most Send calls that were awaiting their outcome
// at once.
func (c *SendCounter) MaxOutstanding() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.max
}
