package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/amqp"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/nats"
)

// brokerTLS are the TLS settings of the broker connection.
type brokerTLS struct {
	enabled    bool
	caFile     string
	certFile   string
	keyFile    string
	serverName string
}

func (t *brokerTLS) wanted() bool {
	return t.enabled || t.caFile != "" || t.certFile != "" || t.keyFile != "" || t.serverName != ""
}

// config builds the TLS configuration, nil when TLS is not wanted. Every
// file is read now, so a missing or bad one fails at start, named.
func (t *brokerTLS) config() (*tls.Config, error) {
	if !t.wanted() {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.serverName}
	if t.caFile != "" {
		pem, err := os.ReadFile(t.caFile)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca: no PEM certificate in %s", t.caFile)
		}
		cfg.RootCAs = pool
	}
	if (t.certFile == "") != (t.keyFile == "") {
		return nil, errors.New("--tls-cert and --tls-key go together: give both for a client certificate, or neither")
	}
	if t.certFile != "" {
		cert, err := tls.LoadX509KeyPair(t.certFile, t.keyFile)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// SASL mechanisms for Kafka.
var kafkaSASLMechanisms = []string{"plain", "scram-sha-256", "scram-sha-512"}

// kafkaOpts are the connection options of the relay's Kafka client.
func (f *relayFlags) kafkaOpts(tlsCfg *tls.Config) ([]kgo.Opt, error) {
	opts := []kgo.Opt{kgo.SeedBrokers(splitList(f.kafkaBrokers)...), kgo.ClientID("exactly-relay")}
	if tlsCfg != nil {
		opts = append(opts, kgo.DialTLSConfig(tlsCfg))
	}
	switch f.kafkaSASL {
	case "":
	case "plain":
		opts = append(opts, kgo.SASL(plain.Auth{User: f.kafkaUser, Pass: f.kafkaPassword}.AsMechanism()))
	case "scram-sha-256":
		opts = append(opts, kgo.SASL(scram.Auth{User: f.kafkaUser, Pass: f.kafkaPassword}.AsSha256Mechanism()))
	case "scram-sha-512":
		opts = append(opts, kgo.SASL(scram.Auth{User: f.kafkaUser, Pass: f.kafkaPassword}.AsSha512Mechanism()))
	default:
		return nil, fmt.Errorf("--kafka-sasl: unknown mechanism %q (want %s)", f.kafkaSASL, strings.Join(kafkaSASLMechanisms, ", "))
	}
	return opts, nil
}

// connectTimeout bounds the check, at start, that the broker answers.
const connectTimeout = 10 * time.Second

// newRelayPublisher connects to the broker and checks that it answers, so
// an unreachable or misconfigured broker fails the start with a clear
// error. Once running, broker outages are retried, never fatal.
func newRelayPublisher(ctx context.Context, f *relayFlags, log *slog.Logger) (exactly.Publisher, func(), error) {
	tlsCfg, err := f.tls.config()
	if err != nil {
		return nil, nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	switch f.broker {
	case "kafka":
		opts, err := f.kafkaOpts(tlsCfg)
		if err != nil {
			return nil, nil, err
		}
		cl, err := kgo.NewClient(opts...)
		if err != nil {
			return nil, nil, fmt.Errorf("--kafka-brokers: %s", f.hideSecrets(err.Error()))
		}
		if err := cl.Ping(cctx); err != nil {
			cl.Close()
			return nil, nil, fmt.Errorf("cannot reach Kafka at %s within %s: %s", f.hideSecrets(f.kafkaBrokers), connectTimeout, f.hideSecrets(err.Error()))
		}
		p, err := kafka.NewPublisher(cl)
		if err != nil {
			cl.Close()
			return nil, nil, err
		}
		return p, func() { p.Close(); cl.Close() }, nil
	case "nats":
		opts := []natsgo.Option{natsgo.Name("exactly-relay"), natsgo.MaxReconnects(-1), natsgo.Timeout(connectTimeout),
			natsgo.DisconnectErrHandler(func(_ *natsgo.Conn, err error) {
				if err != nil {
					log.Warn("disconnected from NATS", "err", err)
				}
			}),
			natsgo.ReconnectHandler(func(c *natsgo.Conn) { log.Info("reconnected to NATS", "url", c.ConnectedUrlRedacted()) })}
		if tlsCfg != nil {
			opts = append(opts, natsgo.Secure(tlsCfg))
		}
		if f.natsCreds != "" {
			if _, err := os.Stat(f.natsCreds); err != nil {
				return nil, nil, fmt.Errorf("--nats-creds: %w", err)
			}
			opts = append(opts, natsgo.UserCredentials(f.natsCreds))
		}
		if f.natsUser != "" {
			opts = append(opts, natsgo.UserInfo(f.natsUser, f.natsPassword))
		}
		nc, err := natsgo.Connect(f.natsURL, opts...)
		if err != nil {
			return nil, nil, fmt.Errorf("cannot connect to NATS at %s: %s", hide.String(f.natsURL), f.hideSecrets(err.Error()))
		}
		js, err := jetstream.New(nc)
		if err != nil {
			nc.Close()
			return nil, nil, fmt.Errorf("--nats-url: %s", f.hideSecrets(err.Error()))
		}
		if _, err := js.AccountInfo(cctx); err != nil {
			nc.Close()
			return nil, nil, fmt.Errorf("NATS at %s does not answer JetStream requests (is JetStream enabled for this account?): %s", hide.String(f.natsURL), f.hideSecrets(err.Error()))
		}
		p, err := nats.NewPublisher(js)
		if err != nil {
			nc.Close()
			return nil, nil, err
		}
		return p, func() { _ = nc.Drain(); nc.Close() }, nil
	case "amqp":
		cfg := amqp091.Config{TLSClientConfig: tlsCfg}
		if tlsCfg != nil && !strings.HasPrefix(f.amqpURL, "amqps://") {
			return nil, nil, errors.New("--amqp-url: TLS settings need an amqps:// URL")
		}
		// Check the broker and the credentials once; the publisher then
		// connects, and reconnects, by itself.
		cfg.Dial = amqp091.DefaultDial(connectTimeout)
		conn, err := amqp091.DialConfig(f.amqpURL, cfg)
		if err != nil {
			return nil, nil, fmt.Errorf("cannot connect to AMQP at %s: %s", hide.String(f.amqpURL), f.hideSecrets(err.Error()))
		}
		conn.Close()
		opts := []amqp.PublisherOption{amqp.DialConfig(amqp091.Config{TLSClientConfig: tlsCfg}), amqp.Logger(log)}
		if f.amqpExchange != "" {
			opts = append(opts, amqp.Exchange(f.amqpExchange))
		}
		p, err := amqp.NewPublisher(f.amqpURL, opts...)
		if err != nil {
			return nil, nil, fmt.Errorf("--amqp-url: %s", f.hideSecrets(err.Error()))
		}
		return p, func() { p.Close() }, nil
	case "pubsub":
		return f.newPubsubPublisher(ctx, cctx, log)
	case "sqs", "sns":
		return f.newAWSPublisher(ctx, cctx, log)
	}
	return nil, nil, fmt.Errorf("--broker: unknown broker %q (want %s)", f.broker, strings.Join(brokers, ", "))
}

// hideSecrets removes every secret the flags hold, and every other one
// known, from msg.
func (f *relayFlags) hideSecrets(msg string) string {
	hide.Add(f.kafkaPassword, f.natsPassword)
	hide.AddFrom(f.natsURL, f.amqpURL, f.dsn, f.kafkaBrokers)
	return hide.String(msg)
}
