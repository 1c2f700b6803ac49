package console

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"html/template"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
)

// Overview is the overview page.
type Overview struct {
	Table                string  `json:"table"`
	Pending              int64   `json:"pending"`
	Dead                 int64   `json:"dead"`
	OldestPendingSeconds float64 `json:"oldest_pending_age_seconds"`
	Failing              int64   `json:"failing"`
	BlockedKeys          int64   `json:"blocked_keys"`
	// PublishedPerSecond is the rate between the last two samples; null
	// until the console has taken two.
	PublishedPerSecond *float64 `json:"published_per_second"`
	// RateSource says where the rate comes from: "relay" (the counters of
	// a relay in this process) or "estimate" (from the table, see the
	// package doc).
	RateSource string        `json:"rate_source"`
	Topics     []TopicRow    `json:"topics"`
	Samples    []Sample      `json:"samples"`
	Since      time.Time     `json:"sampling_since"`
	Interval   float64       `json:"sample_interval_seconds"`
	Chart      template.HTML `json:"-"`
}

// TopicRow is one topic of the overview.
type TopicRow struct {
	Topic                string  `json:"topic"`
	Pending              int64   `json:"pending"`
	Dead                 int64   `json:"dead"`
	OldestPendingSeconds float64 `json:"oldest_pending_age_seconds"`
	// PublishedPerSecond is the topic's rows marked sent in the last
	// minute, per second: null when the table kept none (a relay without
	// retention deletes the rows it publishes).
	PublishedPerSecond *float64 `json:"published_per_second"`
}

func (c *Console) overview(r *http.Request) (any, error) {
	ctx := r.Context()
	st, err := c.cfg.Outbox.Status(ctx, c.db)
	if err != nil {
		return nil, err
	}
	sent, err := c.store().SentSince(ctx, c.db, time.Now().Add(-time.Minute).UnixMilli())
	if err != nil {
		return nil, fmt.Errorf("outbox %s: sent rows: %w", c.cfg.Outbox.Table(), err)
	}
	o := Overview{Table: c.cfg.Outbox.Table(), Pending: st.Pending, Dead: st.Dead, OldestPendingSeconds: st.OldestAge.Seconds(),
		Failing: st.Failing.Messages, BlockedKeys: st.Failing.BlockedKeys, RateSource: "estimate", Topics: []TopicRow{},
		Interval: c.cfg.SampleInterval.Seconds()}
	if c.cfg.Metrics != nil {
		o.RateSource = "relay"
	}
	seen := map[string]bool{}
	for _, t := range st.Topics {
		row := TopicRow{Topic: t.Topic, Pending: t.Pending, Dead: t.Dead, OldestPendingSeconds: t.OldestAge.Seconds()}
		if n, ok := sent[t.Topic]; ok {
			v := float64(n) / 60
			row.PublishedPerSecond = &v
		}
		seen[t.Topic] = true
		o.Topics = append(o.Topics, row)
	}
	for t, n := range sent { // topics with nothing pending or dead
		if !seen[t] {
			v := float64(n) / 60
			o.Topics = append(o.Topics, TopicRow{Topic: t, PublishedPerSecond: &v})
		}
	}
	sort.Slice(o.Topics, func(i, j int) bool { return o.Topics[i].Topic < o.Topics[j].Topic })
	o.Samples, o.Since = c.Samples()
	if n := len(o.Samples); n > 0 && o.Samples[n-1].PublishedPerSecond != nil {
		o.PublishedPerSecond = o.Samples[n-1].PublishedPerSecond
	}
	o.Chart = chart(o.Samples, time.Now(), c.cfg.SampleInterval)
	return o, nil
}

func (c *Console) store() *outboxstore.Store { return outboxstore.For(c.cfg.Outbox) }

// DeadRow is a dead message of the dead page.
type DeadRow struct {
	ID        string            `json:"id"`
	Topic     string            `json:"topic"`
	Key       string            `json:"key"`
	Attempts  int               `json:"attempts"`
	DeadAt    time.Time         `json:"dead_at"`
	CreatedAt time.Time         `json:"created_at"`
	LastError string            `json:"last_error"`
	Headers   map[string]string `json:"headers,omitempty"`
	Size      int               `json:"payload_bytes"`
}

