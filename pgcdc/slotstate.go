package pgcdc

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// SlotState is a replication slot as PostgreSQL reports it, for operators'
// views (the console): whether it exists, is in use, and how much WAL it
// holds back. The age of what a running relay has not confirmed yet is in
// its Stats (SlotLagSeconds); the server does not know it.
type SlotState struct {
	Name      string
	Exists    bool
	Active    bool   // a replication connection is streaming from it now
	Plugin    string // pgoutput for the slots this package creates
	WALStatus string // reserved, extended, unreserved or lost
	// ConfirmedLSN is the position the relay confirmed last.
	ConfirmedLSN LSN
	// LagBytes is the WAL the slot retains: pg_current_wal_lsn() -
	// confirmed_flush_lsn.
	LagBytes int64
}

// ReadSlot reads the state of the slot named slot from pg_replication_slots.
// A slot that does not exist gives Exists false and no error. db is a
// PostgreSQL *sql.DB.
func ReadSlot(ctx context.Context, db *sql.DB, slot string) (SlotState, error) {
	s := SlotState{Name: slot}
	var confirmed string
	err := db.QueryRowContext(ctx, `SELECT active, coalesce(plugin, ''), coalesce(wal_status, ''),
    coalesce(confirmed_flush_lsn::text, ''), coalesce((pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, 0)
FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&s.Active, &s.Plugin, &s.WALStatus, &confirmed, &s.LagBytes)
	if errors.Is(err, sql.ErrNoRows) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("pgcdc: reading slot %q: %w", slot, err)
	}
	s.Exists = true
	if confirmed != "" {
		if s.ConfirmedLSN, err = ParseLSN(confirmed); err != nil {
			return s, err
		}
	}
	return s, nil
}
