package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"google.golang.org/api/iterator"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/pubsub"
)

// demoPubsubProject is the project of the demo's topics: an emulator takes
// any name.
const demoPubsubProject = "exactly-demo"

// pubsubPublishMethod is the gRPC method of a publish request.
const pubsubPublishMethod = "/google.pubsub.v1.Publisher/Publish"

// checkEmulatorAddr checks a Pub/Sub emulator address, host:port.
func checkEmulatorAddr(flag, addr string) error {
	if host, port, err := net.SplitHostPort(addr); err != nil || host == "" || port == "" {
		return fmt.Errorf("%s %q: want host:port of a Pub/Sub emulator", flag, addr)
	}
	return nil
}

// pubsubBroker is Google Cloud Pub/Sub: the in-process pstest server, or an
// emulator (--pubsub, or PUBSUB_EMULATOR_HOST), with a topic of the run's
// own, its dead-letter topic, and one subscription with message ordering
// that the group's members share, each with a streaming pull of its own.
//
// The relay's client loses answers on the wire: now and then the answer to
// a publish the server stored is turned into Unavailable, as a timeout
// would, and the client library sends the request again, so Pub/Sub holds
// two copies with one exactly-id. Those count as lost publish acks, with
// the ones the relay itself is told of (which it re-publishes).
type pubsubBroker struct {
	srv      *pstest.Server // nil for an emulator of the user's
	topicID  string
	subID    string
	auditID  string          // a subscription that only counts the copies, on an emulator of the user's
	admin    *gpubsub.Client // the members' and the set-up's
	relayCl  *gpubsub.Client // the relay's, whose answers get lost
	pub      *pubsub.Publisher
	log      *slog.Logger
	f        *faults
	calls    atomic.Int64
	lostWire atomic.Int64 // answers lost on the wire, re-sent by the client library
}

// newPubsubBroker starts pstest (addr empty) or connects to the emulator at
// addr (given by from: --pubsub or PUBSUB_EMULATOR_HOST), and creates the
// run's topics and subscriptions.
func newPubsubBroker(ctx context.Context, addr, from, run string, f *faults, log *slog.Logger) (*pubsubBroker, error) {
	b := &pubsubBroker{log: log, f: f}
	if addr == "" {
		b.srv = pstest.NewServer()
		addr = b.srv.Addr
		b.topicID, b.subID = "order.created", "promotions"
	} else {
		b.topicID = "exactly-demo-" + run + ".order.created"
		b.subID, b.auditID = "exactly-demo-"+run+".promotions", "exactly-demo-"+run+".audit"
	}
	fail := func(err error) (*pubsubBroker, error) {
		b.close()
		return nil, err
	}
	dial := func(extra ...option.ClientOption) (*gpubsub.Client, error) {
		opts := append([]option.ClientOption{option.WithEndpoint(addr), option.WithoutAuthentication(),
			option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())), option.WithTelemetryDisabled()}, extra...)
		return gpubsub.NewClient(ctx, demoPubsubProject, opts...)
	}
	var err error
	if b.admin, err = dial(); err != nil {
		return fail(fmt.Errorf("connecting to Pub/Sub at %s: %w", addr, err))
	}
	if b.relayCl, err = dial(option.WithGRPCDialOption(grpc.WithUnaryInterceptor(b.loseAnswers))); err != nil {
		return fail(fmt.Errorf("connecting to Pub/Sub at %s: %w", addr, err))
	}
	sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if b.srv == nil {
		pctx, cancel := context.WithTimeout(sctx, 10*time.Second)
		defer cancel()
		_, err := b.admin.TopicAdminClient.ListTopics(pctx, &pb.ListTopicsRequest{Project: "projects/" + demoPubsubProject, PageSize: 1}).Next()
		if err != nil && !errors.Is(err, iterator.Done) {
			return fail(fmt.Errorf("%s: cannot reach the Pub/Sub emulator at %s: %w", from, addr, err))
		}
	}
	for _, t := range []string{b.topicID, b.topicID + ".dlq"} {
		if _, err := b.admin.TopicAdminClient.CreateTopic(sctx, &pb.Topic{Name: b.topicName(t)}); err != nil {
			return fail(fmt.Errorf("creating the demo's topic %s: %w", t, err))
		}
	}
	subs := []*pb.Subscription{{Name: b.subName(b.subID), Topic: b.topicName(b.topicID), AckDeadlineSeconds: 10, EnableMessageOrdering: true}}
	if b.auditID != "" {
		subs = append(subs, &pb.Subscription{Name: b.subName(b.auditID), Topic: b.topicName(b.topicID), AckDeadlineSeconds: 60})
	}
	for _, s := range subs {
		if _, err := b.admin.SubscriptionAdminClient.CreateSubscription(sctx, s); err != nil {
			return fail(fmt.Errorf("creating the demo's subscription %s: %w", s.Name, err))
		}
	}
	if b.pub, err = pubsub.NewPublisher(b.relayCl, pubsub.PublisherConfig{}); err != nil {
		return fail(err)
	}
	return b, nil
}