// DeadPage is the dead page: the filter and the messages it matched.
type DeadPage struct {
	Filter   DeadQuery `json:"filter"`
	Messages []DeadRow `json:"messages"`
	// More is set when the limit cut the list.
	More bool `json:"more"`
}

// DeadQuery is the dead page's filter; empty fields match all.
type DeadQuery struct {
	Topic string `json:"topic"`
	Key   string `json:"key"`
	ID    string `json:"id"`
	Error string `json:"error"` // a piece of the last error's text, any case
	Limit int    `json:"limit"`
}

// maxList bounds the messages one page lists, and one action changes.
const maxList = 1000

func deadQuery(r *http.Request) (DeadQuery, error) {
	q := r.URL.Query()
	d := DeadQuery{Topic: q.Get("topic"), Key: q.Get("key"), ID: strings.TrimSpace(q.Get("id")), Error: q.Get("error"), Limit: 100}
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > maxList {
			return d, &badRequest{fmt.Sprintf("limit %q: want a number from 1 to %d", l, maxList)}
		}
		d.Limit = n
	}
	return d, nil
}

// listDead reads the dead messages d matches, up to d.Limit, and whether
// there are more.
func (c *Console) listDead(r *http.Request, d DeadQuery) ([]DeadRow, bool, error) {
	f := outbox.DeadFilter{Topic: d.Topic, Key: d.Key, Limit: d.Limit + 1}
	if d.ID != "" {
		f.IDs = []string{d.ID}
	}
	if d.Error != "" {
		// The error text is matched here, not in SQL: read up to the bound.
		f.Limit = maxList + 1
	}
	msgs, err := c.cfg.Outbox.ListDead(r.Context(), c.db, f)
	if err != nil {
		return nil, false, err
	}
	out := []DeadRow{}
	needle := strings.ToLower(d.Error)
	for _, m := range msgs {
		if needle != "" && !strings.Contains(strings.ToLower(m.LastError), needle) {
			continue
		}
		out = append(out, deadRow(m))
	}
	more := len(out) > d.Limit || (d.Error != "" && len(msgs) > maxList)
	if len(out) > d.Limit {
		out = out[:d.Limit]
	}
	return out, more, nil
}

func deadRow(m outbox.DeadMessage) DeadRow {
	return DeadRow{ID: m.Message.ID, Topic: m.Message.Topic, Key: m.Message.Key, Attempts: m.Attempts,
		DeadAt: m.DeadAt.UTC(), CreatedAt: m.Message.CreatedAt.UTC(), LastError: m.LastError, Headers: m.Message.Headers,
		Size: len(m.Message.Payload)}
}

func (c *Console) dead(r *http.Request) (any, error) {
	d, err := deadQuery(r)
	if err != nil {
		return nil, err
	}
	rows, more, err := c.listDead(r, d)
	if err != nil {
		return nil, err
	}
	return DeadPage{Filter: d, Messages: rows, More: more}, nil
}

// BlockedRow is a key held back by its failing head message.
type BlockedRow struct {
	ID            string    `json:"id"`
	Topic         string    `json:"topic"`
	Key           string    `json:"key"`
	Attempts      int       `json:"attempts"`
	LastError     string    `json:"last_error"`
	NextAttemptAt time.Time `json:"next_attempt_at"`
	AgeSeconds    float64   `json:"age_seconds"`
	Waiting       int64     `json:"waiting"`
}

// NewBlockedRow is the row of b, as the console's API and `exactly outbox
// status --json` give it.
func NewBlockedRow(b outbox.Blocked) BlockedRow {
	return BlockedRow{ID: b.ID, Topic: b.Topic, Key: b.Key, Attempts: b.Attempts, LastError: b.LastError,
		NextAttemptAt: b.NextAttemptAt.UTC(), AgeSeconds: b.Age.Seconds(), Waiting: b.Waiting}
}

// BlockedPage is the blocked page.
type BlockedPage struct {
	Failing     int64        `json:"failing"`
	BlockedKeys int64        `json:"blocked_keys"`
	Messages    []BlockedRow `json:"messages"`
}

