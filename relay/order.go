package relay

import (
	"time"

	"github.com/exactlyonce/exactly/internal/outboxstore"
)

// keyOrder is the relay's per-key ordering state: which rows are in flight,
// which keys are held back behind a failed message, and where the next read
// starts. It decides what a read asks for (read), which of the rows read
// may go now (admit), what an outcome does to a held-back key (heldBehind,
// hold, done) and forgets rows that left the pipeline (release). It does no
// I/O and has no lock of its own: the Relay holds its mutex around every
// call.
type keyOrder struct {
	batchSize int
	strict    bool // StrictOrder: one row in flight per key
	// pausing is set for a publisher that pauses a key after a failure
	// (exactly.PipelinedPublisher): later messages of the key fail unsent
	// until the relay resumes it. paused holds the keys with a failure
	// since they were last resumed. A paused key's next row is admitted
	// only once no row of the key is in flight, so every message of the
	// key handed over before has its outcome, and it is the row that
	// resumes the key (admit's resume): resumed sooner, a message handed
	// over before the failure was known could overtake the failed one's
	// retry.
	pausing bool
	paused  map[string]struct{}

	inflight map[int64]struct{}
	keysBusy map[string]int // rows in flight per key (strict or pausing)
	blocks   map[string]*block
	// cursor is the highest seq any read returned. Rows above it were never
	// seen, so while working through a backlog (the last read was a full
	// batch) with batches in flight, the next read asks for seq > cursor
	// instead of excluding every seq in flight. Rows at or below it that are
	// pending and not in flight (a late commit, a retry, a row held back)
	// are found by a full read, which happens whenever the relay is caught
	// up or nothing is in flight, after anything was held back, failed or
	// handed back (rescan), and at least every fullReadEvery.
	cursor int64
	rescan bool
	// cursorStale is set when partitions were taken over: their pending
	// rows lie below the cursor, and a read from the cursor would hand out
	// later messages of their keys first. Reads stay full (in seq order,
	// leaving out what is in flight) until one can set the cursor back.
	cursorStale bool
	// fetchGen numbers the reads; a block remembers the read during which
	// its row left the pipeline (see admit).
	fetchGen uint64
}

// block holds back a key whose message at seq failed: later messages of the
// key wait until that one is confirmed or parked, so the key stays in order.
type block struct {
	seq      int64
	until    time.Time
	released bool // the retry is under way; rows after it may flow again
	// freedGen is fetchGen when the row, or another of its key, last left
	// the pipeline: a read with that number or lower may have excluded it
	// as in flight.
	freedGen uint64
	created  time.Time // the held row's CreatedAt (Stats.OldestBlocked)
}

func newKeyOrder(batchSize int, strict, pausing bool) keyOrder {
	return keyOrder{batchSize: batchSize, strict: strict, pausing: pausing, paused: map[string]struct{}{},
		inflight: map[int64]struct{}{}, keysBusy: map[string]int{}, blocks: map[string]*block{}}
}

// countsKeys says whether keysBusy counts the rows in flight per key.
func (o *keyOrder) countsKeys() bool { return o.strict || o.pausing }

// readPlan is what one read of the outbox asks for.
type readPlan struct {
	gen  uint64 // the read's number
	full bool   // a full read (in seq order, leaving out what is in flight), not one from the cursor
	// exclude lists the seqs in flight (full reads); maxExcluded is the
	// highest of them.
	exclude     []int64
	maxExcluded int64
	after       int64    // a read from the cursor: seq > after
	blocked     []string // keys held back until later: the read leaves them out
}

