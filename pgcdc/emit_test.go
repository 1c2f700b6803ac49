package pgcdc_test

import (
	"context"
	"database/sql"
	"strings"
	"testing"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/pgcdc"
)

// Emit makes the same checks as outbox.Enqueue before anything is assigned
// or written: a refused call leaves every message as it was.
func TestEmitRefusesBadInputBeforeWrite(t *testing.T) {
	var tx *sql.Tx // never reached: the refusal comes first
	for _, tc := range []struct {
		name string
		msgs []*exactly.Message
		want string
	}{
		{"reserved header", []*exactly.Message{{Topic: "t", Headers: map[string]string{"exactly-foo": "x"}}}, "exactly-foo"},
		{"header value not UTF-8", []*exactly.Message{{Topic: "t", Headers: map[string]string{"h": "\xff"}}}, "UTF-8"},
		{"key with NUL", []*exactly.Message{{Topic: "t", Key: "a\x00b"}}, "NUL"},
		{"same ID twice", []*exactly.Message{{ID: "one", Topic: "t"}, {ID: "one", Topic: "t"}}, "same ID"},
		{"second message bad", []*exactly.Message{{Topic: "t"}, {Topic: "t", Headers: map[string]string{"a b": "x"}}}, "message 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := pgcdc.Emit(context.Background(), tx, tc.msgs...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Emit = %v, want an error naming %q", err, tc.want)
			}
			for i, m := range tc.msgs {
				if m.ID != "" && m.ID != "one" || !m.CreatedAt.IsZero() {
					t.Errorf("message %d changed by a refused call: id %q, created %v", i, m.ID, m.CreatedAt)
				}
			}
		})
	}
}
