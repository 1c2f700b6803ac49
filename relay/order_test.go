package relay

import (
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
)

// The per-key ordering state on its own: rows as a read returns them, the
// outcomes the mark stage reports, no database.

func row(seq int64, key string, notBefore time.Time) outboxstore.Row {
	r := outboxstore.Row{Seq: seq, Msg: exactly.Message{ID: key + "-" + time.Duration(seq).String(), Topic: "t", Key: key}}
	if !notBefore.IsZero() {
		r.NextAttemptAt = notBefore.UnixMilli()
	}
	return r
}

func seqs(rows []outboxstore.Row) []int64 {
	out := make([]int64, len(rows))
	for i, r := range rows {
		out[i] = r.Seq
	}
	return out
}

// admitRead plans a read at now and admits what it returned.
func admitRead(o *keyOrder, now time.Time, rows ...outboxstore.Row) ([]int64, time.Duration, bool) {
	read := o.read(now, false, now)
	ready, wait, busy, _ := o.admit(rows, now, read)
	return seqs(ready), wait, busy
}

func TestKeyOrderHoldsAKeyBehindItsFailedMessage(t *testing.T) {
	o := newKeyOrder(100, false, false)
	now := time.UnixMilli(1_000_000)
	first := []outboxstore.Row{row(1, "a", time.Time{}), row(2, "a", time.Time{}), row(3, "b", time.Time{})}
	if got, _, _ := admitRead(&o, now, first...); !slices.Equal(got, []int64{1, 2, 3}) {
		t.Fatalf("admitted %v, want 1 2 3", got)
	}
	// Seq 1 fails: its key waits a second; seq 2, published with it, must
	// stay pending behind it, and seq 3 of another key is confirmed.
	retryAt := now.Add(time.Second)
	o.hold(&first[0], retryAt)
	if !o.heldBehind("a", 2) || o.heldBehind("a", 1) || o.heldBehind("b", 3) {
		t.Fatal("heldBehind: only a's messages after seq 1 are held behind it")
	}
	o.done("b", 3)
	o.release(first)
	if n, oldest := o.blocked(); n != 1 || !oldest.Equal(first[0].Msg.CreatedAt) {
		t.Fatalf("blocked() = %d, %v; want 1 key", n, oldest)
	}

	// Before the retry is due, the read leaves key a out; a row of it that
	// comes anyway (a clock step) is held, with the wait until it is due.
	now = now.Add(200 * time.Millisecond)
	if read := o.read(now, false, now); !slices.Equal(read.blocked, []string{"a"}) || !read.full {
		t.Fatalf("read while a is held: %+v, want a full read leaving out key a", read)
	}
	got, wait, _, _ := o.admit([]outboxstore.Row{row(2, "a", time.Time{}), row(4, "b", time.Time{})}, now, readPlan{full: true, gen: o.fetchGen})
	if !slices.Equal(seqs(got), []int64{4}) || wait != 800*time.Millisecond {
		t.Fatalf("admitted %v waiting %v; want 4 (b is free) and 800ms until a is due", seqs(got), wait)
	}
	o.release(got)

	// Once due, the failed message goes first and its successor after it,
	// in the same batch.
	now = retryAt
	if got, _, _ := admitRead(&o, now, row(1, "a", retryAt), row(2, "a", time.Time{})); !slices.Equal(got, []int64{1, 2}) {
		t.Fatalf("admitted %v once due, want 1 2", got)
	}
	o.done("a", 1)
	if n, _ := o.blocked(); n != 0 {
		t.Fatalf("%d keys still held after the failed message was confirmed", n)
	}
}

