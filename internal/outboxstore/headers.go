package outboxstore

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/exactlyonce/exactly"
)

// ReservedPrefix starts the header names exactly sets itself (exactly.HeaderID,
// the dead-letter reason headers, ...). A message written with Enqueue may not
// carry one: it would travel on and be taken for exactly's own.
const ReservedPrefix = "exactly-"

// CheckWrite is the check every writer of messages (outbox.Enqueue,
// pgcdc.Emit) makes before it assigns or writes anything: each message is
// valid (Validate) and storable (CheckStorable), and no caller-set ID is given
// twice in one call. The error names the message by its index.
func CheckWrite(msgs []*exactly.Message) error {
	var ids map[string]int
	for i, m := range msgs {
		if err := m.Validate(); err != nil {
			return fmt.Errorf("message %d: %w", i, err)
		}
		if err := CheckStorable(m); err != nil {
			return fmt.Errorf("message %d: %w", i, err)
		}
		if m.ID != "" && len(msgs) > 1 {
			if ids == nil {
				ids = make(map[string]int, len(msgs))
			}
			if j, dup := ids[m.ID]; dup {
				return fmt.Errorf("messages %d and %d have the same ID %q: an ID names one message (the broker would keep only the first)", j, i, m.ID)
			}
			ids[m.ID] = i
		}
	}
	return nil
}

// CheckStorable reports what, beyond m.Validate, keeps m from being stored in
// the outbox as it was given: the outbox keeps Key and Headers as text (a
// JSON object for the headers), so invalid UTF-8 would be refused by the
// database or silently replaced with U+FFFD. It also refuses the header names
// no broker takes (empty, with spaces or control characters) and the
// reserved ones. Limits only some brokers have are the relay's to find: it
// parks such a message with the reason.
func CheckStorable(m *exactly.Message) error {
	if !utf8.ValidString(m.Key) {
		return fmt.Errorf("exactly: message Key %.60q is not valid UTF-8", m.Key)
	}
	if i := strings.IndexByte(m.Key, 0); i >= 0 {
		return fmt.Errorf("exactly: message Key %.60q holds a NUL byte (at byte %d)", m.Key, i)
	}
	if len(m.Headers) == 0 {
		return nil
	}
	bad := false
	for k, v := range m.Headers {
		if checkHeader(k, v) != nil {
			bad = true
			break
		}
	}
	if !bad {
		return nil
	}
	// Name the first bad header in name order, so the error is the same on
	// every run.
	names := make([]string, 0, len(m.Headers))
	for k := range m.Headers {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, k := range names {
		if err := checkHeader(k, m.Headers[k]); err != nil {
			return err
		}
	}
	return nil
}

func checkHeader(name, value string) error {
	switch {
	case name == "":
		return fmt.Errorf("exactly: message has a header with an empty name")
	case !utf8.ValidString(name):
		return fmt.Errorf("exactly: message header name %.60q is not valid UTF-8", name)
	case len(name) >= len(ReservedPrefix) && strings.EqualFold(name[:len(ReservedPrefix)], ReservedPrefix):
		return fmt.Errorf("exactly: message header %.60q: names starting with %q are reserved for exactly's own headers", name, ReservedPrefix)
	case strings.IndexFunc(name, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0:
		return fmt.Errorf("exactly: message header name %.60q holds a space or a control character", name)
	case !utf8.ValidString(value):
		return fmt.Errorf("exactly: message header %.60q: value %.60q is not valid UTF-8", name, value)
	}
	return nil
}

// DecodeHeaders is ParseHeaders for display (the console, listings): headers
// ParseHeaders refuses come back as one header, exactly-header-error, saying
// why.
func DecodeHeaders(raw []byte) map[string]string {
	m, err := ParseHeaders(raw)
	if err != nil {
		return map[string]string{"exactly-header-error": err.Error()}
	}
	return m
}

// ParseHeaders turns the stored headers into a map. NULL, ” and the JSON
// literal null give nil. Anything else must be a JSON object whose values are
// strings and whose names CheckStorable would take (a service writing the
// outbox with plain SQL may store anything): otherwise the error says why, in
// words that never repeat a header's value, and the relays park the row with
// it (the row never reaches a broker, and never holds the relay up). What
// Enqueue stores (json.Marshal of a map[string]string: a flat object of plain
// strings) is parsed by a fast path; anything else (escapes, whitespace, other
// writers) goes through encoding/json, with the same result.
func ParseHeaders(raw []byte) (map[string]string, error) {
	if len(raw) == 0 {
		return nil, nil
	}
	if m, ok := decodeFlat(raw); ok {
		return m, checkDecoded(m)
	}
	if !utf8.Valid(raw) {
		return nil, errors.New("headers: not valid UTF-8")
	}
	var obj map[string]any
	if err := json.Unmarshal(raw, &obj); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return nil, fmt.Errorf("headers: not JSON (%v)", err)
		}
		return nil, errors.New("headers: not a JSON object: the headers must be a JSON object of strings")
	}
	if obj == nil {
		return nil, nil // the literal null
	}
	m := make(map[string]string, len(obj))
	var bad []string
	for k, v := range obj {
		if s, ok := v.(string); ok {
			m[k] = s
		} else {
			bad = append(bad, k)
		}
	}
	if len(bad) > 0 {
		slices.Sort(bad) // the same header named on every run
		return nil, fmt.Errorf("headers: header %.60q is a JSON %s, not a string: the headers must be a JSON object of strings", bad[0], jsonKind(obj[bad[0]]))
	}
	return m, checkDecoded(m)
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case float64:
		return "number"
	case []any:
		return "array"
	default:
		return "object"
	}
}

// checkDecoded applies CheckStorable's rules for header names to headers
// read back from the outbox.
func checkDecoded(m map[string]string) error {
	if len(m) == 0 {
		return nil
	}
	if err := CheckStorable(&exactly.Message{Headers: m}); err != nil {
		return fmt.Errorf("headers: %s", strings.TrimPrefix(err.Error(), "exactly: message "))
	}
	return nil
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