func (b *pubsubBroker) topicName(id string) string {
	return "projects/" + demoPubsubProject + "/topics/" + id
}
func (b *pubsubBroker) subName(id string) string {
	return "projects/" + demoPubsubProject + "/subscriptions/" + id
}

// loseAnswers is the relay's client's interceptor: it turns the answer to
// some publish requests the server stored into Unavailable, on fixed calls
// (so every run has some) and on a rare roll of the dice.
func (b *pubsubBroker) loseAnswers(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	if err != nil || method != pubsubPublishMethod {
		return err
	}
	if n := b.calls.Add(1); n == 3 || n == 40 || b.f.roll() < 0.002 {
		b.lostWire.Add(1)
		b.f.lostAcks.Add(1)
		return status.Error(codes.Unavailable, "injected: the answer to a publish the server stored was lost")
	}
	return nil
}

func (b *pubsubBroker) label() string {
	if b.srv != nil {
		return "in-process Pub/Sub (pstest)"
	}
	return "Pub/Sub emulator"
}
func (b *pubsubBroker) topic() string                { return b.topicID }
func (b *pubsubBroker) publisher() exactly.Publisher { return b.pub }

func (b *pubsubBroker) member(ctx context.Context, spec memberSpec) error {
	if spec.handler == nil {
		return errors.New("Pub/Sub has no offsets to store in the database")
	}
	c, err := pubsub.NewConsumer(b.admin, pubsub.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: spec.handler, Workers: 4, Retry: demoRetry, DeadLetter: b.pub, Logger: b.log.With("member", spec.name),
			Hooks: exactly.ConsumerHooks{DeadLettered: spec.deadLettered},
		},
		Subscription: b.subID, Topic: b.topicID, MaxLeaseExtension: 10 * time.Second,
	})
	if err != nil {
		return err
	}
	return c.Run(ctx)
}

// stored counts the copies Pub/Sub holds of the topic's messages: from
// pstest's own record, or by draining the audit subscription.
func (b *pubsubBroker) stored(ctx context.Context) (int64, error) {
	if b.srv != nil {
		var n int64
		for _, m := range b.srv.Messages() {
			if m.Topic == b.topicName(b.topicID) {
				n++
			}
		}
		return n, nil
	}
	seen := map[string]bool{}
	for empty := 0; empty < 2; {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		res, err := b.admin.SubscriptionAdminClient.Pull(pctx, &pb.PullRequest{Subscription: b.subName(b.auditID), MaxMessages: 1000})
		cancel()
		switch {
		case err != nil && ctx.Err() == nil && (errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded):
			empty++ // an emulator waits for a message a while before answering none
			continue
		case err != nil:
			return 0, err
		case len(res.ReceivedMessages) == 0:
			empty++
			continue
		}
		empty = 0
		acks := make([]string, 0, len(res.ReceivedMessages))
		for _, m := range res.ReceivedMessages {
			seen[m.Message.GetMessageId()] = true
			acks = append(acks, m.AckId)
		}
		if err := b.admin.SubscriptionAdminClient.Acknowledge(ctx, &pb.AcknowledgeRequest{Subscription: b.subName(b.auditID), AckIds: acks}); err != nil {
			return 0, err
		}
	}
	return int64(len(seen)), nil
}

func (b *pubsubBroker) close() {
	if b.pub != nil {
		b.pub.Close()
	}
	if b.admin != nil && b.srv == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		for _, s := range []string{b.subID, b.auditID} {
			b.admin.SubscriptionAdminClient.DeleteSubscription(ctx, &pb.DeleteSubscriptionRequest{Subscription: b.subName(s)})
		}
		for _, t := range []string{b.topicID, b.topicID + ".dlq"} {
			b.admin.TopicAdminClient.DeleteTopic(ctx, &pb.DeleteTopicRequest{Topic: b.topicName(t)})
		}
		cancel()
	}
	for _, c := range []*gpubsub.Client{b.relayCl, b.admin} {
		if c != nil {
			c.Close()
		}
	}
	if b.srv != nil {
		b.srv.Close()
	}
}

// pubsubEmulator returns the address of the emulator the demo is to use
// (--pubsub, else PUBSUB_EMULATOR_HOST) and the name of where it came from;
// "" for the in-process pstest.
func pubsubEmulator(flag string) (addr, from string) {
	if flag != "" {
		return flag, "--pubsub"
	}
	if env := os.Getenv("PUBSUB_EMULATOR_HOST"); env != "" {
		return env, "PUBSUB_EMULATOR_HOST"
	}
	return "", ""
}
