package awsmsg

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/exactlyonce/exactly"
)

// MaxBatchEntries is the number of entries SendMessageBatch and
// PublishBatch take.
const MaxBatchEntries = 10

// Item is a message of a Publish call ready to send to one destination.
type Item struct {
	I    int // index in the Publish call
	Size int // as SQS and SNS count it
}

// SendInBatches sends the items of one destination in batches of up to
// maxEntries (at most MaxBatchEntries) and maxBytes, one after another, in order. send sends one
// batch and records the outcome of each of its items in errs; it returns
// an error when the call failed as a whole, after which the later items
// are not sent. After a retryable failure of an item, the later items of
// the same non-empty Key are not sent either, so a retry of the first
// cannot land behind them. pkg prefixes the errors ("sqs", "sns").
func SendInBatches(ctx context.Context, pkg string, msgs []*exactly.Message, items []Item, maxEntries, maxBytes int, errs []error,
	send func(ctx context.Context, batch []Item) error) {
	blocked := map[string]int{} // key -> index of the message that failed
	var stop error
	for len(items) > 0 {
		batch := make([]Item, 0, maxEntries)
		size := 0
		for len(items) > 0 && len(batch) < maxEntries && (len(batch) == 0 || size+items[0].Size <= maxBytes) {
			it := items[0]
			items = items[1:]
			m := msgs[it.I]
			switch j, isBlocked := blocked[m.Key]; {
			case stop != nil:
				errs[it.I] = fmt.Errorf("%s: message %s not sent: %w", pkg, m.ID, stop)
			case isBlocked:
				errs[it.I] = fmt.Errorf("%s: message %s not sent: an earlier message with the same key (%s) failed; publish them again in order: %w",
					pkg, m.ID, msgs[j].ID, errs[j])
			default:
				batch = append(batch, it)
				size += it.Size
			}
		}
		if len(batch) == 0 {
			continue
		}
		if err := ctx.Err(); err != nil {
			stop = err
			for _, it := range batch {
				errs[it.I] = fmt.Errorf("%s: message %s not sent: %w", pkg, msgs[it.I].ID, err)
			}
			continue
		}
		if err := send(ctx, batch); err != nil {
			stop = err
		}
		for _, it := range batch {
			m := msgs[it.I]
			if err := errs[it.I]; err != nil && m.Key != "" && !errors.Is(err, exactly.ErrUnpublishable) {
				if _, ok := blocked[m.Key]; !ok {
					blocked[m.Key] = it.I
				}
			}
		}
	}
}

// Refusal is one entry a batch call's answer lists as failed.
type Refusal struct {
	ID          string // the entry id the batch gave it: its index in the batch
	Code        string
	Message     string
	SenderFault bool
}

// RecordAnswer records in errs the outcome of each item of a batch whose
// call was answered: entries listed as successful are done, those listed as
// failed get the error refused makes of them, and those the answer does not
// mention may or may not be stored (exactly.ErrOutcomeUnknown), so they are
// sent again. Entry ids are the items' indexes in batch, as sent. pkg and
// what ("SQS", "SNS") and dest (the queue URL or topic ARN) name them in
// errors.
func RecordAnswer(pkg, what, dest string, msgs []*exactly.Message, batch []Item, successful []string, failed []Refusal, errs []error,
	refused func(m *exactly.Message, r Refusal) error) {
	done := make([]bool, len(batch))
	index := func(id string) (int, bool) {
		k, err := strconv.Atoi(id)
		return k, err == nil && k >= 0 && k < len(batch)
	}
	for _, id := range successful {
		if k, ok := index(id); ok {
			done[k] = true
		}
	}
	for _, f := range failed {
		if k, ok := index(f.ID); ok {
			done[k] = true
			errs[batch[k].I] = refused(msgs[batch[k].I], f)
		}
	}
	for k, it := range batch {
		if !done[k] {
			errs[it.I] = fmt.Errorf("%s: message %s to %s: %s's answer does not mention it; publishing it again is safe: %w",
				pkg, msgs[it.I].ID, dest, what, exactly.ErrOutcomeUnknown)
		}
	}
}
