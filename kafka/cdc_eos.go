package kafka

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

// DefaultCDCCheckpointTopic is the default CDCExactlyOnce.CheckpointTopic.
const DefaultCDCCheckpointTopic = "exactly_cdc_checkpoints"

// CDCExactlyOnce is the exactly-once Kafka mode of the CDC relay: set it as
// pgcdc.Config.ExactlyOnce (instead of a Publisher) and each batch is one
// Kafka transaction holding the batch's records and a checkpoint record of
// the relay's position. It implements pgcdc.ExactlyOnceSink; see "Exactly-once
// to Kafka" in the pgcdc documentation for what it guarantees. One relay
// uses it at a time; it holds that relay's clients between Open and Close.
type CDCExactlyOnce struct {
	// Seeds are the bootstrap brokers. Required.
	Seeds []string
	// Opts are extra franz-go options (TLS, SASL, ...). The relay sets the
	// transactional ID, acks=all and idempotence itself; do not override
	// them.
	Opts []kgo.Opt
	// TransactionalID fences earlier instances of this relay. Default
	// "exactly-cdc-<slot>". It must be unique per slot and stable across
	// restarts.
	TransactionalID string
	// CheckpointTopic holds one checkpoint record per slot (created
	// compacted, one partition, when missing). Default
	// "exactly_cdc_checkpoints".
	CheckpointTopic string
	// TopicFunc names the Kafka topic of a message. Default Message.Topic.
	TopicFunc func(*exactly.Message) string
	// TransactionTimeout is the broker's bound on an open transaction.
	// Default 60s.
	TransactionTimeout time.Duration

	// Set by Open.
	slot  string
	valid func(string) error
	log   *slog.Logger
	cl    *kgo.Client // transactional
	adm   *kgo.Client // plain: fencing, checkpoint reads
}

// Open takes the defaults, connects, creates the checkpoint topic when
// missing, fences earlier producers of the transactional ID (aborting
// their open transaction, so the checkpoint read next is final) and returns
// the last committed checkpoint of slot that valid accepts ("" when there
// is none; a record valid refuses is skipped with a warning).
func (k *CDCExactlyOnce) Open(ctx context.Context, slot string, valid func(checkpoint string) error, log *slog.Logger) (string, error) {
	if len(k.Seeds) == 0 {
		return "", errors.New("kafka: CDCExactlyOnce.Seeds is required")
	}
	if k.TransactionalID == "" {
		k.TransactionalID = "exactly-cdc-" + slot
	}
	if k.CheckpointTopic == "" {
		k.CheckpointTopic = DefaultCDCCheckpointTopic
	}
	if k.TransactionTimeout == 0 {
		k.TransactionTimeout = 60 * time.Second
	}
	k.slot, k.valid, k.log = slot, valid, log
	adm, err := kgo.NewClient(append(slices.Clone(k.Opts), kgo.SeedBrokers(k.Seeds...))...)
	if err != nil {
		return "", fmt.Errorf("kafka: client: %w", err)
	}
	k.adm = adm
	ckpt, err := k.open(ctx)
	if err != nil {
		adm.Close()
		k.adm = nil
		return "", err
	}
	return ckpt, nil
}

func (k *CDCExactlyOnce) open(ctx context.Context) (string, error) {
	if err := k.ensureTopic(ctx); err != nil {
		return "", err
	}
	if err := k.fence(ctx); err != nil {
		return "", err
	}
	ckpt, err := k.Checkpoint(ctx)
	if err != nil {
		return "", err
	}
	if err := k.newProducer(); err != nil {
		return "", err
	}
	return ckpt, nil
}

func (k *CDCExactlyOnce) newProducer() error {
	opts := append(slices.Clone(k.Opts), kgo.SeedBrokers(k.Seeds...), kgo.TransactionalID(k.TransactionalID),
		kgo.TransactionTimeout(k.TransactionTimeout), kgo.RequiredAcks(kgo.AllISRAcks()))
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return fmt.Errorf("kafka: client: %w", err)
	}
	k.cl = cl
	return nil
}

// Close aborts the open transaction, if any, and closes the clients.
func (k *CDCExactlyOnce) Close() {
	if k.cl != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = k.cl.AbortBufferedRecords(ctx)
		_ = k.cl.EndTransaction(ctx, kgo.TryAbort)
		cancel()
		k.cl.Close()
		k.cl = nil
	}
	if k.adm != nil {
		k.adm.Close()
		k.adm = nil
	}
}

func (k *CDCExactlyOnce) ensureTopic(ctx context.Context) error {
	adm := kadm.NewClient(k.adm)
	compact := "compact"
	resp, err := adm.CreateTopic(ctx, 1, -1, map[string]*string{"cleanup.policy": &compact}, k.CheckpointTopic)
	if err == nil {
		err = resp.Err
	}
	if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
		return fmt.Errorf("kafka: creating the checkpoint topic %q: %w", k.CheckpointTopic, err)
	}
	return nil
}

