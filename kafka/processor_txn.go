package kafka

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/consume"
	"github.com/exactlyonce/exactly/internal/kafkarec"
	"github.com/exactlyonce/exactly/internal/pause"
)

// errCrashed ends Run after a test closed the client abruptly.
var errCrashed = errors.New("kafka: the processor's client was closed abruptly")

// fatalError is an error no new session can fix: Run returns it.
type fatalError struct{ err error }

func (e *fatalError) Error() string { return e.err.Error() }
func (e *fatalError) Unwrap() error { return e.err }

// sessionHandle closes a session once, whoever asks first: the client's
// Close must not run twice at the same time.
type sessionHandle struct {
	sess *kgo.GroupTransactSession
	once sync.Once
}

func (h *sessionHandle) close() { h.once.Do(h.sess.Close) }

// Run consumes and processes until ctx is cancelled, then aborts the open
// transaction if it is incomplete (its input is processed again by the
// next owner), leaves the group and returns nil. A Processor runs once.
//
// Errors of the broker or the network do not end Run: the transactional
// session is replaced by a new one with the same transactional ID, which
// aborts whatever the old one left open, and processing resumes from the
// offsets the group committed. Run returns an error only when going on is
// unsafe or hopeless: ErrFenced (another instance took over this
// transactional ID), an authorization failure, or options the client
// refuses.
func (p *Processor) Run(ctx context.Context) error {
	if !p.running.CompareAndSwap(false, true) {
		return errors.New("kafka: Processor.Run called twice")
	}
	admin, err := kgo.NewClient(append(slices.Clone(p.cfg.ClientOpts), kgo.SeedBrokers(p.cfg.Seeds...))...)
	if err != nil {
		return fmt.Errorf("kafka: processor client: %w", err)
	}
	defer admin.Close()
	wctx, stopWatch := context.WithCancel(ctx)
	var watching sync.WaitGroup
	watching.Go(func() {
		p.watch.run(wctx, admin, func() *kgo.Client {
			if h := p.cur.Load(); h != nil {
				return h.sess.Client()
			}
			return nil
		}, p.cfg.RebalanceTimeout)
	})
	defer watching.Wait()
	defer stopWatch()
	backoff := exactly.RetryPolicy{InitialBackoff: 100 * time.Millisecond, MaxBackoff: 5 * time.Second}
	failures := 0
	for {
		progressed, err := p.session(ctx, admin)
		switch {
		case errors.Is(err, errCrashed):
			return err
		case errors.Is(err, ErrFenced), isFatal(err):
			p.log.Error("processor stopped", "err", err)
			return err
		case ctx.Err() != nil:
			return nil
		}
		if progressed {
			failures = 0
		}
		failures++
		p.restarts.Add(1)
		p.log.Warn("transactional session failed; starting a new one with the same transactional ID", "err", err, "failures_in_a_row", failures)
		if !pause.For(ctx, backoff.Backoff(failures)) {
			return nil
		}
	}
}

func isFatal(err error) bool {
	var fe *fatalError
	return errors.As(err, &fe) ||
		errors.Is(err, kerr.TransactionalIDAuthorizationFailed) || errors.Is(err, kerr.GroupAuthorizationFailed) ||
		errors.Is(err, kerr.TopicAuthorizationFailed) || errors.Is(err, kerr.ClusterAuthorizationFailed) ||
		errors.Is(err, kerr.InvalidTransactionTimeout)
}

func isFenced(err error) bool {
	return errors.Is(err, kerr.ProducerFenced) || errors.Is(err, kerr.InvalidProducerEpoch)
}

