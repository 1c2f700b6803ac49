package exactly_test

import (
	"errors"
	"fmt"
	"testing"

	"github.com/exactlyonce/exactly"
)

// Verdicts holds the Publisher contract's one rule: a *BatchError, or the
// ErrUnpublishable refusal of a lone message, is a verdict per message;
// anything else is an outage for the whole batch.
func TestVerdicts(t *testing.T) {
	down := errors.New("connection refused")
	tooBig := exactly.Unpublishable(errors.New("too large"))
	for _, c := range []struct {
		name   string
		err    error
		n      int
		errs   []error
		outage error
	}{
		{"confirmed", nil, 2, []error{nil, nil}, nil},
		{"per message", exactly.NewBatchError([]error{nil, tooBig}), 2, []error{nil, tooBig}, nil},
		{"per message, wrapped", fmt.Errorf("publish: %w", exactly.NewBatchError([]error{down, nil})), 2, []error{down, nil}, nil},
		{"lone message refused", tooBig, 1, []error{tooBig}, nil},
		{"refused for a batch", tooBig, 2, []error{tooBig, tooBig}, tooBig},
		{"outage", down, 3, []error{down, down, down}, down},
		{"outcome unknown for all", exactly.ErrOutcomeUnknown, 1, []error{exactly.ErrOutcomeUnknown}, exactly.ErrOutcomeUnknown},
	} {
		t.Run(c.name, func(t *testing.T) {
			errs, outage := exactly.Verdicts(c.err, c.n)
			if outage != c.outage {
				t.Errorf("outage = %v, want %v", outage, c.outage)
			}
			if len(errs) != len(c.errs) {
				t.Fatalf("got %d errors for %d messages, want %d", len(errs), c.n, len(c.errs))
			}
			for i := range errs {
				if errs[i] != c.errs[i] {
					t.Errorf("message %d: error %v, want %v", i, errs[i], c.errs[i])
				}
			}
		})
	}
}