// fence bumps the producer epoch of the transactional ID: an earlier relay
// (a zombie, or one that was killed) can commit nothing more, and its open
// transaction is aborted, so the checkpoint read next is final.
func (k *CDCExactlyOnce) fence(ctx context.Context) error {
	for attempt := 1; ; attempt++ {
		req := kmsg.NewPtrInitProducerIDRequest()
		req.TransactionalID = &k.TransactionalID
		req.TransactionTimeoutMillis = int32(k.TransactionTimeout.Milliseconds())
		req.ProducerID, req.ProducerEpoch = -1, -1
		resp, err := req.RequestWith(ctx, k.adm)
		if err == nil {
			err = kerr.ErrorForCode(resp.ErrorCode)
		}
		if err == nil {
			return nil
		}
		if attempt >= 50 || ctx.Err() != nil || !kerr.IsRetriable(err) && !errors.Is(err, kerr.ConcurrentTransactions) {
			return fmt.Errorf("kafka: fencing transactional ID %q: %w", k.TransactionalID, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Checkpoint reads the last committed checkpoint of the slot (read
// committed), "" when there is none.
func (k *CDCExactlyOnce) Checkpoint(ctx context.Context) (string, error) {
	topic := k.CheckpointTopic
	ends, err := kadm.NewClient(k.adm).ListCommittedOffsets(ctx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return "", fmt.Errorf("kafka: reading the end of the checkpoint topic %q: %w", topic, err)
	}
	end, ok := ends.Lookup(topic, 0)
	if !ok || end.Offset <= 0 {
		return "", nil
	}
	cl, err := kgo.NewClient(append(slices.Clone(k.Opts), kgo.SeedBrokers(k.Seeds...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: {0: kgo.NewOffset().AtStart()}}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.KeepControlRecords())...)
	if err != nil {
		return "", fmt.Errorf("kafka: client: %w", err)
	}
	defer cl.Close()
	last := ""
	next := int64(0)
	for next < end.Offset {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		var ferr error
		fs.EachError(func(_ string, _ int32, err error) { ferr = err })
		if ferr != nil {
			return "", fmt.Errorf("kafka: reading the checkpoint topic %q: %w", topic, ferr)
		}
		fs.EachRecord(func(r *kgo.Record) {
			next = r.Offset + 1
			if r.Attrs.IsControl() || string(r.Key) != k.slot {
				return
			}
			if err := k.valid(string(r.Value)); err != nil {
				k.log.Warn("ignoring a bad checkpoint record", "offset", r.Offset, "err", err)
				return
			}
			last = string(r.Value)
		})
	}
	return last, nil
}

// Publish produces msgs and the checkpoint record in one transaction and
// commits it. Either every message is committed (errs and outage nil) or
// none is: errs then names the messages at fault (the others, nil, went
// down with them), or outage says why the transaction failed as a whole.
// An outage wrapping exactly.ErrOutcomeUnknown is a commit that may have
// happened: Checkpoint tells.
func (k *CDCExactlyOnce) Publish(ctx context.Context, msgs []*exactly.Message, checkpoint string) ([]error, error) {
	errs := make([]error, len(msgs))
	recs := make([]*kgo.Record, len(msgs))
	bad := false
	for i, m := range msgs {
		rec, err := kafkarec.Record(m, k.TopicFunc)
		if err != nil {
			errs[i], bad = err, true
			continue
		}
		recs[i] = rec
	}
	if bad {
		return errs, nil
	}
	if err := k.cl.BeginTransaction(); err != nil {
		k.reset()
		return nil, fmt.Errorf("kafka: beginning a transaction: %w", err)
	}
	done := make(chan struct{}, len(msgs)+1)
	var ckptErr error
	for i, rec := range recs {
		k.cl.Produce(ctx, rec, func(_ *kgo.Record, err error) {
			if err != nil {
				errs[i] = describeCDC(msgs[i], rec.Topic, err)
			}
			done <- struct{}{}
		})
	}
	k.cl.Produce(ctx, &kgo.Record{Topic: k.CheckpointTopic, Partition: 0, Key: []byte(k.slot), Value: []byte(checkpoint)},
		func(_ *kgo.Record, err error) { ckptErr = err; done <- struct{}{} })
	flushErr := k.cl.Flush(ctx)
	for range len(msgs) + 1 {
		<-done
	}
	failed := flushErr != nil || ckptErr != nil
	for _, err := range errs {
		failed = failed || err != nil
	}
	if failed {
		k.abort()
		if ckptErr != nil || flushErr != nil {
			// Not the messages' fault (the broker, the checkpoint topic):
			// retry the batch without spending attempts.
			return nil, fmt.Errorf("kafka: transaction aborted: %w", errors.Join(flushErr, ckptErr))
		}
		return errs, nil
	}
	if err := k.cl.EndTransaction(ctx, kgo.TryCommit); err != nil {
		// The commit may or may not have happened: abort what can be; the
		// checkpoint tells.
		k.abort()
		return nil, fmt.Errorf("kafka: committing the transaction: %w", errors.Join(exactly.ErrOutcomeUnknown, err))
	}
	return nil, nil
}

// abort ends the open transaction, aborting it; a client that cannot abort
// is replaced (which fences it).
func (k *CDCExactlyOnce) abort() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := k.cl.AbortBufferedRecords(ctx); err != nil {
		k.reset()
		return
	}
	if err := k.cl.EndTransaction(ctx, kgo.TryAbort); err != nil {
		k.log.Warn("aborting the Kafka transaction failed; replacing the producer", "err", err)
		k.reset()
	}
}

func (k *CDCExactlyOnce) reset() {
	k.cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := k.fence(ctx); err != nil {
		k.log.Warn("fencing after a failed transaction failed", "err", err)
	}
	if err := k.newProducer(); err != nil {
		k.log.Error("creating a new producer failed", "err", err)
	}
}

// describeCDC names a record the broker refused, as unpublishable when no
// retry can help.
func describeCDC(m *exactly.Message, topic string, err error) error {
	if isTooLarge(err) || errors.Is(err, kerr.InvalidTopicException) || errors.Is(err, kerr.InvalidRecord) {
		return exactly.Unpublishable(fmt.Errorf("kafka: message %s to topic %q refused: %w", m.ID, topic, err))
	}
	return fmt.Errorf("kafka: message %s to topic %q: %w", m.ID, topic, err)
}
