package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/nats"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// relayFlags are the settings of `exactly relay`.
type relayFlags struct {
	dsn          string
	table        string
	broker       string
	kafkaBrokers string
	natsURL      string
	batchSize    int
	pollInterval time.Duration
	maxAttempts  int
	retention    time.Duration
	partitions   int
	instanceID   string
	adminAddr    string
	logFormat    string
	logLevel     string
}

// relayEnv maps each flag to the environment variable used when the flag is
// not given.
var relayEnv = map[string]string{
	"db":            "EXACTLY_DB",
	"table":         "EXACTLY_TABLE",
	"broker":        "EXACTLY_BROKER",
	"kafka-brokers": "EXACTLY_KAFKA_BROKERS",
	"nats-url":      "EXACTLY_NATS_URL",
	"batch-size":    "EXACTLY_BATCH_SIZE",
	"poll-interval": "EXACTLY_POLL_INTERVAL",
	"max-attempts":  "EXACTLY_MAX_ATTEMPTS",
	"retention":     "EXACTLY_RETENTION",
	"partitions":    "EXACTLY_PARTITIONS",
	"instance-id":   "EXACTLY_INSTANCE_ID",
	"admin-addr":    "EXACTLY_ADMIN_ADDR",
	"log-format":    "EXACTLY_LOG_FORMAT",
	"log-level":     "EXACTLY_LOG_LEVEL",
}

