package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/kafka"
	"github.com/exactlyonce/exactly/nats"
)

// demoPartitions is the number of partitions of the demo's Kafka topic.
const demoPartitions = 6

// demoRetry is the consumers' handler policy in the demo: patient, so that
// nothing is dead-lettered while members come and go.
var demoRetry = exactly.RetryPolicy{MaxAttempts: 50, InitialBackoff: 10 * time.Millisecond, MaxBackoff: 250 * time.Millisecond}

// memberSpec is one incarnation of a consumer-group member.
type memberSpec struct {
	name string
	// handler applies a delivery (commit-after-effect, through an inbox).
	handler exactly.Handler
	// txHandler applies a delivery in the transaction that also advances
	// the stored offset (Kafka, offsets in the database).
	txHandler kafka.TxHandler
	// deadLettered counts messages the member gave up on.
	deadLettered func(*exactly.Message, error)
}

// demoBroker is the broker the demo publishes to and consumes from.
type demoBroker interface {
	label() string
	topic() string
	publisher() exactly.Publisher
	// member runs one member of the consumer group until ctx ends.
	member(ctx context.Context, spec memberSpec) error
	// stored counts the records the broker holds on the topic.
	stored(ctx context.Context) (int64, error)
	close()
}

// kafkaBroker is franz-go's in-process kfake cluster, or a real Kafka.
type kafkaBroker struct {
	cluster *kfake.Cluster // nil for a real Kafka
	seeds   []string
	t       string
	group   string
	admin   *kgo.Client
	pub     *kafka.Publisher
	log     *slog.Logger
	// offsets in the database (nil: committed to Kafka after the effect)
	offsets *demoDB
}

func newKafkaBroker(ctx context.Context, seeds []string, run string, log *slog.Logger) (*kafkaBroker, error) {
	b := &kafkaBroker{log: log, group: "exactly-demo-promotions-" + run}
	if len(seeds) == 0 {
		b.t = "order.created"
		cl, err := kfake.NewCluster(kfake.NumBrokers(3), kfake.SeedTopics(demoPartitions, b.t, b.t+".dlq"))
		if err != nil {
			return nil, fmt.Errorf("starting the in-process Kafka: %w", err)
		}
		b.cluster, b.seeds = cl, cl.ListenAddrs()
	} else {
		b.t, b.seeds = "exactly-demo-"+run+".order.created", seeds
	}
	fail := func(err error) (*kafkaBroker, error) {
		b.close()
		return nil, err
	}
	admin, err := kgo.NewClient(kgo.SeedBrokers(b.seeds...))
	if err != nil {
		return fail(fmt.Errorf("--kafka: %w", err))
	}
	b.admin = admin
	if b.cluster == nil {
		actx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		if err := admin.Ping(actx); err != nil {
			return fail(fmt.Errorf("--kafka: cannot reach Kafka at %s: %w", strings.Join(seeds, ","), err))
		}
		res, err := kadm.NewClient(admin).CreateTopics(actx, demoPartitions, -1, nil, b.t, b.t+".dlq")
		if err == nil {
			err = res.Error()
		}
		if err != nil {
			return fail(fmt.Errorf("--kafka: creating the demo's topics %s: %w", b.t, err))
		}
	}
	if b.pub, err = kafka.NewClientPublisher(b.seeds); err != nil {
		return fail(err)
	}
	return b, nil
}

func (b *kafkaBroker) label() string {
	if b.cluster != nil {
		return "in-process Kafka (kfake)"
	}
	return "Kafka"
}
func (b *kafkaBroker) topic() string                { return b.t }
func (b *kafkaBroker) publisher() exactly.Publisher { return b.pub }

