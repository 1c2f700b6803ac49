package pgcdc

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/sqldb"
)

// registryTable records the slots the relay created, so that a slot that
// disappears is noticed instead of silently recreated.
const registryTable = "exactly_cdc_slots"

// Registry states.
const (
	stateBackfill  = "backfill"  // slot created, pending rows not all published yet
	stateStreaming = "streaming" // the slot is the source of truth
)

func quoteIdent(s string) string { return sqldb.Postgres.Quote(s) }

func (r *Relay) registry() string {
	return quoteIdent(r.tables[0].schema) + "." + quoteIdent(registryTable)
}

// prepare checks the server and the tables, and creates the registry and
// the publication.
func (r *Relay) prepare(ctx context.Context) error {
	var walLevel string
	if err := r.pool.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		return fmt.Errorf("pgcdc: connecting: %w", err)
	}
	if walLevel != "logical" {
		return fmt.Errorf("pgcdc: the server runs with wal_level=%s; logical decoding needs wal_level=logical (set it in postgresql.conf and restart the server)", walLevel)
	}
	// The outbox's tables must have every column the decoder and the
	// snapshot read: a table without them would fail row after row.
	sdb, done, err := sqldb.Open(r.pool)
	if err != nil {
		return fmt.Errorf("pgcdc: %w", err)
	}
	err = r.store.Verify(ctx, sdb)
	done()
	if err != nil {
		return fmt.Errorf("pgcdc: outbox %s is not usable: %w", r.store.Table, err)
	}
	for i := range r.tables {
		t := &r.tables[i]
		err := r.pool.QueryRow(ctx, `SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass($1)`, t.quoted).Scan(&t.schema, &t.name)
		if errors.Is(err, pgx.ErrNoRows) {
			if t.kind == relOutbox {
				return fmt.Errorf("pgcdc: outbox table %s does not exist: apply the migrations first (outbox.Migrate or `exactly migrate`)", t.quoted)
			}
			return fmt.Errorf("pgcdc: Debezium table %s does not exist: create it first (MigrateDebezium)", t.quoted)
		}
		if err != nil {
			return fmt.Errorf("pgcdc: looking up %s: %w", t.quoted, err)
		}
	}
	tx, err := r.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("pgcdc: %w", err)
	}
	defer tx.Rollback(ctx)
	// Serialise the set-up of relays that start together.
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext('exactly_cdc_setup'))"); err != nil {
		return fmt.Errorf("pgcdc: %w", err)
	}
	if _, err := tx.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+r.registry()+` (
    slot_name  text PRIMARY KEY,
    state      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
)`); err != nil {
		return fmt.Errorf("pgcdc: creating %s: %w", r.registry(), err)
	}
	if err := r.ensurePublication(ctx, tx); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("pgcdc: %w", err)
	}
	return nil
}

func (r *Relay) ensurePublication(ctx context.Context, tx pgx.Tx) error {
	pub := quoteIdent(r.cfg.Publication)
	var ins, upd, all bool
	err := tx.QueryRow(ctx, "SELECT pubinsert, pubupdate, puballtables FROM pg_publication WHERE pubname = $1", r.cfg.Publication).Scan(&ins, &upd, &all)
	if errors.Is(err, pgx.ErrNoRows) {
		names := make([]string, len(r.tables))
		for i, t := range r.tables {
			names[i] = quoteIdent(t.schema) + "." + quoteIdent(t.name)
		}
		if _, err := tx.Exec(ctx, "CREATE PUBLICATION "+pub+" FOR TABLE "+strings.Join(names, ", ")+" WITH (publish = 'insert, update')"); err != nil {
			return fmt.Errorf("pgcdc: creating publication %s: %w", r.cfg.Publication, err)
		}
		r.log.Info("publication created", "publication", r.cfg.Publication, "tables", strings.Join(names, ", "))
		return nil
	}
	if err != nil {
		return fmt.Errorf("pgcdc: reading publication %s: %w", r.cfg.Publication, err)
	}
	if !ins {
		return fmt.Errorf("pgcdc: publication %s does not publish inserts; alter it (publish = 'insert, update') or name another one", r.cfg.Publication)
	}
	if !upd {
		r.log.Warn("publication does not publish updates: parked rows re-driven with RetryDead will not be published again by this relay", "publication", r.cfg.Publication)
	}
	if all {
		return nil
	}
	for _, t := range r.tables {
		var n int
		if err := tx.QueryRow(ctx, "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
			r.cfg.Publication, t.schema, t.name).Scan(&n); err != nil {
			return fmt.Errorf("pgcdc: reading publication %s: %w", r.cfg.Publication, err)
		}
		if n == 0 {
			if _, err := tx.Exec(ctx, "ALTER PUBLICATION "+pub+" ADD TABLE "+quoteIdent(t.schema)+"."+quoteIdent(t.name)); err != nil {
				return fmt.Errorf("pgcdc: adding %s.%s to publication %s: %w", t.schema, t.name, r.cfg.Publication, err)
			}
			r.log.Info("table added to the publication", "publication", r.cfg.Publication, "table", t.schema+"."+t.name)
		}
	}
	return nil
}

