package pgcdc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/kafkarec"
)

// errAborted marks a message that was fine but went down with its
// transaction because another one failed.
var errAborted = errors.New("aborted with its transaction")

// kafkaEOS publishes each batch and its checkpoint in one Kafka transaction.
type kafkaEOS struct {
	cfg  *KafkaExactlyOnce
	slot string
	log  *slog.Logger
	cl   *kgo.Client // transactional
	adm  *kgo.Client // plain: fencing, checkpoint reads
}

// openKafkaEOS connects, fences earlier producers of the transactional ID
// (aborting their open transaction) and reads the last committed
// checkpoint of the slot (nil when there is none).
func openKafkaEOS(ctx context.Context, k *KafkaExactlyOnce, slot string, log *slog.Logger) (*kafkaEOS, *position, error) {
	adm, err := kgo.NewClient(append(slices.Clone(k.Opts), kgo.SeedBrokers(k.Seeds...))...)
	if err != nil {
		return nil, nil, fmt.Errorf("pgcdc: kafka client: %w", err)
	}
	e := &kafkaEOS{cfg: k, slot: slot, log: log, adm: adm}
	if err := e.ensureTopic(ctx); err != nil {
		adm.Close()
		return nil, nil, err
	}
	if err := e.fence(ctx); err != nil {
		adm.Close()
		return nil, nil, err
	}
	ckpt, err := e.checkpoint(ctx)
	if err != nil {
		adm.Close()
		return nil, nil, err
	}
	if err := e.newProducer(); err != nil {
		adm.Close()
		return nil, nil, err
	}
	return e, ckpt, nil
}

func (e *kafkaEOS) newProducer() error {
	opts := append(slices.Clone(e.cfg.Opts), kgo.SeedBrokers(e.cfg.Seeds...), kgo.TransactionalID(e.cfg.TransactionalID),
		kgo.TransactionTimeout(e.cfg.TransactionTimeout), kgo.RequiredAcks(kgo.AllISRAcks()))
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return fmt.Errorf("pgcdc: kafka client: %w", err)
	}
	e.cl = cl
	return nil
}

func (e *kafkaEOS) close() {
	if e.cl != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = e.cl.AbortBufferedRecords(ctx)
		_ = e.cl.EndTransaction(ctx, kgo.TryAbort)
		cancel()
		e.cl.Close()
	}
	e.adm.Close()
}

func (e *kafkaEOS) ensureTopic(ctx context.Context) error {
	adm := kadm.NewClient(e.adm)
	compact := "compact"
	resp, err := adm.CreateTopic(ctx, 1, -1, map[string]*string{"cleanup.policy": &compact}, e.cfg.CheckpointTopic)
	if err == nil {
		err = resp.Err
	}
	if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
		return fmt.Errorf("pgcdc: creating the checkpoint topic %q: %w", e.cfg.CheckpointTopic, err)
	}
	return nil
}

