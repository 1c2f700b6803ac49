package console

import (
	"context"
	"time"
)

// SampleAt takes one sample as Run does, stamped at (tests draw an hour of
// history without waiting an hour).
func SampleAt(ctx context.Context, c *Console, at time.Time) error { return c.sample(ctx, at) }
