package outboxstore

import (
	"encoding/json"
	"unicode/utf8"
)

// DecodeHeaders turns the stored headers JSON into a map. Empty input gives
// nil. What Enqueue stores (json.Marshal of a map[string]string: a flat object
// of plain strings) is parsed by a fast path; anything else (escapes,
// whitespace, other writers) goes through encoding/json, with the same
// result. Undecodable input is corruption or a foreign writer: the message
// keeps moving and says what happened in a header.
func DecodeHeaders(raw []byte) map[string]string {
	if len(raw) == 0 {
		return nil
	}
	if m, ok := decodeFlat(raw); ok {
		return m
	}
	var m map[string]string
	if err := json.Unmarshal(raw, &m); err != nil {
		return map[string]string{"exactly-header-error": err.Error()}
	}
	return m
}

// decodeFlat parses {"k":"v",...} with no whitespace and no escapes. It
// reports false for anything else, and the caller falls back.
func decodeFlat(b []byte) (map[string]string, bool) {
	n := len(b)
	if n < 2 || b[0] != '{' || b[n-1] != '}' {
		return nil, false
	}
	if n == 2 {
		return map[string]string{}, true
	}
	// Count the pairs to size the map: every pair has exactly 4 quotes.
	quotes := 0
	for _, c := range b {
		if c == '"' {
			quotes++
		}
	}
	if quotes%4 != 0 {
		return nil, false
	}
	m := make(map[string]string, quotes/4)
	i := 1
	for {
		k, next, ok := plainString(b, i)
		if !ok || next >= n || b[next] != ':' {
			return nil, false
		}
		v, next2, ok := plainString(b, next+1)
		if !ok || next2 >= n {
			return nil, false
		}
		m[k] = v
		switch b[next2] {
		case ',':
			i = next2 + 1
		case '}':
			if next2 != n-1 {
				return nil, false
			}
			return m, true
		default:
			return nil, false
		}
	}
}

// plainString reads a JSON string at b[i] that needs no unescaping and is
// valid UTF-8, and returns it with the index after its closing quote.
func plainString(b []byte, i int) (string, int, bool) {
	if i >= len(b) || b[i] != '"' {
		return "", 0, false
	}
	ascii := true
	for j := i + 1; j < len(b); j++ {
		c := b[j]
		switch {
		case c == '"':
			s := b[i+1 : j]
			if !ascii && !utf8.Valid(s) {
				return "", 0, false
			}
			return string(s), j + 1, true
		case c == '\\' || c < 0x20:
			return "", 0, false
		case c >= 0x80:
			ascii = false
		}
	}
	return "", 0, false
}