// session runs one GroupTransactSession until it fails or ctx ends.
// progressed reports whether it committed a transaction.
func (p *Processor) session(ctx context.Context, admin *kgo.Client) (progressed bool, err error) {
	if err := p.fence(ctx, admin); err != nil {
		return false, err
	}
	reset := kgo.NewOffset().AtStart()
	if p.cfg.StartAtEnd {
		reset = kgo.NewOffset().AtEnd()
	}
	p.resetOwned()
	p.revoked.Store(false)
	opts := append(slices.Clone(p.cfg.ClientOpts),
		kgo.SeedBrokers(p.cfg.Seeds...),
		kgo.TransactionalID(p.txnID),
		kgo.TransactionTimeout(p.cfg.TransactionTimeout),
		kgo.ConsumerGroup(p.cfg.Group),
		kgo.ConsumeTopics(p.cfg.Topics...),
		kgo.ConsumeResetOffset(reset),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.RequireStableFetchOffsets(),
		kgo.OnPartitionsAssigned(p.onAssigned),
		kgo.OnPartitionsRevoked(p.onRevoked),
		kgo.OnPartitionsLost(p.onRevoked),
	)
	opts = append(opts, p.cfg.membership().opts()...)
	sess, err := kgo.NewGroupTransactSession(opts...)
	if err != nil {
		return false, &fatalError{fmt.Errorf("kafka: processor client: %w", err)}
	}
	h := &sessionHandle{sess: sess}
	p.cur.Store(h)
	defer func() {
		p.cur.Store(nil)
		h.close()
	}()
	if p.crashed.Load() { // crashed before the session was published
		return false, errCrashed
	}

	for {
		if err := sess.Begin(); err != nil {
			return progressed, fmt.Errorf("kafka: beginning a transaction: %w", err)
		}
		b, err := p.fill(ctx, sess)
		if err != nil {
			return progressed, err
		}
		if !b.polled { // ctx ended with nothing taken
			return progressed, ctx.Err()
		}
		committed, err := p.end(ctx, admin, sess, b)
		if err != nil {
			return progressed, err
		}
		progressed = progressed || committed
		if ctx.Err() != nil {
			return progressed, ctx.Err()
		}
	}
}

// fence initializes the transactional ID before the group session starts,
// like the Java producer's initTransactions: it bumps the producer epoch,
// which aborts a transaction a previous run of this instance left open and
// fences that run if it is still alive. Without it, that transaction would
// hold the group's offsets unstable (KIP-447) until TransactionTimeout.
func (p *Processor) fence(ctx context.Context, admin *kgo.Client) error {
	backoff := exactly.RetryPolicy{InitialBackoff: 50 * time.Millisecond, MaxBackoff: time.Second}
	for try := 1; ; try++ {
		req := kmsg.NewPtrInitProducerIDRequest()
		req.TransactionalID = &p.txnID
		req.TransactionTimeoutMillis = int32(p.cfg.TransactionTimeout.Milliseconds())
		req.ProducerID, req.ProducerEpoch = -1, -1
		resp, err := req.RequestWith(ctx, admin)
		if err == nil {
			err = kerr.ErrorForCode(resp.ErrorCode)
		}
		switch {
		case err == nil:
			return nil
		case ctx.Err() != nil:
			return ctx.Err()
		case isFatal(err), try >= 20:
			return fmt.Errorf("kafka: initializing transactional ID %q: %w", p.txnID, err)
		}
		if !pause.For(ctx, backoff.Backoff(try)) {
			return ctx.Err()
		}
	}
}

func (p *Processor) onAssigned(_ context.Context, _ *kgo.Client, assigned map[string][]int32) {
	p.ownedMu.Lock()
	defer p.ownedMu.Unlock()
	for topic, parts := range assigned {
		for _, part := range parts {
			p.owned[tp{topic, part}] = true
		}
	}
}

func (p *Processor) onRevoked(_ context.Context, _ *kgo.Client, revoked map[string][]int32) {
	if len(revoked) > 0 {
		p.revoked.Store(true)
	}
	p.ownedMu.Lock()
	defer p.ownedMu.Unlock()
	for topic, parts := range revoked {
		for _, part := range parts {
			delete(p.owned, tp{topic, part})
		}
	}
}

func (p *Processor) resetOwned() {
	p.ownedMu.Lock()
	defer p.ownedMu.Unlock()
	clear(p.owned)
}

func (p *Processor) owns(k tp) bool {
	p.ownedMu.Lock()
	defer p.ownedMu.Unlock()
	return p.owned[k]
}

// txnBatch is the work of one transaction.
type txnBatch struct {
	started  time.Time
	n        int          // records taken from the client
	polled   bool         // the client's positions moved: End must run
	complete bool         // every taken record was processed
	first    map[tp]int64 // offset of the first record taken per partition

	processed, outputs, deadLettered atomic.Int64

	mu    sync.Mutex
	err   error // first produce failure: the transaction must abort
	fatal error // a failure no replay can fix
}