// read plans the next read at now. backlog says whether the last read
// returned a full batch, lastFull when the last full read was.
//
// Cursor reads happen only while working through a backlog: once caught
// up, rows commit out of seq order (concurrent writers) and every read must
// see them at once.
func (o *keyOrder) read(now time.Time, backlog bool, lastFull time.Time) readPlan {
	var p readPlan
	p.full = !backlog || len(o.inflight) == 0 || o.rescan || o.cursor == 0 || o.cursorStale || now.Sub(lastFull) >= fullReadEvery
	if p.full {
		o.rescan = false
		p.exclude = make([]int64, 0, len(o.inflight))
		for seq := range o.inflight {
			p.exclude = append(p.exclude, seq)
			p.maxExcluded = max(p.maxExcluded, seq)
		}
	} else {
		p.after = o.cursor
	}
	o.fetchGen++
	p.gen = o.fetchGen
	for k, b := range o.blocks {
		if !b.released && now.Before(b.until) {
			p.blocked = append(p.blocked, k)
		}
	}
	return p
}

// admit picks the rows of read that may go now, in seq order, and marks
// them in flight. It returns how long until the earliest held-back key is
// due, and whether rows were held back behind a message of their key in
// flight. resume lists the rows of ready (by index) that resume a paused
// key (pausing): the publisher is to let their key go again before they
// are sent.
func (o *keyOrder) admit(rows []outboxstore.Row, now time.Time, read readPlan) (ready []outboxstore.Row, _ time.Duration, busy bool, resume []int) {
	n := len(rows)
	switch {
	case read.full && o.cursorStale && n < o.batchSize:
		// The read returned every pending row not in flight: none is left
		// below any cursor.
		o.cursorStale = false
	case read.full && o.cursorStale && rows[n-1].Seq > read.maxExcluded:
		// Every pending row up to the last one returned was returned or is
		// in flight, and nothing in flight lies above it: reads may go on
		// from there without passing a row by nor reading one twice.
		o.cursor, o.cursorStale = rows[n-1].Seq, false
	}
	if read.full && !o.cursorStale && n == o.batchSize && rows[n-1].Seq < o.cursor {
		// The read filled its batch below the cursor: rows may be pending
		// between its last row and the cursor (left pending behind a
		// failed message of their key, or passed by while their key was
		// held back). A read from the cursor would pass them by and hand
		// out later messages of their keys first, so reads stay full
		// until one can set the cursor back.
		o.cursorStale = true
	}
	if n > 0 && rows[n-1].Seq > o.cursor {
		o.cursor = rows[n-1].Seq
	}
	defer func() {
		if len(ready) < len(rows) {
			o.rescan = true // the rows held back are below the cursor now
		}
	}()
	ready = rows[:0:0]
	var wait time.Duration
	due := func(t time.Time) {
		if d := t.Sub(now); !t.IsZero() && d > 0 && (wait == 0 || d < wait) {
			wait = d
		}
	}
	for i := range rows {
		row := &rows[i]
		key := row.Msg.Key
		_, paused := o.paused[key]
		if paused && o.keysBusy[key] > 0 {
			// Checked before mustWait, which may release a held row: the
			// key's messages in flight fail unsent, and its next row waits
			// for their outcome (the mark stage wakes the fetcher).
			busy = true
			continue
		}
		if hold, until := o.mustWait(row, now, read); hold {
			due(until)
			continue
		}
		if o.countsKeys() && key != "" {
			if o.strict && o.keysBusy[key] > 0 {
				busy = true
				continue // the next fetch after its predecessor is marked takes it
			}
			o.keysBusy[key]++
		}
		if paused {
			delete(o.paused, key)
			resume = append(resume, len(ready))
		}
		ready = append(ready, *row)
		o.inflight[row.Seq] = struct{}{}
	}
	return ready, wait, busy, resume
}

// failed records that a message of key failed (pausing): the publisher
// holds the key's later messages until a row resumes it.
func (o *keyOrder) failed(key string) {
	if o.pausing && key != "" {
		o.paused[key] = struct{}{}
	}
}

