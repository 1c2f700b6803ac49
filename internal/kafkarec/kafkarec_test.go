package kafkarec_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/kafkarec"
)

func headers(r *kgo.Record) string {
	var b strings.Builder
	for _, h := range r.Headers {
		b.WriteString(h.Key + "=" + string(h.Value) + ";")
	}
	return b.String()
}

func TestRecord(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 6, time.FixedZone("x", 3600))
	for _, tc := range []struct {
		m       exactly.Message
		key     string
		nilKey  bool
		value   string
		headers string
	}{
		{m: exactly.Message{ID: "a", Topic: "t"}, nilKey: true, headers: "exactly-id=a;"},
		{m: exactly.Message{ID: "b", Topic: "t", Key: "k", Payload: []byte("v")}, key: "k", value: "v", headers: "exactly-id=b;"},
		{m: exactly.Message{ID: "c", Topic: "t", Key: "k", CreatedAt: at}, key: "k",
			headers: "exactly-id=c;exactly-created-at=2026-01-02T02:04:05.000000006Z;"},
		{m: exactly.Message{ID: "d", Topic: "t", Headers: map[string]string{"z": "1", "a": "2", exactly.HeaderID: "forged", exactly.HeaderCreatedAt: "forged"}, CreatedAt: at},
			nilKey: true, headers: "a=2;z=1;exactly-id=d;exactly-created-at=2026-01-02T02:04:05.000000006Z;"},
		{m: exactly.Message{ID: "e", Topic: "t", Headers: map[string]string{"traceparent": "00-x"}}, nilKey: true, headers: "traceparent=00-x;exactly-id=e;"},
	} {
		r, err := kafkarec.Record(&tc.m, func(*exactly.Message) string { return "out" })
		if err != nil {
			t.Fatalf("%s: %v", tc.m.ID, err)
		}
		if r.Topic != "out" {
			t.Errorf("%s: topic %q", tc.m.ID, r.Topic)
		}
		if tc.nilKey != (r.Key == nil) || string(r.Key) != tc.key {
			t.Errorf("%s: key %q (nil %v)", tc.m.ID, r.Key, r.Key == nil)
		}
		if r.Value == nil || string(r.Value) != tc.value {
			t.Errorf("%s: value %q (nil %v): an empty payload must be an empty value, never a tombstone", tc.m.ID, r.Value, r.Value == nil)
		}
		if got := headers(r); got != tc.headers {
			t.Errorf("%s: headers %s, want %s", tc.m.ID, got, tc.headers)
		}
	}
}

func TestRecordRefusesForever(t *testing.T) {
	for _, tc := range []struct {
		m     exactly.Message
		topic string
		want  string
	}{
		{exactly.Message{Topic: "t"}, "t", "empty ID"},
		{exactly.Message{ID: "a", Topic: "t"}, "bad topic", `has ' '`},
		{exactly.Message{ID: "a", Topic: "t"}, "", "empty topic name"},
		{exactly.Message{ID: "a", Topic: "t"}, "..", "reserved"},
		{exactly.Message{ID: "a", Topic: "t"}, strings.Repeat("t", 250), "limit is 249"},
		{exactly.Message{ID: "a", Topic: "t", Key: strings.Repeat("k", exactly.MaxKeyLen+1)}, "t", "Key is 256 bytes"},
	} {
		_, err := kafkarec.Record(&tc.m, func(*exactly.Message) string { return tc.topic })
		if err == nil || !errors.Is(err, exactly.ErrUnpublishable) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("topic %.20q: %v, want an unpublishable error containing %q", tc.topic, err, tc.want)
		}
	}
}

func TestRecordNilMessage(t *testing.T) {
	if _, err := kafkarec.Record(nil, nil); err == nil || !errors.Is(err, exactly.ErrUnpublishable) {
		t.Errorf("nil message: %v", err)
	}
}

func TestRecordTopicDefaultsToMessageTopic(t *testing.T) {
	r, err := kafkarec.Record(&exactly.Message{ID: "a", Topic: "orders"}, nil)
	if err != nil || r.Topic != "orders" {
		t.Fatalf("record %+v, %v: want topic orders", r, err)
	}
}

// TestRecordAllocations: a message with no headers of its own becomes one
// allocation (the record and its two headers); its key, id and payload are
// not copied.
func TestRecordAllocations(t *testing.T) {
	m := &exactly.Message{ID: "019ad3f0-7c1e-7b2a-9d3e-0a1b2c3d4e5f", Topic: "orders", Key: "k1", Payload: []byte("v")}
	if n := testing.AllocsPerRun(100, func() { _, _ = kafkarec.RecordTo(m, m.Topic) }); n > 1 {
		t.Errorf("RecordTo allocates %.0f times, want 1", n)
	}
	m.CreatedAt = time.Now()
	if n := testing.AllocsPerRun(100, func() { _, _ = kafkarec.RecordTo(m, m.Topic) }); n > 2 {
		t.Errorf("RecordTo with CreatedAt allocates %.0f times, want 2", n)
	}
}

// TestRecordEmptyHeaderValue: an empty header value is an empty value on
// the wire, never a null.
func TestRecordEmptyHeaderValue(t *testing.T) {
	r, err := kafkarec.Record(&exactly.Message{ID: "a", Topic: "t", Headers: map[string]string{"e": ""}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if h := r.Headers[0]; h.Key != "e" || h.Value == nil || len(h.Value) != 0 {
		t.Errorf("header %q=%q (nil %v), want an empty, non-nil value", h.Key, h.Value, h.Value == nil)
	}
}