func (b *txnBatch) fail(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err == nil {
		b.err = err
	}
}

func (b *txnBatch) failFatal(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.fatal == nil {
		b.fatal = err
	}
	if b.err == nil {
		b.err = err
	}
}

func (b *txnBatch) errs() (err, fatal error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err, b.fatal
}

// fill polls and processes records until the batch is full, its commit
// interval has passed, ctx ends or the group revokes partitions.
func (p *Processor) fill(ctx context.Context, sess *kgo.GroupTransactSession) (*txnBatch, error) {
	b := &txnBatch{complete: true, first: map[tp]int64{}}
	var deadline time.Time
	for b.n < p.cfg.MaxBatchRecords {
		pollCtx, cancel := ctx, context.CancelFunc(func() {})
		if !deadline.IsZero() {
			pollCtx, cancel = context.WithDeadline(ctx, deadline)
		}
		fs := sess.PollRecords(pollCtx, min(p.cfg.MaxPollRecords, p.cfg.MaxBatchRecords-b.n))
		cancel()
		if fs.IsClientClosed() || p.crashed.Load() {
			if p.crashed.Load() {
				return b, errCrashed
			}
			return b, errors.New("kafka: the processor's client closed")
		}
		fetchErrs := 0
		fs.EachError(func(topic string, part int32, err error) {
			if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
				return
			}
			fetchErrs++
			p.log.Warn("fetch error", "topic", topic, "partition", part, "err", err)
		})
		if fs.NumRecords() == 0 {
			if ctx.Err() != nil || !deadline.IsZero() && !time.Now().Before(deadline) {
				break
			}
			if fetchErrs > 0 && !pause.For(ctx, 100*time.Millisecond) {
				break
			}
			continue
		}
		b.polled = true
		if deadline.IsZero() {
			b.started = time.Now()
			deadline = b.started.Add(p.cfg.CommitInterval)
		}
		b.n += fs.NumRecords()
		fs.EachPartition(func(ftp kgo.FetchTopicPartition) {
			if len(ftp.Records) > 0 {
				if _, ok := b.first[tp{ftp.Topic, ftp.Partition}]; !ok {
					b.first[tp{ftp.Topic, ftp.Partition}] = ftp.Records[0].Offset
				}
			}
		})
		if p.revoked.Load() || !p.processFetches(ctx, sess, fs, b) {
			b.complete = false
			break
		}
		if _, fatal := b.errs(); fatal != nil {
			b.complete = false
			break
		}
	}
	return b, nil
}

// processFetches processes the partitions of one poll concurrently, the
// records of a partition in order. It returns false when it stopped early.
func (p *Processor) processFetches(ctx context.Context, sess *kgo.GroupTransactSession, fs kgo.Fetches, b *txnBatch) bool {
	var wg sync.WaitGroup
	var stopped atomic.Bool
	fs.EachPartition(func(ftp kgo.FetchTopicPartition) {
		if len(ftp.Records) == 0 {
			return
		}
		wg.Go(func() {
			w := &worker{}
			defer w.flush(b)
			for _, rec := range ftp.Records {
				if stopped.Load() || !p.processRecord(ctx, sess, rec, b, w) {
					stopped.Store(true)
					return
				}
			}
		})
	})
	wg.Wait()
	return !stopped.Load()
}

// worker is what one partition's goroutine keeps for itself: counts added
// to the batch when it is done, and a slice reused for the outputs.
type worker struct {
	processed, outputs, deadLettered int64
	recs                             []*kgo.Record
}

func (w *worker) flush(b *txnBatch) {
	b.processed.Add(w.processed)
	b.outputs.Add(w.outputs)
	b.deadLettered.Add(w.deadLettered)
}

// suspect is an input record whose outputs the broker or the client
// refused as unpublishable. At the first strike its outputs are produced
// again on their own, so that records that merely shared its batch get
// through; at the second it goes to the dead-letter topic.
type suspect struct {
	reason  string
	strikes int
}