func TestKeyOrderAnEarlierRowDueLaterTakesTheHold(t *testing.T) {
	o := newKeyOrder(100, false, false)
	now := time.UnixMilli(1_000_000)
	later := now.Add(time.Second)
	// Seq 5 is due later; seq 7 of the same key must not overtake it.
	got, wait, _ := admitRead(&o, now, row(5, "k", later), row(7, "k", time.Time{}))
	if len(got) != 0 || wait != time.Second {
		t.Fatalf("admitted %v waiting %v; want nothing for a second", got, wait)
	}
	// Once the hold is due, a row below the held one that is due later
	// (its own retry) becomes the one holding the key.
	now = later
	even := now.Add(time.Second)
	if got, _, _ := admitRead(&o, now, row(3, "k", even), row(5, "k", later)); len(got) != 0 {
		t.Fatalf("admitted %v, want nothing", got)
	}
	if b := o.blocks["k"]; b.seq != 3 || !b.until.Equal(time.UnixMilli(even.UnixMilli())) {
		t.Fatalf("block %+v, want seq 3 until %v", b, even)
	}
}

func TestKeyOrderStrictOneInFlightPerKey(t *testing.T) {
	o := newKeyOrder(100, true, false)
	now := time.UnixMilli(1_000_000)
	got, _, busy := admitRead(&o, now, row(1, "k", time.Time{}), row(2, "k", time.Time{}), row(3, "", time.Time{}))
	if !slices.Equal(got, []int64{1, 3}) || !busy {
		t.Fatalf("admitted %v busy %v; want 1 and 3 (no key), with 2 waiting for 1", got, busy)
	}
	// Seq 2 read again while 1 is in flight (excluded from the read) waits.
	if got, _, busy := admitRead(&o, now, row(2, "k", time.Time{})); len(got) != 0 || !busy {
		t.Fatalf("admitted %v busy %v while 1 is in flight", got, busy)
	}
	o.release([]outboxstore.Row{row(1, "k", time.Time{})})
	if got, _, busy := admitRead(&o, now, row(2, "k", time.Time{})); !slices.Equal(got, []int64{2}) || busy {
		t.Fatalf("admitted %v busy %v after 1 left, want 2", got, busy)
	}
}

func TestKeyOrderFreesTheKeyOfAMessageNoLongerPending(t *testing.T) {
	o := newKeyOrder(100, false, false)
	now := time.UnixMilli(1_000_000)
	failed := row(1, "k", time.Time{})
	admitRead(&o, now, failed)
	o.hold(&failed, now.Add(time.Second))
	o.release([]outboxstore.Row{failed})
	now = now.Add(2 * time.Second)

	// A read from the cursor does not see seq 1: seq 2 keeps waiting.
	o.cursor = 1
	cursorRead := readPlan{full: false, gen: o.fetchGen + 1, after: 1}
	o.fetchGen++
	if got, _, _, _ := o.admit([]outboxstore.Row{row(2, "k", time.Time{})}, now, cursorRead); len(got) != 0 {
		t.Fatalf("a cursor read admitted %v past the held row", seqs(got))
	}
	// A full read that started before seq 1 left the pipeline may have
	// excluded it: seq 2 keeps waiting.
	if got, _, _, _ := o.admit([]outboxstore.Row{row(2, "k", time.Time{})}, now, readPlan{full: true, gen: o.blocks["k"].freedGen}); len(got) != 0 {
		t.Fatalf("a full read from before the release admitted %v", seqs(got))
	}
	// A later full read that did not return seq 1: it was parked or purged.
	if got, _, _ := admitRead(&o, now, row(2, "k", time.Time{})); !slices.Equal(got, []int64{2}) {
		t.Fatalf("admitted %v, want 2 once 1 is gone", got)
	}
	if n, _ := o.blocked(); n != 0 {
		t.Fatal("the key is still held")
	}
}