func (b *kafkaBroker) member(ctx context.Context, spec memberSpec) error {
	cfg := kafka.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Retry: demoRetry, DeadLetter: b.pub, Logger: b.log.With("member", spec.name),
			Workers: demoPartitions, // every partition at once
			Hooks:   exactly.ConsumerHooks{DeadLettered: spec.deadLettered},
		},
		Group: b.group, Topics: []string{b.t}, MaxPollRecords: 100,
	}
	var c *kafka.Consumer
	var err error
	if b.offsets != nil {
		c, err = kafka.NewDBConsumer(b.seeds, kafka.DBConfig{ConsumerConfig: cfg, TxHandler: spec.txHandler, DB: b.offsets.db, Dialect: b.offsets.dialect,
			OffsetsTable: b.offsets.table(demoOffsetsTable)})
	} else {
		cfg.Handler = spec.handler
		c, err = kafka.NewConsumer(b.seeds, cfg)
	}
	if err != nil {
		return err
	}
	return c.Run(ctx)
}

func (b *kafkaBroker) stored(ctx context.Context) (int64, error) {
	ends, err := kadm.NewClient(b.admin).ListEndOffsets(ctx, b.t)
	if err != nil {
		return 0, err
	}
	var n int64
	ends.Each(func(o kadm.ListedOffset) { n += o.Offset })
	return n, ends.Error()
}

func (b *kafkaBroker) close() {
	if b.pub != nil {
		b.pub.Close()
	}
	if b.admin != nil {
		if b.cluster == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			kadm.NewClient(b.admin).DeleteTopics(ctx, b.t, b.t+".dlq")
			cancel()
		}
		b.admin.Close()
	}
	if b.cluster != nil {
		b.cluster.Close()
	}
}

// natsBroker is NATS JetStream: a stream of the run's own, and a durable
// pull consumer shared by the group's members.
type natsBroker struct {
	nc      *natsgo.Conn
	js      jetstream.JetStream
	stream  string
	subject string
	pub     *nats.Publisher
	log     *slog.Logger
}

func newNATSBroker(ctx context.Context, url, run string, log *slog.Logger) (*natsBroker, error) {
	nc, err := natsgo.Connect(url, natsgo.Name("exactly-demo"), natsgo.Timeout(5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("--nats: cannot connect to NATS at %s: %w", hide.String(url), err)
	}
	b := &natsBroker{nc: nc, log: log, stream: "EXACTLY_DEMO_" + strings.ToUpper(run), subject: "exactly-demo." + run + ".order.created"}
	if b.js, err = jetstream.New(nc); err != nil {
		nc.Close()
		return nil, fmt.Errorf("--nats: %w", err)
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := b.js.CreateStream(sctx, jetstream.StreamConfig{Name: b.stream, Subjects: []string{b.subject, b.subject + ".dlq"},
		Duplicates: 10 * time.Minute, Storage: jetstream.FileStorage}); err != nil {
		nc.Close()
		return nil, fmt.Errorf("--nats: creating the demo's stream %s (is JetStream enabled?): %w", b.stream, err)
	}
	if b.pub, err = nats.NewPublisher(b.js); err != nil {
		b.close()
		return nil, err
	}
	return b, nil
}

func (b *natsBroker) label() string                { return "NATS JetStream" }
func (b *natsBroker) topic() string                { return b.subject }
func (b *natsBroker) publisher() exactly.Publisher { return b.pub }

func (b *natsBroker) member(ctx context.Context, spec memberSpec) error {
	if spec.handler == nil {
		return errors.New("NATS has no offsets to store in the database")
	}
	c, err := nats.NewConsumer(b.js, nats.ConsumerConfig{
		Stream: b.stream, Durable: "promotions", FilterSubjects: []string{b.subject},
		AckWait: 2 * time.Second, Batch: 50,
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: spec.handler, Workers: 4, Retry: demoRetry, Logger: b.log.With("member", spec.name),
			Hooks: exactly.ConsumerHooks{DeadLettered: spec.deadLettered},
		},
	})
	if err != nil {
		return err
	}
	return c.Run(ctx)
}

func (b *natsBroker) stored(ctx context.Context) (int64, error) {
	s, err := b.js.Stream(ctx, b.stream)
	if err != nil {
		return 0, err
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(b.subject))
	if err != nil {
		return 0, err
	}
	var n uint64
	for _, c := range info.State.Subjects {
		n += c
	}
	return int64(n), nil
}

func (b *natsBroker) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b.js.DeleteStream(ctx, b.stream)
	b.nc.Close()
}