func (p *Processor) suspectOf(pos inputPos) (suspect, bool) {
	if p.suspects.Load() == 0 {
		return suspect{}, false
	}
	p.poisonMu.Lock()
	defer p.poisonMu.Unlock()
	s, ok := p.poison[pos]
	return s, ok
}

func (p *Processor) strike(pos inputPos, err error) {
	p.poisonMu.Lock()
	defer p.poisonMu.Unlock()
	s, ok := p.poison[pos]
	if !ok {
		p.suspects.Add(1)
	}
	s.strikes++
	s.reason = err.Error()
	p.poison[pos] = s
}

func (p *Processor) clearSuspect(pos inputPos) {
	if p.suspects.Load() == 0 {
		return
	}
	p.poisonMu.Lock()
	defer p.poisonMu.Unlock()
	if _, ok := p.poison[pos]; ok {
		delete(p.poison, pos)
		p.suspects.Add(-1)
	}
}

// processRecord runs the ProcessFunc with retries and produces the
// outputs, or the dead letter, into the open transaction. It returns false
// when the record was not dealt with (ctx ended, partitions revoked, a
// fatal failure): the transaction must then abort.
func (p *Processor) processRecord(ctx context.Context, sess *kgo.GroupTransactSession, rec *kgo.Record, b *txnBatch, w *worker) bool {
	var idBuf [maxPositionID]byte
	inID := appendRecordID(idBuf[:0], rec) // all the outputs need, and no allocation
	in := input{rec: rec}
	pos := inputPos{rec.Topic, rec.Partition, rec.Offset}
	sus, isSuspect := p.suspectOf(pos)
	if isSuspect && sus.strikes >= 2 {
		return p.deadLetter(sess, b, w, in.message(), pos, 0, fmt.Errorf("kafka: an output was refused as unpublishable: %s", sus.reason))
	}
	for attempt := 1; ; attempt++ {
		if ctx.Err() != nil || p.revoked.Load() {
			return false
		}
		var start time.Time
		if p.cfg.Hooks.Handled != nil {
			start = time.Now()
		}
		outs, err := p.call(ctx, rec)
		permanent := false
		if err == nil {
			w.recs, err = p.outputRecords(inID, outs, w.recs[:0])
			permanent = err != nil
		}
		if err == nil {
			if p.cfg.Hooks.Handled != nil {
				p.cfg.Hooks.Handled(in.message(), time.Since(start))
			}
			if isSuspect {
				return p.produceAlone(ctx, sess, b, w, w.recs, pos)
			}
			p.produce(sess, b, w.recs, pos, false)
			w.processed++
			w.outputs += int64(len(w.recs))
			return true
		}
		if ctx.Err() != nil {
			return false // stopping, not a failure of the record
		}
		p.failed.Add(1)
		if p.cfg.Hooks.Failed != nil {
			p.cfg.Hooks.Failed(in.message(), attempt, err)
		}
		if permanent || attempt >= p.cfg.Retry.MaxAttempts {
			return p.deadLetter(sess, b, w, in.message(), pos, attempt, err)
		}
		p.log.Debug("process function failed; retrying", "id", string(inID), "topic", rec.Topic, "partition", rec.Partition, "offset", rec.Offset, "attempt", attempt, "err", err)
		if !pause.For(ctx, p.cfg.Retry.Backoff(attempt)) {
			return false
		}
	}
}

// input is the record being processed: its whole message is decoded only
// for the hooks and a dead letter.
type input struct {
	rec *kgo.Record
	msg *exactly.Message
}

func (in *input) message() *exactly.Message {
	if in.msg == nil {
		in.msg = decodeRecord(in.rec)
	}
	return in.msg
}

// call runs the ProcessFunc, turning a panic into an error wrapping
// exactly.ErrPanic.
func (p *Processor) call(ctx context.Context, rec *kgo.Record) (outs []exactly.Message, err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("%w: %v\n%s", exactly.ErrPanic, v, debug.Stack())
		}
	}()
	return p.fn(ctx, rec)
}

// outputRecords checks the outputs and appends them to recs as records.
func (p *Processor) outputRecords(inID []byte, outs []exactly.Message, recs []*kgo.Record) ([]*kgo.Record, error) {
	for i := range outs {
		m := outs[i]
		if m.ID == "" {
			m.ID = outputID(inID, i)
		}
		r, err := outputRecord(&m)
		if err != nil {
			return nil, fmt.Errorf("kafka: output %d of input %s: %w", i, string(inID), err)
		}
		recs = append(recs, r)
	}
	return recs, nil
}

