package main

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/pubsub"
)

// pubsubProject is the project of the rows' topics on pstest.
const pubsubProject = "exactly-bench"

// pubsubFake is the one pstest server of the run, in this process, and a
// client of it: every Pub/Sub row publishes to it, on a topic of its own.
type pubsubFake struct {
	srv    *pstest.Server
	client *gpubsub.Client
	topics atomic.Int64
}

// pstest starts the run's pstest server on first use.
func (b *bench) pstest(ctx context.Context) (*pubsubFake, error) {
	if b.ps != nil {
		return b.ps, nil
	}
	srv := pstest.NewServer()
	client, err := gpubsub.NewClient(ctx, pubsubProject, option.WithEndpoint(srv.Addr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())), option.WithTelemetryDisabled())
	if err != nil {
		srv.Close()
		return nil, fmt.Errorf("pstest client: %w", err)
	}
	b.ps = &pubsubFake{srv: srv, client: client}
	return b.ps, nil
}

func (f *pubsubFake) close() {
	f.client.Close()
	f.srv.Close()
}

// freshTopic creates a topic of the row's own (no subscription: pstest
// keeps every published message for the count), and returns its ID and
// what removes it and the server's record of its messages.
func (b *bench) freshTopic(ctx context.Context, id string) (*pubsubFake, string, func(), error) {
	f, err := b.pstest(ctx)
	if err != nil {
		return nil, "", nil, err
	}
	topic := fmt.Sprintf("exactlybench-%s-%d", id, f.topics.Add(1))
	if _, err := f.client.TopicAdminClient.CreateTopic(ctx, &pb.Topic{Name: f.topicName(topic)}); err != nil {
		return nil, "", nil, fmt.Errorf("create topic %s: %w", topic, err)
	}
	return f, topic, func() {
		cctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		if err := f.client.TopicAdminClient.DeleteTopic(cctx, &pb.DeleteTopicRequest{Topic: f.topicName(topic)}); err != nil {
			b.log.Warn("could not delete the row's topic", "topic", topic, "err", err)
		}
		f.srv.ClearMessages() // rows never overlap
	}, nil
}

func (f *pubsubFake) topicName(id string) string {
	return "projects/" + pubsubProject + "/topics/" + id
}

// checkTopic fails unless the server stored exactly want messages on topic,
// each exactly-id once: every message arrived and none was stored twice.
func (f *pubsubFake) checkTopic(topic string, want int) error {
	name := f.topicName(topic)
	ids := make(map[string]bool, want)
	total := 0
	for _, m := range f.srv.Messages() {
		if m.Topic != name {
			continue
		}
		total++
		ids[m.Attributes[exactly.HeaderID]] = true
	}
	if total != want || len(ids) != want {
		return fmt.Errorf("topic %s holds %d messages with %d distinct ids, want %d", topic, total, len(ids), want)
	}
	return nil
}

// pubsubSettings are the publish settings of every Pub/Sub row: the pubsub
// Publisher's defaults.
func pubsubSettings() gpubsub.PublishSettings {
	s := gpubsub.DefaultPublishSettings
	s.Timeout = pubsub.DefaultPublishTimeout
	return s
}

// runPubsubCeiling publishes the messages as fast as the client library
// and pstest take them: every message handed to the library's Publisher
// (message ordering on, the same ordering keys, data and attributes as the
// pubsub Publisher sends, its settings), then every result awaited. The
// messages are built before the clock starts.
func runPubsubCeiling(ctx context.Context, b *bench) (result, error) {
	const id = "pubsub"
	f, topic, drop, err := b.freshTopic(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer drop()
	gen := b.messages(topic)
	msgs := make([]*gpubsub.Message, b.cfg.n)
	for i := range msgs {
		m := gen.get(i)
		attrs := make(map[string]string, len(m.Headers)+2)
		for k, v := range m.Headers {
			attrs[k] = v
		}
		attrs[exactly.HeaderID] = m.ID
		attrs[exactly.HeaderCreatedAt] = m.CreatedAt.UTC().Format(time.RFC3339Nano)
		msgs[i] = &gpubsub.Message{Data: m.Payload, Attributes: attrs, OrderingKey: m.Key}
	}
	t := f.client.Publisher(f.topicName(topic))
	t.PublishSettings = pubsubSettings()
	t.EnableMessageOrdering = true
	defer t.Stop()

	tm := b.startTimer(id)
	results := make([]*gpubsub.PublishResult, len(msgs))
	for i, m := range msgs {
		results[i] = t.Publish(ctx, m)
	}
	for _, r := range results {
		if _, err := r.Get(ctx); err != nil {
			tm.stop()
			return result{}, err
		}
	}
	elapsed := tm.stop()
	if err := f.checkTopic(topic, b.cfg.n); err != nil {
		return result{}, err
	}
	return result{msgs: b.cfg.n, elapsed: elapsed, note: fmt.Sprintf("library Publisher, every message handed over at once, then every result awaited; pstest in this process (its CPU is the bench's); %s", tm.cpu())}, nil
}

// runPubsubPublisherAlone calls the pubsub Publisher the way the relay
// does, in batches of -batch messages handed over in order with Send, up to
// relayDepth of them awaiting their outcome, with no database: the rate
// the publisher itself allows.
func runPubsubPublisherAlone(ctx context.Context, b *bench) (result, error) {
	const id = "pub-pubsub"
	f, topic, drop, err := b.freshTopic(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer drop()
	pub, err := pubsub.NewPublisher(f.client, pubsub.PublisherConfig{})
	if err != nil {
		return result{}, err
	}
	defer pub.Close()
	gen := b.messages(topic)
	batches := make([][]*exactly.Message, 0, b.cfg.n/b.cfg.batch+1)
	for i := 0; i < b.cfg.n; i += b.cfg.batch {
		batch := make([]*exactly.Message, 0, b.cfg.batch)
		for j := i; j < min(i+b.cfg.batch, b.cfg.n); j++ {
			batch = append(batch, gen.get(j))
		}
		batches = append(batches, batch)
	}
	tm := b.startTimer(id)
	err = sendPipelined(ctx, pub, batches)
	elapsed := tm.stop()
	if err != nil {
		return result{}, err
	}
	if err := f.checkTopic(topic, b.cfg.n); err != nil {
		return result{}, err
	}
	return result{msgs: b.cfg.n, elapsed: elapsed, note: fmt.Sprintf("%d Send calls, up to %d awaiting their outcome; %s", len(batches), relayDepth, tm.cpu())}, nil
}

// runRelayPubsub drains the outbox to Pub/Sub through the pubsub Publisher,
// with its defaults, on the row's own topic of the run's pstest server.
func runRelayPubsub(ctx context.Context, b *bench) (result, error) {
	const id = "relay-pubsub"
	f, topic, drop, err := b.freshTopic(ctx, id)
	if err != nil {
		return result{}, err
	}
	defer drop()
	pub, err := pubsub.NewPublisher(f.client, pubsub.PublisherConfig{})
	if err != nil {
		return result{}, err
	}
	defer pub.Close()
	res, err := b.drainRelay(ctx, id, topic, pub, nil)
	if err != nil {
		return res, err
	}
	if err := f.checkTopic(topic, b.cfg.n); err != nil {
		return result{}, err
	}
	res.note = "pstest in this process (its CPU is the bench's); " + res.note
	return res, nil
}
