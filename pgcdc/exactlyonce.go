package pgcdc

import (
	"context"
	"errors"
	"log/slog"

	"github.com/exactlyonce/exactly"
)

// ExactlyOnceSink publishes each batch together with the relay's position
// in one atomic step, so that a restart resumes after what the broker holds
// instead of publishing it again: see "Exactly-once to Kafka" in the
// package documentation. kafka.CDCExactlyOnce is the one for Kafka (a
// transaction holding the records and a checkpoint record).
//
// A checkpoint is the position of a batch's last message in the relay's
// own text form; the sink stores it and gives it back, and never needs to
// read it.
type ExactlyOnceSink interface {
	// Open connects, fences earlier instances publishing for slot (their
	// open transaction is aborted, so what it reads next is final) and
	// returns the last committed checkpoint of slot, "" when there is none.
	// A stored checkpoint that valid refuses is skipped, with a warning to
	// log. Run calls it once, before reading the slot.
	Open(ctx context.Context, slot string, valid func(checkpoint string) error, log *slog.Logger) (checkpoint string, err error)
	// Publish publishes msgs and checkpoint, the position of the last one,
	// atomically. errs and outage both nil: all of it committed. Otherwise
	// none of it did: errs has one entry per message, the error of each
	// message at fault (nil for the ones that only went down with them), or
	// outage says the sink failed as a whole. An outage wrapping
	// exactly.ErrOutcomeUnknown is a commit that may have happened; the
	// relay then reads the checkpoint to tell.
	Publish(ctx context.Context, msgs []*exactly.Message, checkpoint string) (errs []error, outage error)
	// Checkpoint reads the last committed checkpoint of the slot again, as
	// Open does.
	Checkpoint(ctx context.Context) (string, error)
	// Close aborts what is open and releases the connections. Run calls it
	// when it returns, after a successful Open.
	Close()
}

// openExactlyOnce opens the sink and reads the checkpoint it holds (nil
// when there is none).
func openExactlyOnce(ctx context.Context, s ExactlyOnceSink, slot string, log *slog.Logger) (*position, error) {
	valid := func(c string) error { _, err := parsePosition(c); return err }
	c, err := s.Open(ctx, slot, valid, log)
	if err != nil {
		return nil, err
	}
	return checkpointPosition(c)
}

func checkpointPosition(c string) (*position, error) {
	if c == "" {
		return nil, nil
	}
	p, err := parsePosition(c)
	if err != nil {
		return nil, err
	}
	return &p, nil
}

// exactlyOnceSink hands batches to an ExactlyOnceSink with the position of
// their last message, and settles a commit whose outcome is unknown by the
// checkpoint.
type exactlyOnceSink struct {
	s   ExactlyOnceSink
	log *slog.Logger
}

func (s exactlyOnceSink) publish(ctx context.Context, es []*entry) ([]error, error) {
	msgs := make([]*exactly.Message, len(es))
	for i, e := range es {
		msgs[i] = &e.msg
	}
	last := es[len(es)-1].pos
	errs, outage := s.s.Publish(ctx, msgs, last.String())
	if outage != nil && errors.Is(outage, exactly.ErrOutcomeUnknown) {
		c, err := s.s.Checkpoint(context.WithoutCancel(ctx))
		if err == nil {
			if ckpt, err := checkpointPosition(c); err == nil && ckpt != nil && last.lessEq(*ckpt) {
				s.log.Info("the Kafka commit's outcome was unknown; the checkpoint shows it committed", "checkpoint", ckpt.String())
				return make([]error, len(es)), nil
			}
		}
	}
	if outage != nil {
		return nil, outage
	}
	if errs == nil {
		errs = make([]error, len(es))
	}
	return errs, nil
}