// outputRecord converts an output with a non-empty ID, in the publisher's
// wire format.
func outputRecord(m *exactly.Message) (*kgo.Record, error) { return kafkarec.RecordTo(m, m.Topic) }

// produce hands the records of one input to the transaction, with one
// promise for all of them. A failure dooms the transaction; one that no
// retry can fix makes the input a suspect.
func (p *Processor) produce(sess *kgo.GroupTransactSession, b *txnBatch, recs []*kgo.Record, pos inputPos, deadLetter bool) {
	if len(recs) == 0 {
		return // a filtered input costs no promise
	}
	promise := func(r *kgo.Record, err error) {
		if err == nil {
			return
		}
		if !isUnpublishable(err) {
			b.fail(fmt.Errorf("kafka: producing to %s: %w", r.Topic, err))
			return
		}
		if deadLetter {
			b.failFatal(fmt.Errorf("kafka: the dead letter of %s/%d@%d was refused by topic %s (%w); the input cannot be parked, fix the dead-letter topic or its max.message.bytes",
				pos.topic, pos.part, pos.offset, r.Topic, err))
			return
		}
		p.strike(pos, err)
		b.fail(fmt.Errorf("kafka: an output of %s/%d@%d to %s is unpublishable: %w", pos.topic, pos.part, pos.offset, r.Topic, err))
	}
	for _, r := range recs {
		// Not the caller's ctx: a record of a transaction that is to
		// commit must not fail because Run is stopping.
		sess.Produce(context.Background(), r, promise)
	}
}

// produceAlone produces the outputs of a suspect and waits for them, so
// they share no batch with the records of other inputs.
func (p *Processor) produceAlone(ctx context.Context, sess *kgo.GroupTransactSession, b *txnBatch, w *worker, recs []*kgo.Record, pos inputPos) bool {
	for _, res := range sess.ProduceSync(context.WithoutCancel(ctx), recs...) {
		if res.Err == nil {
			continue
		}
		if isUnpublishable(res.Err) {
			p.strike(pos, res.Err)
		}
		b.fail(fmt.Errorf("kafka: producing an output of %s/%d@%d: %w", pos.topic, pos.part, pos.offset, res.Err))
		return true // processed; the transaction aborts and the next replay parks it
	}
	p.clearSuspect(pos)
	w.processed++
	w.outputs += int64(len(recs))
	return true
}

func isUnpublishable(err error) bool {
	return isTooLarge(err) || errors.Is(err, kerr.InvalidRecord) || errors.Is(err, kerr.InvalidTopicException)
}

// deadLetter produces a copy of the input, with the reason, to the
// dead-letter topic in the open transaction: it becomes visible exactly
// when the input's offset advances past it.
func (p *Processor) deadLetter(sess *kgo.GroupTransactSession, b *txnBatch, w *worker, msg *exactly.Message, pos inputPos, attempts int, cause error) bool {
	dl := consume.DeadLetterCopy(msg, p.cfg.DeadLetterTopic(msg), attempts, cause)
	r, err := kafkarec.Record(&dl, nil)
	if err != nil {
		b.failFatal(fmt.Errorf("kafka: input %s/%d@%d failed (%v) and cannot be dead-lettered: %w", pos.topic, pos.part, pos.offset, cause, err))
		return false
	}
	p.log.Warn("input dead-lettered in the transaction", "id", msg.ID, "topic", pos.topic, "partition", pos.part, "offset", pos.offset, "to", dl.Topic, "attempts", attempts, "err", cause)
	if p.cfg.Hooks.DeadLettered != nil {
		p.cfg.Hooks.DeadLettered(msg, cause)
	}
	p.produce(sess, b, []*kgo.Record{r}, pos, true)
	p.clearSuspect(pos)
	w.processed++
	w.deadLettered++
	return true
}