type slotInfo struct {
	exists                          bool
	plugin, slotType, db, walStatus string
	confirmed                       LSN
	lagBytes                        int64
}

func (r *Relay) slotState(ctx context.Context) (slotInfo, error) {
	var s slotInfo
	var confirmed string
	err := r.pool.QueryRow(ctx, `SELECT coalesce(plugin, ''), slot_type, coalesce(database, ''), coalesce(wal_status, ''),
    coalesce(confirmed_flush_lsn::text, ''), coalesce((pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, 0)
FROM pg_replication_slots WHERE slot_name = $1`, r.cfg.Slot).Scan(&s.plugin, &s.slotType, &s.db, &s.walStatus, &confirmed, &s.lagBytes)
	if errors.Is(err, pgx.ErrNoRows) {
		return s, nil
	}
	if err != nil {
		return s, err
	}
	s.exists = true
	if confirmed != "" {
		if s.confirmed, err = ParseLSN(confirmed); err != nil {
			return s, err
		}
	}
	return s, nil
}

// usable fails for a slot that is gone or invalidated.
func (s slotInfo) usable(slot string) error {
	switch {
	case !s.exists:
		return fmt.Errorf("%w: slot %q no longer exists (dropped); changes committed since its last confirmed position may be gone. "+
			"Check what is still pending (`exactly outbox status`), then run pgcdc.DropSlot to forget the slot and start afresh", ErrSlotLost, slot)
	case s.walStatus == "lost":
		return fmt.Errorf("%w: slot %q no longer holds the WAL it needs (wal_status lost, see max_slot_wal_keep_size); changes may be gone. "+
			"Check what is still pending (`exactly outbox status`), then run pgcdc.DropSlot to forget the slot and start afresh", ErrSlotInvalidated, slot)
	}
	return nil
}

// setupSlot makes sure the slot exists and is the one recorded, creating it
// on first start: then the rows already pending in the outbox table are read
// in the slot's snapshot and published before streaming starts. conn is a
// replication connection that has not started streaming.
func (r *Relay) setupSlot(ctx context.Context, conn *replConn) error {
	// One relay sets up a slot at a time: a standby waits here.
	lock, err := r.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer lock.Release()
	if _, err := lock.Exec(ctx, "SELECT pg_advisory_lock(hashtext($1))", "exactly_cdc_slot:"+r.cfg.Slot); err != nil {
		return err
	}
	defer lock.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock(hashtext($1))", "exactly_cdc_slot:"+r.cfg.Slot)

	st, err := r.slotState(ctx)
	if err != nil {
		return err
	}
	var state string
	if err := r.pool.QueryRow(ctx, "SELECT state FROM "+r.registry()+" WHERE slot_name = $1", r.cfg.Slot).Scan(&state); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return err
	}
	var db string
	if err := r.pool.QueryRow(ctx, "SELECT current_database()").Scan(&db); err != nil {
		return err
	}
	switch {
	case st.exists && state == stateBackfill:
		// A relay died while publishing what was pending at creation; the
		// slot may already hold changes it never published, so nothing of
		// it was confirmed: start over.
		r.log.Warn("the slot was created but its initial backlog was not finished; recreating it", "slot", r.cfg.Slot)
		if _, err := r.pool.Exec(ctx, "SELECT pg_drop_replication_slot($1)", r.cfg.Slot); err != nil {
			return fmt.Errorf("pgcdc: dropping the unfinished slot %q: %w", r.cfg.Slot, err)
		}
	case st.exists:
		switch {
		case st.slotType != "logical" || st.plugin != "pgoutput":
			return fmt.Errorf("pgcdc: slot %q exists but is a %s slot with plugin %q; pgcdc needs a logical slot with pgoutput: name another slot", r.cfg.Slot, st.slotType, st.plugin)
		case st.db != db:
			return fmt.Errorf("pgcdc: slot %q belongs to database %q, not %q: name another slot", r.cfg.Slot, st.db, db)
		}
		if err := st.usable(r.cfg.Slot); err != nil {
			return err
		}
		if state == "" {
			r.log.Warn("adopting an existing slot this relay did not create; rows committed before it was created are not published by it", "slot", r.cfg.Slot)
			if _, err := r.pool.Exec(ctx, "INSERT INTO "+r.registry()+" (slot_name, state) VALUES ($1, $2) ON CONFLICT (slot_name) DO NOTHING", r.cfg.Slot, stateStreaming); err != nil {
				return err
			}
		}
		return nil
	case state == stateStreaming:
		return st.usable(r.cfg.Slot) // the slot is gone
	}

	if _, err := r.pool.Exec(ctx, "INSERT INTO "+r.registry()+" (slot_name, state) VALUES ($1, $2) ON CONFLICT (slot_name) DO UPDATE SET state = excluded.state, updated_at = now()",
		r.cfg.Slot, stateBackfill); err != nil {
		return err
	}
	created, err := pglogrepl.CreateReplicationSlot(ctx, conn.pg, r.cfg.Slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "EXPORT_SNAPSHOT"})
	if err != nil {
		return fmt.Errorf("pgcdc: creating slot %q: %w", r.cfg.Slot, err)
	}
	point, err := ParseLSN(created.ConsistentPoint)
	if err != nil {
		return fmt.Errorf("pgcdc: creating slot %q: %w", r.cfg.Slot, err)
	}
	r.log.Info("replication slot created", "slot", r.cfg.Slot, "lsn", point.String())
	if err := r.backfill(ctx, created.SnapshotName, point); err != nil {
		return err
	}
	if _, err := r.pool.Exec(context.WithoutCancel(ctx), "UPDATE "+r.registry()+" SET state = $2, updated_at = now() WHERE slot_name = $1", r.cfg.Slot, stateStreaming); err != nil {
		return err
	}
	return nil
}

