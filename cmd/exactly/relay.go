package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/exactlyonce/exactly/exactlyprom"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pgcdc"
	"github.com/exactlyonce/exactly/relay"
)

// relayFlags are the settings of `exactly relay`.
type relayFlags struct {
	config       string
	dsn          string
	table        string
	source       string
	broker       string
	kafkaBrokers string
	natsURL      string
	amqpURL      string
	amqpExchange string
	adminAddr    string
	logFormat    string
	logLevel     string

	tls           brokerTLS
	kafkaSASL     string
	kafkaUser     string
	kafkaPassword string
	natsCreds     string
	natsUser      string
	natsPassword  string
	// --broker pubsub (brokerpubsub.go)
	pubsubProject string
	pubsubTopics  string
	// --broker sqs and sns (brokeraws.go)
	aws awsFlags

	// cdc source
	slot             string
	cdcMessages      bool
	debeziumTable    string
	kafkaExactlyOnce bool

	// console: the ops console's pages on the admin server (console.go)
	console, consoleActions bool

	// tune holds the relay.Config and pgcdc.Config settings (relaysettings.go).
	tune relayTuning
	// origin says where a setting not given as a flag came from, for errors.
	origin map[string]string
}

// brokers the relay publishes to.
var brokers = []string{"kafka", "nats", "amqp", "pubsub", "sqs", "sns"}

// relayEnv maps each flag of cmd to its environment variable, used when
// the flag is not given: EXACTLY_ and the flag's name (envName).
func relayEnv(fl *pflag.FlagSet) map[string]string {
	env := map[string]string{}
	fl.VisitAll(func(f *pflag.Flag) {
		if f.Name != "help" {
			env[f.Name] = envName(f.Name)
		}
	})
	return env
}

// secretFlags hold secrets: their values are never printed.
var secretFlags = map[string]bool{"kafka-password": true, "nats-password": true}