// end commits the batch if it is whole and nothing failed, and aborts it
// otherwise. An error means the session must be replaced.
func (p *Processor) end(ctx context.Context, admin *kgo.Client, sess *kgo.GroupTransactSession, b *txnBatch) (committed bool, err error) {
	if p.crashed.Load() {
		return false, errCrashed
	}
	// End may take as long as the broker lets a transaction live; past
	// that the broker aborts it anyway.
	endCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.cfg.TransactionTimeout)
	defer cancel()

	commit := b.complete && b.processed.Load() > 0
	if commit && p.abortHook != nil && p.abortHook() {
		commit = false
	}
	if commit {
		if err := sess.Client().Flush(endCtx); err != nil {
			return false, fmt.Errorf("kafka: flushing the transaction's records: %w", err)
		}
	}
	prodErr, fatal := b.errs()
	if prodErr != nil {
		commit = false
	}
	age := time.Since(b.started)
	if isFenced(prodErr) {
		// Do not let the client recover its producer ID: that would
		// fence the instance that fenced us.
		return false, p.fenced(prodErr, age)
	}

	p.revoked.Store(false) // End resets the session's own flag too
	committed, err = sess.End(endCtx, kgo.TransactionEndTry(commit))
	if p.crashed.Load() {
		return false, errCrashed
	}
	if err != nil {
		if isFenced(err) {
			return false, p.fenced(err, age)
		}
		if commit {
			return false, fmt.Errorf("kafka: committing a transaction of %d input records: the outcome is unknown (%w); a new session with the same transactional ID completes or aborts it and resumes from the offsets the broker holds", b.processed.Load(), err)
		}
		return false, fmt.Errorf("kafka: aborting a transaction: %w", err)
	}
	if fatal != nil {
		return false, &fatalError{fatal}
	}
	if committed {
		p.commits.Add(1)
		p.processed.Add(b.processed.Load())
		p.outputs.Add(b.outputs.Load())
		p.deadLettered.Add(b.deadLettered.Load())
		return true, nil
	}
	if b.processed.Load() > 0 {
		p.aborts.Add(1)
		if prodErr != nil {
			p.log.Warn("transaction aborted: a record could not be produced; its input is processed again", "records", b.processed.Load(), "err", prodErr)
		} else {
			p.log.Debug("transaction aborted; its input is processed again", "records", b.processed.Load(), "commit_attempted", commit)
		}
	}
	if commit {
		// The session refused or downgraded the commit and rewound to
		// the offsets it last saw committed. When it downgraded a commit
		// whose outcome was unconfirmed, the broker may hold this batch's
		// offsets after all: then resuming from the rewound positions
		// would write the batch twice.
		if err := p.checkRewind(endCtx, admin, b); err != nil {
			return false, err
		}
	}
	return false, nil
}

func (p *Processor) fenced(err error, age time.Duration) error {
	if age >= p.cfg.TransactionTimeout*9/10 {
		// The broker aborted the transaction for running too long and
		// bumped the epoch: we fenced ourselves. A new session recovers.
		return fmt.Errorf("kafka: the transaction ran %s, about TransactionTimeout (%s), and the broker aborted it: %w", age.Round(time.Millisecond), p.cfg.TransactionTimeout, err)
	}
	return fmt.Errorf("%w: transactional ID %q was initialized by another producer; this instance stops and its open transaction stays aborted (%w)", ErrFenced, p.txnID, err)
}

// checkRewind compares the group's committed offsets with the first
// offsets of the aborted batch, for the partitions this member still owns.
// A committed offset past the batch's start means the transaction did
// commit: the session must be replaced so it resumes from the broker's
// offsets.
func (p *Processor) checkRewind(ctx context.Context, admin *kgo.Client, b *txnBatch) error {
	offs, err := kadm.NewClient(admin).FetchOffsets(ctx, p.cfg.Group)
	if err != nil {
		return fmt.Errorf("kafka: checking the group's offsets after a refused commit: %w", err)
	}
	for k, first := range b.first {
		o, ok := offs.Lookup(k.topic, k.part)
		if !ok || o.Err != nil || !p.owns(k) {
			continue
		}
		if o.At > first {
			return fmt.Errorf("kafka: a commit reported as not done was applied (%s/%d committed at %d, the batch began at %d); a new session resumes from the broker's offsets", k.topic, k.part, o.At, first)
		}
	}
	return nil
}
