package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/outbox"
)

// PipelineReport is what the checker found for one pipeline. See the
// package documentation for the definitions.
type PipelineReport struct {
	Name string
	// Written: messages committed by the producer into the pipeline's outbox.
	Written int
	// Published: distinct written messages found on the broker; Copies: the
	// records or stream messages carrying them (a re-publish is a copy).
	Published, Copies int
	// Delivered: handler invocations of the consumer; DupDelivered: those
	// for a message already delivered before.
	Delivered, DupDelivered int
	// Applied: distinct messages with at least one effect row.
	Applied int
	// Lost: written messages without an effect. Twice: messages with more
	// than one effect row. Explained: of those, the ones a documented
	// window of a non-exact store accounts for. Phantom: effects of
	// messages never written.
	Lost, Twice, Explained, Phantom int
	// BrokerOrder: per key, first copies on the broker out of sequence.
	// EffectOrder: per key, first applications out of sequence.
	BrokerOrder, EffectOrder int
	// Dead: messages parked by the relay or dead-lettered by the consumer.
	Dead int

	Exact, BrokerOrderPromised, EffectOrderPromised bool

	// Faults counts, by kind, the faults that hit this pipeline: kill and
	// pause of its relay or consumer, kill bursts and churn of its
	// consumer group, network faults on the proxy of its broker, of
	// PostgreSQL or of its Redis inbox, restarts of its broker or of
	// PostgreSQL.
	Faults map[string]int
}

// Failed lists what breaks a promise in this pipeline.
func (p PipelineReport) Failed() []string {
	var out []string
	add := func(cond bool, format string, args ...any) {
		if cond {
			out = append(out, p.Name+": "+fmt.Sprintf(format, args...))
		}
	}
	add(p.Lost > 0, "%d messages lost", p.Lost)
	add(p.Exact && p.Twice > 0, "%d messages applied twice", p.Twice)
	add(!p.Exact && p.Twice > p.Explained, "%d messages applied twice outside the store's documented limits", p.Twice-p.Explained)
	add(p.Phantom > 0, "%d effects of messages never written", p.Phantom)
	add(p.BrokerOrderPromised && p.BrokerOrder > 0, "%d per-key order violations on the broker", p.BrokerOrder)
	add(p.EffectOrderPromised && p.EffectOrder > 0, "%d per-key order violations in the effects", p.EffectOrder)
	add(p.Dead > 0, "%d messages parked or dead-lettered", p.Dead)
	add(p.Published < p.Written, "%d written messages are not on the broker", p.Written-p.Published)
	return out
}

// Report is the outcome of one run.
type Report struct {
	Seed      uint64
	Pipelines []PipelineReport
	Faults    map[string]int
	// Problems are failures of the run itself (a worker that exited by
	// itself, a drain that timed out, a fault that could not be healed).
	Problems []string
	Took     time.Duration
	Dir      string // the run's files, kept when it failed
}

// Failures lists every broken promise and every problem.
func (r *Report) Failures() []string {
	out := slices.Clone(r.Problems)
	for _, p := range r.Pipelines {
		out = append(out, p.Failed()...)
	}
	return out
}

// OK reports whether nothing was lost, nothing applied twice (beyond the
// documented limits of a non-exact store), no promised order broken and the
// run itself went as planned.
func (r *Report) OK() bool { return r != nil && len(r.Failures()) == 0 }

// Print writes the table of the run.
func (r *Report) Print(w io.Writer) {
	fmt.Fprintf(w, "seed %d, %s, faults: %s\n", r.Seed, r.Took.Round(time.Second), FormatFaults(r.Faults))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "pipeline\twritten\tpublished\tcopies\tdelivered\tdup delivered\tapplied\tlost\tapplied twice\texplained\tbroker order\teffect order\tdead\t")
	for _, p := range r.Pipelines {
		bo, eo := fmt.Sprint(p.BrokerOrder), fmt.Sprint(p.EffectOrder)
		if !p.BrokerOrderPromised {
			bo += " (not promised)"
		}
		if !p.EffectOrderPromised {
			eo += " (not promised)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%d\t\n", p.Name, p.Written, p.Published, p.Copies,
			p.Delivered, p.DupDelivered, p.Applied, p.Lost, p.Twice, p.Explained, bo, eo, p.Dead)
	}
	tw.Flush()
	for _, p := range r.Pipelines {
		fmt.Fprintf(w, "faults hitting %s: %s\n", p.Name, FormatFaults(p.Faults))
	}
	for _, f := range r.Failures() {
		fmt.Fprintln(w, "FAIL:", f)
	}
	if r.Dir != "" {
		fmt.Fprintln(w, "files kept in", r.Dir)
	}
}

