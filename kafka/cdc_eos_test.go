package kafka_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/kafka"
)

// TestCDCExactlyOnceCheckpoints holds CDCExactlyOnce to its contract with
// the CDC relay: a batch and its checkpoint commit together, the next Open
// fences the previous instance and reads the last valid checkpoint, and a
// batch with an invalid message commits nothing and names that message.
func TestCDCExactlyOnceCheckpoints(t *testing.T) {
	t.Parallel()
	tc := newCluster(t)
	topic := tc.topic(t, nil)
	ckptTopic := topic + "-checkpoints" // created by Open, one partition
	valid := func(c string) error {
		if !strings.HasPrefix(c, "pos-") {
			return errors.New("not a position")
		}
		return nil
	}
	open := func() (*kafka.CDCExactlyOnce, string) {
		t.Helper()
		s := &kafka.CDCExactlyOnce{Seeds: tc.c.ListenAddrs(), CheckpointTopic: ckptTopic, TransactionTimeout: 10 * time.Second}
		c, err := s.Open(t.Context(), "slot_a", valid, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		t.Cleanup(s.Close)
		return s, c
	}

	first, c := open()
	if c != "" {
		t.Fatalf("first Open read checkpoint %q, want none", c)
	}
	msgs := batch(topic, []string{"a", "b"}, 4)
	if errs, outage := first.Publish(t.Context(), msgs, "pos-1"); errs != nil || outage != nil {
		t.Fatalf("Publish = %v, %v", errs, outage)
	}
	// A record of the slot the relay cannot read, and one of another slot,
	// are passed over.
	if err := tc.client(t).ProduceSync(t.Context(),
		&kgo.Record{Topic: ckptTopic, Partition: 0, Key: []byte("slot_a"), Value: []byte("garbage")},
		&kgo.Record{Topic: ckptTopic, Partition: 0, Key: []byte("slot_b"), Value: []byte("pos-9")}).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if c, err := first.Checkpoint(t.Context()); err != nil || c != "pos-1" {
		t.Fatalf("Checkpoint = %q, %v, want pos-1", c, err)
	}

	bad := batch(topic, []string{"a"}, 2)
	bad[1].ID = ""
	errs, outage := first.Publish(t.Context(), bad, "pos-2")
	if outage != nil || len(errs) != 2 || errs[0] != nil || errs[1] == nil {
		t.Fatalf("Publish with an invalid message = %v, %v: want the second one named", errs, outage)
	}

	second, c := open()
	if c != "pos-1" {
		t.Fatalf("second Open read checkpoint %q, want pos-1", c)
	}
	if errs, outage := first.Publish(t.Context(), batch(topic, []string{"a"}, 1), "pos-3"); errs == nil && outage == nil {
		t.Fatal("the fenced instance committed a transaction")
	}
	second1 := batch(topic, []string{"c"}, 1)
	if errs, outage := second.Publish(t.Context(), second1, "pos-4"); errs != nil || outage != nil {
		t.Fatalf("Publish after fencing = %v, %v", errs, outage)
	}
	if c, err := second.Checkpoint(t.Context()); err != nil || c != "pos-4" {
		t.Fatalf("Checkpoint = %q, %v, want pos-4", c, err)
	}
	want := append(msgs, second1...)
	got := committed(t, tc, topic, len(want))
	exactlytest.CheckExactlyOnce(t, want, got)
	if len(got) != len(want) {
		t.Errorf("read_committed output holds %d records, want the %d committed ones only", len(got), len(want))
	}
}

// committed reads n records of topic with read_committed.
func committed(t *testing.T, tc *testCluster, topic string, n int) []exactly.Message {
	t.Helper()
	cl := tc.client(t, kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.FetchMaxWait(100*time.Millisecond))
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	var out []exactly.Message
	for ctx.Err() == nil {
		cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) {
			rec := received(r)
			out = append(out, exactly.Message{ID: rec.ID, Topic: topic, Key: rec.Key, Payload: rec.Payload})
		})
		if len(out) > n {
			break
		}
	}
	return out
}

// TestCDCExactlyOnceNeedsSeeds: a clear error before anything is opened.
func TestCDCExactlyOnceNeedsSeeds(t *testing.T) {
	t.Parallel()
	_, err := (&kafka.CDCExactlyOnce{}).Open(t.Context(), "s", func(string) error { return nil }, slog.Default())
	if err == nil || !strings.Contains(err.Error(), "Seeds is required") {
		t.Fatalf("Open = %v", err)
	}
}
