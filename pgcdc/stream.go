package pgcdc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/exactlyonce/exactly"
)

// replConn is a replication connection.
type replConn struct {
	pg       *pgconn.PgConn
	lastSent LSN
}

func connectReplication(ctx context.Context, dsn string) (*replConn, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["application_name"] = "exactly-pgcdc"
	pg, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return &replConn{pg: pg}, nil
}

// status sends the standby status update: lsn is reported written, flushed
// and applied. Never 0: the server would take it as "no position".
func (c *replConn) status(lsn LSN) error {
	if lsn == 0 {
		return nil
	}
	c.lastSent = lsn
	return pglogrepl.SendStandbyStatusUpdate(context.Background(), c.pg, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: pglogrepl.LSN(lsn), WALFlushPosition: pglogrepl.LSN(lsn), WALApplyPosition: pglogrepl.LSN(lsn),
	})
}

func (c *replConn) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c.pg.Close(ctx)
}

// session is the decoding state of one replication connection.
type session struct {
	r    *Relay
	conn *replConn
	rels map[uint32]*relation
	cur  *unit // the transaction being received
	skip bool  // cur was received before (reconnect): skip it
	// resume counts the messages of cur already received before a
	// reconnect, which the stream sends again.
	resume     int
	nextStatus time.Time
	cols       []colValue
}

// The stream's positions across sessions, to drop what a new session sends
// again: lastTxn is the commit LSN of the last transaction (or
// non-transactional message) received, lastUnit its unit; lastMarker the
// last keepalive or heartbeat position.
type streamState struct {
	lastTxn    LSN
	lastUnit   *unit
	lastMarker LSN
	slotReady  bool
}

// stream runs replication sessions until ctx ends, reconnecting after
// failures. It returns the live connection (for the final status update)
// or a fatal error.
func (r *Relay) stream(ctx context.Context) (*replConn, error) {
	var st streamState
	failures := 0
	for {
		conn, received, err := r.session(ctx, &st)
		if ctx.Err() != nil {
			return conn, nil
		}
		if conn != nil {
			conn.close()
		}
		if fatal := r.classify(ctx, err); fatal != nil {
			return nil, fatal
		}
		if received {
			failures = 0
		}
		failures++
		wait := min(r.backoff(failures), 10*time.Second)
		r.log.Warn("replication connection failed; reconnecting", "err", err, "in", wait)
		r.stats.reconnects.Add(1)
		select {
		case <-ctx.Done():
			return nil, nil
		case <-time.After(wait):
		}
	}
}

// classify returns a fatal error for failures that no reconnect can fix.
func (r *Relay) classify(ctx context.Context, err error) error {
	if errors.Is(err, ErrSlotLost) || errors.Is(err, ErrSlotInvalidated) {
		return err
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return nil // the network, the server restarting
	}
	switch pgErr.Code {
	case "55006", "57P01", "57P02", "57P03", "53300", "08006", "08003", "08000":
		// slot in use by another connection, server shutting down or
		// starting, too many connections: wait and retry
		return nil
	case "42704", "55000":
		// an object missing, or the slot can no longer be used: check the
		// slot for a clear error
		if st, serr := r.slotState(ctx); serr == nil {
			if uerr := st.usable(r.cfg.Slot); uerr != nil {
				return uerr
			}
		}
		return fmt.Errorf("pgcdc: replication failed: %w", err)
	case "42501", "28000", "28P01":
		return fmt.Errorf("pgcdc: the role may not replicate (it needs the REPLICATION attribute): %w", err)
	}
	return nil
}

