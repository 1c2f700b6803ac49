package main

import (
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/spf13/cobra"

	"github.com/exactlyonce/exactly/console"
	"github.com/exactlyonce/exactly/inbox"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/outbox"
)

// dbFlags are the --db and --table flags every operations command takes.
type dbFlags struct {
	dsn   string
	table string
}

func (f *dbFlags) add(cmd *cobra.Command, defaultTable, what string) {
	cmd.Flags().StringVar(&f.dsn, "db", "", "database: postgres://..., 'mysql://root@tcp(127.0.0.1:3306)/test' (quoted for the shell) or sqlite:path (env EXACTLY_DB)")
	cmd.Flags().StringVar(&f.table, "table", defaultTable, what+" table name, optionally schema-qualified")
}

// connect opens the database named by --db, or EXACTLY_DB when --db is not
// given, lets check validate the configuration for its dialect before any
// connection is made, then pings it. Errors never carry the DSN's password.
func (f *dbFlags) connect(cmd *cobra.Command, check func(dialect string) error) (*sql.DB, error) {
	dsn := f.dsn
	if dsn == "" {
		dsn = envDefault("EXACTLY_DB", "")
	}
	hide.AddFrom(dsn)
	db, dialect, err := openDB(dsn)
	if err != nil {
		return nil, err
	}
	if err := check(dialect); err != nil {
		db.Close()
		return nil, err
	}
	if err := db.PingContext(cmd.Context()); err != nil {
		db.Close()
		return nil, fmt.Errorf("cannot reach the database %s: %s", hide.String(dsn), scrub(err, dsn))
	}
	return db, nil
}

// openOutbox connects and configures the outbox named by --table.
func (f *dbFlags) openOutbox(cmd *cobra.Command) (*sql.DB, *outbox.Outbox, error) {
	var ob *outbox.Outbox
	db, err := f.connect(cmd, func(dialect string) (err error) {
		ob, err = outbox.New(outbox.Config{Dialect: dialect, Table: f.table})
		return err
	})
	return db, ob, err
}

func outboxCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "outbox",
		Short: "Inspect the outbox and handle its dead messages",
	}
	cmd.AddCommand(outboxStatusCmd(), outboxDeadCmd())
	return cmd
}

type topicStatusJSON struct {
	Topic            string  `json:"topic"`
	Pending          int64   `json:"pending"`
	Dead             int64   `json:"dead"`
	OldestAgeSeconds float64 `json:"oldest_pending_age_seconds"`
}

type statusJSON struct {
	Table            string               `json:"table"`
	Pending          int64                `json:"pending"`
	Dead             int64                `json:"dead"`
	OldestAgeSeconds float64              `json:"oldest_pending_age_seconds"`
	Topics           []topicStatusJSON    `json:"topics"`
	Failing          failingJSON          `json:"failing"`
	Blocked          []console.BlockedRow `json:"blocked"`
}

type failingJSON struct {
	Messages                int64   `json:"messages"`
	BlockedKeys             int64   `json:"blocked_keys"`
	OldestFailingAgeSeconds float64 `json:"oldest_failing_age_seconds"`
}

