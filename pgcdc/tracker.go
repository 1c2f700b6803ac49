package pgcdc

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/exactlyonce/exactly"
)

// LSN is a PostgreSQL write-ahead log position.
type LSN uint64

// String formats the LSN as PostgreSQL does (16/B374D848).
func (l LSN) String() string { return pglogrepl.LSN(l).String() }

// ParseLSN parses PostgreSQL's text form of an LSN.
func ParseLSN(s string) (LSN, error) {
	l, err := pglogrepl.ParseLSN(s)
	return LSN(l), err
}

// position orders messages in the stream: the commit LSN of their
// transaction (or the LSN of a non-transactional message), then their
// index in it. Transactions arrive in commit order, so positions only grow.
type position struct {
	lsn LSN
	idx int
}

func (p position) String() string { return fmt.Sprintf("%s/%d", p.lsn, p.idx) }

func (p position) lessEq(q position) bool {
	return p.lsn < q.lsn || (p.lsn == q.lsn && p.idx <= q.idx)
}

func parsePosition(s string) (position, error) {
	var p position
	var lsn string
	i := len(s) - 1
	for i >= 0 && s[i] != '/' {
		i--
	}
	if i <= 0 {
		return p, fmt.Errorf("bad checkpoint %q", s)
	}
	lsn = s[:i]
	if _, err := fmt.Sscanf(s[i+1:], "%d", &p.idx); err != nil {
		return p, fmt.Errorf("bad checkpoint %q: %w", s, err)
	}
	l, err := ParseLSN(lsn)
	if err != nil {
		return p, fmt.Errorf("bad checkpoint %q: %w", s, err)
	}
	p.lsn = l
	return p, nil
}

// source says where a message came from.
type source uint8

const (
	srcTable    source = iota // a row of the exactly outbox table
	srcDebezium               // a row of a Debezium-layout table
	srcMessage                // a logical decoding message
	srcBackfill               // a row read from the slot's snapshot
)

// entry is one message between the stream and its confirmation.
type entry struct {
	pos  position
	unit *unit
	msg  exactly.Message
	seq  int64 // its row in the exactly outbox table; 0 for none
	src  source
	bad  error // undecodable: parked at once, never published
	// inKafka: at or below the exactly-once checkpoint; only its row is
	// deleted.
	inKafka bool

	// Owned by the dispatcher.
	attempts int
	until    time.Time // unkeyed: not before
	removed  bool      // left the pending list
}

// unit is a transaction (or a marker: a keepalive, a heartbeat) in stream
// order. Its end position can be confirmed once it is sealed and none of
// its messages is left.
type unit struct {
	lsn        LSN // commit LSN, or the marker's LSN
	end        LSN // what to confirm: the transaction's end LSN, the marker's LSN
	commitTime time.Time
	remaining  int
	count      int // messages received so far (to resume after a reconnect)
	sealed     bool
	// xid is the transaction's id from its Begin message; 0 for a marker,
	// a non-transactional message, the slot's snapshot. Its rows are
	// deleted or parked only once other sessions see it ended.
	xid uint32
}

// tracker keeps the units in stream order and computes the position that
// may be confirmed: the end of the longest prefix of finished units.
type tracker struct {
	mu        sync.Mutex
	q         []*unit
	confirmed LSN
	pending   atomic.Int64 // messages not finished
	onAdvance func(LSN)
}

func (t *tracker) push(u *unit) {
	t.mu.Lock()
	t.q = append(t.q, u)
	t.advance()
	t.mu.Unlock()
}

// add counts one more message of u.
func (t *tracker) add(u *unit) {
	t.mu.Lock()
	u.remaining++
	u.count++
	t.mu.Unlock()
	t.pending.Add(1)
}

// skip counts a message of u that needs no work (EOS: already in Kafka).
func (t *tracker) skip(u *unit) {
	t.mu.Lock()
	u.count++
	t.mu.Unlock()
}

func (t *tracker) seal(u *unit, end LSN) {
	t.mu.Lock()
	u.end, u.sealed = end, true
	t.advance()
	t.mu.Unlock()
}

// done finishes messages.
func (t *tracker) done(es []*entry) {
	if len(es) == 0 {
		return
	}
	t.mu.Lock()
	for _, e := range es {
		e.unit.remaining--
	}
	t.advance()
	t.mu.Unlock()
	t.pending.Add(-int64(len(es)))
}

// advance pops finished units. Called with t.mu held.
func (t *tracker) advance() {
	n := 0
	for n < len(t.q) && t.q[n].sealed && t.q[n].remaining == 0 {
		if t.q[n].end > t.confirmed {
			t.confirmed = t.q[n].end
		}
		n++
	}
	if n == 0 {
		return
	}
	clear(t.q[:n])
	t.q = t.q[n:]
	if t.onAdvance != nil {
		t.onAdvance(t.confirmed)
	}
}

func (t *tracker) position() LSN {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.confirmed
}

// oldest is the commit time of the oldest unfinished transaction.
func (t *tracker) oldest() time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, u := range t.q {
		if !u.commitTime.IsZero() {
			return u.commitTime
		}
	}
	return time.Time{}
}

// waitUnit blocks until u is finished or stop is closed.
func (t *tracker) finished(u *unit) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return u.sealed && u.remaining == 0
}