func TestKeyOrderReads(t *testing.T) {
	o := newKeyOrder(2, false, false)
	now := time.UnixMilli(1_000_000)
	if r := o.read(now, false, now); !r.full || len(r.exclude) != 0 || r.gen != 1 {
		t.Fatalf("first read %+v, want a full read numbered 1", r)
	}
	got, _, _, _ := o.admit([]outboxstore.Row{row(10, "a", time.Time{}), row(11, "b", time.Time{})}, now, readPlan{full: true, gen: 1})
	if len(got) != 2 || o.cursor != 11 {
		t.Fatalf("admitted %v, cursor %d", seqs(got), o.cursor)
	}
	// A backlog with rows in flight: read from the cursor.
	if r := o.read(now, true, now); r.full || r.after != 11 {
		t.Fatalf("read in a backlog %+v, want one after 11", r)
	}
	// A full read at least every fullReadEvery, leaving out what is in flight.
	r := o.read(now.Add(fullReadEvery), true, now)
	slices.Sort(r.exclude)
	if !r.full || !slices.Equal(r.exclude, []int64{10, 11}) || r.maxExcluded != 11 {
		t.Fatalf("read %+v, want a full read excluding 10 and 11", r)
	}
	// After rows were held back or handed back (rescan), the next read is full.
	o.rescan = true
	if r := o.read(now, true, now); !r.full || o.rescan {
		t.Fatalf("read after a rescan was asked: %+v", r)
	}
	// Taken-over partitions: reads stay full until one sets the cursor back.
	o.cursorStale = true
	r = o.read(now, true, now)
	if !r.full {
		t.Fatal("a read with a stale cursor is not full")
	}
	o.admit([]outboxstore.Row{row(3, "c", time.Time{}), row(12, "d", time.Time{})}, now, r)
	if o.cursorStale || o.cursor != 12 {
		t.Fatalf("cursor %d stale %v after a full read past everything in flight, want 12", o.cursor, o.cursorStale)
	}
}

func TestKeyOrderForgetsKeysOfPartitionsGone(t *testing.T) {
	o := newKeyOrder(100, false, false)
	now := time.UnixMilli(1_000_000)
	a, b := row(1, "a", time.Time{}), row(2, "b", time.Time{})
	admitRead(&o, now, a, b)
	o.hold(&a, now.Add(time.Second))
	o.hold(&b, now.Add(time.Second))
	o.blocks["b"].released = true // b's retry is under way here
	o.forget(func(string) bool { return true })
	if _, ok := o.blocks["a"]; ok {
		t.Error("a's hold was kept")
	}
	if _, ok := o.blocks["b"]; !ok {
		t.Error("b's hold was dropped while its retry is under way")
	}
}

// A full read that fills its batch below the cursor may leave pending rows
// between its last row and the cursor (rows left behind a failed message,
// or passed by while their key was held back): the reads after it stay
// full, or a read from the cursor would hand out later rows of their keys
// first.
func TestKeyOrderStaysFullAfterAFullReadBelowTheCursor(t *testing.T) {
	o := newKeyOrder(2, false, false)
	now := time.UnixMilli(1_000_000)
	o.admit([]outboxstore.Row{row(50, "x", time.Time{}), row(51, "y", time.Time{})}, now, o.read(now, false, now))
	// Rows 3 and 4 of key a come back from a rescan; 5 and 6 of a are
	// still pending below the cursor, and 52 of a is above it.
	o.rescan = true
	r := o.read(now, true, now)
	if !r.full {
		t.Fatal("the rescan read is not full")
	}
	o.admit([]outboxstore.Row{row(3, "a", time.Time{}), row(4, "a", time.Time{})}, now, r)
	if r := o.read(now, true, now); !r.full {
		t.Fatalf("read after a full batch below the cursor: %+v, want a full one (rows 5 and 6 of a lie below the cursor)", r)
	}
}

