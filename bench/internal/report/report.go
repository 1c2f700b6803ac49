// Package report holds what both benchmark commands print the same way.
package report

import (
	"os"
	"slices"
	"strings"
)

// loadAvg is the 1-minute load average, logged so that a noisy run shows.
// LoadAvg is the 1-minute load average, for the notes.
func LoadAvg() string {
	raw, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(raw))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

// OneLine folds s onto one table cell.
func OneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	s = strings.ReplaceAll(s, "|", "/")
	if len(s) > 200 {
		s = s[:200] + "…"
	}
	return s
}

// PairedRatio takes the ratios a[i]/b[i] of runs made in the same round and
// returns their lowest, median and highest; ok is false with fewer than
// minRuns pairs, unequal lengths or a zero rate.
func PairedRatio(a, b []float64, minRuns int) (lo, med, hi float64, ok bool) {
	if len(a) < minRuns || len(a) == 0 || len(a) != len(b) {
		return 0, 0, 0, false
	}
	rs := make([]float64, len(a))
	for i := range a {
		if b[i] == 0 {
			return 0, 0, 0, false
		}
		rs[i] = a[i] / b[i]
	}
	slices.Sort(rs)
	return rs[0], rs[len(rs)/2], rs[len(rs)-1], true
}
