package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/exactlyonce/exactly/console"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
)

// consoleFlags are the settings of `exactly console`.
type consoleFlags struct {
	db       dbFlags
	inboxes  []string
	slots    []string
	addr     string
	actions  bool
	interval time.Duration
}

func consoleCmd() *cobra.Command {
	var f consoleFlags
	cmd := &cobra.Command{
		Use:   "console",
		Short: "Serve the ops console: web pages of the outbox, dead messages, blocked keys, relays, CDC slots and inboxes",
		Long: `Serve the ops console on --addr until SIGTERM or SIGINT: web pages (and the
same as JSON, ?format=json) of what is pending, failing and dead per topic,
with a chart of the last hour's backlog and published rate (sampled by this
process from its start, every --sample-interval), the dead messages (filter,
inspect, retry, purge), the keys held back by a failing message, the relays'
leases and heartbeats, the CDC slots' lag, what each inbox table recorded,
and where a message is now, found by its id.

It only reads unless --console-actions is given; actions are confirmed on a
page listing the messages, carry a CSRF token, and are logged with the ids
they changed. It has no authentication: keep --addr on a loopback address
(the default), or put it behind a proxy that authenticates.`,
		Example: `  exactly console --db postgres://postgres@127.0.0.1:5432/app --inbox-table exactly_inbox
  exactly console --db postgres://postgres@127.0.0.1:5432/app --console-actions   # retry and purge enabled`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, _, err := net.SplitHostPort(f.addr); err != nil {
				return fmt.Errorf("--addr %q: %v", f.addr, err)
			}
			if f.interval < time.Second {
				return fmt.Errorf("--sample-interval %s: want at least 1s", f.interval)
			}
			log := slog.New(slog.NewTextHandler(logOutput, nil))
			return runConsole(cmd, &f, log)
		},
	}
	fl := cmd.Flags()
	f.db.add(cmd, outbox.DefaultTable, "outbox")
	fl.StringArrayVar(&f.inboxes, "inbox-table", nil, "inbox table to show and search by id, optionally schema-qualified (repeatable)")
	fl.StringArrayVar(&f.slots, "slot", nil, "CDC replication slot to show (repeatable; PostgreSQL; default "+pgcdc.DefaultSlot+" there)")
	fl.StringVar(&f.addr, "addr", "127.0.0.1:9465", "address to serve the console on (no authentication: keep it on loopback)")
	fl.BoolVar(&f.actions, "console-actions", false, "enable retrying and purging dead messages from the pages (default read-only)")
	fl.DurationVar(&f.interval, "sample-interval", console.DefaultSampleInterval, "how often to sample the backlog and published rate for the overview's chart")
	return cmd
}

func runConsole(cmd *cobra.Command, f *consoleFlags, log *slog.Logger) error {
	ctx := cmd.Context()
	var ob *outbox.Outbox
	db, err := f.db.connect(cmd, func(dialect string) (err error) {
		ob, err = outbox.New(outbox.Config{Dialect: dialect, Table: f.db.table})
		if err == nil && len(f.slots) > 0 && dialect != outbox.Postgres {
			err = fmt.Errorf("--slot: CDC slots are PostgreSQL's, the database is %s", dialect)
		}
		return err
	})
	if err != nil {
		return err
	}
	defer db.Close()
	slots := f.slots
	if len(slots) == 0 && ob.Dialect() == outbox.Postgres {
		slots = []string{pgcdc.DefaultSlot}
	}
	dsn := f.db.dsn
	if dsn == "" {
		dsn = envDefault("EXACTLY_DB", "")
	}
	c, err := console.New(console.Config{DB: db, Outbox: ob, Inboxes: f.inboxes, Slots: slots, DSN: dsn,
		Actions: f.actions, Logger: log, SampleInterval: f.interval})
	if err != nil {
		return err
	}
	defer c.Close()
	checkCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = c.Check(checkCtx)
	cancel()
	if err != nil {
		return fmt.Errorf("%s", scrub(err, dsn))
	}
	ln, err := net.Listen("tcp", f.addr)
	if err != nil {
		return fmt.Errorf("--addr: %w", err)
	}
	defer ln.Close()
	if !loopbackAddr(f.addr) {
		log.Warn("the console has no authentication and listens beyond this machine; keep --addr on a loopback address, or put it behind a proxy that authenticates",
			"addr", f.addr, "actions", f.actions)
	}
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	go func() { _ = c.Run(runCtx) }()
	srv := &http.Server{Handler: c, ReadHeaderTimeout: 5 * time.Second}
	srvErr := make(chan error, 1)
	go func() { srvErr <- srv.Serve(ln) }()
	mode := "read-only"
	if f.actions {
		mode = "actions enabled"
	}
	// The address as given, with the port the listener got (for :0).
	host, _, _ := net.SplitHostPort(f.addr)
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	addr := net.JoinHostPort(host, port)
	fmt.Fprintf(cmd.OutOrStdout(), "console on http://%s/ (%s)\n", addr, mode)
	log.Info("console started", "addr", addr, "table", ob.Table(), "inbox_tables", f.inboxes, "actions", f.actions, "db", hide.String(dsn))
	select {
	case err := <-srvErr:
		if !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("console HTTP server: %w", err)
		}
	case <-ctx.Done():
	}
	shutCtx, cancelShut := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancelShut()
	_ = srv.Shutdown(shutCtx)
	log.Info("console stopped")
	return nil
}

// mountConsole serves the console's pages under /console/ on the relay's
// admin mux, fed by the relay's own metrics (the exact published rate, the
// CDC slot's lag in seconds). The returned func stops its sampling.
func mountConsole(ctx context.Context, mux *http.ServeMux, f *relayFlags, db any, ob *outbox.Outbox, metrics prometheus.Gatherer, log *slog.Logger) (func(), error) {
	var slots []string
	if f.source == sourceCDC {
		slots = []string{f.slot}
	}
	c, err := console.New(console.Config{DB: db, Outbox: ob, Slots: slots, Metrics: metrics, DSN: f.dsn, Actions: f.consoleActions, Logger: log})
	if err != nil {
		return nil, err
	}
	runCtx, stop := context.WithCancel(ctx)
	go func() { _ = c.Run(runCtx) }()
	mux.Handle("/console/", http.StripPrefix("/console", c))
	mux.Handle("GET /console", http.RedirectHandler("console/", http.StatusFound))
	log.Info("console pages on the admin server", "path", "/console/", "actions", f.consoleActions)
	return func() { stop(); c.Close() }, nil
}