// FormatFaults writes fault counts as kind=n in the order of AllFaults.
func FormatFaults(m map[string]int) string {
	var parts []string
	for _, k := range AllFaults {
		if m[k] > 0 {
			parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
		}
	}
	return strings.Join(parts, " ")
}

type written struct {
	key string
	seq int64
}

// brokerLog is what one broker holds for an outbox: copies per id, first
// copies out of order per key, dead letters.
type brokerLog struct {
	copies     map[string]int
	orderViol  int
	deadLetter int
}

// orderTracker counts, per key, elements whose seq is below the highest
// seq seen before them.
type orderTracker map[string]int64

func (o orderTracker) see(key string, seq int64) bool {
	prev, ok := o[key]
	if ok && seq < prev {
		return false
	}
	o[key] = max(prev, seq)
	return true
}

func (h *harness) check(ctx context.Context) (*Report, error) {
	pool, err := pgxpool.New(ctx, h.pg.DSN("test"))
	if err != nil {
		return nil, err
	}
	defer pool.Close()

	// What was written, per outbox.
	writtenBy := map[string]map[string]written{}
	rows, err := pool.Query(ctx, "SELECT outbox, msg_id, key, seq FROM chaos_written")
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var ob, id string
		var w written
		if err := rows.Scan(&ob, &id, &w.key, &w.seq); err != nil {
			return nil, err
		}
		if writtenBy[ob] == nil {
			writtenBy[ob] = map[string]written{}
		}
		writtenBy[ob][id] = w
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}

	logs := map[string]*brokerLog{} // by outbox: each outbox has its own subject or topic
	for _, p := range h.pipelines {
		if logs[p.Outbox] != nil {
			continue
		}
		var l *brokerLog
		switch p.Broker {
		case "nats":
			l, err = h.readNATS(ctx, p.Subject)
		case "sqs":
			l, err = h.readSQS(ctx, pool, p.Name)
		case "pubsub":
			l, err = h.readPubsub(ctx)
		default:
			l, err = h.readKafka(ctx)
		}
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", p.Broker, err)
		}
		logs[p.Outbox] = l
	}

	rep := &Report{}
	for _, p := range h.pipelines {
		pr := PipelineReport{Name: p.Name, Exact: p.Exact, BrokerOrderPromised: p.BrokerOrder, EffectOrderPromised: p.EffectOrder}
		wr := writtenBy[p.Outbox]
		pr.Written = len(wr)
		bl := logs[p.Outbox]
		for id := range wr {
			if n := bl.copies[id]; n > 0 {
				pr.Published++
				pr.Copies += n
			}
		}
		pr.BrokerOrder = bl.orderViol
		pr.Dead = bl.deadLetter
		ob, err := outbox.New(outbox.Config{Dialect: outbox.Postgres, Table: p.Outbox})
		if err != nil {
			return nil, err
		}
		st, err := ob.Status(ctx, pool)
		if err != nil {
			return nil, err
		}
		pr.Dead += int(st.Dead)

		var distinct int
		if err := pool.QueryRow(ctx, "SELECT count(*), count(DISTINCT msg_id) FROM chaos_deliveries WHERE pipeline = $1", p.Name).
			Scan(&pr.Delivered, &distinct); err != nil {
			return nil, err
		}
		pr.DupDelivered = pr.Delivered - distinct

		apps := map[string][]string{} // msg id -> workers, in application order
		order := orderTracker{}
		rows, err := pool.Query(ctx, "SELECT msg_id, key, seq, worker FROM chaos_effects WHERE pipeline = $1 ORDER BY id", p.Name)
		if err != nil {
			return nil, err
		}
		for rows.Next() {
			var id, key, worker string
			var seq int64
			if err := rows.Scan(&id, &key, &seq, &worker); err != nil {
				return nil, err
			}
			if len(apps[id]) == 0 && !order.see(key, seq) {
				pr.EffectOrder++
			}
			apps[id] = append(apps[id], worker)
		}
		if err := rows.Err(); err != nil {
			return nil, err
		}
		for id, ws := range apps {
			if _, ok := wr[id]; !ok {
				pr.Phantom++
				continue
			}
			pr.Applied++
			if len(ws) > 1 {
				pr.Twice++
				if !p.Exact && h.explained(id, ws) {
					pr.Explained++
				}
			}
		}
		pr.Lost = pr.Written - pr.Applied
		rep.Pipelines = append(rep.Pipelines, pr)
	}
	return rep, nil
}

