package main

import (
	"database/sql"
	"fmt"
	"strings"

	_ "github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/spf13/cobra"
	_ "modernc.org/sqlite"

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
	return nil, "", fmt.Errorf("unrecognised database DSN scheme (want postgres://, mysql:// or sqlite:): %s", redact(dsn))
}

// redact hides a password in a DSN before it is printed.
func redact(dsn string) string {
	at := strings.LastIndex(dsn, "@")
	if at < 0 {
		return dsn
	}
	head := dsn[:at]
	scheme := ""
	if i := strings.Index(head, "://"); i >= 0 {
		scheme, head = head[:i+3], head[i+3:]
	}
	if user, _, ok := strings.Cut(head, ":"); ok {
		return scheme + user + ":***" + dsn[at:]
	}
	return dsn
}

func migrateCmd() *cobra.Command {
	var dsn, table string
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Create or upgrade the outbox tables (idempotent)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			db, dialect, err := openDB(dsn)
			if err != nil {
				return err
			}
			defer db.Close()
			ob, err := outbox.New(outbox.Config{Dialect: dialect, Table: table})
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if err := db.PingContext(ctx); err != nil {
				return fmt.Errorf("cannot reach the database %s: %w", redact(dsn), err)
			}
			if dryRun {
				script, err := ob.MigrationSQL(ctx, db)
				if err != nil {
					return err
				}
				if strings.TrimSpace(script) == "" {
					fmt.Fprintln(cmd.OutOrStdout(), "-- up to date: nothing to apply")
				}
				fmt.Fprint(cmd.OutOrStdout(), script)
				return nil
			}
			if err := ob.Migrate(ctx, db); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "outbox table %s is up to date\n", ob.Table())
			return nil
		},
	}
	cmd.Flags().StringVar(&dsn, "db", "", "database: postgres://..., mysql://user@tcp(host:3306)/db or sqlite:path (env EXACTLY_DB)")
	cmd.Flags().StringVar(&table, "table", outbox.DefaultTable, "outbox table name, optionally schema-qualified")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "print the SQL that would run, change nothing")
	cmd.PreRun = func(*cobra.Command, []string) {
		if dsn == "" {
			dsn = envDefault("EXACTLY_DB", "")
		}
	}
	return cmd
}
