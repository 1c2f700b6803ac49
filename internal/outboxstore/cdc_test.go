package outboxstore

import (
	"slices"
	"testing"
)

func TestRunningIn(t *testing.T) {
	for _, c := range []struct {
		snap string
		xids []uint32
		want []uint32
	}{
		{"100:105:", []uint32{0, 1, 99, 100, 104, 105, 200}, []uint32{105, 200}},
		{"100:105:100,103", []uint32{99, 100, 101, 103, 104}, []uint32{100, 103}},
		// epoch 1: the 32-bit ids just below 2^32 are of epoch 0, ended
		// long ago unless listed
		{"4294967396:4294967401:4294967398", []uint32{4294967290, 99, 100, 101, 102, 105}, []uint32{102, 105}},
		// epoch 0 near its end: the small ids are of epoch 1, still to end
		{"4294967290:4294967295:4294967292", []uint32{4294967291, 4294967292, 4294967295, 3, 10}, []uint32{4294967292, 4294967295, 3, 10}},
		// the first ids: an id "before" 3 is not widened below 0
		{"3:10:5", []uint32{4294967290, 4, 5, 11}, []uint32{5, 11}},
	} {
		got, err := runningIn(c.snap, c.xids)
		if err != nil {
			t.Fatalf("%s: %v", c.snap, err)
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("runningIn(%q, %v) = %v, want %v", c.snap, c.xids, got, c.want)
		}
	}
	for _, bad := range []string{"", "1", "1:2", "a:2:", "1:b:", "1:2:x", "1:2:3,"} {
		if _, err := runningIn(bad, []uint32{5}); err == nil {
			t.Errorf("runningIn(%q) took it", bad)
		}
	}
}