func relayCmd() *cobra.Command {
	var f relayFlags
	cmd := &cobra.Command{
		Use:   "relay",
		Short: "Run the outbox relay: publish committed outbox rows to Kafka or NATS",
		Long: `Run the outbox relay until SIGTERM or SIGINT: it polls the outbox table
(woken at once by NOTIFY on PostgreSQL) and publishes the rows to Kafka or NATS
JetStream. Every flag falls back to an EXACTLY_* environment variable
(--db: EXACTLY_DB, --broker: EXACTLY_BROKER, ...); a flag given wins.

Admin HTTP on --admin-addr: /metrics (Prometheus), /healthz, /readyz.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyEnv(cmd.Flags()); err != nil {
				return err
			}
			log, err := f.validate()
			if err != nil {
				return err
			}
			return runRelay(cmd.Context(), &f, log)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.dsn, "db", "", "database: postgres://..., mysql://user@tcp(host:3306)/db or sqlite:path (env EXACTLY_DB)")
	fl.StringVar(&f.table, "table", outbox.DefaultTable, "outbox table name, optionally schema-qualified (env EXACTLY_TABLE)")
	fl.StringVar(&f.broker, "broker", "", "broker: kafka or nats (env EXACTLY_BROKER)")
	fl.StringVar(&f.kafkaBrokers, "kafka-brokers", "", "comma-separated Kafka seed brokers host:port (env EXACTLY_KAFKA_BROKERS)")
	fl.StringVar(&f.natsURL, "nats-url", "", "NATS server URL, e.g. nats://127.0.0.1:4222 (env EXACTLY_NATS_URL)")
	fl.IntVar(&f.batchSize, "batch-size", 0, "most rows published at once, 0 for the default 2000 (env EXACTLY_BATCH_SIZE)")
	fl.DurationVar(&f.pollInterval, "poll-interval", 0, "how often the table is read when nothing woke the relay, 0 for the default (env EXACTLY_POLL_INTERVAL)")
	fl.IntVar(&f.maxAttempts, "max-attempts", 0, "failed publishes before a message is parked as dead, 0 for the default 25 (env EXACTLY_MAX_ATTEMPTS)")
	fl.DurationVar(&f.retention, "retention", 0, "keep sent rows this long, 0 deletes them once confirmed (env EXACTLY_RETENTION)")
	fl.IntVar(&f.partitions, "partitions", 0, "key partitions shared between relays, 0 for the default 16; the same on every relay of the table (env EXACTLY_PARTITIONS)")
	fl.StringVar(&f.instanceID, "instance-id", "", "name of this relay in the lease table, default hostname-pid-random (env EXACTLY_INSTANCE_ID)")
	fl.StringVar(&f.adminAddr, "admin-addr", "127.0.0.1:9464", "address of the admin HTTP server (/metrics, /healthz, /readyz) (env EXACTLY_ADMIN_ADDR)")
	fl.StringVar(&f.logFormat, "log-format", "text", "log format: text or json (env EXACTLY_LOG_FORMAT)")
	fl.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error (env EXACTLY_LOG_LEVEL)")
	return cmd
}

// applyEnv sets every flag not given on the command line from its
// environment variable, if that is set.
func applyEnv(fl *pflag.FlagSet) error {
	var err error
	fl.VisitAll(func(f *pflag.Flag) {
		env, ok := relayEnv[f.Name]
		if !ok || f.Changed || err != nil {
			return
		}
		v, set := os.LookupEnv(env)
		if !set || v == "" {
			return
		}
		if e := fl.Set(f.Name, v); e != nil {
			shown := v
			if f.Name == "db" {
				shown = redact(v)
			}
			err = fmt.Errorf("invalid value %q in %s (for --%s): %v", shown, env, f.Name, e)
		}
	})
	return err
}

// validate checks every setting before anything is opened and returns the
// logger they configure.
func (f *relayFlags) validate() (*slog.Logger, error) {
	if f.dsn == "" {
		return nil, errors.New("--db is required (or EXACTLY_DB): postgres://..., mysql://... or sqlite:path")
	}
	if !strings.HasPrefix(f.dsn, "postgres://") && !strings.HasPrefix(f.dsn, "postgresql://") &&
		!strings.HasPrefix(f.dsn, "mysql://") && !strings.HasPrefix(f.dsn, "sqlite:") && !strings.HasPrefix(f.dsn, "file:") {
		return nil, fmt.Errorf("--db: unrecognised database DSN scheme (want postgres://, mysql:// or sqlite:): %s", redact(f.dsn))
	}
	if strings.TrimSpace(f.table) == "" {
		return nil, errors.New("--table must not be empty")
	}
	switch f.broker {
	case "kafka":
		if len(splitList(f.kafkaBrokers)) == 0 {
			return nil, errors.New("--kafka-brokers is required with --broker kafka (or EXACTLY_KAFKA_BROKERS): host:port[,host:port...]")
		}
	case "nats":
		if f.natsURL == "" {
			return nil, errors.New("--nats-url is required with --broker nats (or EXACTLY_NATS_URL): nats://host:4222")
		}
	case "":
		return nil, errors.New("--broker is required (or EXACTLY_BROKER): kafka or nats")
	default:
		return nil, fmt.Errorf("--broker: unknown broker %q (want kafka or nats)", f.broker)
	}
	for _, c := range []struct {
		flag string
		v    int64
	}{
		{"batch-size", int64(f.batchSize)}, {"max-attempts", int64(f.maxAttempts)}, {"partitions", int64(f.partitions)},
		{"poll-interval", int64(f.pollInterval)}, {"retention", int64(f.retention)},
	} {
		if c.v < 0 {
			return nil, fmt.Errorf("--%s must not be negative", c.flag)
		}
	}
	if f.batchSize > 10000 {
		return nil, fmt.Errorf("--batch-size %d is above the limit of 10000", f.batchSize)
	}
	if f.partitions > 1024 {
		return nil, fmt.Errorf("--partitions %d is above the limit of 1024", f.partitions)
	}
	if _, _, err := net.SplitHostPort(f.adminAddr); err != nil {
		return nil, fmt.Errorf("--admin-addr %q: %v", f.adminAddr, err)
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(f.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: unknown level %q (want debug, info, warn or error)", f.logLevel)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch f.logFormat {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format: unknown format %q (want text or json)", f.logFormat)
}

func splitList(s string) []string {
	var out []string
	for p := range strings.SplitSeq(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// scrub removes the DSN's password from an error message.
func scrub(err error, dsn string) string {
	msg := err.Error()
	if u, e := url.Parse(dsn); e == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok && pw != "" {
			msg = strings.ReplaceAll(msg, pw, "***")
		}
	}
	return msg
}

// relayDB is the database handle the relay uses and how to ping and close it.
type relayDB struct {
	handle  any
	dialect string
	ping    func(context.Context) error
	close   func()
}

// openRelayDB opens a pgxpool.Pool for PostgreSQL (LISTEN/NOTIFY, pgx fast
// path) and a *sql.DB otherwise.
func openRelayDB(ctx context.Context, dsn string) (*relayDB, error) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		cfg, err := pgxpool.ParseConfig(dsn)
		if err != nil {
			return nil, fmt.Errorf("--db: invalid PostgreSQL DSN %s: %s", redact(dsn), scrub(err, dsn))
		}
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("--db: opening %s: %s", redact(dsn), scrub(err, dsn))
		}
		return &relayDB{handle: pool, dialect: outbox.Postgres, ping: pool.Ping, close: pool.Close}, nil
	}
	db, dialect, err := openDB(dsn)
	if err != nil {
		return nil, err
	}
	return &relayDB{handle: db, dialect: dialect, ping: db.PingContext, close: func() { db.Close() }}, nil
}

// relayMetrics are the Prometheus metrics of the relay, on their own registry.
type relayMetrics struct {
	reg       *prometheus.Registry
	published prometheus.Counter
	failed    prometheus.Counter
	dead      prometheus.Counter
	took      prometheus.Histogram
	pending   prometheus.Gauge
	oldest    prometheus.Gauge
}

func newRelayMetrics(partitions func() float64) *relayMetrics {
	m := &relayMetrics{
		reg: prometheus.NewRegistry(),
		published: prometheus.NewCounter(prometheus.CounterOpts{Name: "exactly_relay_published_total",
			Help: "Messages confirmed by the broker."}),
		failed: prometheus.NewCounter(prometheus.CounterOpts{Name: "exactly_relay_failed_total",
			Help: "Failed publish attempts that will be retried."}),
		dead: prometheus.NewCounter(prometheus.CounterOpts{Name: "exactly_relay_dead_total",
			Help: "Messages parked as dead after too many failures or an unpublishable error."}),
		took: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "exactly_relay_publish_seconds",
			Help: "Time a batch took to be confirmed by the broker.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{Name: "exactly_outbox_pending",
			Help: "Pending rows in the outbox table."}),
		oldest: prometheus.NewGauge(prometheus.GaugeOpts{Name: "exactly_outbox_oldest_pending_seconds",
			Help: "Age of the oldest pending row, 0 when none is."}),
	}
	held := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "exactly_relay_partitions_held",
		Help: "Partitions of the outbox this relay holds."}, partitions)
	m.reg.MustRegister(m.published, m.failed, m.dead, m.took, m.pending, m.oldest, held)
	return m
}

func (m *relayMetrics) hooks() relay.Hooks {
	return relay.Hooks{
		Published: func(msgs []*exactly.Message, took time.Duration) {
			m.published.Add(float64(len(msgs)))
			m.took.Observe(took.Seconds())
		},
		Failed: func(*exactly.Message, int, error) { m.failed.Inc() },
		Dead:   func(*exactly.Message, error) { m.dead.Inc() },
		Backlog: func(pending int64, oldest time.Duration) {
			m.pending.Set(float64(pending))
			m.oldest.Set(oldest.Seconds())
		},
		BacklogInterval: 5 * time.Second,
	}
}

// newRelayPublisher connects to the broker.
func newRelayPublisher(f *relayFlags, log *slog.Logger) (exactly.Publisher, func(), error) {
	switch f.broker {
	case "kafka":
		p, err := kafka.NewClientPublisher(splitList(f.kafkaBrokers))
		if err != nil {
			return nil, nil, fmt.Errorf("--kafka-brokers: %w", err)
		}
		return p, func() { p.Close() }, nil
	case "nats":
		nc, err := natsgo.Connect(f.natsURL, natsgo.Name("exactly-relay"), natsgo.MaxReconnects(-1),
			natsgo.DisconnectErrHandler(func(_ *natsgo.Conn, err error) {
				if err != nil {
					log.Warn("disconnected from NATS", "err", err)
				}
			}),
			natsgo.ReconnectHandler(func(c *natsgo.Conn) { log.Info("reconnected to NATS", "url", c.ConnectedUrlRedacted()) }))
		if err != nil {
			return nil, nil, fmt.Errorf("--nats-url: cannot connect to NATS at %s: %w", redact(f.natsURL), err)
		}
		js, err := jetstream.New(nc)
		if err != nil {
			nc.Close()
			return nil, nil, fmt.Errorf("--nats-url: %w", err)
		}
		p, err := nats.NewPublisher(js)
		if err != nil {
			nc.Close()
			return nil, nil, err
		}
		return p, func() { _ = nc.Drain(); nc.Close() }, nil
	}
	return nil, nil, fmt.Errorf("--broker: unknown broker %q (want kafka or nats)", f.broker)
}

func runRelay(ctx context.Context, f *relayFlags, log *slog.Logger) error {
	db, err := openRelayDB(ctx, f.dsn)
	if err != nil {
		return err
	}
	defer db.close()
	ob, err := outbox.New(outbox.Config{Dialect: db.dialect, Table: f.table})
	if err != nil {
		return fmt.Errorf("--table: %w", err)
	}
	pingCtx, cancelPing := context.WithTimeout(ctx, 10*time.Second)
	err = db.ping(pingCtx)
	cancelPing()
	if err != nil {
		return fmt.Errorf("cannot reach the database %s: %s", redact(f.dsn), scrub(err, f.dsn))
	}

	ln, err := net.Listen("tcp", f.adminAddr)
	if err != nil {
		return fmt.Errorf("--admin-addr: %w", err)
	}
	defer ln.Close()

	pub, closePub, err := newRelayPublisher(f, log)
	if err != nil {
		return err
	}
	defer closePub()

	var rl atomic.Pointer[relay.Relay]
	var running atomic.Bool
	m := newRelayMetrics(func() float64 {
		if r := rl.Load(); r != nil {
			return float64(r.Stats().Partitions)
		}
		return 0
	})
	r, err := relay.New(relay.Config{
		Outbox:       ob,
		DB:           db.handle,
		Publisher:    pub,
		BatchSize:    f.batchSize,
		PollInterval: f.pollInterval,
		MaxAttempts:  f.maxAttempts,
		Retention:    f.retention,
		Partitions:   f.partitions,
		InstanceID:   f.instanceID,
		Logger:       log,
		Hooks:        m.hooks(),
	})
	if err != nil {
		return err
	}
	rl.Store(r)

	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, req *http.Request) {
		if !running.Load() {
			http.Error(w, "relay not running", http.StatusServiceUnavailable)
			return
		}
		if n := r.Stats().Partitions; n == 0 {
			http.Error(w, "relay holds no partitions", http.StatusServiceUnavailable)
			return
		}
		pctx, cancel := context.WithTimeout(req.Context(), 2*time.Second)
		defer cancel()
		if err := db.ping(pctx); err != nil {
			http.Error(w, "database unreachable", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	srvErr := make(chan error, 1)
	go func() { srvErr <- srv.Serve(ln) }()

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	relayErr := make(chan error, 1)
	running.Store(true)
	go func() { relayErr <- r.Run(runCtx) }()
	log.Info("relay started", "table", ob.Table(), "dialect", db.dialect, "broker", f.broker,
		"admin", ln.Addr().String(), "db", redact(f.dsn))

	var runErr error
	select {
	case runErr = <-relayErr:
	case err := <-srvErr:
		log.Error("admin HTTP server failed; stopping", "err", err)
		cancel()
		<-relayErr
		runErr = fmt.Errorf("admin HTTP server: %w", err)
	case <-ctx.Done():
		log.Info("shutting down: finishing the batch in flight")
		runErr = <-relayErr
	}
	running.Store(false)
	shutCtx, cancelShut := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancelShut()
	if err := srv.Shutdown(shutCtx); err != nil {
		log.Warn("admin HTTP server shutdown", "err", err)
	}
	if runErr != nil {
		return runErr
	}
	log.Info("relay exited cleanly")
	return nil
}
