package outboxstore

import (
	"encoding/json"
	"maps"
	"strings"
	"testing"

	"github.com/exactlyonce/exactly"
)

func TestParseHeadersMatchesEncodingJSON(t *testing.T) {
	for _, in := range []string{
		`{}`, `{"a":"b"}`, `{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}`,
		`{"a":"1","b":"","c":"ünï"}`, `{"a":"x\"y"}`, `{"a":"<&>"}`, `{"a":"\u003c"}`, `{ "a" : "b" }`,
		`{"a":"b","a":"c"}`, `{"a":"b","c":"d"}`, `null`, "\n{\"a\":\"b\"}\t",
	} {
		got, err := ParseHeaders([]byte(in))
		var want map[string]string
		if jerr := json.Unmarshal([]byte(in), &want); jerr != nil {
			t.Fatalf("%q: %v", in, jerr)
		}
		if err != nil || !maps.Equal(got, want) || (got == nil) != (want == nil) {
			t.Errorf("%q: got %#v, %v, want %#v", in, got, err, want)
		}
	}
	if got, err := ParseHeaders(nil); got != nil || err != nil {
		t.Error("empty input must give nil")
	}
}

// A service writing the outbox with plain SQL may store anything in the
// headers column: what is not a JSON object of strings with names the
// brokers take is refused, with a reason that names the header but never
// repeats a value.
func TestParseHeadersRefuses(t *testing.T) {
	for in, want := range map[string]string{
		`{"a":1}`:                     `header "a" is a JSON number, not a string`,
		`{"a":null}`:                  `header "a" is a JSON null`,
		`{"a":true}`:                  `header "a" is a JSON boolean`,
		`{"b":"x","a":["secret"]}`:    `header "a" is a JSON array`,
		`{"a":{"b":"secret"}}`:        `header "a" is a JSON object`,
		`{"a":"b",}`:                  `not JSON`,
		`{"a":"b"}x`:                  `not JSON`,
		`{"a"}`:                       `not JSON`,
		`{"a":"b""c":"d"}`:            `not JSON`,
		`{`:                           `not JSON`,
		`secret`:                      `not JSON`,
		`[]`:                          `not a JSON object`,
		`"secret"`:                    `not a JSON object`,
		`42`:                          `not a JSON object`,
		"{\"a\":\"\xff\"}":            `not valid UTF-8`,
		"{\"a\":\"\x01\"}":            `not JSON`,
		`{"":"secret"}`:               `empty name`,
		`{"exactly-id":"secret"}`:     `reserved`,
		`{"Exactly-Dead-Reason":"x"}`: `reserved`,
		`{"a b":"secret"}`:            `"a b" holds a space`,
		`{"a\tb":"secret"}`:           `control`,
	} {
		got, err := ParseHeaders([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, %v; want an error with %q", in, got, err, want)
			continue
		}
		if strings.Contains(err.Error(), "secret") || !strings.HasPrefix(err.Error(), "headers: ") {
			t.Errorf("%q: error %q repeats a value or does not start with headers:", in, err)
		}
		if d := DecodeHeaders([]byte(in)); len(d) != 1 || d["exactly-header-error"] != err.Error() {
			t.Errorf("%q: DecodeHeaders gave %v", in, d)
		}
	}
}

func BenchmarkDecodeHeaders(b *testing.B) {
	raw := []byte(`{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}`)
	for b.Loop() {
		ParseHeaders(raw)
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