func (c *Console) blocked(r *http.Request) (any, error) {
	st, err := c.cfg.Outbox.Status(r.Context(), c.db)
	if err != nil {
		return nil, err
	}
	p := BlockedPage{Failing: st.Failing.Messages, BlockedKeys: st.Failing.BlockedKeys, Messages: []BlockedRow{}}
	if st.Failing.Messages == 0 {
		return p, nil
	}
	bs, err := c.cfg.Outbox.ListBlocked(r.Context(), c.db, 200)
	if err != nil {
		return nil, err
	}
	for _, b := range bs {
		p.Messages = append(p.Messages, NewBlockedRow(b))
	}
	return p, nil
}

// RelaysPage is the relays page: the partitions' leases, the relays'
// heartbeats, and the CDC slots.
type RelaysPage struct {
	Owners []OwnerRow `json:"owners"`
	Leases []LeaseRow `json:"leases"`
	Slots  []SlotRow  `json:"slots"`
	// InProcess is the relay in this process, when Config.Metrics is set.
	InProcess *LocalRelay `json:"in_process,omitempty"`
}

// OwnerRow is a relay known by its heartbeat or its leases.
type OwnerRow struct {
	Owner               string    `json:"owner"`
	HeartbeatAt         time.Time `json:"heartbeat_at"`
	HeartbeatAgeSeconds *float64  `json:"heartbeat_age_seconds"` // null: no heartbeat row
	Partitions          []int64   `json:"partitions"`
}

// LeaseRow is one partition's lease.
type LeaseRow struct {
	Partition        int64     `json:"partition"`
	Owner            string    `json:"owner"`
	ExpiresAt        time.Time `json:"expires_at"`
	ExpiresInSeconds float64   `json:"expires_in_seconds"` // negative: expired
}

// SlotRow is a CDC slot.
type SlotRow struct {
	Name      string `json:"name"`
	Exists    bool   `json:"exists"`
	Active    bool   `json:"active"`
	WALStatus string `json:"wal_status"`
	Confirmed string `json:"confirmed_lsn"`
	LagBytes  int64  `json:"lag_bytes"`
	// LagSeconds is the age of the oldest transaction the relay in this
	// process received and has not confirmed; null without one.
	LagSeconds *float64 `json:"lag_seconds"`
}

// LocalRelay is what the metrics of the relay in this process say.
type LocalRelay struct {
	Published      float64 `json:"published_total"`
	Failed         float64 `json:"failed_total"`
	Dead           float64 `json:"dead_total"`
	PartitionsHeld float64 `json:"partitions_held"`
}

func (c *Console) relays(r *http.Request) (any, error) {
	ctx := r.Context()
	s := c.store()
	leases, err := s.Leases(ctx, c.db)
	if err != nil {
		return nil, fmt.Errorf("outbox %s: leases: %w", s.Table, err)
	}
	beats, err := s.Heartbeats(ctx, c.db)
	if err != nil {
		return nil, fmt.Errorf("outbox %s: heartbeats: %w", s.Table, err)
	}
	now := time.Now()
	p := RelaysPage{Owners: []OwnerRow{}, Leases: []LeaseRow{}, Slots: []SlotRow{}}
	owners := map[string]*OwnerRow{}
	owner := func(name string) *OwnerRow {
		if o, ok := owners[name]; ok {
			return o
		}
		o := &OwnerRow{Owner: name, Partitions: []int64{}}
		owners[name] = o
		return o
	}
	for _, b := range beats {
		o := owner(b.Owner)
		o.HeartbeatAt = b.HeartbeatAt.UTC()
		a := max(now.Sub(b.HeartbeatAt).Seconds(), 0)
		o.HeartbeatAgeSeconds = &a
	}
	for _, l := range leases {
		row := LeaseRow{Partition: l.Part, Owner: l.Owner}
		if !l.ExpiresAt.IsZero() {
			row.ExpiresAt = l.ExpiresAt.UTC()
			row.ExpiresInSeconds = l.ExpiresAt.Sub(now).Seconds()
		}
		if l.Owner != "" && l.ExpiresAt.After(now) {
			o := owner(l.Owner)
			o.Partitions = append(o.Partitions, l.Part)
		}
		p.Leases = append(p.Leases, row)
	}
	for _, o := range owners {
		p.Owners = append(p.Owners, *o)
	}
	sort.Slice(p.Owners, func(i, j int) bool { return p.Owners[i].Owner < p.Owners[j].Owner })
	m := c.metrics()
	for _, name := range c.cfg.Slots {
		st, err := pgcdc.ReadSlot(ctx, c.db, name)
		if err != nil {
			return nil, err
		}
		row := SlotRow{Name: name, Exists: st.Exists, Active: st.Active, WALStatus: st.WALStatus, LagBytes: st.LagBytes}
		if st.Exists {
			row.Confirmed = st.ConfirmedLSN.String()
		}
		if v, ok := m["exactly_cdc_slot_lag_seconds"]; ok && st.Active {
			row.LagSeconds = &v
		}
		p.Slots = append(p.Slots, row)
	}
	if c.cfg.Metrics != nil {
		p.InProcess = &LocalRelay{Published: m["exactly_relay_published_total"], Failed: m["exactly_relay_failed_total"],
			Dead: m["exactly_relay_dead_total"], PartitionsHeld: m["exactly_relay_partitions_held"]}
	}
	return p, nil
}

