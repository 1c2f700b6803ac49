package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"
)

// outcome is what the run left behind, read once everything stopped.
type outcome struct {
	verdict
	finished     bool
	lastProgress time.Time
	pending      int64 // outbox rows not sent
	dead         int64 // outbox rows parked
	onBroker     int64 // records the broker holds
	// exact is false for the Redis inbox, whose double applications are
	// explained when the recorded runs show one of its documented windows.
	exact     bool
	doubles   []doubleApplication
	explained int64
}

// brokerNotes are the words of the table that depend on the broker.
type brokerNotes struct {
	stored, crash, rebalance string
}

var demoBrokerNotes = map[string]brokerNotes{
	demoKafka: {
		stored:    "re-sends included",
		crash:     "consumer crash after the effect, before the offset commit",
		rebalance: "rebalance (a member left the group, another joined)",
	},
	demoNATS: {
		stored:    "the stream dropped re-sends within its duplicate window",
		crash:     "consumer crash after the effect, before the ack",
		rebalance: "rebalance (a member left the group, another joined)",
	},
	demoPubsub: {
		stored:    "re-sends included, and the client library's own after a lost answer",
		crash:     "consumer crash after the effect, before the ack",
		rebalance: "rebalance (a subscriber left, another took over)",
	},
	demoSQS: {
		stored:    "distinct SQS message ids: the FIFO queue dropped re-sends within its deduplication window",
		crash:     "consumer crash after the effect, before the delete",
		rebalance: "rebalance (a consumer left the queue, another joined)",
	},
}

// notes returns the broker's words for the run's strategy.
func (o *demoOptions) notes() brokerNotes {
	n := demoBrokerNotes[o.broker]
	if o.offsets == offsetsDB {
		n.crash = "consumer crash after the effect, before the commit"
	}
	return n
}

// verdict reads the database once everything stopped, prints the table and
// returns an *exitError when a promise was broken.
func (r *demoRun) verdict(ctx context.Context, finished bool, lastProgress time.Time) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	res, err := r.outcome(ctx, finished, lastProgress)
	if err != nil {
		return err
	}
	r.printTable(res)
	r.printFaults()
	fmt.Fprintf(r.out, "\ntook %s\n", time.Since(r.start).Round(time.Millisecond))
	if problems := r.problems(res); len(problems) > 0 {
		return &exitError{1, "FAILED: " + strings.Join(problems, "; ")}
	}
	if !r.everyFaultInjected() {
		return &exitError{1, "a fault kind was never injected: the run proved less than it should"}
	}
	printOK(r.out, res)
	return nil
}

// outcome reads what the run left in the database, the outbox and on the
// broker, and explains the Redis inbox's double applications.
func (r *demoRun) outcome(ctx context.Context, finished bool, lastProgress time.Time) (*outcome, error) {
	v, err := r.db.verify(ctx)
	if err != nil {
		return nil, err
	}
	st, err := r.ob.Status(ctx, r.db.db)
	if err != nil {
		return nil, err
	}
	onBroker, err := r.broker.stored(ctx)
	if err != nil {
		return nil, fmt.Errorf("counting the records on %s: %w", r.broker.topic(), err)
	}
	res := &outcome{verdict: v, finished: finished, lastProgress: lastProgress,
		pending: st.Pending, dead: st.Dead, onBroker: onBroker, exact: r.attempts == nil}
	if res.exact || v.appliedTwice == 0 {
		return res, nil
	}
	apps, err := r.db.appliedTwice(ctx)
	if err != nil {
		return nil, err
	}
	res.doubles = r.attempts.explain(apps)
	for _, d := range res.doubles {
		if d.explained {
			res.explained++
		}
	}
	return res, nil
}

// absorbed returns how many duplicates the consumer side absorbed, and how.
func (r *demoRun) absorbed() (int64, string) {
	switch {
	case r.sqlIn != nil:
		return r.sqlIn.Stats().Duplicates, "by the SQL inbox: the id's claim commits with the effect"
	case r.redisIn != nil:
		return r.redisIn.Stats().Duplicates, "by the Redis inbox: done marker after the effect"
	}
	return r.claimDuplicates.Load(), "re-sends, by the id's claim; redeliveries never pass the stored offset"
}

// printTable prints the figures of the run, each with what it must be.
func (r *demoRun) printTable(res *outcome) {
	out, v := r.out, res.verdict
	total, distinct := r.got.total.Load(), int64(r.got.distinct())
	published := r.pub.published.Load()
	absorbed, absorbedBy := r.absorbed()

	fmt.Fprintln(out)
	row := func(name string, val any, note string) { fmt.Fprintf(out, "  %-24s %15v   %s\n", name, val, note) }
	row("orders written", v.orders, "each with its order.created event, in one transaction")
	row("events published", published, fmt.Sprintf("confirmed by the broker; %d re-sends of events already published", published-v.orders))
	row("records on the broker", res.onBroker, r.o.notes().stored)
	dupNote := "re-sends, redeliveries after crashes and rebalances"
	if r.o.broker == demoSQS && res.onBroker == v.orders {
		dupNote = "redeliveries after lost deletes, crashes and rebalances (the FIFO queue dropped the re-sends)"
	}
	row("deliveries", total, fmt.Sprintf("%d duplicates: %s", total-distinct, dupNote))
	row("duplicates absorbed", absorbed, absorbedBy)
	row("effects applied", v.applied, "one promotion per order")
	if res.finished {
		row("lost", v.lost, "must be 0")
	} else {
		row("lost", v.lost, "must be 0; the run stalled and was stopped, so some may still be on the way")
	}
	if res.exact {
		row("applied twice", v.appliedTwice, "must be 0")
	} else {
		row("applied twice", v.appliedTwice, "must be 0 but for the Redis inbox's documented limits:")
		row("  explained by them", res.explained, "a run outlived its lease, or its effect committed and yet failed, or its marker was not written")
	}
	printDoubles(out, res.doubles)
	pointsNote := "applied / owed: must be equal"
	if v.appliedTwice > 0 {
		pointsNote = "applied / owed: the difference is what the double applications credited"
	}
	row("customer points", fmt.Sprintf("%d/%d", v.pointsGot, v.pointsWant), pointsNote)
	row("outbox pending / dead", fmt.Sprintf("%d/%d", res.pending, res.dead), "must be 0/0")
	row("dead-lettered", r.deadLettered.Load(), "must be 0")
}

