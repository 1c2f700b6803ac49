package console

import (
	"context"
	"fmt"
	"html/template"
	"strings"
	"time"
)

// Sample is one point of the overview's chart.
type Sample struct {
	At      time.Time `json:"at"`
	Pending int64     `json:"pending"`
	Dead    int64     `json:"dead"`
	// PublishedPerSecond is the rate since the previous sample; null for
	// the first sample, which has none before it.
	PublishedPerSecond *float64 `json:"published_per_second"`
}

// rawSample is what the next sample's rate is computed from.
type rawSample struct {
	at        time.Time
	backlog   int64   // pending + dead
	highWater int64   // greatest seq seen
	published float64 // the relay's counter, when Config.Metrics is set
	ok        bool
}

// Run samples the backlog and the published rate every SampleInterval
// until ctx ends, keeping the last hour for the overview's chart. It takes
// the first sample at once. A sample that fails (the database is down) is
// logged and skipped: the chart shows a gap.
func (c *Console) Run(ctx context.Context) error {
	t := time.NewTicker(c.cfg.SampleInterval)
	defer t.Stop()
	for {
		sctx, cancel := context.WithTimeout(ctx, max(c.cfg.SampleInterval, 5*time.Second))
		err := c.sample(sctx, time.Now())
		cancel()
		if err != nil && ctx.Err() == nil {
			c.log.Warn("console: sampling the outbox", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (c *Console) sample(ctx context.Context, now time.Time) error {
	b, err := c.store().Backlog(ctx, c.db)
	if err != nil {
		return err
	}
	hw, err := c.store().HighWater(ctx, c.db)
	if err != nil {
		return err
	}
	raw := rawSample{at: now, backlog: b.Pending + b.Dead, highWater: hw, ok: true}
	var published float64
	var haveCounter bool
	if c.cfg.Metrics != nil {
		published, haveCounter = c.metrics()["exactly_relay_published_total"]
		raw.published = published
	}
	s := Sample{At: now.UTC(), Pending: b.Pending, Dead: b.Dead}

	c.mu.Lock()
	defer c.mu.Unlock()
	prev := c.last
	if raw.highWater == 0 && prev.ok {
		// An empty table has no greatest seq: keep the last one seen (the
		// rows enqueued and published meanwhile are not counted).
		raw.highWater = prev.highWater
	}
	raw.highWater = max(raw.highWater, prev.highWater)
	if prev.ok {
		dt := now.Sub(prev.at).Seconds()
		if dt > 0 {
			var n float64
			if haveCounter {
				n = published - prev.published
			} else {
				n = float64((raw.highWater - prev.highWater) + (prev.backlog - raw.backlog))
			}
			r := max(n, 0) / dt
			s.PublishedPerSecond = &r
		}
	}
	c.last = raw
	if c.since.IsZero() {
		c.since = now.UTC()
	}
	c.samples = append(c.samples, s)
	cutoff := now.Add(-chartWindow)
	i := 0
	for i < len(c.samples) && c.samples[i].At.Before(cutoff) {
		i++
	}
	c.samples = append(c.samples[:0], c.samples[i:]...)
	return nil
}

// Samples returns the samples of the last hour, oldest first, and the time
// of the first sample Run took (zero before it took one).
func (c *Console) Samples() ([]Sample, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Sample{}, c.samples...), c.since
}

// Chart geometry.
const (
	chartW, chartH         = 760, 220
	padL, padR, padT, padB = 56, 56, 16, 28
)

// chart draws the last hour of samples as an SVG: the backlog (pending)
// on the left axis, the published rate on the right axis. Everything it
// writes is numbers and fixed text.
func chart(samples []Sample, now time.Time, interval time.Duration) template.HTML {
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart" viewBox="0 0 %d %d" role="img" aria-label="backlog and published rate over the last hour" xmlns="http://www.w3.org/2000/svg">`, chartW, chartH)
	x0, x1, y0, y1 := float64(padL), float64(chartW-padR), float64(chartH-padB), float64(padT)
	start := now.Add(-chartWindow)
	x := func(t time.Time) float64 { return x0 + (x1-x0)*t.Sub(start).Seconds()/chartWindow.Seconds() }
	var maxPending, maxRate float64 = 1, 1
	for _, s := range samples {
		maxPending = max(maxPending, float64(s.Pending))
		if s.PublishedPerSecond != nil {
			maxRate = max(maxRate, *s.PublishedPerSecond)
		}
	}
	maxPending, maxRate = niceCeil(maxPending), niceCeil(maxRate)
	// Grid and axes.
	for i := 0; i <= 4; i++ {
		y := y0 + (y1-y0)*float64(i)/4
		fmt.Fprintf(&b, `<line class="grid" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f"/>`, x0, y, x1, y)
		fmt.Fprintf(&b, `<text class="axis pending" x="%.1f" y="%.1f" text-anchor="end">%s</text>`, x0-6, y+4, short(maxPending*float64(i)/4))
		fmt.Fprintf(&b, `<text class="axis rate" x="%.1f" y="%.1f">%s/s</text>`, x1+6, y+4, short(maxRate*float64(i)/4))
	}
	for m := 60; m >= 0; m -= 15 {
		t := now.Add(-time.Duration(m) * time.Minute)
		label := "now"
		if m > 0 {
			label = fmt.Sprintf("-%dm", m)
		}
		fmt.Fprintf(&b, `<text class="axis" x="%.1f" y="%d" text-anchor="middle">%s</text>`, x(t), chartH-8, label)
	}
	// Series: a gap in the samples (more than three intervals) breaks the line.
	series := func(class string, val func(Sample) (float64, bool), top float64) {
		type point struct{ x, y float64 }
		var pts []point
		flush := func() {
			switch len(pts) {
			case 0:
			case 1:
				fmt.Fprintf(&b, `<circle class="%s" cx="%.1f" cy="%.1f" r="3"/>`, class, pts[0].x, pts[0].y)
			default:
				fmt.Fprintf(&b, `<polyline class="%s" points="`, class)
				for i, p := range pts {
					if i > 0 {
						b.WriteByte(' ')
					}
					fmt.Fprintf(&b, "%.1f,%.1f", p.x, p.y)
				}
				b.WriteString(`"/>`)
			}
			pts = pts[:0]
		}
		var last time.Time
		for _, s := range samples {
			v, ok := val(s)
			if !ok {
				continue
			}
			if !last.IsZero() && s.At.Sub(last) > 3*interval {
				flush()
			}
			last = s.At
			pts = append(pts, point{x(s.At), y0 + (y1-y0)*v/top})
		}
		flush()
	}
	series("pending", func(s Sample) (float64, bool) { return float64(s.Pending), true }, maxPending)
	series("rate", func(s Sample) (float64, bool) {
		if s.PublishedPerSecond == nil {
			return 0, false
		}
		return *s.PublishedPerSecond, true
	}, maxRate)
	fmt.Fprintf(&b, `<text class="legend pending" x="%.1f" y="%d">■ pending</text>`, x0+4, padT+12)
	fmt.Fprintf(&b, `<text class="legend rate" x="%.1f" y="%d">■ published/s</text>`, x0+90, padT+12)
	if len(samples) == 0 {
		fmt.Fprintf(&b, `<text class="empty" x="%.1f" y="%.1f" text-anchor="middle">no sample yet</text>`, (x0+x1)/2, (y0+y1)/2)
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String()) // numbers and fixed text only
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	p := 1.0
	for p*10 <= v {
		p *= 10
	}
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func short(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.1fM", v/1e6)
	case v >= 1e4:
		return fmt.Sprintf("%.0fk", v/1e3)
	case v >= 1e3:
		return fmt.Sprintf("%.1fk", v/1e3)
	case v == float64(int64(v)):
		return fmt.Sprintf("%d", int64(v))
	}
	return fmt.Sprintf("%.1f", v)
}