// session runs one replication connection. It reports whether anything was
// received, and returns the connection when ctx ended (to send the final
// status after the pipeline finished).
func (r *Relay) session(ctx context.Context, st *streamState) (*replConn, bool, error) {
	conn, err := connectReplication(ctx, r.cfg.DSN)
	if err != nil {
		return nil, false, err
	}
	if !st.slotReady {
		if err := r.setupSlot(ctx, conn); err != nil {
			return conn, false, err
		}
		st.slotReady = true
		r.slotUp.Store(true)
	}
	slot, err := r.slotState(ctx)
	if err != nil {
		return conn, false, err
	}
	if err := slot.usable(r.cfg.Slot); err != nil {
		return conn, false, err
	}
	// Never report a position below the slot's: the server would move the
	// slot back.
	r.track.mu.Lock()
	if slot.confirmed > r.track.confirmed {
		r.track.confirmed = slot.confirmed
	}
	r.track.mu.Unlock()

	args := []string{"proto_version '1'", "publication_names '" + r.cfg.Publication + "'", "messages 'true'"}
	if err := pglogrepl.StartReplication(ctx, conn.pg, r.cfg.Slot, 0, pglogrepl.StartReplicationOptions{
		Mode: pglogrepl.LogicalReplication, PluginArgs: args,
	}); err != nil {
		return conn, false, err
	}
	r.log.Info("streaming", "slot", r.cfg.Slot, "from", slot.confirmed.String())
	s := &session{r: r, conn: conn, rels: map[uint32]*relation{}}
	received := false
	for {
		if ctx.Err() != nil {
			return conn, received, nil
		}
		if err := s.maybeStatus(false); err != nil {
			return conn, received, err
		}
		if r.writeTrouble.Load() {
			return conn, received, errors.New("pgcdc: the database refuses the relay's writes; disconnecting the stream until it accepts them")
		}
		rctx, cancel := context.WithDeadline(ctx, s.nextStatus)
		msg, err := conn.pg.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return conn, received, nil
			}
			if pgconn.Timeout(err) {
				continue
			}
			return conn, received, err
		}
		switch m := msg.(type) {
		case *pgproto3.CopyData:
			if len(m.Data) == 0 {
				continue
			}
			switch m.Data[0] {
			case pglogrepl.PrimaryKeepaliveMessageByteID:
				ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(m.Data[1:])
				if err != nil {
					return conn, received, err
				}
				s.marker(LSN(ka.ServerWALEnd), st)
				if err := s.maybeStatus(ka.ReplyRequested); err != nil {
					return conn, received, err
				}
			case pglogrepl.XLogDataByteID:
				xld, err := pglogrepl.ParseXLogData(m.Data[1:])
				if err != nil {
					return conn, received, err
				}
				received = true
				if err := s.handle(ctx, xld, st); err != nil {
					return conn, received, err
				}
			}
		case *pgproto3.ErrorResponse:
			return conn, received, pgconn.ErrorResponseToPgError(m)
		case *pgproto3.CopyDone:
			return conn, received, errors.New("pgcdc: the server ended the replication stream")
		}
	}
}

// maybeStatus sends the confirmed position when it is due (or now).
func (s *session) maybeStatus(now bool) error {
	t := time.Now()
	if !now && t.Before(s.nextStatus) {
		return nil
	}
	s.nextStatus = t.Add(s.r.cfg.StatusInterval)
	return s.conn.status(s.r.track.position())
}

// marker records a position with no message of ours before it that was not
// received: a keepalive's WAL end, a heartbeat. Ignored inside a
// transaction.
func (s *session) marker(lsn LSN, st *streamState) {
	if s.cur != nil || lsn <= st.lastMarker || lsn <= st.lastTxn {
		return
	}
	st.lastMarker = lsn
	u := &unit{lsn: lsn, end: lsn, sealed: true}
	st.lastUnit = u
	s.r.track.push(u)
	s.r.stats.receivedLSN.Store(uint64(lsn))
}