// printDoubles lists the first double applications and what let each happen.
func printDoubles(out io.Writer, doubles []doubleApplication) {
	const listed = 10
	for i, d := range doubles {
		if i == listed {
			fmt.Fprintf(out, "    ... and %d more\n", len(doubles)-listed)
			return
		}
		verdict := "explained"
		if !d.explained {
			verdict = "NOT EXPLAINED"
		}
		fmt.Fprintf(out, "    %s applied %d times, %s: %s\n", d.order, d.times, verdict, d.why)
	}
}

// printFaults prints how many faults of each kind the run injected.
func (r *demoRun) printFaults() {
	out, f, notes := r.out, r.f, r.o.notes()
	fmt.Fprintln(out)
	fmt.Fprintln(out, "  faults injected")
	frow := func(name string, n int64) { fmt.Fprintf(out, "    %-58s %7d\n", name, n) }
	frow("publish ack lost (a timeout after the broker accepted)", f.lostAcks.Load())
	if pb, ok := r.broker.(*pubsubBroker); ok {
		frow("  of which on the wire, sent again by the client library", pb.lostWire.Load())
	}
	sb, onSQS := r.broker.(*sqsBroker)
	if onSQS {
		frow("  of which SendMessageBatch answers lost after SQS stored", sb.lostWire.Load())
	}
	frow("relay crash after the broker confirmed, before mark-sent", f.relayCrashes.Load())
	frow(notes.crash, f.consumerCrashes.Load())
	if onSQS {
		frow("delete lost after the effect (redelivered once visible)", sb.lostDeletes.Load())
	}
	frow(notes.rebalance, f.rebalances.Load())
}

// problems lists the promises the run broke.
func (r *demoRun) problems(res *outcome) []string {
	o, v := r.o, res.verdict
	var problems []string
	if !res.finished {
		problems = append(problems, fmt.Sprintf("nothing progressed for %s (the last progress was %s into the run), with %d of %d orders written and %d applied",
			o.timeout, res.lastProgress.Sub(r.start).Round(time.Second), r.written.Load(), o.orders, v.applied))
	}
	for _, c := range []struct {
		bad  bool
		what string
	}{
		{v.lost > 0 && res.finished, fmt.Sprintf("%d lost", v.lost)},
		{v.lost > 0 && !res.finished, fmt.Sprintf("%d not applied by then", v.lost)},
		{res.exact && v.appliedTwice > 0, fmt.Sprintf("%d applied twice", v.appliedTwice)},
		{!res.exact && v.appliedTwice > res.explained, fmt.Sprintf("%d applied twice outside the Redis inbox's documented limits", v.appliedTwice-res.explained)},
		{v.strangers > 0, fmt.Sprintf("%d promotions of unknown events", v.strangers)},
		{v.appliedTwice == 0 && v.pointsGot != v.pointsWant, fmt.Sprintf("customer points %d, owed %d", v.pointsGot, v.pointsWant)},
		{v.pointsGot != v.pointsPromoted, fmt.Sprintf("customer points %d, while the promotions credit %d", v.pointsGot, v.pointsPromoted)},
		{res.pending > 0 || res.dead > 0, fmt.Sprintf("outbox still holds %d pending and %d dead", res.pending, res.dead)},
		{r.deadLettered.Load() > 0, fmt.Sprintf("%d dead-lettered", r.deadLettered.Load())},
	} {
		if c.bad {
			problems = append(problems, c.what)
		}
	}
	return problems
}

// everyFaultInjected reports whether the run injected each kind of fault
// at least once: a run that did not proved less than it should.
func (r *demoRun) everyFaultInjected() bool {
	f := r.f
	counts := []int64{f.lostAcks.Load(), f.relayCrashes.Load(), f.consumerCrashes.Load(), f.rebalances.Load()}
	if sb, ok := r.broker.(*sqsBroker); ok {
		counts = append(counts, sb.lostWire.Load(), sb.lostDeletes.Load())
	}
	for _, n := range counts {
		if n == 0 {
			return false
		}
	}
	return true
}

// printOK says what the run proved.
func printOK(out io.Writer, res *outcome) {
	switch {
	case res.exact:
		fmt.Fprintln(out, "OK: every order's promotion applied exactly once, through every fault")
	case res.appliedTwice == 0:
		fmt.Fprintln(out, "OK: every order's promotion applied once, through every fault. The Redis inbox promises one run at a time")
		fmt.Fprintln(out, "and a done marker for its TTL, not exactly once: a run that outlives its lease, an effect that commits and")
		fmt.Fprintln(out, "yet fails, or a marker not written would apply again (none did here)")
	default:
		fmt.Fprintf(out, "OK: every order's promotion applied, through every fault; %d applied twice, each in a window the Redis\n", res.appliedTwice)
		fmt.Fprintln(out, "inbox documents (listed above): it promises one run at a time and a done marker for its TTL, not exactly once.")
		fmt.Fprintln(out, "For exactly once, keep the effect in the database and use the SQL inbox")
	}
}
