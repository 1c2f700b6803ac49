package pgcdc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// Emit writes msgs as logical decoding messages (pg_logical_emit_message,
// transactional) with DefaultMessagePrefix, inside tx, the caller's own
// transaction: a relay with Config.Messages publishes them if and only if
// tx commits. Nothing is stored in a table. tx is a pgx.Tx (including
// *pgxpool.Tx) or a *sql.Tx on PostgreSQL.
//
// Like outbox.Enqueue, Emit assigns each message without an ID a fresh
// UUIDv7 and sets CreatedAt when zero, in place; the ID travels in the
// message and is the published Message.ID.
func Emit(ctx context.Context, tx any, msgs ...*exactly.Message) error {
	return EmitPrefix(ctx, tx, DefaultMessagePrefix, msgs...)
}

// EmitPrefix is Emit with another prefix (Config.MessagePrefix).
func EmitPrefix(ctx context.Context, tx any, prefix string, msgs ...*exactly.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	if prefix == "" || prefix == HeartbeatPrefix {
		return fmt.Errorf("pgcdc: Emit: prefix %q is not allowed", prefix)
	}
	if err := outboxstore.Prepare(msgs, time.Now()); err != nil {
		return fmt.Errorf("pgcdc: Emit: %w", err)
	}
	prefixes := make([]string, len(msgs))
	bodies := make([][]byte, len(msgs))
	for i, m := range msgs {
		payload := m.Payload
		if payload == nil {
			payload = []byte{}
		}
		body, err := json.Marshal(emitted{ID: m.ID, Topic: m.Topic, Key: m.Key, Payload: payload, Headers: m.Headers, CreatedAt: m.CreatedAt})
		if err != nil {
			return fmt.Errorf("pgcdc: Emit: message %s: %w", m.ID, err)
		}
		prefixes[i], bodies[i] = prefix, body
	}
	// One round trip for the lot, in order.
	const q = "SELECT pg_logical_emit_message(true, p, b) FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS m(p, b, n) ORDER BY n"
	return execTx(ctx, tx, "Emit", q, prefixes, bodies)
}

// execTx runs q in the caller's transaction, pgx or database/sql.
func execTx(ctx context.Context, tx any, what, q string, args ...any) error {
	t, err := sqldb.CallerTx(tx)
	var nilTx *sqldb.NilTxError
	switch {
	case errors.As(err, &nilTx):
		return errors.New("pgcdc: " + what + ": nil transaction: it must run inside the caller's transaction")
	case err != nil:
		return fmt.Errorf("pgcdc: %s: %w", what, err)
	}
	if _, err := t.Exec(ctx, q, args...); err != nil {
		return fmt.Errorf("pgcdc: %s: %w", what, err)
	}
	return nil
}