func outboxStatusCmd() *cobra.Command {
	var f dbFlags
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the pending, failing and dead messages, overall and per topic, and the keys held back",
		Long: `Show the pending and dead messages, overall and per topic, and the failing ones:
pending messages whose last publish failed (with the attempts the polling relay
stores in the table), the keys they hold back (the key's later messages wait
for them), and the oldest of them with its last error and next attempt.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			db, ob, err := f.openOutbox(cmd)
			if err != nil {
				return err
			}
			defer db.Close()
			st, err := ob.Status(cmd.Context(), db)
			if err != nil {
				return fmt.Errorf("status of outbox table %s: %w", ob.Table(), err)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				js := statusJSON{Table: ob.Table(), Pending: st.Pending, Dead: st.Dead,
					OldestAgeSeconds: st.OldestAge.Seconds(), Topics: []topicStatusJSON{},
					Failing: failingJSON{Messages: st.Failing.Messages, BlockedKeys: st.Failing.BlockedKeys,
						OldestFailingAgeSeconds: st.Failing.OldestAge.Seconds()},
					Blocked: []console.BlockedRow{}}
				for _, t := range st.Topics {
					js.Topics = append(js.Topics, topicStatusJSON{Topic: t.Topic, Pending: t.Pending, Dead: t.Dead, OldestAgeSeconds: t.OldestAge.Seconds()})
				}
				for _, b := range st.Blocked {
					js.Blocked = append(js.Blocked, console.NewBlockedRow(b))
				}
				return writeJSON(out, js)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "outbox table\t%s\n", ob.Table())
			fmt.Fprintf(tw, "pending\t%d\n", st.Pending)
			fmt.Fprintf(tw, "dead\t%d\n", st.Dead)
			fmt.Fprintf(tw, "oldest pending age\t%s\n", age(st.OldestAge, st.Pending))
			fmt.Fprintf(tw, "failing\t%d\n", st.Failing.Messages)
			fmt.Fprintf(tw, "blocked keys\t%d\n", st.Failing.BlockedKeys)
			fmt.Fprintf(tw, "oldest failing age\t%s\n", age(st.Failing.OldestAge, st.Failing.Messages))
			if err := tw.Flush(); err != nil {
				return err
			}
			if len(st.Topics) > 0 {
				fmt.Fprintln(out)
				tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "TOPIC\tPENDING\tDEAD\tOLDEST PENDING AGE")
				for _, t := range st.Topics {
					fmt.Fprintf(tw, "%s\t%d\t%d\t%s\n", oneLine(t.Topic, 0), t.Pending, t.Dead, age(t.OldestAge, t.Pending))
				}
				if err := tw.Flush(); err != nil {
					return err
				}
			}
			if len(st.Blocked) == 0 {
				return nil
			}
			fmt.Fprintln(out)
			if n := st.Failing.Messages; n > int64(len(st.Blocked)) {
				fmt.Fprintf(out, "failing messages, the oldest %d of %d:\n", len(st.Blocked), n)
			} else {
				fmt.Fprintln(out, "failing messages:")
			}
			tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "TOPIC\tKEY\tWAITING\tATTEMPTS\tNEXT ATTEMPT\tAGE\tID\tLAST ERROR")
			now := time.Now()
			for _, b := range st.Blocked {
				key := oneLine(b.Key, 40)
				if b.Key == "" {
					key = "-"
				}
				next := "due"
				if d := b.NextAttemptAt.Sub(now); d > 0 {
					next = "in " + age(d, 1)
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\n", oneLine(b.Topic, 40), key, b.Waiting, b.Attempts, next,
					age(b.Age, 1), b.ID, oneLine(b.LastError, lastErrorWidth))
			}
			return tw.Flush()
		},
	}
	f.add(cmd, outbox.DefaultTable, "outbox")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON instead of text")
	return cmd
}

// age formats the age of the oldest pending message, "-" when none is.
func age(d time.Duration, pending int64) string {
	if pending == 0 {
		return "-"
	}
	if d >= time.Second {
		return d.Round(time.Second).String()
	}
	return d.Round(time.Millisecond).String()
}

// deadFlags select dead messages.
type deadFlags struct {
	topic, key string
	ids        []string
}

func (d *deadFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&d.topic, "topic", "", "only messages of this topic")
	cmd.Flags().StringVar(&d.key, "key", "", "only messages with this key")
	cmd.Flags().StringArrayVar(&d.ids, "id", nil, "only the message with this id (repeatable)")
}

func (d *deadFlags) filter() outbox.DeadFilter {
	return outbox.DeadFilter{Topic: d.topic, Key: d.key, IDs: d.ids}
}

func (d *deadFlags) empty() bool { return d.topic == "" && d.key == "" && len(d.ids) == 0 }

func outboxDeadCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dead",
		Short: "List, retry or purge the messages parked after their last failed attempt",
	}
	cmd.AddCommand(deadListCmd(), deadRetryCmd(), deadPurgeCmd())
	return cmd
}

type deadJSON struct {
	ID        string            `json:"id"`
	Topic     string            `json:"topic"`
	Key       string            `json:"key"`
	Attempts  int               `json:"attempts"`
	DeadAt    *time.Time        `json:"dead_at"`
	CreatedAt time.Time         `json:"created_at"`
	LastError string            `json:"last_error"`
	Headers   map[string]string `json:"headers,omitempty"`
}

const lastErrorWidth = 80

func deadListCmd() *cobra.Command {
	var f dbFlags
	var d deadFlags
	var limit int
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List dead messages, oldest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if limit < 0 {
				return fmt.Errorf("--limit must not be negative, got %d", limit)
			}
			db, ob, err := f.openOutbox(cmd)
			if err != nil {
				return err
			}
			defer db.Close()
			flt := d.filter()
			flt.Limit = limit
			msgs, err := ob.ListDead(cmd.Context(), db, flt)
			if err != nil {
				return fmt.Errorf("outbox table %s: %w", ob.Table(), err)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				js := make([]deadJSON, 0, len(msgs))
				for _, m := range msgs {
					j := deadJSON{ID: m.Message.ID, Topic: m.Message.Topic, Key: m.Message.Key, Attempts: m.Attempts,
						CreatedAt: m.Message.CreatedAt.UTC(), LastError: m.LastError, Headers: m.Message.Headers}
					if !m.DeadAt.IsZero() {
						t := m.DeadAt.UTC()
						j.DeadAt = &t
					}
					js = append(js, j)
				}
				return writeJSON(out, js)
			}
			if len(msgs) == 0 {
				fmt.Fprintln(out, "no dead messages")
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tTOPIC\tKEY\tATTEMPTS\tDEAD AT\tLAST ERROR")
			for _, m := range msgs {
				deadAt := "-"
				if !m.DeadAt.IsZero() {
					deadAt = m.DeadAt.UTC().Format(time.RFC3339)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", oneLine(m.Message.ID, 0), oneLine(m.Message.Topic, 0),
					oneLine(m.Message.Key, 0), m.Attempts, deadAt, oneLine(m.LastError, lastErrorWidth))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if limit > 0 && len(msgs) == limit {
				fmt.Fprintf(out, "(showing the first %d; raise --limit for more)\n", limit)
			}
			return nil
		},
	}
	f.add(cmd, outbox.DefaultTable, "outbox")
	d.add(cmd)
	cmd.Flags().IntVar(&limit, "limit", 100, "list at most this many (0 for all)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON instead of text")
	return cmd
}

// oneLine flattens s to one line of text safe for a table and a terminal,
// cut to width runes when width > 0: line breaks and tabs become spaces,
// other control characters (terminal escape sequences) and invisible
// format characters (bidirectional overrides) are shown escaped, \x1b or
// \u202e, and invalid UTF-8 as \ufffd.
func oneLine(s string, width int) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\n', r == '\r', r == '\t':
			b.WriteByte(' ')
		case r < 0x20, r == 0x7f, r >= 0x80 && r < 0xa0:
			fmt.Fprintf(&b, `\x%02x`, r)
		case r == utf8.RuneError, unicode.Is(unicode.Cf, r):
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			b.WriteRune(r)
		}
	}
	s = b.String()
	if width > 0 && utf8.RuneCountInString(s) > width {
		return string([]rune(s)[:width-1]) + "…"
	}
	return s
}

func deadRetryCmd() *cobra.Command {
	var f dbFlags
	var d deadFlags
	var yes bool
	cmd := &cobra.Command{
		Use:   "retry",
		Short: "Make dead messages pending again so the relay publishes them",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if d.empty() && !yes {
				return errors.New("refusing to retry every dead message: narrow it with --topic, --key or --id, or pass --yes to retry them all")
			}
			db, ob, err := f.openOutbox(cmd)
			if err != nil {
				return err
			}
			defer db.Close()
			n, err := ob.RetryDead(cmd.Context(), db, d.filter())
			if err != nil {
				return fmt.Errorf("outbox table %s: %w", ob.Table(), err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "retried %d dead message(s): pending again in %s\n", n, ob.Table())
			return nil
		},
	}
	f.add(cmd, outbox.DefaultTable, "outbox")
	d.add(cmd)
	cmd.Flags().BoolVar(&yes, "yes", false, "confirm retrying every dead message when no filter is given")
	return cmd
}

func deadPurgeCmd() *cobra.Command {
	var f dbFlags
	var d deadFlags
	var yes bool
	cmd := &cobra.Command{
		Use:   "purge",
		Short: "Delete dead messages for good (they are never published)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if d.empty() && !yes {
				return errors.New("refusing to purge every dead message: narrow it with --topic, --key or --id, or pass --yes to purge them all")
			}
			db, ob, err := f.openOutbox(cmd)
			if err != nil {
				return err
			}
			defer db.Close()
			n, err := ob.PurgeDead(cmd.Context(), db, d.filter())
			if err != nil {
				return fmt.Errorf("outbox table %s: %w", ob.Table(), err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "purged %d dead message(s) from %s\n", n, ob.Table())
			return nil
		},
	}
	f.add(cmd, outbox.DefaultTable, "outbox")
	d.add(cmd)
	cmd.Flags().BoolVar(&yes, "yes", false, "confirm purging every dead message when no filter is given")
	return cmd
}

func inboxCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "inbox",
		Short: "Maintain the inbox's dedup records",
	}
	cmd.AddCommand(inboxGCCmd())
	return cmd
}

// minGCAge is the least --older-than `inbox gc` takes.
const minGCAge = time.Minute

func inboxGCCmd() *cobra.Command {
	var f dbFlags
	var consumer string
	var olderThan time.Duration
	var batch int
	cmd := &cobra.Command{
		Use:   "gc",
		Short: "Delete a consumer's dedup records older than --older-than",
		Long: "Delete a consumer's dedup records processed more than --older-than ago.\n" +
			"A redelivery of a message whose record is gone is applied again: keep records\n" +
			"longer than the broker can redeliver a message.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if consumer == "" {
				return errors.New("--consumer is required: the consumer whose records to delete")
			}
			if !cmd.Flags().Changed("older-than") {
				return errors.New("--older-than is required, for example --older-than 720h")
			}
			if olderThan < minGCAge {
				return fmt.Errorf("--older-than %s is below the floor of %s: a younger record may belong to a message the broker still redelivers, "+
					"which would then be applied twice; keep records longer than the broker can redeliver (for example --older-than 720h)", olderThan, minGCAge)
			}
			if batch < 0 {
				return fmt.Errorf("--batch must not be negative, got %d", batch)
			}
			var in *inbox.SQL
			db, err := f.connect(cmd, func(dialect string) (err error) {
				in, err = inbox.NewSQL(inbox.Config{Dialect: dialect, Table: f.table, Consumer: consumer})
				return err
			})
			if err != nil {
				return err
			}
			defer db.Close()
			n, err := in.GC(cmd.Context(), db, olderThan, batch)
			fmt.Fprintf(cmd.OutOrStdout(), "deleted %d inbox record(s) of consumer %q older than %s from %s\n", n, consumer, olderThan, in.Table())
			return err
		},
	}
	f.add(cmd, inbox.DefaultTable, "inbox")
	cmd.Flags().StringVar(&consumer, "consumer", "", "consumer name whose records to delete (required)")
	cmd.Flags().DurationVar(&olderThan, "older-than", 0, "delete records processed longer ago than this, e.g. 720h; at least 1m (required)")
	cmd.Flags().IntVar(&batch, "batch", 0, fmt.Sprintf("rows per DELETE statement (0 for %d)", inbox.DefaultGCBatch))
	return cmd
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
