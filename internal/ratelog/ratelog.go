// Package ratelog keeps a repeating warning from flooding the log: the first
// occurrence of each name goes through, then at most one per interval, which
// says how many were held back since the last one.
package ratelog

import (
	"sync"
	"time"
)

// maxNames bounds the names remembered; past it the ones not seen for an
// interval are forgotten (their next occurrence goes through at once).
const maxNames = 4096

// Limiter decides which occurrences to log. The zero value is not usable:
// create one with New.
type Limiter struct {
	every time.Duration
	mu    sync.Mutex
	names map[string]*state
}

type state struct {
	last       time.Time // when one went through
	suppressed int       // held back since
}

// New returns a limiter letting through one occurrence per name per every.
func New(every time.Duration) *Limiter {
	return &Limiter{every: every, names: map[string]*state{}}
}

// Allow reports whether the occurrence of name at now should be logged, and
// if so how many occurrences of it were held back since the last one logged.
func (l *Limiter) Allow(name string, now time.Time) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s, seen := l.names[name]
	if !seen {
		if len(l.names) >= maxNames {
			for n, o := range l.names {
				if now.Sub(o.last) >= l.every {
					delete(l.names, n)
				}
			}
		}
		l.names[name] = &state{last: now}
		return true, 0
	}
	if now.Sub(s.last) < l.every {
		s.suppressed++
		return false, 0
	}
	suppressed = s.suppressed
	s.last, s.suppressed = now, 0
	return true, suppressed
}