// backfill publishes the rows pending in the outbox table as of the slot's
// snapshot, and waits until they are all confirmed or parked.
func (r *Relay) backfill(ctx context.Context, snapshot string, point LSN) error {
	var rows []outboxstore.Row
	err := pgx.BeginTxFunc(ctx, r.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET TRANSACTION SNAPSHOT '"+strings.ReplaceAll(snapshot, "'", "")+"'"); err != nil {
			return err
		}
		return r.store.PendingSnapshotPgx(ctx, tx, func(row outboxstore.Row) error {
			rows = append(rows, row)
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("pgcdc: reading the pending rows in the slot's snapshot: %w", err)
	}
	u := &unit{lsn: point, commitTime: time.Now()}
	r.track.push(u)
	noWait := func() error { return nil }
	for i, row := range rows {
		e := &entry{pos: position{lsn: point, idx: i}, unit: u, msg: row.Msg, seq: row.Seq, src: srcBackfill, bad: exactly.Unpublishable(row.Bad)}
		if err := r.dispatch(ctx, e, noWait); err != nil {
			return err
		}
	}
	r.track.seal(u, point)
	if len(rows) > 0 {
		r.log.Info("publishing the rows pending when the slot was created", "rows", len(rows))
	}
	for !r.track.finished(u) {
		select {
		case <-ctx.Done():
			if r.track.finished(u) {
				return nil
			}
			return ctx.Err()
		case <-r.fatal:
			return r.fatalErr
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// DropSlot drops the replication slot and forgets it, so that the next Run
// creates a new one (and publishes the rows then pending in the outbox
// table). It is the deliberate way to remove a slot, and the way to go on
// after ErrSlotLost or ErrSlotInvalidated. Stop the relay first: a slot in
// use cannot be dropped. The publication is left in place.
func DropSlot(ctx context.Context, dsn, slot string) error {
	if !slotName.MatchString(slot) {
		return fmt.Errorf("pgcdc: DropSlot: bad slot name %q", slot)
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("pgcdc: DropSlot: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	// A relay that just stopped leaves its WAL sender for a moment: wait
	// up to 5s for the slot to be released.
	for attempt := 0; ; attempt++ {
		_, err := conn.Exec(ctx, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slot)
		if err == nil {
			break
		}
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "55006" || attempt >= 50 {
			return fmt.Errorf("pgcdc: DropSlot %q (stop the relay using it first): %w", slot, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	rows, err := conn.Query(ctx, "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = $1 AND c.relkind = 'r'", registryTable)
	if err != nil {
		return fmt.Errorf("pgcdc: DropSlot: %w", err)
	}
	schemas, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("pgcdc: DropSlot: %w", err)
	}
	for _, s := range schemas {
		if _, err := conn.Exec(ctx, "DELETE FROM "+quoteIdent(s)+"."+quoteIdent(registryTable)+" WHERE slot_name = $1", slot); err != nil {
			return fmt.Errorf("pgcdc: DropSlot: %w", err)
		}
	}
	return nil
}