func relayCmd() *cobra.Command {
	var f relayFlags
	cmd := &cobra.Command{
		Use:   "relay",
		Short: "Run the outbox relay: publish committed outbox rows to Kafka, NATS JetStream, RabbitMQ, Google Cloud Pub/Sub, Amazon SQS or SNS",
		Long: `Run the outbox relay until SIGTERM or SIGINT: it reads the outbox table
(--source poll: polling, woken at once by NOTIFY on PostgreSQL; --source cdc:
a PostgreSQL logical replication slot, wal_level=logical, the role needs
REPLICATION) and publishes the messages to Kafka, NATS JetStream, an AMQP
broker (RabbitMQ) or Google Cloud Pub/Sub (--pubsub-project; the key is the
ordering key; Application Default Credentials, or the emulator named by
PUBSUB_EMULATOR_HOST), or Amazon SQS or SNS (--broker sqs, sns; the standard
AWS credential chain and region, --aws-endpoint for an emulator; FIFO queues
and topics deduplicate by the message id for 5 minutes). With --source cdc
and --broker kafka, --kafka-exactly-once
commits the messages and the slot position in one Kafka transaction: no
duplicate in read_committed output even after a crash.

Settings come from, in order of precedence: flags; EXACTLY_* environment
variables (--db: EXACTLY_DB, --broker: EXACTLY_BROKER, ...: each flag's help
names its variable); the config file given by --config, one "name = value"
per line with the flags' names ("#" starts a comment); the defaults. Every
setting is checked at start, and the broker and the database must answer,
or the relay exits non-zero with an error naming the setting.

Connection security: PostgreSQL's sslmode and sslrootcert go in the DSN;
--tls, --tls-ca, --tls-cert and --tls-key apply to the broker connection
(amqps:// URLs for AMQP); Kafka takes SASL with --kafka-sasl plain,
scram-sha-256 or scram-sha-512; NATS takes --nats-creds or --nats-user.
Passwords are never logged: pass them in the environment
(EXACTLY_KAFKA_PASSWORD, EXACTLY_NATS_PASSWORD) rather than as flags.

Every relay.Config setting a deployment tunes has a flag (StrictOrder:
--strict-order, ShutdownTimeout: --shutdown-timeout, LeaseTTL: --lease-ttl,
InitialBackoff and MaxBackoff: --initial-backoff and --max-backoff, ...),
and so do the cdc source's (--max-pending, --status-interval, ...).

Admin HTTP on --admin-addr: /metrics (Prometheus), /healthz, /readyz, and with
--console the ops console's pages under /console/ (see exactly console). They
have no authentication: keep them on a loopback or private address.`,
		Example: `  exactly relay --db postgres://relay@127.0.0.1:5432/app --broker nats --nats-url nats://127.0.0.1:4222
  exactly relay --db 'mysql://root@tcp(127.0.0.1:3306)/test' --broker kafka --kafka-brokers 127.0.0.1:9092
  EXACTLY_DB=sqlite:app.db exactly relay --broker amqp --config /etc/exactly/relay.conf
  exactly relay --db postgres://relay@127.0.0.1:5432/app --broker pubsub --pubsub-project my-project --pubsub-topics orders=orders-v1
  exactly relay --db postgres://relay@127.0.0.1:5432/app --broker sqs --aws-region eu-west-1 --sqs-queues orders=orders.fifo

Quote a MySQL DSN: the shell reads its parentheses.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fl := cmd.Flags()
			f.origin = map[string]string{}
			setByFlag := map[string]bool{}
			fl.Visit(func(fv *pflag.Flag) { setByFlag[fv.Name] = true })
			env := relayEnv(fl)
			if err := applyEnv(fl, env); err != nil {
				return err
			}
			fl.Visit(func(fv *pflag.Flag) {
				if !setByFlag[fv.Name] {
					f.origin[fv.Name], setByFlag[fv.Name] = "from "+env[fv.Name], true
				}
			})
			errorLogFormat = f.logFormat
			if f.config != "" {
				lines, err := applyConfigFile(fl, f.config)
				if err != nil {
					return err
				}
				for name, line := range lines {
					f.origin[name] = fmt.Sprintf("from --config %s line %d", f.config, line)
				}
			}
			errorLogFormat = f.logFormat
			hide.Add(f.kafkaPassword, f.natsPassword)
			hide.AddFrom(f.dsn, f.natsURL, f.amqpURL, f.kafkaBrokers)
			log, err := f.validate(fl)
			if err != nil {
				return err
			}
			if attrs := f.tune.given(fl); len(attrs) > 0 {
				log.Info("relay settings", attrs...)
			}
			if !loopbackAddr(f.adminAddr) {
				log.Warn("the admin endpoints (/metrics, /healthz, /readyz) have no authentication and listen beyond this machine; "+
					"keep --admin-addr on a loopback or private address, or firewall it", "admin_addr", f.adminAddr)
			}
			return runRelay(cmd.Context(), &f, log)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.config, "config", "", "config file of name = value lines, read for the settings neither flags nor the environment give (env EXACTLY_CONFIG)")
	fl.StringVar(&f.dsn, "db", "", "database: postgres://..., 'mysql://root@tcp(127.0.0.1:3306)/test' (quoted for the shell) or sqlite:path (env EXACTLY_DB)")
	fl.StringVar(&f.table, "table", outbox.DefaultTable, "outbox table name, optionally schema-qualified (env EXACTLY_TABLE)")
	fl.StringVar(&f.source, "source", sourcePoll, "where the relay reads the outbox: poll, or cdc (logical replication, PostgreSQL) (env EXACTLY_SOURCE)")
	fl.StringVar(&f.broker, "broker", "", "broker: kafka, nats, amqp, pubsub, sqs or sns (env EXACTLY_BROKER)")
	fl.StringVar(&f.kafkaBrokers, "kafka-brokers", "", "comma-separated Kafka seed brokers host:port (env EXACTLY_KAFKA_BROKERS)")
	fl.StringVar(&f.natsURL, "nats-url", "", "NATS server URL, e.g. nats://127.0.0.1:4222 (env EXACTLY_NATS_URL)")
	fl.StringVar(&f.amqpURL, "amqp-url", "", "AMQP broker URL, amqp://user:password@host:5672/vhost or amqps://... (env EXACTLY_AMQP_URL)")
	fl.StringVar(&f.amqpExchange, "amqp-exchange", "", "AMQP exchange to publish to, the topic being the routing key; default the default exchange (env EXACTLY_AMQP_EXCHANGE)")
	fl.StringVar(&f.pubsubProject, "pubsub-project", "", "Google Cloud project of the Pub/Sub topics; credentials are Application Default Credentials, PUBSUB_EMULATOR_HOST selects an emulator (env EXACTLY_PUBSUB_PROJECT)")
	fl.StringVar(&f.pubsubTopics, "pubsub-topics", "", "comma-separated topic=pubsub-topic pairs mapping outbox topics to Pub/Sub topic IDs or full names; an unlisted topic goes to the Pub/Sub topic of its name (env EXACTLY_PUBSUB_TOPICS)")
	fl.StringVar(&f.aws.region, "aws-region", "", "sqs, sns: AWS region, default that of the standard AWS configuration (AWS_REGION, the shared config); credentials come from the standard chain (env EXACTLY_AWS_REGION)")
	fl.StringVar(&f.aws.endpoint, "aws-endpoint", "", "sqs, sns: endpoint URL instead of AWS's, for an emulator such as http://127.0.0.1:4566 (env EXACTLY_AWS_ENDPOINT)")
	fl.StringVar(&f.aws.sqsQueues, "sqs-queues", "", "sqs: comma-separated topic=queue pairs, the queue a URL or a name; an unlisted topic goes to the queue of its name (env EXACTLY_SQS_QUEUES)")
	fl.StringVar(&f.aws.snsTopics, "sns-topics", "", "sns: comma-separated topic=topic-ARN pairs; an unlisted topic is an ARN itself or is appended to --sns-arn-prefix (env EXACTLY_SNS_TOPICS)")
	fl.StringVar(&f.aws.snsPrefix, "sns-arn-prefix", "", "sns: ARN prefix of the topics not in --sns-topics, e.g. arn:aws:sns:eu-west-1:123456789012: (env EXACTLY_SNS_ARN_PREFIX)")
	addTunables(fl, f.tune.tunables())
	fl.StringVar(&f.adminAddr, "admin-addr", "127.0.0.1:9464", "address of the admin HTTP server (/metrics, /healthz, /readyz; no authentication) (env EXACTLY_ADMIN_ADDR)")
	fl.BoolVar(&f.console, "console", false, "serve the ops console's pages under /console/ on the admin server, read-only (env EXACTLY_CONSOLE)")
	fl.BoolVar(&f.consoleActions, "console-actions", false, "with --console: enable retrying and purging dead messages from the pages (env EXACTLY_CONSOLE_ACTIONS)")
	fl.StringVar(&f.logFormat, "log-format", "text", "log format: text or json (env EXACTLY_LOG_FORMAT)")
	fl.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error (env EXACTLY_LOG_LEVEL)")
	fl.BoolVar(&f.tls.enabled, "tls", false, "connect to the broker over TLS, verified against the system roots (env EXACTLY_TLS)")
	fl.StringVar(&f.tls.caFile, "tls-ca", "", "PEM file of the CA to verify the broker with; implies --tls (env EXACTLY_TLS_CA)")
	fl.StringVar(&f.tls.certFile, "tls-cert", "", "PEM client certificate for the broker, with --tls-key; implies --tls (env EXACTLY_TLS_CERT)")
	fl.StringVar(&f.tls.keyFile, "tls-key", "", "PEM private key of --tls-cert (env EXACTLY_TLS_KEY)")
	fl.StringVar(&f.tls.serverName, "tls-server-name", "", "name to verify the broker's certificate against, default its host (env EXACTLY_TLS_SERVER_NAME)")
	fl.StringVar(&f.kafkaSASL, "kafka-sasl", "", "Kafka SASL mechanism: plain, scram-sha-256 or scram-sha-512 (env EXACTLY_KAFKA_SASL)")
	fl.StringVar(&f.kafkaUser, "kafka-user", "", "Kafka SASL user (env EXACTLY_KAFKA_USER)")
	fl.StringVar(&f.kafkaPassword, "kafka-password", "", "Kafka SASL password; prefer the environment (env EXACTLY_KAFKA_PASSWORD)")
	fl.StringVar(&f.natsCreds, "nats-creds", "", "NATS credentials file (JWT and NKey seed) (env EXACTLY_NATS_CREDS)")
	fl.StringVar(&f.natsUser, "nats-user", "", "NATS user (env EXACTLY_NATS_USER)")
	fl.StringVar(&f.natsPassword, "nats-password", "", "NATS password; prefer the environment (env EXACTLY_NATS_PASSWORD)")
	fl.StringVar(&f.slot, "slot", pgcdc.DefaultSlot, "cdc: logical replication slot (and publication) name (env EXACTLY_SLOT)")
	fl.BoolVar(&f.cdcMessages, "cdc-messages", false, "cdc: also publish table-less messages written with pgcdc.Emit (env EXACTLY_CDC_MESSAGES)")
	fl.StringVar(&f.debeziumTable, "debezium-table", "", "cdc: also publish a Debezium-layout outbox table, routed to outbox.event.<aggregatetype> (env EXACTLY_DEBEZIUM_TABLE)")
	fl.BoolVar(&f.kafkaExactlyOnce, "kafka-exactly-once", false, "cdc + kafka: messages and the slot position in one Kafka transaction (env EXACTLY_KAFKA_EXACTLY_ONCE)")
	return cmd
}

// validate checks every setting before anything is opened and returns the
// logger they configure.
func (f *relayFlags) validate(fl *pflag.FlagSet) (*slog.Logger, error) {
	if f.dsn == "" {
		return nil, errors.New("--db is required (or EXACTLY_DB): postgres://..., mysql://... or sqlite:path")
	}
	if !strings.HasPrefix(f.dsn, "postgres://") && !strings.HasPrefix(f.dsn, "postgresql://") &&
		!strings.HasPrefix(f.dsn, "mysql://") && !strings.HasPrefix(f.dsn, "sqlite:") && !strings.HasPrefix(f.dsn, "file:") {
		return nil, fmt.Errorf("--db: unrecognised database DSN scheme (want postgres://, mysql:// or sqlite:): %s", hide.String(f.dsn))
	}
	if strings.TrimSpace(f.table) == "" {
		return nil, errors.New("--table must not be empty")
	}
	if f.consoleActions && !f.console {
		return nil, errors.New("--console-actions is for the console's pages: add --console")
	}
	if err := checkSource(f.source, dialectOf(f.dsn)); err != nil {
		return nil, fmt.Errorf("--source: %w", err)
	}
	if f.source != sourceCDC {
		for flag, set := range map[string]bool{"cdc-messages": f.cdcMessages, "debezium-table": f.debeziumTable != "",
			"kafka-exactly-once": f.kafkaExactlyOnce, "slot": f.slot != pgcdc.DefaultSlot} {
			if set {
				return nil, fmt.Errorf("--%s is for --source cdc, not %s", flag, f.source)
			}
		}
	}
	if f.kafkaExactlyOnce && f.broker != "kafka" {
		return nil, fmt.Errorf("--kafka-exactly-once needs --broker kafka, not %q", f.broker)
	}
	switch f.broker {
	case "kafka":
		if len(splitList(f.kafkaBrokers)) == 0 {
			return nil, errors.New("--kafka-brokers is required with --broker kafka (or EXACTLY_KAFKA_BROKERS): host:port[,host:port...]")
		}
		if f.kafkaSASL != "" {
			if !slices.Contains(kafkaSASLMechanisms, f.kafkaSASL) {
				return nil, fmt.Errorf("--kafka-sasl: unknown mechanism %q (want %s)", f.kafkaSASL, strings.Join(kafkaSASLMechanisms, ", "))
			}
			if f.kafkaUser == "" || f.kafkaPassword == "" {
				return nil, errors.New("--kafka-sasl needs --kafka-user and --kafka-password (or EXACTLY_KAFKA_USER and EXACTLY_KAFKA_PASSWORD)")
			}
		} else if f.kafkaUser != "" || f.kafkaPassword != "" {
			return nil, errors.New("--kafka-user and --kafka-password need --kafka-sasl (plain, scram-sha-256 or scram-sha-512)")
		}
	case "nats":
		if f.natsURL == "" {
			return nil, errors.New("--nats-url is required with --broker nats (or EXACTLY_NATS_URL): nats://host:4222")
		}
		if !strings.HasPrefix(f.natsURL, "nats://") && !strings.HasPrefix(f.natsURL, "tls://") {
			return nil, fmt.Errorf("--nats-url: want nats://host:port or tls://host:port, got %s", hide.String(f.natsURL))
		}
		if f.natsPassword != "" && f.natsUser == "" {
			return nil, errors.New("--nats-password needs --nats-user")
		}
		if f.natsCreds != "" && f.natsUser != "" {
			return nil, errors.New("--nats-creds and --nats-user both given: choose one way to authenticate")
		}
	case "amqp":
		if f.amqpURL == "" {
			return nil, errors.New("--amqp-url is required with --broker amqp (or EXACTLY_AMQP_URL): amqp://user:password@host:5672/vhost")
		}
		if _, err := amqp091.ParseURI(f.amqpURL); err != nil {
			return nil, fmt.Errorf("--amqp-url: invalid URL %s: %s", hide.String(f.amqpURL), f.hideSecrets(err.Error()))
		}
	case "pubsub":
		if err := f.checkPubsub(); err != nil {
			return nil, err
		}
	case "sqs", "sns":
		if err := f.checkAWS(); err != nil {
			return nil, err
		}
	case "":
		return nil, fmt.Errorf("--broker is required (or EXACTLY_BROKER): %s", strings.Join(brokers, ", "))
	default:
		return nil, fmt.Errorf("--broker: unknown broker %q (want %s)", f.broker, strings.Join(brokers, ", "))
	}
	if f.broker != "kafka" && (f.kafkaSASL != "" || f.kafkaUser != "" || f.kafkaPassword != "") {
		return nil, fmt.Errorf("--kafka-sasl, --kafka-user and --kafka-password are for --broker kafka, not %s", f.broker)
	}
	if f.broker != "nats" && (f.natsCreds != "" || f.natsUser != "" || f.natsPassword != "") {
		return nil, fmt.Errorf("--nats-creds, --nats-user and --nats-password are for --broker nats, not %s", f.broker)
	}
	if f.broker != "pubsub" && (f.pubsubProject != "" || f.pubsubTopics != "") {
		return nil, fmt.Errorf("--pubsub-project and --pubsub-topics are for --broker pubsub, not %s", f.broker)
	}
	if f.broker != "sqs" && f.broker != "sns" && f.aws != (awsFlags{}) {
		return nil, fmt.Errorf("--aws-region, --aws-endpoint, --sqs-queues, --sns-topics and --sns-arn-prefix are for --broker sqs and sns, not %s", f.broker)
	}
	if _, err := f.tls.config(); err != nil {
		return nil, err
	}
	if err := f.checkTunables(fl); err != nil {
		return nil, err
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
		return slog.New(slog.NewTextHandler(logOutput, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(logOutput, opts)), nil
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

// scrub removes the DSN's secrets, and every other one known, from an
// error message.
func scrub(err error, dsn string) string {
	hide.AddFrom(dsn)
	return hide.String(err.Error())
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
			return nil, fmt.Errorf("--db: invalid PostgreSQL DSN %s: %s", hide.String(dsn), scrub(err, dsn))
		}
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("--db: opening %s: %s", hide.String(dsn), scrub(err, dsn))
		}
		return &relayDB{handle: pool, dialect: outbox.Postgres, ping: pool.Ping, close: pool.Close}, nil
	}
	db, dialect, err := openDB(dsn)
	if err != nil {
		return nil, err
	}
	return &relayDB{handle: db, dialect: dialect, ping: db.PingContext, close: func() { db.Close() }}, nil
}

// relayMetrics are the Prometheus metrics of the relay (exactlyprom.Relay),
// on their own registry.
type relayMetrics struct {
	reg        *prometheus.Registry
	partitions func() float64
	*exactlyprom.Relay
}

func newRelayMetrics(partitions func() float64) *relayMetrics {
	m := &relayMetrics{reg: prometheus.NewRegistry(), partitions: partitions}
	m.use(exactlyprom.NewRelay(exactlyprom.RelayConfig{Partitions: m.held}))
	return m
}

func (m *relayMetrics) held() int { return int(m.partitions()) }

func (m *relayMetrics) use(r *exactlyprom.Relay) {
	if m.Relay != nil {
		m.reg.Unregister(m.Relay)
	}
	m.Relay = r
	m.reg.MustRegister(r)
}

// registerCDC exports the metrics of the cdc source instead; the source
// sets them through cdcHooks as it reads the slot. The failing gauges of
// the polling relay are left out: the cdc source keeps its attempts in
// memory (its failures show as exactly_relay_failed_total and in its warn
// logs).
func (m *relayMetrics) registerCDC() {
	m.use(exactlyprom.NewRelay(exactlyprom.RelayConfig{CDC: true, Partitions: m.held}))
}

// cdcHooks feed the metrics from the cdc source.
func (m *relayMetrics) cdcHooks() pgcdc.Hooks {
	return pgcdc.Hooks{Published: m.Published, Failed: m.Failed, Dead: m.Dead, Lag: m.Lag}
}

func (m *relayMetrics) hooks() relay.Hooks {
	h := m.Relay.Hooks()
	h.BacklogInterval = 5 * time.Second
	return h
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
		return fmt.Errorf("cannot reach the database %s: %s", hide.String(f.dsn), scrub(err, f.dsn))
	}
	// An outbox the relay cannot use is refused here, before the broker is
	// dialled and before "relay started" (Run checks again for the library).
	checkCtx, cancelCheck := context.WithTimeout(ctx, 10*time.Second)
	err = ob.Check(checkCtx, db.handle)
	cancelCheck()
	if err != nil {
		return fmt.Errorf("%s", scrub(err, f.dsn))
	}

	ln, err := net.Listen("tcp", f.adminAddr)
	if err != nil {
		return fmt.Errorf("--admin-addr: %w", err)
	}
	defer ln.Close()

	pub, closePub, err := newRelayPublisher(ctx, f, log)
	if err != nil {
		return err
	}
	defer closePub()
	var kafkaEOS *kafka.CDCExactlyOnce
	if f.kafkaExactlyOnce {
		// The transactional client is the sink's own; the publisher above
		// only proved that the brokers answer.
		tlsCfg, err := f.tls.config()
		if err != nil {
			return err
		}
		opts, err := f.kafkaOpts(tlsCfg)
		if err != nil {
			return err
		}
		kafkaEOS = &kafka.CDCExactlyOnce{Seeds: splitList(f.kafkaBrokers), Opts: opts,
			TransactionalID: f.tune.transactionalID, CheckpointTopic: f.tune.checkpointTopic, TransactionTimeout: f.tune.txnTime}
	}

	var rl atomic.Pointer[relayRunner]
	var running atomic.Bool
	m := newRelayMetrics(func() float64 {
		if r := rl.Load(); r != nil {
			return float64((*r).Partitions())
		}
		return 0
	})
	if f.source == sourceCDC {
		m.registerCDC()
	}
	r, err := newRelayRunner(f.source, relay.Config{
		Outbox:          ob,
		DB:              db.handle,
		Publisher:       pub,
		BatchSize:       f.tune.batchSize,
		PollInterval:    f.tune.pollInterval,
		MaxAttempts:     f.tune.maxAttempts,
		InitialBackoff:  f.tune.initialBackoff,
		MaxBackoff:      f.tune.maxBackoff,
		StrictOrder:     f.tune.strictOrder,
		PipelineDepth:   f.tune.pipelineDepth,
		Retention:       f.tune.retention,
		Partitions:      f.tune.partitions,
		LeaseTTL:        f.tune.leaseTTL,
		InstanceID:      f.tune.instanceID,
		ShutdownTimeout: f.tune.shutdownTimeout,
		Logger:          log,
		Hooks:           m.hooks(),
	}, cdcSettings{
		DSN: f.dsn, Slot: f.slot, Messages: f.cdcMessages, DebeziumTable: f.debeziumTable,
		KeepRows: f.tune.retention > 0, KafkaEOS: kafkaEOS, Hooks: m.cdcHooks(),
		Publication: f.tune.publication, MessagePrefix: f.tune.messagePrefix, MaxPending: f.tune.maxPending,
		HeartbeatInterval: f.tune.heartbeatInterval, StatusInterval: f.tune.statusInterval, LagInterval: f.tune.lagInterval,
	})
	if err != nil {
		return fmt.Errorf("%s", scrub(err, f.dsn))
	}
	rl.Store(&r)
	if f.source == sourceCDC {
		// The cdc source reads no backlog from the table; the gauges come
		// from the outbox's status instead.
		go func() {
			t := time.NewTicker(5 * time.Second)
			defer t.Stop()
			for {
				sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				if st, err := ob.Status(sctx, db.handle); err == nil {
					m.Backlog(st.Pending, st.OldestAge)
				}
				cancel()
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		}()
	}

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
		if r.Partitions() == 0 {
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
	if f.console {
		closeConsole, err := mountConsole(ctx, mux, f, db.handle, ob, m.reg, log)
		if err != nil {
			return err
		}
		defer closeConsole()
	}
	srv := &http.Server{Handler: hide.Handler(mux), ReadHeaderTimeout: 5 * time.Second}
	srvErr := make(chan error, 1)
	go func() { srvErr <- srv.Serve(ln) }()

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	relayErr := make(chan error, 1)
	running.Store(true)
	go func() { relayErr <- runSafely(runCtx, r) }()
	log.Info("relay started", "source", f.source, "table", ob.Table(), "dialect", db.dialect, "broker", f.broker, "tls", f.tls.wanted(),
		"admin", ln.Addr().String(), "db", hide.String(f.dsn))

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

// dialectOf names the dialect of a DSN already checked by validate.
func dialectOf(dsn string) string {
	switch {
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		return outbox.Postgres
	case strings.HasPrefix(dsn, "mysql://"):
		return outbox.MySQL
	}
	return outbox.SQLite
}