// mustWait says whether row must wait now, for its own retry or behind a
// failed message of its key, and until when: zero when it waits for a full
// read that sees the message holding its key.
func (o *keyOrder) mustWait(row *outboxstore.Row, now time.Time, read readPlan) (bool, time.Time) {
	notBefore := time.UnixMilli(row.NextAttemptAt)
	key := row.Msg.Key
	b, held := o.blocks[key]
	switch {
	case key == "" || !held:
		if !now.Before(notBefore) {
			return false, time.Time{}
		}
		// Its retry is not due (the query leaves these out; a clock step
		// may not): a keyed row holds its key back until then.
		if key != "" {
			o.blocks[key] = &block{seq: row.Seq, until: notBefore, created: row.Msg.CreatedAt}
		}
		return true, notBefore
	case b.released:
		// Retry under way: later rows follow it in order, unless a row of
		// the key left the pipeline after this read was planned: the read
		// may have excluded it as in flight, and it may still be pending.
		if b.freedGen >= read.gen {
			return true, time.Time{}
		}
		return false, time.Time{}
	case now.Before(b.until):
		return true, b.until
	case row.Seq == b.seq:
		b.released = true
		return false, time.Time{}
	case row.Seq > b.seq:
		if _, inflight := o.inflight[b.seq]; inflight || !read.full || b.freedGen >= read.gen {
			// The held row was not in this read's view: it is in flight (its
			// failure being recorded), or was when the read started, or the
			// read started above it (cursor). Wait for a full read that sees
			// it.
			return true, time.Time{}
		}
		// A full read that did not exclude the held row did not return it:
		// it is no longer pending (parked, or purged by an operator). The
		// key is free again.
		delete(o.blocks, key)
		return false, time.Time{}
	}
	// row.Seq < b.seq: an earlier row is due first, unless its own retry
	// is not due yet, when it holds the key instead.
	if now.Before(notBefore) {
		b.seq, b.until, b.created = row.Seq, notBefore, row.Msg.CreatedAt
		return true, notBefore
	}
	return false, time.Time{}
}

// release forgets rows that left the pipeline.
func (o *keyOrder) release(rows []outboxstore.Row) {
	for _, row := range rows {
		delete(o.inflight, row.Seq)
		if b, ok := o.blocks[row.Msg.Key]; ok {
			// Any row of a held-back key: it may be left pending behind
			// the held one, and reads planned before now excluded it.
			if b.seq == row.Seq {
				b.released = false
			}
			b.freedGen = o.fetchGen
		}
		if o.countsKeys() && row.Msg.Key != "" {
			if o.keysBusy[row.Msg.Key]--; o.keysBusy[row.Msg.Key] <= 0 {
				delete(o.keysBusy, row.Msg.Key)
			}
		}
	}
}

// heldBehind reports whether key is held back behind an earlier message
// than seq: a message at seq must then stay pending, to go after it.
func (o *keyOrder) heldBehind(key string, seq int64) bool {
	b := o.blocks[key]
	return b != nil && b.seq < seq
}

// hold holds row's key back until until, behind row (a failed message).
func (o *keyOrder) hold(row *outboxstore.Row, until time.Time) {
	o.blocks[row.Msg.Key] = &block{seq: row.Seq, until: until, created: row.Msg.CreatedAt}
}

// done frees key when the message at seq that held it back was confirmed
// or parked.
func (o *keyOrder) done(key string, seq int64) {
	if b := o.blocks[key]; b != nil && b.seq == seq {
		delete(o.blocks, key)
	}
}

// forget drops the held-back keys that gone reports true for (their
// partitions are another relay's now, which reads the backoff from the
// table), but for those whose retry is under way.
func (o *keyOrder) forget(gone func(key string) bool) {
	for k, b := range o.blocks {
		if !b.released && gone(k) {
			delete(o.blocks, k)
		}
	}
	for k := range o.paused {
		if gone(k) && o.keysBusy[k] == 0 {
			delete(o.paused, k)
		}
	}
}

// blocked returns how many keys are held back, and the CreatedAt of the
// oldest message holding one (zero when none is).
func (o *keyOrder) blocked() (keys int, oldest time.Time) {
	for _, b := range o.blocks {
		if oldest.IsZero() || b.created.Before(oldest) {
			oldest = b.created
		}
	}
	return len(o.blocks), oldest
}
