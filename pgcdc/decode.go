package pgcdc

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
)

// The pgoutput protocol (version 1), as far as the relay needs it:
// https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html
// Tuples are decoded here rather than through pglogrepl's TupleData, which
// copies every value byte by byte: the values are sliced from the received
// buffer and copied once, into the message.

// column value kinds in a tuple.
const (
	colNull      = 'n'
	colUnchanged = 'u' // an unchanged TOASTed value (updates only)
	colText      = 't'
	colBinary    = 'b'
)

type colValue struct {
	kind byte
	data []byte // aliases the received buffer
}

// parseTuple reads TupleData at src and returns the values and the rest.
func parseTuple(src []byte, cols []colValue) ([]colValue, []byte, error) {
	if len(src) < 2 {
		return nil, nil, errors.New("pgoutput: short tuple")
	}
	n := int(binary.BigEndian.Uint16(src))
	src = src[2:]
	cols = cols[:0]
	for range n {
		if len(src) < 1 {
			return nil, nil, errors.New("pgoutput: short tuple column")
		}
		c := colValue{kind: src[0]}
		src = src[1:]
		switch c.kind {
		case colText, colBinary:
			if len(src) < 4 {
				return nil, nil, errors.New("pgoutput: short tuple value length")
			}
			l := int(binary.BigEndian.Uint32(src))
			src = src[4:]
			if len(src) < l {
				return nil, nil, errors.New("pgoutput: short tuple value")
			}
			c.data = src[:l:l]
			src = src[l:]
		case colNull, colUnchanged:
		default:
			return nil, nil, fmt.Errorf("pgoutput: unknown tuple column kind %q", c.kind)
		}
		cols = append(cols, c)
	}
	return cols, src, nil
}

// relKind says which source a relation is.
type relKind uint8

const (
	relOther relKind = iota
	relOutbox
	relDebezium
)

// relation is what a Relation message told about a table of the
// publication, reduced to the columns the decoder reads (-1: absent).
type relation struct {
	kind relKind
	name string
	// exactly outbox table
	seq, id, topic, key, payload, headers, created, status, attempts int
	// Debezium layout (id and payload shared with the above)
	aggType, aggID, evType int
	payloadBytea           bool
}

func newRelation(kind relKind, name string, cols []string, types []uint32) (*relation, error) {
	rel := &relation{kind: kind, name: name}
	idx := map[string]int{}
	for i, c := range cols {
		idx[c] = i
	}
	get := func(c string) int {
		if i, ok := idx[c]; ok {
			return i
		}
		return -1
	}
	var need []string
	switch kind {
	case relOutbox:
		rel.seq, rel.id, rel.topic, rel.key = get("seq"), get("id"), get("topic"), get("msg_key")
		rel.payload, rel.headers, rel.created, rel.status, rel.attempts = get("payload"), get("headers"), get("created_at"), get("status"), get("attempts")
		need = []string{"seq", "id", "topic", "msg_key", "payload", "headers", "created_at", "status", "attempts"}
	case relDebezium:
		rel.id, rel.aggType, rel.aggID, rel.evType, rel.payload = get("id"), get("aggregatetype"), get("aggregateid"), get("type"), get("payload")
		need = []string{"id", "aggregatetype", "aggregateid", "type", "payload"}
		if rel.payload >= 0 {
			rel.payloadBytea = types[rel.payload] == 17
		}
	default:
		return rel, nil
	}
	for _, c := range need {
		if get(c) < 0 {
			return nil, fmt.Errorf("pgcdc: table %s has no column %q; it does not have the expected layout", name, c)
		}
	}
	return rel, nil
}

func text(cols []colValue, i int) (string, bool) {
	if i < 0 || i >= len(cols) || (cols[i].kind != colText && cols[i].kind != colBinary) {
		return "", false
	}
	return string(cols[i].data), true
}

func integer(cols []colValue, i int) (int64, error) {
	if i < 0 || i >= len(cols) || cols[i].kind != colText {
		return 0, errors.New("missing integer column")
	}
	return strconv.ParseInt(string(cols[i].data), 10, 64)
}

// bytea decodes a bytea value in text form (\x and hex digits).
func bytea(cols []colValue, i int) ([]byte, error) {
	if i < 0 || i >= len(cols) {
		return nil, errors.New("missing bytea column")
	}
	c := cols[i]
	switch c.kind {
	case colNull:
		return nil, nil
	case colText:
	default:
		return nil, errors.New("bytea column not in text form")
	}
	if len(c.data) < 2 || c.data[0] != '\\' || c.data[1] != 'x' {
		return nil, errors.New("bytea value is not in hex format (bytea_output must be hex)")
	}
	out := make([]byte, (len(c.data)-2)/2)
	if _, err := hex.Decode(out, c.data[2:]); err != nil {
		return nil, err
	}
	return out, nil
}

