package outboxstore

import (
	"encoding/json"
	"maps"
	"strings"
	"testing"

	"github.com/exactlyonce/exactly"
)

func TestDecodeHeadersMatchesEncodingJSON(t *testing.T) {
	for _, in := range []string{
		`{}`, `{"a":"b"}`, `{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}`,
		`{"a":"1","b":"","c":"ünï"}`, `{"a":"x\"y"}`, `{"a":"<&>"}`, `{"a":"\u003c"}`, `{ "a" : "b" }`,
		`{"a":"b","a":"c"}`, `{"a":1}`, `{"a":null}`, `{"a":"b",}`, `{"a":"b"}x`, `{"a"}`, `{"a":"b""c":"d"}`,
		`{"a":"b","c":"d"}`, "{\"a\":\"\xff\"}", "{\"a\":\"\x01\"}", `null`, `[]`, `{`, `{"":""}`,
	} {
		got := DecodeHeaders([]byte(in))
		var want map[string]string
		if err := json.Unmarshal([]byte(in), &want); err != nil {
			if _, bad := got["exactly-header-error"]; !bad {
				t.Errorf("%q: got %v, want an error header (%v)", in, got, err)
			}
			continue
		}
		if !maps.Equal(got, want) || (got == nil) != (want == nil) {
			t.Errorf("%q: got %#v, want %#v", in, got, want)
		}
	}
	if DecodeHeaders(nil) != nil {
		t.Error("empty input must give nil")
	}
}

func BenchmarkDecodeHeaders(b *testing.B) {
	raw := []byte(`{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}`)
	for b.Loop() {
		DecodeHeaders(raw)
	}
}

func TestCheckStorable(t *testing.T) {
	for _, ok := range []map[string]string{
		nil, {}, {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, {"x-note": "ünï ✓", "X_Y.z": ""},
		{"exactly": "not the prefix"}, {"my-exactly-id": "inside is fine"}, {"nul": "a\x00b"},
	} {
		if err := CheckStorable(&exactly.Message{Topic: "t", Key: "ключ", Headers: ok}); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, c := range []struct {
		key     string
		headers map[string]string
		want    string
	}{
		{"k\xff", nil, "Key"},
		{"k\x00", nil, "NUL"},
		{"", map[string]string{"exactly-id": "x"}, `"exactly-id" ... reserved`},
		{"", map[string]string{"EXACTLY-dead-reason": "x"}, "reserved"},
		{"", map[string]string{"a b": "x"}, `"a b" holds a space`},
		{"", map[string]string{"a\tb": "x"}, "control"},
		{"", map[string]string{"a\u0085": "x"}, "control"},
		{"", map[string]string{"\xff": "x"}, "not valid UTF-8"},
		{"", map[string]string{"": "x"}, "empty name"},
		{"", map[string]string{"v": "\xe9t\xe9"}, `"v": value`},
		// Several bad headers: the first in name order is named, every time.
		{"", map[string]string{"z z": "1", "b b": "1", "exactly-a": "1", "m m": "1"}, `"b b"`},
	} {
		err := CheckStorable(&exactly.Message{Topic: "t", Key: c.key, Headers: c.headers})
		for _, part := range strings.Split(c.want, " ... ") {
			if err == nil || !strings.Contains(err.Error(), part) {
				t.Errorf("key %q headers %q: got %v, want an error with %s", c.key, c.headers, err, c.want)
				break
			}
		}
	}
}
