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

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
)

// Record converts m into a record, or returns why it can never be
// published (wrapping exactly.ErrUnpublishable). The record's topic is
// topicOf(m), or m.Topic when topicOf is nil.
func Record(m *exactly.Message, topicOf func(*exactly.Message) string) (*kgo.Record, error) {
	if err := m.Validate(); err != nil {
		return nil, exactly.Unpublishable(fmt.Errorf("kafka: %w", err))
	}
	if m.ID == "" {
		return nil, exactly.Unpublishable(errors.New("kafka: message has an empty ID; outbox.Enqueue assigns one, a direct caller must set it (exactly.NewID)"))
	}
	topic := m.Topic
	if topicOf != nil {
		topic = topicOf(m)
	}
	if err := CheckTopic(topic); err != nil {
		return nil, exactly.Unpublishable(fmt.Errorf("kafka: message %s: %w", m.ID, err))
	}
	rec := &kgo.Record{
		Topic:   topic,
		Value:   m.Payload,
		Headers: make([]kgo.RecordHeader, 0, len(m.Headers)+2),
	}
	if rec.Value == nil {
		rec.Value = []byte{} // an empty body, never a null value (a tombstone to compaction)
	}
	if m.Key != "" {
		rec.Key = []byte(m.Key)
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
		rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: k, Value: []byte(m.Headers[k])})
	}
	rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: exactly.HeaderID, Value: []byte(m.ID)})
	if !m.CreatedAt.IsZero() {
		rec.Headers = append(rec.Headers, kgo.RecordHeader{
			Key:   exactly.HeaderCreatedAt,
			Value: []byte(m.CreatedAt.UTC().Format(time.RFC3339Nano)),
		})
	}
	return rec, nil
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
