package nats

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/pause"
)

// Publisher publishes exactly.Messages to NATS JetStream. Each message goes
// to the subject named by Message.Topic (or the SubjectFunc option), with
// the Nats-Msg-Id header set to Message.ID, so the stream drops a
// re-publish within its duplicate window, and the headers of the message
// plus exactly-id, exactly-key and exactly-created-at.
//
// A Publisher is safe for concurrent use. Messages of one Publish call are
// sent in slice order on the JetStream context's single connection; the
// caller must not publish the same key from two concurrent Publish calls if
// it needs their relative order. Send and Resume (exactly.PipelinedPublisher)
// are the way to have several calls of one key out at once, in order: the
// relay uses them, and hands the publisher its next batch while the last
// one's acks are on their way.
type Publisher struct {
	js          jetstream.JetStream
	subject     func(*exactly.Message) string
	maxInFlight int
	ackWait     time.Duration
	strict      bool

	// paused holds the keys whose message failed in a Send since they were
	// last resumed: Send fails their later messages unsent.
	mu     sync.Mutex
	paused map[string]struct{}
}

var _ exactly.PipelinedPublisher = (*Publisher)(nil)

// Option configures a Publisher.
type Option func(*Publisher)

// SubjectFunc sets the function that names the subject of a message,
// overriding the default of Message.Topic. It must be fast, must not block,
// and must return a subject a stream captures: a subject that is not valid
// for publishing (empty tokens, wildcards, whitespace) fails as
// unpublishable and the relay parks the message, while a valid subject no
// stream captures fails with a retryable error until one does. It must map
// messages of one key to subjects of one stream, or their order is lost.
func SubjectFunc(fn func(*exactly.Message) string) Option {
	return func(p *Publisher) { p.subject = fn }
}

// MaxInFlight bounds how many messages of one Publish call await their
// PubAck at a time, overriding the default of 1024. Higher values help only
// over long round trips. It should stay below the JetStream context's
// jetstream.WithPublishAsyncMaxPending (default 4000), which bounds all
// publishers sharing that context: when that bound is reached Publish waits
// for its own acks before sending more, so a value above it only adds
// waiting. n must be at least 1.
func MaxInFlight(n int) Option {
	return func(p *Publisher) { p.maxInFlight = n }
}

// AckWait bounds how long Publish waits for the PubAck of a message after
// sending it, overriding the default of 10s. A message whose ack does not
// come in time is reported with a retryable error matching exactly.ErrOutcomeUnknown (the
// stream may still store it; a re-publish within the duplicate window is
// then dropped by Nats-Msg-Id). Too short a wait makes a slow stream look
// failed and causes needless re-publishes; the context passed to Publish
// bounds the whole call in any case. d must be positive.
func AckWait(d time.Duration) Option {
	return func(p *Publisher) { p.ackWait = d }
}

// StrictKeyOrder keeps a key's order even when a message fails, at the cost
// of one round trip per message of the same key. By default all messages of
// a call are pipelined: when message i of a key fails (no stream, a lost
// ack), later messages of that key may already be stored, and the relay's
// retry of i lands after them. With StrictKeyOrder a key has at most one
// message awaiting its ack, and after a retryable failure its later
// messages are not sent (they fail with a retryable error), so for every
// key the confirmed messages are a prefix of the call's messages with that
// key. A message refused as unpublishable does not stop its key: the relay
// parks it and the rest keep their order. Different keys, and messages with
// an empty key, are still sent in parallel.
func StrictKeyOrder() Option {
	return func(p *Publisher) { p.strict = true }
}

