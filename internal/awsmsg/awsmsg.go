// Package awsmsg maps exactly.Messages onto the bodies and message
// attributes of SQS and SNS, which share their rules: a body is non-empty
// text of a restricted character set, a message has at most 10 attributes,
// and an attribute value is non-empty.
package awsmsg

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/exactlyonce/exactly"
)

// Attribute names beside exactly's own header names.
const (
	// HeaderEncoding says how the body carries the payload: "base64" (the
	// payload is not text SQS accepts) or "empty" (the payload is empty;
	// the body is one space, since SQS and SNS refuse an empty one). A
	// body without it is the payload as is.
	HeaderEncoding = "exactly-encoding"
	// HeaderHeaders carries the message's headers as one JSON object when
	// they cannot each be an attribute of their own.
	HeaderHeaders = "exactly-headers"
)

// MaxAttributes is the number of message attributes SQS and SNS allow.
const MaxAttributes = 10

// Attr is one message attribute: String or Binary.
type Attr struct {
	Name   string
	Type   string // "String" or "Binary"
	String string
	Binary []byte
}

// Encoded is a message as SQS and SNS carry it.
type Encoded struct {
	Body  string
	Attrs []Attr
}

// Size is the size SQS and SNS count against their limit: the body plus
// each attribute's name, type and value.
func (e Encoded) Size() int {
	n := len(e.Body)
	for _, a := range e.Attrs {
		n += len(a.Name) + len(a.Type) + len(a.String) + len(a.Binary)
	}
	return n
}

// Encode maps m onto a body and attributes: exactly-id, exactly-key (when
// Key is not empty; Binary when it is not text SQS accepts),
// exactly-created-at, exactly-encoding when the payload is not text SQS
// accepts, and the headers. The headers are attributes of their own when
// there is room (10 in all), every name is a valid attribute name and
// every value non-empty text; otherwise they all travel in the one
// exactly-headers attribute, as a JSON object. Headers named like exactly's
// own are dropped (ours win). The error, if any, is why m can never be
// published.
func Encode(m *exactly.Message) (Encoded, error) {
	if err := m.Validate(); err != nil {
		return Encoded{}, err
	}
	if m.ID == "" {
		return Encoded{}, errors.New("message has an empty ID; outbox.Enqueue assigns one, a direct caller must set it (exactly.NewID)")
	}
	var e Encoded
	e.Attrs = append(e.Attrs, Attr{Name: exactly.HeaderID, Type: "String", String: m.ID})
	if m.Key != "" {
		if ValidText(m.Key) {
			e.Attrs = append(e.Attrs, Attr{Name: exactly.HeaderKey, Type: "String", String: m.Key})
		} else {
			e.Attrs = append(e.Attrs, Attr{Name: exactly.HeaderKey, Type: "Binary", Binary: []byte(m.Key)})
		}
	}
	if !m.CreatedAt.IsZero() {
		e.Attrs = append(e.Attrs, Attr{Name: exactly.HeaderCreatedAt, Type: "String", String: m.CreatedAt.UTC().Format(time.RFC3339Nano)})
	}
	switch {
	case len(m.Payload) == 0:
		e.Body = " "
		e.Attrs = append(e.Attrs, Attr{Name: HeaderEncoding, Type: "String", String: "empty"})
	case ValidText(string(m.Payload)):
		e.Body = string(m.Payload)
	default:
		e.Body = base64.StdEncoding.EncodeToString(m.Payload)
		e.Attrs = append(e.Attrs, Attr{Name: HeaderEncoding, Type: "String", String: "base64"})
	}
	headers := make(map[string]string, len(m.Headers))
	separate := true
	for k, v := range m.Headers {
		if reserved(k) {
			continue
		}
		if !utf8.ValidString(v) {
			return Encoded{}, fmt.Errorf("message %s: header %q has a value that is not valid UTF-8", m.ID, k)
		}
		headers[k] = v
		if !validName(k) || v == "" || !ValidText(v) {
			separate = false
		}
	}
	if len(headers) == 0 {
		return e, nil
	}
	if separate && len(e.Attrs)+len(headers) <= MaxAttributes {
		for _, k := range slices.Sorted(maps.Keys(headers)) {
			e.Attrs = append(e.Attrs, Attr{Name: k, Type: "String", String: headers[k]})
		}
		return e, nil
	}
	js, err := json.Marshal(headers)
	if err != nil {
		return Encoded{}, fmt.Errorf("message %s: encoding its headers: %w", m.ID, err)
	}
	// JSON leaves U+FFFE and U+FFFF as they are, and SQS refuses them.
	s := strings.NewReplacer("\uFFFE", `\ufffe`, "\uFFFF", `\uffff`).Replace(string(js))
	e.Attrs = append(e.Attrs, Attr{Name: HeaderHeaders, Type: "String", String: s})
	return e, nil
}

