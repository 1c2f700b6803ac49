// Package kafkarec is the one conversion of an exactly.Message into a Kafka
// record, shared by the kafka package's Publisher and Processor and by the
// CDC relay's exactly-once Kafka mode, so every path writes the same wire
// format: the message's key and payload, its headers in name order, then
// exactly-id and exactly-created-at (which always win over copies of them
// in the headers).
package kafkarec

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"
	"unsafe"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
)

// Record converts m into a record, or returns why it can never be
// published (wrapping exactly.ErrUnpublishable). The record's topic is
// topicOf(m), or m.Topic when topicOf is nil.
//
// The record's key and header values share memory with m's strings, and
// its value is m.Payload: nothing may write into them (franz-go only reads
// a record it produces).
func Record(m *exactly.Message, topicOf func(*exactly.Message) string) (*kgo.Record, error) {
	if err := check(m); err != nil {
		return nil, err
	}
	if topicOf == nil {
		return build(m, m.Topic)
	}
	return build(m, topicOf(m))
}

// RecordTo is Record with the topic given. Unlike Record it does not keep
// m itself (only what m's fields point to), so a caller's m can live on
// its stack.
func RecordTo(m *exactly.Message, topic string) (*kgo.Record, error) {
	if err := check(m); err != nil {
		return nil, err
	}
	return build(m, topic)
}

func check(m *exactly.Message) error {
	if err := m.Validate(); err != nil {
		return exactly.Unpublishable(fmt.Errorf("kafka: %w", err))
	}
	if m.ID == "" {
		return exactly.Unpublishable(errors.New("kafka: message has an empty ID; outbox.Enqueue assigns one, a direct caller must set it (exactly.NewID)"))
	}
	return nil
}

// withHeaders is a record with room for two headers in the same
// allocation: exactly-id and exactly-created-at, the headers of a
// message that has no others.
type withHeaders struct {
	rec kgo.Record
	hdr [2]kgo.RecordHeader
}

func build(m *exactly.Message, topic string) (*kgo.Record, error) {
	if err := CheckTopic(topic); err != nil {
		return nil, exactly.Unpublishable(fmt.Errorf("kafka: message %s: %w", m.ID, err))
	}
	var rec *kgo.Record
	if len(m.Headers) == 0 {
		wh := &withHeaders{}
		rec = &wh.rec
		rec.Headers = wh.hdr[:0]
	} else {
		rec = &kgo.Record{Headers: make([]kgo.RecordHeader, 0, len(m.Headers)+2)}
	}
	rec.Topic = topic
	rec.Value = m.Payload
	if rec.Value == nil {
		rec.Value = []byte{} // an empty body, never a null value (a tombstone to compaction)
	}
	if m.Key != "" {
		rec.Key = bytesOf(m.Key)
	}
	var names []string
	switch len(m.Headers) {
	case 0:
	case 1: // no sort, no allocation of a sorted copy: the common cases
		for k := range m.Headers {
			names = []string{k}
		}
	default:
		names = slices.Sorted(maps.Keys(m.Headers))
	}
	for _, k := range names {
		if k == exactly.HeaderID || k == exactly.HeaderCreatedAt {
			continue // ours win, so a stale copy cannot mislabel the message
		}
		rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: k, Value: bytesOf(m.Headers[k])})
	}
	rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: exactly.HeaderID, Value: bytesOf(m.ID)})
	if !m.CreatedAt.IsZero() {
		rec.Headers = append(rec.Headers, kgo.RecordHeader{
			Key:   exactly.HeaderCreatedAt,
			Value: m.CreatedAt.UTC().AppendFormat(make([]byte, 0, len(time.RFC3339Nano)), time.RFC3339Nano),
		})
	}
	return rec, nil
}

// bytesOf returns the bytes of s without copying them; they must never be
// written. An empty s gives an empty, non-nil slice: a nil header value is
// a null on the wire.
func bytesOf(s string) []byte {
	if s == "" {
		return []byte{}
	}
	return unsafe.Slice(unsafe.StringData(s), len(s))
}

// CheckTopic applies Kafka's rules for topic names.
func CheckTopic(t string) error {
	switch {
	case t == "":
		return errors.New("empty topic name")
	case len(t) > 249:
		return fmt.Errorf("topic name is %d bytes, Kafka's limit is 249", len(t))
	case t == "." || t == "..":
		return fmt.Errorf("topic name %q is reserved", t)
	}
	for _, c := range []byte(t) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("topic name %q has %q; Kafka allows only a-z A-Z 0-9 . _ -", t, c)
		}
	}
	return nil
}
