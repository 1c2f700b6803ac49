package kafka

import (
	"math"
	"strconv"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
)

// TestOutputIDIsUUIDv5: the derived output ids are the name-based UUIDs
// they always were (uuid.NewSHA1 of the input id, a NUL and the index), so
// a replay after an upgrade derives the same ids; for ids longer than the
// usual limit too.
func TestOutputIDIsUUIDv5(t *testing.T) {
	for _, in := range []string{"", "a", "kafka:in/3/12345", "019ad3f0-7c1e-7b2a-9d3e-0a1b2c3d4e5f", strings.Repeat("x", 128), strings.Repeat("é", 300)} {
		for _, i := range []int{0, 1, 9, 10, 12345, 1 << 40} {
			want := uuid.NewSHA1(outputIDSpace, []byte(in+"\x00"+strconv.Itoa(i))).String()
			if got := outputID(in, i); got != want {
				t.Fatalf("outputID(%.20q, %d) = %s, want %s", in, i, got, want)
			}
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = outputID("019ad3f0-7c1e-7b2a-9d3e-0a1b2c3d4e5f", 3) }); n > 1 {
		t.Errorf("outputID allocates %.0f times, want 1", n)
	}
}

// TestPositionID: a record produced outside exactly gets the id
// "kafka:topic/partition/offset", in one allocation.
func TestPositionID(t *testing.T) {
	for _, rec := range []*kgo.Record{
		{Topic: "in", Partition: 3, Offset: 12345},
		{Topic: "a.b_c-d", Partition: 0, Offset: 0},
		{Topic: strings.Repeat("t", 249), Partition: math.MaxInt32, Offset: math.MaxInt64},
	} {
		want := "kafka:" + rec.Topic + "/" + strconv.Itoa(int(rec.Partition)) + "/" + strconv.FormatInt(rec.Offset, 10)
		if got := DecodeRecord(rec).ID; got != want {
			t.Errorf("id %q, want %q", got, want)
		}
		if n := testing.AllocsPerRun(100, func() { _ = positionID(rec) }); n > 1 {
			t.Errorf("positionID allocates %.0f times, want 1", n)
		}
	}
}

// TestRecordID: the id is the last exactly-id header, or the position when
// that is missing or empty; the Processor reads it without allocating, and
// derives the same output ids from its bytes as from the string.
func TestRecordID(t *testing.T) {
	pos := "kafka:in/2/7"
	for _, tc := range []struct {
		headers []kgo.RecordHeader
		want    string
	}{
		{nil, pos},
		{[]kgo.RecordHeader{{Key: "h", Value: []byte("x")}}, pos},
		{[]kgo.RecordHeader{{Key: exactly.HeaderID, Value: []byte("a")}}, "a"},
		{[]kgo.RecordHeader{{Key: exactly.HeaderID, Value: []byte("a")}, {Key: exactly.HeaderID, Value: []byte("b")}, {Key: "h"}}, "b"},
		{[]kgo.RecordHeader{{Key: exactly.HeaderID, Value: []byte("a")}, {Key: exactly.HeaderID}}, pos},
	} {
		rec := &kgo.Record{Topic: "in", Partition: 2, Offset: 7, Headers: tc.headers}
		var buf [maxPositionID]byte
		got := appendRecordID(buf[:0], rec)
		if string(got) != tc.want || recordID(rec) != tc.want || DecodeRecord(rec).ID != tc.want {
			t.Errorf("headers %v: id %q / %q / %q, want %q", tc.headers, got, recordID(rec), DecodeRecord(rec).ID, tc.want)
		}
		if outputID(got, 3) != outputID(tc.want, 3) {
			t.Errorf("headers %v: output ids differ between bytes and string", tc.headers)
		}
		if n := testing.AllocsPerRun(100, func() { _ = appendRecordID(buf[:0], rec) }); n > 0 {
			t.Errorf("appendRecordID allocates %.0f times, want 0", n)
		}
	}
}