// NewPublisher returns a Publisher that publishes through js.
//
// js's default publish options apply; Publish adds its own per message (no
// automatic re-send on "no responders": it would reorder a key, and the
// relay retries instead).
func NewPublisher(js jetstream.JetStream, opts ...Option) (*Publisher, error) {
	if js == nil {
		return nil, errors.New("nats: NewPublisher: the jetstream.JetStream is nil")
	}
	p := &Publisher{js: js, maxInFlight: 1024, ackWait: 10 * time.Second, paused: map[string]struct{}{}}
	for _, opt := range opts {
		opt(p)
	}
	switch {
	case p.maxInFlight < 1:
		return nil, fmt.Errorf("nats: NewPublisher: MaxInFlight is %d, it must be at least 1", p.maxInFlight)
	case p.ackWait <= 0:
		return nil, fmt.Errorf("nats: NewPublisher: AckWait is %v, it must be positive", p.ackWait)
	}
	return p, nil
}

// errKeyBlocked marks a message not sent because an earlier message of its
// key failed (StrictKeyOrder).
var errKeyBlocked = errors.New("not sent: an earlier message with the same key failed")

// errKeyPaused marks a message Send did not send because an earlier message
// of its key failed and the key was not resumed since.
var errKeyPaused = errors.New("not sent: an earlier message with the same key failed, and the key was not resumed since (Resume)")

// Publish sends every message and waits for the stream's PubAck of each.
//
// It returns nil when every message is stored (a PubAck marked duplicate
// counts: the stream already holds that ID), or a *exactly.BatchError with
// one entry per message. Entries matching exactly.ErrUnpublishable will
// never succeed: an invalid message or subject, a header name NATS does not
// allow, a message larger than the server's max_payload or the stream's
// max_msg_size. Every other failure is worth retrying, notably
// jetstream.ErrNoStreamResponse when no stream captures the subject (yet),
// and exactly.ErrOutcomeUnknown when the ack did not come before AckWait or ctx;
// the stream drops a re-publish of a stored message within its duplicate
// window (2 minutes by default), and past the window the exactly-id header
// lets the inbox drop it.
//
// When ctx ends, Publish stops sending, fails the unsent messages and
// returns at once; the messages already sent may still be stored.
func (p *Publisher) Publish(ctx context.Context, msgs []*exactly.Message) error {
	return p.send(ctx, msgs, false)()
}

// Send hands msgs to the connection and returns once they are sent (or,
// with StrictKeyOrder, once they have their outcome); wait returns their
// outcome as Publish would. It is the exactly.PipelinedPublisher half of
// the Publisher, which the relay uses to have several batches out at once:
// calls are sent in order on the one connection. Once a message fails, Send
// sends no later message of its key (they fail with a retryable error)
// until Resume. JetStream has no such pause of its own: messages of the key
// sent before the failure was known may still be stored after it, as within
// one Publish call (see StrictKeyOrder).
func (p *Publisher) Send(ctx context.Context, msgs []*exactly.Message) (wait func() error) {
	return p.send(ctx, msgs, true)
}

// Resume lets Send send m's key again after one of its messages failed. The
// relay calls it with the failed message's retry, once none of the key's
// messages is in flight; nothing of the key waits unsent in the Publisher,
// so there is nothing to wait for.
func (p *Publisher) Resume(_ context.Context, m *exactly.Message) {
	p.mu.Lock()
	delete(p.paused, m.Key)
	p.mu.Unlock()
}

// send sends msgs and returns the wait for their outcome. With pausing
// (Send), a failed message pauses its key, and messages of a paused key are
// not sent.
func (p *Publisher) send(ctx context.Context, msgs []*exactly.Message, pausing bool) func() error {
	if len(msgs) == 0 {
		return func() error { return nil }
	}
	if err := ctx.Err(); err != nil {
		return func() error { return fmt.Errorf("nats: publish not started: %w", err) }
	}
	errs := make([]error, len(msgs))
	out := make([]*natsgo.Msg, len(msgs))
	todo := make([]int, 0, len(msgs))
	for i, m := range msgs {
		nm, err := p.message(m)
		if err != nil {
			errs[i] = err
			continue
		}
		out[i] = nm
		todo = append(todo, i)
	}
	if pausing {
		todo = p.leaveOutPaused(msgs, out, todo, errs)
	}
	if p.strict {
		p.waves(ctx, msgs, out, todo, errs)
		if pausing {
			p.pauseFailed(msgs, todo, errs)
		}
		return func() error { return exactly.NewBatchError(errs) }
	}
	s := &sending{p: p, ctx: ctx, msgs: msgs, out: out, errs: errs, pausing: pausing}
	s.sendAll(todo)
	return func() error {
		s.settleAll()
		return exactly.NewBatchError(errs)
	}
}