// complete reports whether every column the decoder reads carries its value
// (an update leaves unchanged TOASTed values out).
func (rel *relation) complete(cols []colValue) bool {
	for _, i := range []int{rel.seq, rel.id, rel.topic, rel.key, rel.payload, rel.headers, rel.created, rel.status} {
		if i >= len(cols) || cols[i].kind == colUnchanged {
			return false
		}
	}
	return true
}

// outboxRow decodes a row of the exactly outbox table. It returns the row's
// status and attempts too.
func (rel *relation) outboxRow(cols []colValue) (seq int64, msg exactly.Message, status, attempts int64, err error) {
	if status, err = integer(cols, rel.status); err != nil {
		return 0, msg, 0, 0, fmt.Errorf("status: %w", err)
	}
	attempts, _ = integer(cols, rel.attempts)
	if seq, err = integer(cols, rel.seq); err != nil {
		return 0, msg, 0, 0, fmt.Errorf("seq: %w", err)
	}
	if status != outboxstore.StatusPending || !rel.complete(cols) {
		return seq, msg, status, attempts, nil
	}
	msg.ID, _ = text(cols, rel.id)
	msg.Topic, _ = text(cols, rel.topic)
	msg.Key, _ = text(cols, rel.key)
	if msg.Payload, err = bytea(cols, rel.payload); err != nil {
		return 0, msg, 0, 0, fmt.Errorf("payload: %w", err)
	}
	if msg.Payload == nil {
		msg.Payload = []byte{}
	}
	if h, ok := text(cols, rel.headers); ok {
		if msg.Headers, err = outboxstore.ParseHeaders([]byte(h)); err != nil {
			return seq, msg, status, attempts, err // parked by its row
		}
	}
	created, err := integer(cols, rel.created)
	if err != nil {
		return 0, msg, 0, 0, fmt.Errorf("created_at: %w", err)
	}
	msg.CreatedAt = time.UnixMicro(created)
	return seq, msg, status, attempts, nil
}

// debeziumRow decodes a row of a Debezium-layout table the way the outbox
// event router maps it: topic from aggregatetype, key aggregateid, header
// "id" (and Message.ID) the event id.
func (rel *relation) debeziumRow(cols []colValue, d *Debezium, commit time.Time) (exactly.Message, error) {
	var msg exactly.Message
	id, ok := text(cols, rel.id)
	if !ok || id == "" {
		return msg, errors.New("the id column is empty")
	}
	aggType, _ := text(cols, rel.aggType)
	msg.ID = id
	if d.Topic != nil {
		msg.Topic = d.Topic(aggType)
	} else {
		msg.Topic = d.TopicPrefix + aggType
	}
	msg.Key, _ = text(cols, rel.aggID)
	msg.Headers = map[string]string{"id": id}
	if d.TypeHeader != "" {
		if t, ok := text(cols, rel.evType); ok {
			msg.Headers[d.TypeHeader] = t
		}
	}
	var err error
	if rel.payloadBytea {
		msg.Payload, err = bytea(cols, rel.payload)
	} else if p, ok := text(cols, rel.payload); ok {
		msg.Payload = []byte(p)
	}
	msg.CreatedAt = commit
	return msg, err
}

// emitted is the body of a logical message written by Emit.
type emitted struct {
	ID        string            `json:"id"`
	Topic     string            `json:"topic"`
	Key       string            `json:"key,omitempty"`
	Payload   []byte            `json:"payload"`
	Headers   map[string]string `json:"headers,omitempty"`
	CreatedAt time.Time         `json:"created_at"`
}

func decodeEmitted(content []byte) (exactly.Message, error) {
	var e emitted
	if err := json.Unmarshal(content, &e); err != nil {
		return exactly.Message{}, err
	}
	if e.ID == "" {
		return exactly.Message{}, errors.New("message has no id")
	}
	if e.Payload == nil {
		e.Payload = []byte{}
	}
	return exactly.Message{ID: e.ID, Topic: e.Topic, Key: e.Key, Payload: e.Payload, Headers: e.Headers, CreatedAt: e.CreatedAt}, nil
}