// A row of a key whose held message is being retried left the pipeline
// (pending, behind it) after a read was planned: the read may have
// excluded it, so the key's later rows that read returned wait.
func TestKeyOrderReleasedKeyWaitsForRowsFreedDuringARead(t *testing.T) {
	o := newKeyOrder(100, false, false)
	now := time.UnixMilli(1_000_000)
	head, behind := row(1, "a", time.Time{}), row(2, "a", time.Time{})
	admitRead(&o, now, head)
	admitRead(&o, now, behind) // a later batch, in flight
	o.hold(&head, now)         // 1 failed; its retry is due at once
	o.release([]outboxstore.Row{head})
	read := o.read(now, false, now)      // excludes 2, in flight
	o.release([]outboxstore.Row{behind}) // left pending behind the head meanwhile
	got, _, _, _ := o.admit([]outboxstore.Row{row(1, "a", time.Time{}), row(3, "a", time.Time{})}, now, read)
	if !slices.Equal(seqs(got), []int64{1}) {
		t.Fatalf("admitted %v, want only 1: row 2, excluded by the read, goes before 3", seqs(got))
	}
	if got, _, _ := admitRead(&o, now, row(2, "a", time.Time{}), row(3, "a", time.Time{})); !slices.Equal(got, []int64{2, 3}) {
		t.Fatalf("the next read admitted %v, want 2 3", got)
	}
}

// With a publisher that pauses a key after a failure, the key's next row
// waits until nothing of the key is in flight, and resumes it; the rows
// after it in the same read follow without resuming again.
func TestKeyOrderResumesAPausedKeyOnceNothingOfItIsInFlight(t *testing.T) {
	o := newKeyOrder(100, false, true)
	now := time.UnixMilli(1_000_000)
	first, second := row(1, "a", time.Time{}), row(2, "a", time.Time{})
	admitRead(&o, now, first)
	admitRead(&o, now, second, row(3, "b", time.Time{}))
	// 1 failed: a is paused; 2, handed over before that was known, is
	// still in flight (it fails unsent).
	o.failed("a")
	o.hold(&first, now)
	o.release([]outboxstore.Row{first})
	if got, _, busy := admitRead(&o, now, row(1, "a", time.Time{})); len(got) != 0 || !busy {
		t.Fatalf("admitted %v (busy %v) while row 2 of the paused key is in flight", got, busy)
	}
	o.failed("a")
	o.release([]outboxstore.Row{second, row(3, "b", time.Time{})})
	read := o.read(now, false, now)
	got, _, _, resume := o.admit([]outboxstore.Row{row(1, "a", time.Time{}), row(2, "a", time.Time{}), row(4, "b", time.Time{})}, now, read)
	if !slices.Equal(seqs(got), []int64{1, 2, 4}) || !slices.Equal(resume, []int{0}) {
		t.Fatalf("admitted %v resuming %v; want 1 2 4, with 1 resuming a", seqs(got), resume)
	}
	if _, paused := o.paused["a"]; paused {
		t.Fatal("a is still marked paused after the row that resumes it")
	}
}

// A batch that was to resume a paused key and is handed back unsent (its
// lease ran out, it was fenced, the relay stops) leaves the key paused: the
// next row of the key admitted resumes it instead.
func TestHandBackKeepsTheKeyPaused(t *testing.T) {
	r := &Relay{order: newKeyOrder(100, false, true)}
	r.drained = sync.NewCond(&r.mu)
	now := time.UnixMilli(1_000_000)
	r.order.failed("a")
	rows := []outboxstore.Row{row(1, "a", time.Time{}), row(2, "b", time.Time{})}
	ready, _, _, resume := r.order.admit(rows, now, r.order.read(now, false, now))
	if !slices.Equal(resume, []int{0}) {
		t.Fatalf("resume %v, want row 1 of the paused key", resume)
	}
	b := newBatch(ready, 0, resume)
	r.handBack(&b)
	ready, _, _, resume = r.order.admit(rows, now, r.order.read(now, false, now))
	if !slices.Equal(seqs(ready), []int64{1, 2}) || !slices.Equal(resume, []int{0}) {
		t.Fatalf("after the hand-back admitted %v resuming %v; want 1 2, with 1 resuming a again", seqs(ready), resume)
	}
}