// handle decodes one pgoutput message.
func (s *session) handle(ctx context.Context, xld pglogrepl.XLogData, st *streamState) error {
	data := xld.WALData
	if len(data) == 0 {
		return nil
	}
	r := s.r
	switch pglogrepl.MessageType(data[0]) {
	case pglogrepl.MessageTypeRelation:
		m, err := pglogrepl.Parse(data)
		if err != nil {
			return err
		}
		rm := m.(*pglogrepl.RelationMessage)
		kind := relOther
		for _, t := range r.tables {
			if t.schema == rm.Namespace && t.name == rm.RelationName {
				kind = t.kind
			}
		}
		names := make([]string, len(rm.Columns))
		types := make([]uint32, len(rm.Columns))
		for i, c := range rm.Columns {
			names[i], types[i] = c.Name, c.DataType
		}
		rel, err := newRelation(kind, rm.Namespace+"."+rm.RelationName, names, types)
		if err != nil {
			r.fail(err)
			return err
		}
		s.rels[rm.RelationID] = rel

	case pglogrepl.MessageTypeBegin:
		m, err := pglogrepl.Parse(data)
		if err != nil {
			return err
		}
		b := m.(*pglogrepl.BeginMessage)
		final := LSN(b.FinalLSN)
		s.skip, s.resume = false, 0
		switch lu := st.lastUnit; {
		case lu != nil && lu.lsn == final && !lu.sealed:
			// Received in part before a reconnect: go on after that part.
			s.cur, s.resume = lu, lu.count
		case final < st.lastMarker || final <= st.lastTxn:
			s.skip = true // received before a reconnect
			s.cur = &unit{lsn: final}
		default:
			s.cur = &unit{lsn: final, commitTime: b.CommitTime, xid: b.Xid}
			st.lastTxn, st.lastUnit = final, s.cur
			r.track.push(s.cur)
		}

	case pglogrepl.MessageTypeCommit:
		m, err := pglogrepl.Parse(data)
		if err != nil {
			return err
		}
		c := m.(*pglogrepl.CommitMessage)
		if s.cur != nil && !s.skip {
			r.track.seal(s.cur, LSN(c.TransactionEndLSN))
		}
		s.cur, s.skip = nil, false
		r.stats.receivedLSN.Store(uint64(c.TransactionEndLSN))

	case pglogrepl.MessageTypeInsert, pglogrepl.MessageTypeUpdate:
		if s.cur == nil || s.skip || len(data) < 6 {
			return nil
		}
		rel := s.rels[binary.BigEndian.Uint32(data[1:])]
		if rel == nil || rel.kind == relOther {
			return nil
		}
		return s.row(ctx, pglogrepl.MessageType(data[0]), rel, data[5:])

	case pglogrepl.MessageTypeMessage:
		m, err := pglogrepl.Parse(data)
		if err != nil {
			return err
		}
		lm := m.(*pglogrepl.LogicalDecodingMessage)
		if lm.Prefix == HeartbeatPrefix && !lm.Transactional {
			s.marker(LSN(lm.LSN), st)
			return nil
		}
		if !r.cfg.Messages || lm.Prefix != r.cfg.MessagePrefix {
			return nil
		}
		msg, derr := decodeEmitted(lm.Content)
		if lm.Transactional {
			if s.cur == nil || s.skip {
				return nil
			}
			return s.add(ctx, msg, derr, 0, srcMessage)
		}
		// A non-transactional message is its own unit.
		lsn := LSN(lm.LSN)
		if lsn <= st.lastTxn || lsn < st.lastMarker {
			return nil
		}
		u := &unit{lsn: lsn, commitTime: time.Now()}
		st.lastTxn, st.lastUnit = lsn, u
		r.track.push(u)
		s.cur = u
		err = s.add(ctx, msg, derr, 0, srcMessage)
		s.cur = nil
		r.track.seal(u, lsn)
		return err
	}
	return nil
}