func reserved(name string) bool {
	switch name {
	case exactly.HeaderID, exactly.HeaderKey, exactly.HeaderCreatedAt, HeaderEncoding, HeaderHeaders:
		return true
	}
	return false
}

// Decoded is what Decode recovers of a message.
type Decoded struct {
	ID        string
	Key       string
	Payload   []byte
	Headers   map[string]string // every attribute but exactly's own, and those of exactly-headers
	CreatedAt time.Time
}

// Decode recovers a message from its body and attributes; attributes not
// set by Encode (another producer's) become headers when they are text.
func Decode(body string, attrs []Attr) (Decoded, error) {
	d := Decoded{Headers: map[string]string{}}
	encoding := ""
	for _, a := range attrs {
		v := a.String
		if a.Type == "Binary" || strings.HasPrefix(a.Type, "Binary.") {
			v = string(a.Binary)
		}
		switch a.Name {
		case exactly.HeaderID:
			d.ID = v
		case exactly.HeaderKey:
			d.Key = v
		case exactly.HeaderCreatedAt:
			if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
				d.CreatedAt = t
			}
		case HeaderEncoding:
			encoding = v
		case HeaderHeaders:
			var h map[string]string
			if err := json.Unmarshal([]byte(v), &h); err != nil {
				return d, fmt.Errorf("attribute %s is not a JSON object of strings: %w", HeaderHeaders, err)
			}
			maps.Copy(d.Headers, h)
		default:
			if _, ok := d.Headers[a.Name]; !ok {
				d.Headers[a.Name] = v
			}
		}
	}
	switch encoding {
	case "":
		d.Payload = []byte(body)
	case "empty":
		d.Payload = []byte{}
	case "base64":
		p, err := base64.StdEncoding.DecodeString(body)
		if err != nil {
			return d, fmt.Errorf("body marked %s=base64 is not base64: %w", HeaderEncoding, err)
		}
		d.Payload = p
	default:
		return d, fmt.Errorf("unknown %s %q", HeaderEncoding, encoding)
	}
	return d, nil
}

// ValidText reports whether s is a non-empty string of the characters SQS
// and SNS accept in bodies and attribute values: #x9 | #xA | #xD |
// #x20 to #xD7FF | #xE000 to #xFFFD | #x10000 to #x10FFFF.
func ValidText(s string) bool {
	if s == "" || !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		switch {
		case r == 0x9 || r == 0xA || r == 0xD:
		case r >= 0x20 && r <= 0xD7FF:
		case r >= 0xE000 && r <= 0xFFFD:
		case r >= 0x10000 && r <= 0x10FFFF:
		default:
			return false
		}
	}
	return true
}

// validName applies the rules for message attribute names: 1 to 256 of
// A-Z a-z 0-9 _ - ., no leading, trailing or doubled period, and no "AWS."
// or "Amazon." prefix.
func validName(s string) bool {
	if s == "" || len(s) > 256 || s[0] == '.' || s[len(s)-1] == '.' || strings.Contains(s, "..") {
		return false
	}
	low := strings.ToLower(s)
	if strings.HasPrefix(low, "aws.") || strings.HasPrefix(low, "amazon.") {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

// FIFOID returns s as a FIFO group or deduplication id when it is one (1 to
// 128 printable ASCII characters, no space), and otherwise "sha256-" and
// the hex SHA-256 of s, which is, so a Key or ID of any bytes maps to one
// stable id.
func FIFOID(s string) string {
	ok := s != "" && len(s) <= 128
	for i := 0; ok && i < len(s); i++ {
		ok = s[i] >= 0x21 && s[i] <= 0x7E
	}
	if ok {
		return s
	}
	sum := sha256.Sum256([]byte(s))
	return "sha256-" + hex.EncodeToString(sum[:])
}

// GroupID is the FIFO MessageGroupId of m: its Key, or, when Key is empty
// (no order required), its ID, so keyless messages wait for none other.
func GroupID(m *exactly.Message) string {
	if m.Key == "" {
		return FIFOID(m.ID)
	}
	return FIFOID(m.Key)
}