// fence bumps the producer epoch of the transactional ID: an earlier relay
// (a zombie, or one that was killed) can commit nothing more, and its open
// transaction is aborted, so the checkpoint read next is final.
func (e *kafkaEOS) fence(ctx context.Context) error {
	for attempt := 1; ; attempt++ {
		req := kmsg.NewPtrInitProducerIDRequest()
		req.TransactionalID = &e.cfg.TransactionalID
		req.TransactionTimeoutMillis = int32(e.cfg.TransactionTimeout.Milliseconds())
		req.ProducerID, req.ProducerEpoch = -1, -1
		resp, err := req.RequestWith(ctx, e.adm)
		if err == nil {
			err = kerr.ErrorForCode(resp.ErrorCode)
		}
		if err == nil {
			return nil
		}
		if attempt >= 50 || ctx.Err() != nil || !kerr.IsRetriable(err) && !errors.Is(err, kerr.ConcurrentTransactions) {
			return fmt.Errorf("pgcdc: fencing transactional ID %q: %w", e.cfg.TransactionalID, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// checkpoint reads the last committed checkpoint of the slot.
func (e *kafkaEOS) checkpoint(ctx context.Context) (*position, error) {
	topic := e.cfg.CheckpointTopic
	ends, err := kadm.NewClient(e.adm).ListCommittedOffsets(ctx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("pgcdc: reading the end of the checkpoint topic %q: %w", topic, err)
	}
	end, ok := ends.Lookup(topic, 0)
	if !ok || end.Offset <= 0 {
		return nil, nil
	}
	cl, err := kgo.NewClient(append(slices.Clone(e.cfg.Opts), kgo.SeedBrokers(e.cfg.Seeds...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: {0: kgo.NewOffset().AtStart()}}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.KeepControlRecords())...)
	if err != nil {
		return nil, fmt.Errorf("pgcdc: kafka client: %w", err)
	}
	defer cl.Close()
	var last *position
	next := int64(0)
	for next < end.Offset {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var ferr error
		fs.EachError(func(_ string, _ int32, err error) { ferr = err })
		if ferr != nil {
			return nil, fmt.Errorf("pgcdc: reading the checkpoint topic %q: %w", topic, ferr)
		}
		fs.EachRecord(func(r *kgo.Record) {
			next = r.Offset + 1
			if r.Attrs.IsControl() || string(r.Key) != e.slot {
				return
			}
			p, err := parsePosition(string(r.Value))
			if err != nil {
				e.log.Warn("ignoring a bad checkpoint record", "offset", r.Offset, "err", err)
				return
			}
			last = &p
		})
	}
	return last, nil
}

// publish produces the batch and the checkpoint of its last message in one
// transaction and commits it. Either every message is confirmed (nil
// errors) or none is: the failed ones carry their error, the others
// errAborted.
func (e *kafkaEOS) publish(ctx context.Context, es []*entry) ([]error, error) {
	errs := make([]error, len(es))
	recs := make([]*kgo.Record, len(es))
	bad := false
	for i, en := range es {
		rec, err := e.record(&en.msg)
		if err != nil {
			errs[i], bad = err, true
			continue
		}
		recs[i] = rec
	}
	if bad {
		for i := range errs {
			if errs[i] == nil {
				errs[i] = errAborted
			}
		}
		return errs, nil
	}
	if err := e.cl.BeginTransaction(); err != nil {
		e.reset()
		return nil, fmt.Errorf("pgcdc: beginning a Kafka transaction: %w", err)
	}
	done := make(chan struct{}, len(es)+1)
	var ckptErr error
	for i, rec := range recs {
		e.cl.Produce(ctx, rec, func(_ *kgo.Record, err error) {
			if err != nil {
				errs[i] = e.describe(&es[i].msg, rec.Topic, err)
			}
			done <- struct{}{}
		})
	}
	last := es[len(es)-1].pos
	e.cl.Produce(ctx, &kgo.Record{Topic: e.cfg.CheckpointTopic, Partition: 0, Key: []byte(e.slot), Value: []byte(last.String())},
		func(_ *kgo.Record, err error) { ckptErr = err; done <- struct{}{} })
	flushErr := e.cl.Flush(ctx)
	for range len(es) + 1 {
		<-done
	}
	failed := flushErr != nil || ckptErr != nil
	for _, err := range errs {
		failed = failed || err != nil
	}
	if failed {
		e.abort()
		if ckptErr != nil || flushErr != nil {
			// Not the messages' fault (the broker, the checkpoint topic):
			// retry the batch without spending attempts.
			return nil, fmt.Errorf("pgcdc: Kafka transaction aborted: %w", errors.Join(flushErr, ckptErr))
		}
		for i := range errs {
			if errs[i] == nil {
				errs[i] = errAborted
			}
		}
		return errs, nil
	}
	if err := e.cl.EndTransaction(ctx, kgo.TryCommit); err != nil {
		// The commit may or may not have happened: abort what can be,
		// then ask the checkpoint.
		e.abort()
		ckpt, cerr := e.checkpoint(context.WithoutCancel(ctx))
		if cerr == nil && ckpt != nil && last.lessEq(*ckpt) {
			e.log.Info("the Kafka commit's outcome was unknown; the checkpoint shows it committed", "checkpoint", ckpt.String())
			return errs, nil
		}
		return nil, fmt.Errorf("pgcdc: committing the Kafka transaction: %w", err)
	}
	return errs, nil
}

// abort ends the open transaction, aborting it; a client that cannot abort
// is replaced (which fences it).
func (e *kafkaEOS) abort() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.cl.AbortBufferedRecords(ctx); err != nil {
		e.reset()
		return
	}
	if err := e.cl.EndTransaction(ctx, kgo.TryAbort); err != nil {
		e.log.Warn("aborting the Kafka transaction failed; replacing the producer", "err", err)
		e.reset()
	}
}

func (e *kafkaEOS) reset() {
	e.cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := e.fence(ctx); err != nil {
		e.log.Warn("fencing after a failed transaction failed", "err", err)
	}
	if err := e.newProducer(); err != nil {
		e.log.Error("creating a new producer failed", "err", err)
	}
}

// record converts a message exactly as the kafka package's Publisher does.
func (e *kafkaEOS) record(m *exactly.Message) (*kgo.Record, error) {
	return kafkarec.Record(m, e.cfg.TopicFunc)
}

func (e *kafkaEOS) describe(m *exactly.Message, topic string, err error) error {
	switch {
	case errors.Is(err, kerr.MessageTooLarge), errors.Is(err, kerr.RecordListTooLarge),
		errors.Is(err, kerr.InvalidTopicException), errors.Is(err, kerr.InvalidRecord):
		return exactly.Unpublishable(fmt.Errorf("kafka: message %s to topic %q refused: %w", m.ID, topic, err))
	default:
		return fmt.Errorf("kafka: message %s to topic %q: %w", m.ID, topic, err)
	}
}
