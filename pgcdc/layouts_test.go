package pgcdc_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
)

// TestDebeziumLayout: rows of a Debezium-layout table reach Kafka as
// Debezium's outbox event router would send them: topic
// outbox.event.<aggregatetype>, key aggregateid, header id, value payload.
// The usual insert-then-delete in one transaction works; rolled-back
// events never appear.
func TestDebeziumLayout(t *testing.T) {
	t.Parallel()
	f := setup(t)
	ctx := context.Background()
	table := "dbz_" + f.slot
	if err := pgcdc.MigrateDebezium(ctx, f.pool, table); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.pool.Exec(context.Background(), "DROP TABLE IF EXISTS "+table) })
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, "outbox.event.Order", "outbox.event.Customer"))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	pub, err := kafka.NewClientPublisher(cluster.ListenAddrs())
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	cfg := f.config(pub)
	cfg.Debezium = &pgcdc.Debezium{Table: table, TypeHeader: "eventType"}
	start(t, cfg)
	f.waitStreaming()

	order := &pgcdc.DebeziumEvent{AggregateType: "Order", AggregateID: "order-1", Type: "OrderCreated", Payload: []byte(`{"total": 42}`)}
	order2 := &pgcdc.DebeziumEvent{AggregateType: "Order", AggregateID: "order-1", Type: "OrderPaid", Payload: []byte(`{"paid": true}`)}
	cust := &pgcdc.DebeziumEvent{AggregateType: "Customer", AggregateID: "c-7", Type: "CustomerMoved", Payload: []byte(`{"city": "Lyon"}`)}
	tx, err := f.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := pgcdc.EnqueueDebezium(ctx, tx, table, order, order2); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "DELETE FROM "+table); err != nil { // Debezium users' habit
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	tx, _ = f.pool.Begin(ctx)
	if err := pgcdc.EnqueueDebezium(ctx, tx, table, &pgcdc.DebeziumEvent{AggregateType: "Order", AggregateID: "never"}); err != nil {
		t.Fatal(err)
	}
	tx.Rollback(ctx)
	tx, _ = f.pool.Begin(ctx)
	if err := pgcdc.EnqueueDebezium(ctx, tx, table, cust); err != nil {
		t.Fatal(err)
	}
	tx.Commit(ctx)

	cl, err := kgo.NewClient(kgo.SeedBrokers(cluster.ListenAddrs()...), kgo.ConsumeTopics("outbox.event.Order", "outbox.event.Customer"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var recs []*kgo.Record
	deadline := time.Now().Add(20 * time.Second)
	for len(recs) < 3 && time.Now().Before(deadline) {
		fctx, cancel := context.WithTimeout(ctx, time.Second)
		cl.PollFetches(fctx).EachRecord(func(r *kgo.Record) { recs = append(recs, r) })
		cancel()
	}
	if len(recs) != 3 {
		t.Fatalf("got %d records, want 3", len(recs))
	}
	header := func(r *kgo.Record, k string) string {
		for _, h := range r.Headers {
			if h.Key == k {
				return string(h.Value)
			}
		}
		return ""
	}
	byID := map[string]*kgo.Record{}
	var orderSeq []string
	for _, r := range recs {
		byID[header(r, "id")] = r
		if r.Topic == "outbox.event.Order" {
			orderSeq = append(orderSeq, header(r, "id"))
		}
	}
	for _, want := range []*pgcdc.DebeziumEvent{order, order2, cust} {
		r := byID[want.ID]
		switch {
		case r == nil:
			t.Errorf("event %s missing", want.ID)
		case r.Topic != "outbox.event."+want.AggregateType, string(r.Key) != want.AggregateID, string(r.Value) != string(want.Payload),
			header(r, exactly.HeaderID) != want.ID, header(r, "eventType") != want.Type:
			t.Errorf("event %s: topic %q key %q value %q headers %v", want.ID, r.Topic, r.Key, r.Value, r.Headers)
		}
	}
	if len(orderSeq) != 2 || orderSeq[0] != order.ID || orderSeq[1] != order2.ID {
		t.Errorf("events of aggregate order-1 out of order: %v", orderSeq)
	}
}

// TestTablelessMessages: messages emitted with pg_logical_emit_message in
// the business transaction are published iff it commits, with the ID
// assigned at Emit, in key order; no table is written. One the broker
// refuses is parked as a dead row of the outbox table.
func TestTablelessMessages(t *testing.T) {
	t.Parallel()
	f := setup(t)
	rec := &exactlytest.Recorder{MaxPayload: 1000}
	cfg := f.config(rec)
	cfg.Messages = true
	start(t, cfg)
	f.waitStreaming()
	ctx := context.Background()
	emit := func(commit bool, msgs ...*exactly.Message) {
		t.Helper()
		tx, err := f.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := pgcdc.Emit(ctx, tx, msgs...); err != nil {
			t.Fatal(err)
		}
		if commit {
			err = tx.Commit(ctx)
		} else {
			err = tx.Rollback(ctx)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	want := keyed("t", 3, 20)
	for i := 0; i < len(want); i += 10 {
		emit(true, want[i:i+10]...)
		emit(false, &exactly.Message{Topic: "t", Key: "k00", Payload: []byte("rolled back")})
	}
	big := &exactly.Message{Topic: "t", Key: "k01", Payload: []byte(strings.Repeat("x", 2000)), Headers: map[string]string{"h": "v"}}
	emit(true, big)
	waitFor(t, "the messages", 20*time.Second, func() bool { return distinct(rec.Delivered()) >= len(want) })
	exactlytest.CheckExactlyOnce(t, want, rec.Delivered())
	exactlytest.CheckKeyOrder(t, rec.Delivered())
	for _, m := range rec.Delivered() {
		if string(m.Payload) == "rolled back" {
			t.Error("a rolled-back message was published")
		}
	}
	waitFor(t, "the refused message parked", 10*time.Second, func() bool { return f.rows(2) == 1 })
	dead, err := f.ob.ListDead(ctx, f.pool, outbox.DeadFilter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 1 || dead[0].Message.ID != big.ID || len(dead[0].Message.Payload) != 2000 || dead[0].Message.Headers["h"] != "v" {
		t.Fatalf("dead rows: %+v", dead)
	}
	if f.rows(0) != 0 {
		t.Error("table-less messages left pending rows")
	}
}
