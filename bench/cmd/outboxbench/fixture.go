package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/outbox"
)

// cleanupTimeout bounds the drop of a row's schema or stream, which runs
// even when the row itself was cancelled.
const cleanupTimeout = 30 * time.Second

// freshSchema drops and recreates the row's own schema. Everything a row
// creates in PostgreSQL (outbox, lease and migration tables, Watermill's
// tables) lives in it, so one DROP SCHEMA … CASCADE cleans up.
func (b *bench) freshSchema(ctx context.Context, id string) (string, func(), error) {
	schema := "exactly_bench_" + strings.ReplaceAll(id, "-", "_")
	drop := func(ctx context.Context) error {
		_, err := b.pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+pgx.Identifier{schema}.Sanitize()+` CASCADE`)
		return err
	}
	if err := drop(ctx); err != nil {
		return "", nil, fmt.Errorf("drop schema %s: %w", schema, err)
	}
	if _, err := b.pool.Exec(ctx, `CREATE SCHEMA `+pgx.Identifier{schema}.Sanitize()); err != nil {
		return "", nil, fmt.Errorf("create schema %s: %w", schema, err)
	}
	return schema, func() {
		cctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		if err := drop(cctx); err != nil {
			b.log.Warn("could not drop the row's schema", "schema", schema, "err", err)
		}
	}, nil
}

// messages generates the benchmark's messages: keys spread round-robin, a
// payload of the configured size that differs per message, and optionally a
// W3C traceparent header, as an instrumented application would send.
type messages struct {
	topic   string
	keys    []string
	payload []byte
	headers bool
	created time.Time
}

func (b *bench) messages(topic string) *messages {
	m := &messages{topic: topic, payload: make([]byte, b.cfg.payload), headers: b.cfg.headers, created: time.Now()}
	rand.Read(m.payload)
	for k := range b.cfg.keys {
		m.keys = append(m.keys, fmt.Sprintf("order-%06d", k))
	}
	return m
}

// get returns message i with a fresh id.
func (m *messages) get(i int) *exactly.Message {
	payload := slices.Clone(m.payload)
	if len(payload) >= 8 {
		binary.BigEndian.PutUint64(payload, uint64(i))
	}
	msg := &exactly.Message{
		ID:        exactly.NewID(),
		Topic:     m.topic,
		Key:       m.keys[i%len(m.keys)],
		Payload:   payload,
		CreatedAt: m.created.Add(time.Duration(i) * time.Microsecond),
	}
	if m.headers {
		var trace [24]byte
		rand.Read(trace[:])
		msg.Headers = map[string]string{
			"traceparent": "00-" + hex.EncodeToString(trace[:16]) + "-" + hex.EncodeToString(trace[16:]) + "-01",
		}
	}
	return msg
}

// newOutbox creates the outbox tables of the row in schema, through the
// library's own migrations.
func (b *bench) newOutbox(ctx context.Context, schema string) (*outbox.Outbox, error) {
	ob, err := outbox.New(outbox.Config{Dialect: outbox.Postgres, Table: schema + ".outbox"})
	if err != nil {
		return nil, err
	}
	if err := ob.Migrate(ctx, b.pool); err != nil {
		return nil, err
	}
	return ob, nil
}

// prefillOutbox creates the outbox in schema and loads n messages into it
// with COPY, in the exact column format Enqueue writes, then settles the
// table (VACUUM ANALYZE, CHECKPOINT) so every drain starts from one state.
func (b *bench) prefillOutbox(ctx context.Context, schema, topic string) (*outbox.Outbox, error) {
	ob, err := b.newOutbox(ctx, schema)
	if err != nil {
		return nil, err
	}
	gen := b.messages(topic)
	i := 0
	start := time.Now()
	copied, err := b.pool.CopyFrom(ctx, pgx.Identifier{schema, "outbox"},
		[]string{"id", "topic", "msg_key", "key_hash", "payload", "headers", "created_at"},
		pgx.CopyFromFunc(func() ([]any, error) {
			if i == b.cfg.n {
				return nil, nil
			}
			m := gen.get(i)
			i++
			var headers any // NULL when there are none, as Enqueue stores it
			if len(m.Headers) > 0 {
				raw, err := json.Marshal(m.Headers)
				if err != nil {
					return nil, err
				}
				headers = string(raw)
			}
			return []any{m.ID, m.Topic, m.Key, outboxstore.KeyHash(m), m.Payload, headers, m.CreatedAt.UnixMicro()}, nil
		}))
	if err != nil {
		return nil, fmt.Errorf("COPY into %s.outbox: %w", schema, err)
	}
	if int(copied) != b.cfg.n {
		return nil, fmt.Errorf("COPY into %s.outbox loaded %d rows, want %d", schema, copied, b.cfg.n)
	}
	if err := b.settle(ctx, pgx.Identifier{schema, "outbox"}.Sanitize()); err != nil {
		return nil, err
	}
	b.log.Info("outbox filled", "schema", schema, "rows", copied, "took", time.Since(start).Round(time.Millisecond))
	return ob, nil
}