// explained says whether a documented window of the Redis inbox accounts
// for a double application: the worker that applied it first was killed
// (the effect committed, the done marker never written), or a worker
// reported for this message a lease that ran out while another runner took
// it, a done marker it could not write, or an effect whose outcome it
// could not know (an insert that failed as the connection dropped, which
// may have committed).
func (h *harness) explained(id string, workers []string) bool {
	h.mu.Lock()
	killed := h.killed[workers[0]]
	h.mu.Unlock()
	return killed || len(h.events.of(id)) > 0
}

func seqOf(payload []byte) (string, int64, bool) {
	var p struct {
		Key string `json:"key"`
		Seq int64  `json:"seq"`
	}
	if err := json.Unmarshal(payload, &p); err != nil {
		return "", 0, false
	}
	return p.Key, p.Seq, true
}

// readNATS reads the whole stream in order, directly (not through a proxy).
func (h *harness) readNATS(ctx context.Context, subject string) (*brokerLog, error) {
	nc, err := natsgo.Connect("nats://" + h.natsAddr)
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	s, err := js.Stream(ctx, natsStream)
	if err != nil {
		return nil, err
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(">"))
	if err != nil {
		return nil, err
	}
	l := &brokerLog{copies: map[string]int{}, deadLetter: int(info.State.Subjects[subject+".dlq"])}
	total := info.State.Subjects[subject]
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
	if err != nil {
		return nil, err
	}
	order := orderTracker{}
	seen := uint64(0)
	deadline := time.Now().Add(2 * time.Minute)
	for seen < total {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("read %d of %d stream messages", seen, total)
		}
		batch, err := cons.Fetch(500, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return nil, err
		}
		for m := range batch.Messages() {
			seen++
			id := m.Headers().Get(exactly.HeaderID)
			l.copies[id]++
			if l.copies[id] == 1 {
				if key, seq, ok := seqOf(m.Data()); ok && !order.see(key, seq) {
					l.orderViol++
				}
			}
		}
		if err := batch.Error(); err != nil && err != jetstream.ErrNoMessages && !strings.Contains(err.Error(), "timeout") {
			return nil, err
		}
	}
	return l, nil
}

// readKafka reads every partition of the topic to its end, directly.
func (h *harness) readKafka(ctx context.Context) (*brokerLog, error) {
	adm, err := kgo.NewClient(kgo.SeedBrokers(h.kafkaAddr))
	if err != nil {
		return nil, err
	}
	defer adm.Close()
	ac := kadm.NewClient(adm)
	ends, err := ac.ListEndOffsets(ctx, kafkaTopic, kafkaDLQ)
	if err != nil {
		return nil, err
	}
	l := &brokerLog{copies: map[string]int{}}
	want := map[int32]int64{}
	parts := map[int32]kgo.Offset{}
	ends.Each(func(o kadm.ListedOffset) {
		if o.Topic == kafkaDLQ {
			l.deadLetter += int(o.Offset)
			return
		}
		if o.Offset > 0 {
			want[o.Partition] = o.Offset
			parts[o.Partition] = kgo.NewOffset().AtStart()
		}
	})
	if err := ends.Error(); err != nil {
		return nil, err
	}
	if len(want) == 0 {
		return l, nil
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(h.kafkaAddr), kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{kafkaTopic: parts}))
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	orders := map[int32]orderTracker{}
	done := func() bool { return len(want) == 0 }
	deadline := time.Now().Add(2 * time.Minute)
	for !done() {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("partitions not read to their end: %v", want)
		}
		fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		fs := cl.PollFetches(fctx)
		cancel()
		fs.EachRecord(func(r *kgo.Record) {
			var id string
			for _, hd := range r.Headers {
				if hd.Key == exactly.HeaderID {
					id = string(hd.Value)
				}
			}
			l.copies[id]++
			if l.copies[id] == 1 {
				if orders[r.Partition] == nil {
					orders[r.Partition] = orderTracker{}
				}
				if key, seq, ok := seqOf(r.Value); ok && !orders[r.Partition].see(key, seq) {
					l.orderViol++
				}
			}
			if end, ok := want[r.Partition]; ok && r.Offset+1 >= end {
				delete(want, r.Partition)
			}
		})
	}
	return l, nil
}