// leaveOutPaused fails the messages of todo whose key is paused, and
// returns the others.
func (p *Publisher) leaveOutPaused(msgs []*exactly.Message, out []*natsgo.Msg, todo []int, errs []error) []int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.paused) == 0 {
		return todo
	}
	send := todo[:0]
	for _, i := range todo {
		if _, paused := p.paused[msgs[i].Key]; paused && msgs[i].Key != "" {
			errs[i] = fmt.Errorf("nats: message %s to %q %w", msgs[i].ID, out[i].Subject, errKeyPaused)
			continue
		}
		send = append(send, i)
	}
	return send
}

// pauseFailed pauses the keys of the messages of idx that failed.
func (p *Publisher) pauseFailed(msgs []*exactly.Message, idx []int, errs []error) {
	for _, i := range idx {
		if errs[i] != nil {
			p.pause(msgs[i].Key)
		}
	}
}

// pause makes Send leave out key's messages until Resume.
func (p *Publisher) pause(key string) {
	if key == "" {
		return
	}
	p.mu.Lock()
	p.paused[key] = struct{}{}
	p.mu.Unlock()
}

// waves sends the k-th message of every key in wave k, so each key has at
// most one message awaiting its ack, and stops a key at its first
// retryable failure.
func (p *Publisher) waves(ctx context.Context, msgs []*exactly.Message, out []*natsgo.Msg, todo []int, errs []error) {
	var waves [][]int
	rank := make(map[string]int)
	for _, i := range todo {
		w := 0
		if k := msgs[i].Key; k != "" {
			w = rank[k]
			rank[k]++
		}
		for len(waves) <= w {
			waves = append(waves, nil)
		}
		waves[w] = append(waves[w], i)
	}
	blocked := make(map[string]int) // key -> index of the message that failed
	for _, wave := range waves {
		send := wave[:0:0]
		for _, i := range wave {
			m := msgs[i]
			if j, ok := blocked[m.Key]; ok {
				errs[i] = fmt.Errorf("nats: message %s %w (message %s); publish them again in order: %w",
					m.ID, errKeyBlocked, msgs[j].ID, errs[j])
				continue
			}
			send = append(send, i)
		}
		p.pipeline(ctx, msgs, out, send, errs)
		for _, i := range send {
			if k := msgs[i].Key; k != "" && errs[i] != nil && !errors.Is(errs[i], exactly.ErrUnpublishable) {
				blocked[k] = i
			}
		}
	}
}

type pending struct {
	i    int
	ack  jetstream.PubAckFuture
	sent time.Time
}

// pipeline sends the messages of idx in order, with at most maxInFlight
// awaiting their ack, and records each outcome in errs.
func (p *Publisher) pipeline(ctx context.Context, msgs []*exactly.Message, out []*natsgo.Msg, idx []int, errs []error) {
	s := &sending{p: p, ctx: ctx, msgs: msgs, out: out, errs: errs}
	s.sendAll(idx)
	s.settleAll()
}

// sending is one call's messages on their way: sent, at most maxInFlight
// of them awaiting their ack.
type sending struct {
	p       *Publisher
	ctx     context.Context
	msgs    []*exactly.Message
	out     []*natsgo.Msg
	errs    []error
	pausing bool
	queue   []pending
}

// settleOldest records the outcome of the oldest message awaiting its ack.
func (s *sending) settleOldest() {
	f := s.queue[0]
	s.queue = s.queue[1:]
	err := s.p.await(s.ctx, s.msgs[f.i], s.out[f.i].Subject, f)
	s.errs[f.i] = err
	if err != nil && s.pausing {
		s.p.pause(s.msgs[f.i].Key)
	}
}

