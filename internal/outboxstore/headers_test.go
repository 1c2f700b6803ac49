package outboxstore

import (
	"encoding/json"
	"maps"
	"testing"
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
