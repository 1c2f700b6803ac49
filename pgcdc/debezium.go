package pgcdc

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/exactlyonce/exactly/internal/sqldb"
)

// DebeziumEvent is a row of a Debezium-layout outbox table.
type DebeziumEvent struct {
	// ID is the event id (a UUID); the published Message.ID and the "id"
	// header. EnqueueDebezium assigns a UUIDv7 when empty.
	ID string
	// AggregateType routes the event: topic "outbox.event.<AggregateType>"
	// by default.
	AggregateType string
	// AggregateID is the record key (the ordering key).
	AggregateID string
	// Type is the event type.
	Type string
	// Payload is the body, stored in a jsonb column: it must be JSON.
	Payload []byte
}

// DebeziumTableSQL returns the statement that creates a table with the
// layout Debezium's outbox event router expects (payload jsonb), as the
// Debezium documentation shows it.
func DebeziumTableSQL(table string) (string, error) {
	id, err := sqldb.ParseIdent(table)
	if err != nil {
		return "", fmt.Errorf("pgcdc: Debezium table: %w", err)
	}
	return "CREATE TABLE IF NOT EXISTS " + id.Quoted(sqldb.Postgres) + ` (
    id            uuid PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid   varchar(255) NOT NULL,
    type          varchar(255) NOT NULL,
    payload       jsonb
)`, nil
}

// MigrateDebezium creates the Debezium-layout table if it does not exist.
func MigrateDebezium(ctx context.Context, pool *pgxpool.Pool, table string) error {
	q, err := DebeziumTableSQL(table)
	if err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, q); err != nil {
		return fmt.Errorf("pgcdc: creating Debezium table %s: %w", table, err)
	}
	return nil
}

// EnqueueDebezium inserts events into a Debezium-layout table inside tx,
// the caller's transaction (a pgx.Tx or *sql.Tx). It assigns a UUIDv7 to
// events without an ID, in place.
func EnqueueDebezium(ctx context.Context, tx any, table string, events ...*DebeziumEvent) error {
	if len(events) == 0 {
		return nil
	}
	id, err := sqldb.ParseIdent(table)
	if err != nil {
		return fmt.Errorf("pgcdc: Debezium table: %w", err)
	}
	ids := make([]string, len(events))
	types, aggTypes, aggIDs := make([]string, len(events)), make([]string, len(events)), make([]string, len(events))
	payloads := make([]*string, len(events))
	for i, e := range events {
		if e == nil || e.AggregateType == "" {
			return errors.New("pgcdc: EnqueueDebezium: every event needs an AggregateType")
		}
		if e.ID == "" {
			e.ID = uuid.Must(uuid.NewV7()).String()
		}
		ids[i], types[i], aggTypes[i], aggIDs[i] = e.ID, e.Type, e.AggregateType, e.AggregateID
		if e.Payload != nil {
			p := string(e.Payload)
			payloads[i] = &p
		}
	}
	q := "INSERT INTO " + id.Quoted(sqldb.Postgres) + ` (id, aggregatetype, aggregateid, type, payload)
SELECT i, at, ai, t, p::jsonb FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS e(i, at, ai, t, p, n) ORDER BY n`
	return execTx(ctx, tx, "EnqueueDebezium", q, ids, aggTypes, aggIDs, types, payloads)
}