func (s *sending) settleAll() {
	for len(s.queue) > 0 {
		s.settleOldest()
	}
}

// sendAll sends the messages of idx in order; the last ones may still be
// awaiting their ack when it returns.
func (s *sending) sendAll(idx []int) {
	p, msgs, out, errs := s.p, s.msgs, s.out, s.errs
	if s.queue == nil {
		s.queue = make([]pending, 0, min(len(idx), p.maxInFlight))
	}
	failRest := func(rest []int, err error) {
		for _, i := range rest {
			errs[i] = fmt.Errorf("nats: message %s to %q not sent: %w", msgs[i].ID, out[i].Subject, err)
		}
	}
	for n, i := range idx {
		for len(s.queue) >= p.maxInFlight {
			s.settleOldest()
		}
		if err := s.ctx.Err(); err != nil {
			failRest(idx[n:], err)
			break
		}
		ack, err := p.js.PublishMsgAsync(out[i], jetstream.WithRetryAttempts(0))
		for errors.Is(err, jetstream.ErrTooManyStalledMsgs) && s.ctx.Err() == nil {
			// The JetStream context's limit on pending acks, shared with
			// every publisher on it, is reached: wait for one of ours,
			// or a moment, and send the same message again.
			if len(s.queue) > 0 {
				s.settleOldest()
			} else {
				pause.For(s.ctx, 10*time.Millisecond)
			}
			ack, err = p.js.PublishMsgAsync(out[i], jetstream.WithRetryAttempts(0))
		}
		switch {
		case err == nil:
			s.queue = append(s.queue, pending{i, ack, time.Now()})
		case errors.Is(err, natsgo.ErrMaxPayload):
			errs[i] = exactly.Unpublishable(fmt.Errorf("nats: message %s: payload of %d bytes plus headers exceeds the server's max_payload of %d bytes: %w",
				msgs[i].ID, len(out[i].Data), p.js.Conn().MaxPayload(), err))
		case errors.Is(err, natsgo.ErrBadSubject):
			errs[i] = exactly.Unpublishable(fmt.Errorf("nats: message %s: subject %q: %w", msgs[i].ID, out[i].Subject, err))
		case errors.Is(err, natsgo.ErrBadHeaderMsg):
			errs[i] = exactly.Unpublishable(fmt.Errorf("nats: message %s: a header name is not valid for NATS (printable ASCII without spaces or \"()/,:;<=>?@[\\]{}): %w", msgs[i].ID, err))
		default:
			// The connection refused it (closed, draining, reconnect
			// buffer full) or ctx ended while stalled: the rest would
			// fail alike, and sending them would break key order.
			if s.ctx.Err() != nil {
				err = s.ctx.Err()
			}
			failRest(idx[n:], err)
			if s.pausing {
				s.p.pauseFailed(msgs, idx[n:], errs)
			}
			return
		}
	}
}

// await returns the outcome of one sent message.
func (p *Publisher) await(ctx context.Context, m *exactly.Message, subject string, f pending) error {
	select { // an outcome that is already known wins over an ended ctx
	case <-f.ack.Ok():
		return nil
	case err := <-f.ack.Err():
		return describe(m, subject, err)
	default:
	}
	timer := time.NewTimer(time.Until(f.sent.Add(p.ackWait)))
	defer timer.Stop()
	select {
	case <-f.ack.Ok():
		return nil
	case err := <-f.ack.Err():
		return describe(m, subject, err)
	case <-ctx.Done():
		return fmt.Errorf("nats: message %s to %q: the context ended before its PubAck; publishing it again is safe: %w: %w",
			m.ID, subject, exactly.ErrOutcomeUnknown, ctx.Err())
	case <-timer.C:
		return fmt.Errorf("nats: message %s to %q: no PubAck within %v (AckWait); publishing it again is safe: %w: %w",
			m.ID, subject, p.ackWait, exactly.ErrOutcomeUnknown, jetstream.ErrAsyncPublishTimeout)
	}
}

