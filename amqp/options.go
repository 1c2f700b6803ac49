package amqp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"strconv"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// PublisherOption configures a Publisher. (A Consumer takes a
// ConsumerConfig instead.)
type PublisherOption interface {
	applyPublisher(*publisherOptions)
}

// connOptions are the settings of one AMQP connection.
type connOptions struct {
	config amqp091.Config
	logger *slog.Logger
}

type sharedOption func(*connOptions)

func (o sharedOption) applyPublisher(p *publisherOptions) { o(&p.conn) }

// DialConfig sets the amqp091-go configuration used for every connection
// of a Publisher (TLS, SASL, vhost, heartbeat, frame size, client
// properties, a custom Dial), overriding amqp091-go's defaults (10s
// heartbeat, 30s handshake timeout, PLAIN auth from the URL). Values in the
// URL take precedence as amqp091.DialConfig defines. A Consumer takes the
// same settings in ConsumerConfig.DialConfig.
//
// Config.Recovery must stay nil: the Publisher and the Consumer reconnect by
// themselves, and amqp091-go's experimental recovery would re-open channels
// behind their back (resetting publisher-confirm sequence numbers, which
// would attribute confirms to the wrong messages); a config with Recovery
// set is refused. A Heartbeat far above the default makes a dead connection
// take that long to notice, and with it the in-flight batch. When
// Config.Properties has no "connection_name", the adapter names the
// connection after its role ("exactly publisher", "exactly consumer
// <queue>") so it is recognisable in the management UI and rabbitmqctl.
func DialConfig(cfg amqp091.Config) PublisherOption {
	return sharedOption(func(o *connOptions) { o.config = cfg })
}

// Logger sets a Publisher's logger for connection events, overriding the
// default of slog.Default(). A nil logger restores the default. (A
// Consumer's is ConsumerConfig.Logger.)
func Logger(l *slog.Logger) PublisherOption {
	return sharedOption(func(o *connOptions) { o.logger = l })
}

// dialer opens connections to one broker with one configuration.
type dialer struct {
	url     string
	where   string // host:port[/vhost], for messages: the URL may hold a password
	timeout time.Duration
	config  amqp091.Config
	name    string // the default connection_name
}

func newDialer(url string, o connOptions, name string) (*dialer, error) {
	uri, err := amqp091.ParseURI(url)
	if err != nil {
		return nil, fmt.Errorf("the AMQP URL is not valid (want amqp://user:pass@host:port/vhost): %w", err)
	}
	if o.config.Recovery != nil {
		return nil, errors.New("DialConfig: Config.Recovery must be nil: the adapter reconnects by itself, and amqp091-go's recovery would re-open channels behind it")
	}
	d := &dialer{
		url:     url,
		where:   net.JoinHostPort(uri.Host, strconv.Itoa(uri.Port)),
		timeout: 30 * time.Second,
		config:  o.config,
		name:    name,
	}
	if uri.Vhost != "/" {
		d.where += "/" + uri.Vhost
	}
	if uri.ConnectionTimeout > 0 {
		d.timeout = time.Duration(uri.ConnectionTimeout) * time.Millisecond
	}
	return d, nil
}

// dial opens a connection. ctx bounds the TCP connect (unless the
// configuration brings its own Dial); the TLS and AMQP handshakes are
// bounded by the connection timeout.
func (d *dialer) dial(ctx context.Context) (*amqp091.Connection, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	cfg := d.config
	props := amqp091.NewConnectionProperties()
	maps.Copy(props, d.config.Properties)
	if _, ok := props["connection_name"]; !ok {
		props["connection_name"] = d.name
	}
	cfg.Properties = props
	if cfg.TLSClientConfig != nil {
		// amqp091.DialConfig fills in ServerName: keep the caller's copy, shared
		// by concurrent dials, untouched.
		cfg.TLSClientConfig = cfg.TLSClientConfig.Clone()
	}
	if cfg.Dial == nil {
		timeout := d.timeout
		cfg.Dial = func(network, addr string) (net.Conn, error) {
			dctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			var nd net.Dialer
			c, err := nd.DialContext(dctx, network, addr)
			if err != nil {
				return nil, err
			}
			// amqp091-go clears the deadline once the handshake is done.
			if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
				c.Close()
				return nil, err
			}
			return c, nil
		}
	}
	conn, err := amqp091.DialConfig(d.url, cfg)
	if err != nil {
		return nil, fmt.Errorf("amqp: connecting to %s: %w", d.where, err)
	}
	return conn, nil
}