// settle vacuums and analyzes the given tables and forces a checkpoint, so
// that no drain pays for the fill's dirty pages or runs on stale statistics.
func (b *bench) settle(ctx context.Context, tables ...string) error {
	for _, t := range tables {
		if _, err := b.pool.Exec(ctx, "VACUUM ANALYZE "+t); err != nil {
			return fmt.Errorf("VACUUM ANALYZE %s: %w", t, err)
		}
	}
	if _, err := b.pool.Exec(ctx, "CHECKPOINT"); err != nil {
		return fmt.Errorf("CHECKPOINT: %w", err)
	}
	return nil
}

// pending counts the rows of the outbox still to publish.
func (b *bench) pending(ctx context.Context, schema string) (int64, error) {
	var n int64
	err := b.pool.QueryRow(ctx, "SELECT count(*) FROM "+pgx.Identifier{schema, "outbox"}.Sanitize()+" WHERE status = 0").Scan(&n)
	return n, err
}

// broker is a row's own NATS connection and JetStream stream.
type broker struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	stream  string
	subject string // every message of the row goes to this subject
}

// freshStream connects to NATS and (re)creates the row's own file-storage
// stream. close deletes the stream and closes the connection.
func (b *bench) freshStream(ctx context.Context, id string) (*broker, func(), error) {
	nc, err := nats.Connect(b.cfg.natsURL, nats.Name("outboxbench-"+id))
	if err != nil {
		return nil, nil, fmt.Errorf("NATS: %w", err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	token := strings.ReplaceAll(id, "-", "_")
	br := &broker{
		nc:      nc,
		js:      js,
		stream:  "EXACTLYBENCH_" + strings.ToUpper(token),
		subject: "exactlybench." + token + ".events",
	}
	if err := js.DeleteStream(ctx, br.stream); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
		nc.Close()
		return nil, nil, fmt.Errorf("delete stream %s: %w", br.stream, err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name:     br.stream,
		Subjects: []string{"exactlybench." + token + ".>"},
		Storage:  jetstream.FileStorage,
		Replicas: 1,
	}); err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("create stream %s: %w", br.stream, err)
	}
	return br, func() {
		cctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		if err := js.DeleteStream(cctx, br.stream); err != nil {
			b.log.Warn("could not delete the row's stream", "stream", br.stream, "err", err)
		}
		nc.Close()
	}, nil
}

// streamCount is the number of messages the stream holds: after a drain it
// must be n, which shows every message arrived and none was stored twice.
func (br *broker) streamCount(ctx context.Context) (uint64, error) {
	s, err := br.js.Stream(ctx, br.stream)
	if err != nil {
		return 0, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.State.Msgs, nil
}

// checkStream fails unless the stream holds exactly want messages.
func (br *broker) checkStream(ctx context.Context, want int) error {
	got, err := br.streamCount(ctx)
	if err != nil {
		return fmt.Errorf("stream %s: %w", br.stream, err)
	}
	if got != uint64(want) {
		return fmt.Errorf("stream %s holds %d messages, want %d", br.stream, got, want)
	}
	return nil
}

// timer times a row's measured section, with a CPU profile of it when
// -cpuprofile is set and the CPU meter's account of it.
type timer struct {
	b           *bench
	start       time.Time
	elapsed     time.Duration
	cpu0, cpu1  cpuSample
	stopProfile func()
	stopped     bool
	sql         string
}

func (b *bench) startTimer(id string) *timer {
	t := &timer{b: b, stopProfile: b.profile(id)}
	t.cpu0 = b.sampleCPU()
	b.sqlTrace.start()
	t.start = time.Now()
	return t
}

// stop ends the measured section (once) and returns its length.
func (t *timer) stop() time.Duration {
	if !t.stopped {
		t.stopped = true
		t.elapsed = time.Since(t.start)
		t.sql = t.b.sqlTrace.stop(t.elapsed)
		t.cpu1 = t.b.sampleCPU()
		t.stopProfile()
	}
	return t.elapsed
}

// cpu describes the CPU used and the SQL statements run during the
// measured section.
func (t *timer) cpu() string {
	s := cpuNote(t.cpu0, t.cpu1, runtime.NumCPU())
	if t.sql != "" {
		s += "; " + t.sql
	}
	return s
}

// profile starts a CPU profile of the row's timed section when -cpuprofile
// is set; the returned func stops it.
func (b *bench) profile(id string) func() {
	if b.cfg.profileDir == "" {
		return func() {}
	}
	path := filepath.Join(b.cfg.profileDir, id+".pprof")
	f, err := os.Create(path)
	if err != nil {
		b.log.Warn("no CPU profile", "err", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		b.log.Warn("no CPU profile", "err", err)
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
		b.log.Info("CPU profile written", "path", path)
	}
}