// describe wraps a publish error with the message and what to do about it,
// marking the ones no retry can fix.
func describe(m *exactly.Message, subject string, err error) error {
	var apiErr *jetstream.APIError
	switch {
	case errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamMessageExceedsMaximum:
		return exactly.Unpublishable(fmt.Errorf("nats: message %s to %q: payload of %d bytes plus headers exceeds the stream's max_msg_size: %w",
			m.ID, subject, len(m.Payload), err))
	case errors.Is(err, jetstream.ErrNoStreamResponse):
		return fmt.Errorf("nats: message %s: no stream captures subject %q (or its leader is unavailable); create the stream or wait for it: %w",
			m.ID, subject, err)
	case errors.Is(err, natsgo.ErrDisconnected), errors.Is(err, natsgo.ErrConnectionClosed):
		return fmt.Errorf("nats: message %s to %q: the connection dropped before its PubAck; publishing it again is safe: %w: %w",
			m.ID, subject, exactly.ErrOutcomeUnknown, err)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled), errors.Is(err, natsgo.ErrTimeout),
		errors.Is(err, jetstream.ErrAsyncPublishTimeout):
		return fmt.Errorf("nats: message %s to %q: no PubAck in time; publishing it again is safe: %w: %w",
			m.ID, subject, exactly.ErrOutcomeUnknown, err)
	default:
		return fmt.Errorf("nats: message %s to %q: %w", m.ID, subject, err)
	}
}

// message converts m, or returns why it can never be published.
func (p *Publisher) message(m *exactly.Message) (*natsgo.Msg, error) {
	if err := m.Validate(); err != nil {
		return nil, exactly.Unpublishable(fmt.Errorf("nats: %w", err))
	}
	if m.ID == "" {
		return nil, exactly.Unpublishable(errors.New("nats: message has an empty ID; outbox.Enqueue assigns one, a direct caller must set it (exactly.NewID)"))
	}
	subject := m.Topic
	if p.subject != nil {
		subject = p.subject(m)
	}
	if err := checkSubject(subject); err != nil {
		return nil, exactly.Unpublishable(fmt.Errorf("nats: message %s: %w", m.ID, err))
	}
	// Every value in one backing array, each header a full slice of one
	// element (so an Add to one reallocates it and leaves the others): one
	// allocation instead of one per header, per message.
	n := len(m.Headers) + 4
	h := make(natsgo.Header, n)
	vals := make([]string, 0, n)
	set := func(k, v string) {
		vals = append(vals, v)
		h[k] = vals[len(vals)-1 : len(vals) : len(vals)]
	}
	for k, v := range m.Headers {
		switch k {
		case jetstream.MsgIDHeader, exactly.HeaderID, exactly.HeaderKey, exactly.HeaderCreatedAt:
			continue // ours win, so a stale copy cannot mislabel the message
		}
		set(k, v)
	}
	set(jetstream.MsgIDHeader, m.ID)
	set(exactly.HeaderID, m.ID)
	if m.Key != "" {
		set(exactly.HeaderKey, m.Key)
	}
	if !m.CreatedAt.IsZero() {
		set(exactly.HeaderCreatedAt, m.CreatedAt.UTC().Format(time.RFC3339Nano))
	}
	return &natsgo.Msg{Subject: subject, Data: m.Payload, Header: h}, nil
}

// checkSubject applies NATS's rules for a subject one can publish to.
func checkSubject(s string) error {
	if s == "" {
		return errors.New("empty subject")
	}
	if strings.ContainsAny(s, " \t\r\n") {
		return fmt.Errorf("subject %q contains whitespace", s)
	}
	for tok := range strings.SplitSeq(s, ".") {
		switch tok {
		case "":
			return fmt.Errorf("subject %q has an empty token", s)
		case "*", ">":
			return fmt.Errorf("subject %q has a wildcard; one publishes to a literal subject", s)
		}
	}
	return nil
}