// metrics reads the unlabelled counters and gauges of Config.Metrics.
func (c *Console) metrics() map[string]float64 {
	out := map[string]float64{}
	if c.cfg.Metrics == nil {
		return out
	}
	fams, err := c.cfg.Metrics.Gather()
	if err != nil {
		c.log.Warn("console: gathering the relay's metrics", "err", err)
	}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			if len(m.GetLabel()) > 0 {
				continue
			}
			switch {
			case m.Counter != nil:
				out[f.GetName()] = m.Counter.GetValue()
			case m.Gauge != nil:
				out[f.GetName()] = m.Gauge.GetValue()
			}
		}
	}
	return out
}

// InboxPage is the inbox page: per table, per consumer.
type InboxPage struct {
	Tables []InboxTable `json:"tables"`
}

// InboxTable is one inbox table.
type InboxTable struct {
	Table     string        `json:"table"`
	Consumers []ConsumerRow `json:"consumers"`
}

// ConsumerRow is one consumer's records.
type ConsumerRow struct {
	Consumer         string    `json:"consumer"`
	Records          int64     `json:"records"`
	OldestRecordAt   time.Time `json:"oldest_record_at"`
	OldestAgeSeconds float64   `json:"oldest_record_age_seconds"`
	// Duplicates is how many deliveries the consumer suppressed since it
	// started, known only for consumers in this process (Config.InboxStats).
	Duplicates *int64 `json:"duplicates"`
	Processed  *int64 `json:"processed"`
}

func (c *Console) inbox(r *http.Request) (any, error) {
	p := InboxPage{Tables: []InboxTable{}}
	var stats map[string]struct{ processed, duplicates int64 }
	if c.cfg.InboxStats != nil {
		stats = map[string]struct{ processed, duplicates int64 }{}
		for name, s := range c.cfg.InboxStats() {
			stats[name] = struct{ processed, duplicates int64 }{s.Processed, s.Duplicates}
		}
	}
	now := time.Now()
	for _, s := range c.inboxes {
		counts, err := s.Consumers(r.Context(), c.db)
		if err != nil {
			return nil, fmt.Errorf("inbox %s: %w", s.Table, err)
		}
		t := InboxTable{Table: s.Table.String(), Consumers: []ConsumerRow{}}
		for _, n := range counts {
			row := ConsumerRow{Consumer: n.Consumer, Records: n.Records, OldestRecordAt: n.Oldest.UTC(),
				OldestAgeSeconds: max(now.Sub(n.Oldest).Seconds(), 0)}
			if st, ok := stats[n.Consumer]; ok {
				row.Duplicates, row.Processed = &st.duplicates, &st.processed
			}
			t.Consumers = append(t.Consumers, row)
		}
		p.Tables = append(p.Tables, t)
	}
	return p, nil
}

// FindPage is where a message is now, found by id.
type FindPage struct {
	ID     string        `json:"id"`
	Outbox []FoundRow    `json:"outbox"`
	Inbox  []InboxClaims `json:"inbox"`
	// Hex shows the payloads in hexadecimal (?view=hex).
	Hex bool `json:"-"`
}

