package inboxstore

import (
	"context"
	"database/sql"
	"time"

	"github.com/exactlyonce/exactly/internal/sqldb"
)

// ConsumerCount is what the inbox table holds for one consumer.
type ConsumerCount struct {
	Consumer string
	Records  int64
	Oldest   time.Time // the oldest record's claim time (database clock)
}

// Consumers counts the records per consumer, with the oldest claim, in
// consumer order. It walks the (consumer, processed_at) index.
func (s *Store) Consumers(ctx context.Context, db *sql.DB) ([]ConsumerCount, error) {
	rows, err := db.QueryContext(ctx, "SELECT consumer, count(*), min(processed_at) FROM "+s.t+" GROUP BY consumer ORDER BY consumer")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []ConsumerCount
	for rows.Next() {
		var c ConsumerCount
		var oldest int64
		if err := rows.Scan(&c.Consumer, &c.Records, &oldest); err != nil {
			return nil, err
		}
		c.Oldest = time.UnixMilli(oldest)
		out = append(out, c)
	}
	return out, rows.Err()
}

// Claim is a consumer's record of a message id.
type Claim struct {
	Consumer    string
	ProcessedAt time.Time
}

// ClaimsOf returns the consumers that claimed id (applied its effect), in
// consumer order. The primary key leads with the consumer, so this reads
// the table: an operator's lookup, not a hot path.
func (s *Store) ClaimsOf(ctx context.Context, db *sql.DB, id string) ([]Claim, error) {
	a := sqldb.NewArgs(s.D)
	rows, err := db.QueryContext(ctx, "SELECT consumer, processed_at FROM "+s.t+" WHERE id = "+a.Add(id)+" ORDER BY consumer", a.Vals...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Claim
	for rows.Next() {
		var c Claim
		var at int64
		if err := rows.Scan(&c.Consumer, &at); err != nil {
			return nil, err
		}
		c.ProcessedAt = time.UnixMilli(at)
		out = append(out, c)
	}
	return out, rows.Err()
}
