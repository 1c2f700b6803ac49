package main

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strings"

	_ "github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/spf13/cobra"
	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly/inbox"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/outbox"
)

// openDB opens a database from a DSN: postgres://..., mysql://user@tcp(host)/db
// or a go-sql-driver DSN prefixed with mysql://, sqlite:path or file:path.
func openDB(dsn string) (*sql.DB, string, error) {
	switch {
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		db, err := sql.Open("pgx", dsn)
		return db, outbox.Postgres, err
	case strings.HasPrefix(dsn, "mysql://"):
		db, err := sql.Open("mysql", strings.TrimPrefix(dsn, "mysql://"))
		return db, outbox.MySQL, err
	case strings.HasPrefix(dsn, "sqlite:"), strings.HasPrefix(dsn, "file:"):
		path := strings.TrimPrefix(dsn, "sqlite:")
		if !strings.HasPrefix(path, "file:") {
			path = "file:" + path
		}
		sep := "?"
		if strings.Contains(path, "?") {
			sep = "&"
		}
		db, err := sql.Open("sqlite", path+sep+"_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_pragma=synchronous(NORMAL)")
		return db, outbox.SQLite, err
	case dsn == "":
		return nil, "", fmt.Errorf("no database given: pass --db postgres://..., mysql://... or sqlite:path")
	}
	return nil, "", fmt.Errorf("unrecognised database DSN scheme (want postgres://, mysql:// or sqlite:): %s", hide.String(dsn))
}

// The parts of the schema `exactly migrate` manages.
const (
	partOutbox  = "outbox"
	partInbox   = "inbox"
	partOffsets = "offsets"
)

var allParts = []string{partOutbox, partInbox, partOffsets}

var migrateEnv = map[string]string{
	"db":            "EXACTLY_DB",
	"table":         "EXACTLY_TABLE",
	"inbox-table":   "EXACTLY_INBOX_TABLE",
	"offsets-table": "EXACTLY_OFFSETS_TABLE",
	"only":          "EXACTLY_MIGRATE_ONLY",
}

type migrateFlags struct {
	dsn, table, inboxTable, offsetsTable string
	only                                 []string
	dryRun                               bool
}

// migratable is a part's public migration entry points: *outbox.Outbox,
// *inbox.SQL and *kafka.OffsetsTable, the ones the library's users call.
type migratable interface {
	ApplyMigrations(ctx context.Context, db any) ([]int, error)
	MigrationSQL(ctx context.Context, db any) (string, error)
}

// migratingConsumer names the inbox for NewSQL, which wants a consumer;
// the inbox's migrations do not use it (the table is shared).
const migratingConsumer = "exactly-migrate"

// migrators returns each selected part, in order, with the name of its
// table. Names are validated before anything is opened.
func (f *migrateFlags) migrators(dialect string) ([]migratable, []string, error) {
	var ms []migratable
	var names []string
	for _, part := range allParts {
		if !slices.Contains(f.only, part) {
			continue
		}
		switch part {
		case partOutbox:
			o, err := outbox.New(outbox.Config{Dialect: dialect, Table: f.table})
			if err != nil {
				return nil, nil, fmt.Errorf("--table: %w", err)
			}
			ms, names = append(ms, o), append(names, "outbox table "+o.Table())
		case partInbox:
			in, err := inbox.NewSQL(inbox.Config{Dialect: dialect, Table: f.inboxTable, Consumer: migratingConsumer})
			if err != nil {
				return nil, nil, fmt.Errorf("--inbox-table: %w", err)
			}
			ms, names = append(ms, in), append(names, "inbox table "+in.Table())
		case partOffsets:
			t, err := kafka.NewOffsetsTable(dialect, f.offsetsTable)
			if err != nil {
				return nil, nil, fmt.Errorf("--offsets-table: %w", err)
			}
			ms, names = append(ms, t), append(names, "Kafka offsets table "+t.Table())
		}
	}
	return ms, names, nil
}

func migrateCmd() *cobra.Command {
	var f migrateFlags
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Create or upgrade the outbox, inbox and Kafka offsets tables (idempotent)",
		Long: `migrate applies the same versioned, embedded migrations as the library's
Migrate functions (outbox.Migrate, inbox.SQL.Migrate, kafka.MigrateOffsets)
and records them in exactly_migrations. Running it again applies nothing;
several processes may run it at once. --dry-run prints the SQL it would run
and changes nothing. Every flag falls back to an EXACTLY_* environment
variable (EXACTLY_DB, EXACTLY_TABLE, EXACTLY_INBOX_TABLE,
EXACTLY_OFFSETS_TABLE, EXACTLY_MIGRATE_ONLY).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyEnv(cmd.Flags(), migrateEnv); err != nil {
				return err
			}
			for _, p := range f.only {
				if !slices.Contains(allParts, p) {
					return fmt.Errorf("--only: unknown part %q (want outbox, inbox or offsets)", p)
				}
			}
			if len(f.only) == 0 {
				return fmt.Errorf("--only: name at least one of outbox, inbox, offsets")
			}
			db, dialect, err := openDB(f.dsn)
			if err != nil {
				return err
			}
			defer db.Close()
			ms, names, err := f.migrators(dialect)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if err := db.PingContext(ctx); err != nil {
				return fmt.Errorf("cannot reach the database %s: %s", hide.String(f.dsn), scrub(err, f.dsn))
			}
			out := cmd.OutOrStdout()
			for i, m := range ms {
				if f.dryRun {
					script, err := m.MigrationSQL(ctx, db)
					if err != nil {
						return fmt.Errorf("%s: %w", names[i], err)
					}
					if script == "" {
						fmt.Fprintf(out, "-- %s: up to date, nothing to apply\n", names[i])
						continue
					}
					fmt.Fprintf(out, "-- %s\n%s", names[i], script)
					continue
				}
				applied, err := m.ApplyMigrations(ctx, db)
				if err != nil {
					return fmt.Errorf("%s: %w", names[i], err)
				}
				if len(applied) == 0 {
					fmt.Fprintf(out, "%s is up to date\n", names[i])
				} else {
					fmt.Fprintf(out, "%s: applied version(s) %s\n", names[i], joinInts(applied))
				}
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.dsn, "db", "", "database: postgres://..., 'mysql://root@tcp(127.0.0.1:3306)/test' (quoted for the shell) or sqlite:path (env EXACTLY_DB)")
	fl.StringVar(&f.table, "table", outbox.DefaultTable, "outbox table name, optionally schema-qualified (env EXACTLY_TABLE)")
	fl.StringVar(&f.inboxTable, "inbox-table", inbox.DefaultTable, "inbox table name, optionally schema-qualified (env EXACTLY_INBOX_TABLE)")
	fl.StringVar(&f.offsetsTable, "offsets-table", kafka.DefaultOffsetsTable, "Kafka offsets table name, optionally schema-qualified (env EXACTLY_OFFSETS_TABLE)")
	fl.StringSliceVar(&f.only, "only", allParts, "the parts to migrate: outbox, inbox, offsets (env EXACTLY_MIGRATE_ONLY)")
	fl.BoolVar(&f.dryRun, "dry-run", false, "print the SQL that would run, change nothing")
	return cmd
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = fmt.Sprint(n)
	}
	return strings.Join(s, ", ")
}
