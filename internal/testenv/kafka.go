package testenv

import (
	"context"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
)

// ReadTopic reads every record of topic (read_uncommitted) up to the end
// offsets it lists first, so that a check on the order of the last copies
// sees every copy: stopping once every id has been seen once would miss the
// copies still behind in some partition. It fails the test when the end is
// not reached within timeout.
func ReadTopic(t testing.TB, seeds []string, topic string, timeout time.Duration) []*kgo.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	adm, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	if err != nil {
		t.Fatal(err)
	}
	ends, err := kadm.NewClient(adm).ListEndOffsets(ctx, topic)
	adm.Close()
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		t.Fatalf("listing the end offsets of %s: %v", topic, err)
	}
	left := map[int32]int64{} // partition -> end offset still to reach
	ends.Each(func(o kadm.ListedOffset) {
		if o.Offset > 0 {
			left[o.Partition] = o.Offset
		}
	})
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var out []*kgo.Record
	for len(left) > 0 {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("reading %s: %d records read, partitions not read to their end offsets %v within %s", topic, len(out), left, timeout)
		}
		fs.EachRecord(func(r *kgo.Record) {
			out = append(out, r)
			if end, ok := left[r.Partition]; ok && r.Offset+1 >= end {
				delete(left, r.Partition)
			}
		})
	}
	return out
}

// Messages turns records into messages: key, payload, topic, and the id
// from the exactly-id header.
func Messages(recs []*kgo.Record) []exactly.Message {
	out := make([]exactly.Message, 0, len(recs))
	for _, r := range recs {
		m := exactly.Message{Key: string(r.Key), Payload: r.Value, Topic: r.Topic}
		for _, h := range r.Headers {
			if h.Key == exactly.HeaderID {
				m.ID = string(h.Value)
			}
		}
		out = append(out, m)
	}
	return out
}