// row decodes an insert or update of one of the outbox tables.
func (s *session) row(ctx context.Context, typ pglogrepl.MessageType, rel *relation, src []byte) error {
	r := s.r
	if len(src) < 1 {
		return errors.New("pgoutput: short row message")
	}
	if typ == pglogrepl.MessageTypeUpdate {
		if rel.kind != relOutbox {
			return nil
		}
		if src[0] == 'K' || src[0] == 'O' { // the old tuple: not needed
			_, rest, err := parseTuple(src[1:], s.cols)
			if err != nil {
				return err
			}
			src = rest
		}
	}
	if len(src) < 1 || src[0] != 'N' {
		return errors.New("pgoutput: row message without a new tuple")
	}
	cols, _, err := parseTuple(src[1:], s.cols)
	if err != nil {
		return err
	}
	s.cols = cols
	switch rel.kind {
	case relDebezium:
		msg, derr := rel.debeziumRow(cols, r.cfg.Debezium, s.cur.commitTime)
		return s.add(ctx, msg, derr, 0, srcDebezium)
	case relOutbox:
		seq, msg, status, attempts, derr := rel.outboxRow(cols)
		if derr != nil {
			return s.add(ctx, msg, fmt.Errorf("row %d of %s: %w", seq, rel.name, derr), seq, srcTable)
		}
		if status != 0 {
			return nil // parked (ours), or sent by a polling relay
		}
		if typ == pglogrepl.MessageTypeUpdate {
			if attempts != 0 {
				return nil // not a re-drive
			}
			// A parked row made pending again (outbox.RetryDead).
			if !rel.complete(cols) {
				row, ok, err := r.store.PendingRowPgx(ctx, r.pool, seq)
				if err != nil {
					return fmt.Errorf("pgcdc: reading re-driven row %d: %w", seq, err)
				}
				if !ok {
					return s.add(ctx, msg, errGone, seq, srcTable)
				}
				msg = row.Msg
				if row.Bad != nil {
					return s.add(ctx, msg, row.Bad, seq, srcTable)
				}
			}
			r.log.Info("re-driven row published again", "seq", seq, "id", msg.ID)
		}
		return s.add(ctx, msg, nil, seq, srcTable)
	}
	return nil
}

// errGone marks a re-driven row that is no longer there: nothing to do.
var errGone = errors.New("row gone")

// add turns a decoded message into an entry of the current unit. A message
// that cannot be decoded is parked at once with the reason.
func (s *session) add(ctx context.Context, msg exactly.Message, decodeErr error, seq int64, src source) error {
	r := s.r
	u := s.cur
	idx := u.count
	if s.resume > 0 {
		s.resume--
		return nil // received before the reconnect, in the pipeline already
	}
	pos := position{lsn: u.lsn, idx: idx}
	e := &entry{pos: pos, unit: u, msg: msg, seq: seq, src: src}
	if errors.Is(decodeErr, errGone) {
		r.track.skip(u)
		return nil
	}
	if r.ckpt != nil && pos.lessEq(*r.ckpt) {
		// Already in Kafka, committed with its checkpoint: not published
		// again; its row is still deleted.
		r.stats.skipped.Add(1)
		if seq == 0 || r.cfg.KeepRows {
			r.track.skip(u)
			return nil
		}
		e.inKafka = true
		return r.dispatch(ctx, e, func() error { return s.maybeStatus(false) })
	}
	if decodeErr == nil {
		decodeErr = msg.Validate()
	}
	if decodeErr != nil {
		if e.msg.ID == "" {
			e.msg.ID = exactly.NewID()
		}
		if e.msg.Topic == "" {
			e.msg.Topic = "undecodable"
		}
		e.msg.ID = truncate(e.msg.ID, exactly.MaxIDLen)
		e.msg.Topic = truncate(e.msg.Topic, exactly.MaxTopicLen)
		e.msg.Key = truncate(e.msg.Key, exactly.MaxKeyLen)
		r.log.Error("undecodable outbox message; parking it", "id", e.msg.ID, "lsn", pos.String(), "err", decodeErr)
		e.bad = exactly.Unpublishable(decodeErr)
	}
	return r.dispatch(ctx, e, func() error { return s.maybeStatus(false) })
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