// FoundRow is one outbox row with the id.
type FoundRow struct {
	Status        string            `json:"status"` // pending, sent or dead
	Seq           int64             `json:"seq"`
	Topic         string            `json:"topic"`
	Key           string            `json:"key"`
	Attempts      int               `json:"attempts"`
	LastError     string            `json:"last_error"`
	CreatedAt     time.Time         `json:"created_at"`
	DoneAt        *time.Time        `json:"done_at"`         // sent or dead at
	NextAttemptAt *time.Time        `json:"next_attempt_at"` // pending after a failure
	Headers       map[string]string `json:"headers,omitempty"`
	RawHeaders    string            `json:"raw_headers,omitempty"` // when they are not a flat object of strings
	Payload       []byte            `json:"payload"`
	PayloadText   string            `json:"-"`
	PayloadHex    string            `json:"-"`
	Text          bool              `json:"-"` // the payload is printable UTF-8
}

// InboxClaims is whether each consumer of an inbox table claimed the id.
type InboxClaims struct {
	Table  string     `json:"table"`
	Claims []ClaimRow `json:"claims"`
}

// ClaimRow is a consumer that applied the message.
type ClaimRow struct {
	Consumer    string    `json:"consumer"`
	ProcessedAt time.Time `json:"processed_at"`
}

var statusNames = map[int]string{outboxstore.StatusPending: "pending", outboxstore.StatusSent: "sent", outboxstore.StatusDead: "dead"}

func (c *Console) find(r *http.Request) (any, error) {
	id := strings.TrimSpace(r.URL.Query().Get("id"))
	p := FindPage{ID: id, Outbox: []FoundRow{}, Inbox: []InboxClaims{}, Hex: r.URL.Query().Get("view") == "hex"}
	if id == "" {
		return p, nil
	}
	ctx := r.Context()
	rows, err := c.store().FindByID(ctx, c.db, id)
	if err != nil {
		return nil, fmt.Errorf("outbox %s: %w", c.cfg.Outbox.Table(), err)
	}
	for _, f := range rows {
		fr := FoundRow{Status: statusNames[f.Status], Seq: f.Seq, Topic: f.Msg.Topic, Key: f.Msg.Key, Attempts: f.Attempts,
			LastError: f.LastError, CreatedAt: f.Msg.CreatedAt.UTC(), Headers: f.Msg.Headers, Payload: f.Msg.Payload,
			PayloadHex: hexDump(f.Msg.Payload), Text: printable(f.Msg.Payload)}
		if fr.Headers == nil {
			fr.RawHeaders = f.RawHeaders
		}
		if fr.Text {
			fr.PayloadText = string(f.Msg.Payload)
		}
		if !f.DoneAt.IsZero() {
			t := f.DoneAt.UTC()
			fr.DoneAt = &t
		}
		if f.Status == outboxstore.StatusPending && f.Attempts > 0 {
			t := time.UnixMilli(f.NextAttemptAt).UTC()
			fr.NextAttemptAt = &t
		}
		p.Outbox = append(p.Outbox, fr)
	}
	for _, s := range c.inboxes {
		claims, err := s.ClaimsOf(ctx, c.db, id)
		if err != nil {
			return nil, fmt.Errorf("inbox %s: %w", s.Table, err)
		}
		ic := InboxClaims{Table: s.Table.String(), Claims: []ClaimRow{}}
		for _, cl := range claims {
			ic.Claims = append(ic.Claims, ClaimRow{Consumer: cl.Consumer, ProcessedAt: cl.ProcessedAt.UTC()})
		}
		p.Inbox = append(p.Inbox, ic)
	}
	return p, nil
}

// printable tells whether a payload reads as text: valid UTF-8 without
// control characters other than line breaks and tabs.
func printable(b []byte) bool {
	if !utf8.Valid(b) {
		return false
	}
	for _, r := range string(b) {
		if r < 0x20 && r != '\n' && r != '\r' && r != '\t' || r == 0x7f {
			return false
		}
	}
	return true
}

// hexDump renders b as hex, 16 bytes a line, at most 64 KiB of it.
func hexDump(b []byte) string {
	const maxDump = 64 << 10
	cutOff := len(b) > maxDump
	if cutOff {
		b = b[:maxDump]
	}
	var out bytes.Buffer
	for i := 0; i < len(b); i += 16 {
		line := b[i:min(i+16, len(b))]
		fmt.Fprintf(&out, "%08x  %-48s\n", i, spaced(hex.EncodeToString(line)))
	}
	if cutOff {
		out.WriteString("… (cut at 64 KiB)\n")
	}
	return out.String()
}

func spaced(h string) string {
	var b strings.Builder
	for i := 0; i < len(h); i += 2 {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(h[i : i+2])
	}
	return b.String()
}
