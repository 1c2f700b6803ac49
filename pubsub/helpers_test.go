package pubsub_test

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/pubsub"
)

const project = "exactly-test"

// fake is a pstest server of the test's own and a client connected to it.
type fake struct {
	srv    *pstest.Server
	client *gpubsub.Client
	topics atomic.Int64
}

func newFake(t *testing.T, opts ...pstest.ServerReactorOption) *fake {
	t.Helper()
	srv := pstest.NewServer(opts...)
	t.Cleanup(func() { _ = srv.Close() })
	client, err := gpubsub.NewClient(context.Background(), project,
		option.WithEndpoint(srv.Addr),
		option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return &fake{srv: srv, client: client}
}

// topic creates a topic no other test uses, with an ordered subscription,
// and returns its ID.
func (f *fake) topic(t *testing.T) string {
	t.Helper()
	id := fmt.Sprintf("t-%s-%d", t.Name()[len(t.Name())-min(len(t.Name()), 40):], f.topics.Add(1))
	id = sanitize(id)
	ctx := context.Background()
	if _, err := f.client.TopicAdminClient.CreateTopic(ctx, &pb.Topic{Name: f.name(id)}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.SubscriptionAdminClient.CreateSubscription(ctx, &pb.Subscription{
		Name: "projects/" + project + "/subscriptions/" + id, Topic: f.name(id), EnableMessageOrdering: true,
	}); err != nil {
		t.Fatal(err)
	}
	return id
}

func sanitize(s string) string {
	b := []byte(s)
	for i, c := range b {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-':
		default:
			b[i] = '-'
		}
	}
	return string(b)
}

func (f *fake) name(id string) string { return "projects/" + project + "/topics/" + id }

func (f *fake) publisher(t *testing.T, cfg pubsub.PublisherConfig) *pubsub.Publisher {
	t.Helper()
	p, err := pubsub.NewPublisher(f.client, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// stored returns the messages the server stored for topic, in the order it
// stored them.
func (f *fake) stored(topic string) []exactlytest.Received {
	var out []exactlytest.Received
	for _, m := range f.srv.Messages() {
		if m.Topic != f.name(topic) {
			continue
		}
		h := make(map[string]string, len(m.Attributes))
		for k, v := range m.Attributes {
			h[k] = v
		}
		out = append(out, exactlytest.Received{
			ID: m.Attributes[exactly.HeaderID], Key: m.OrderingKey, Payload: m.Data, Headers: h,
		})
	}
	return out
}

// read is PublisherHarness.Read: the server holds a published message as
// soon as Publish confirmed it.
func (f *fake) read(t *testing.T, topic string, n int, timeout time.Duration) []exactlytest.Received {
	deadline := time.Now().Add(timeout)
	for {
		got := f.stored(topic)
		if len(got) >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// failPublish is a pstest reactor that fails the publish requests match
// picks with code, up to times of them (all with times < 0).
type failPublish struct {
	code  codes.Code
	mu    sync.Mutex
	match func(*pb.PublishRequest) bool
	times int
	hits  int
}

func (r *failPublish) React(req any) (bool, any, error) {
	pr, ok := req.(*pb.PublishRequest)
	if !ok {
		return false, nil, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.match == nil || !r.match(pr) || r.times == 0 {
		return false, nil, nil
	}
	r.times--
	r.hits++
	return true, nil, status.Error(r.code, "injected failure")
}

func (r *failPublish) set(times int, match func(*pb.PublishRequest) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.times, r.match = times, match
}

func (r *failPublish) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.hits
}

func (r *failPublish) option() pstest.ServerReactorOption {
	return pstest.ServerReactorOption{FuncName: "Publish", Reactor: r}
}

// orderingKey matches the requests of one ordering key.
func orderingKey(key string) func(*pb.PublishRequest) bool {
	return func(req *pb.PublishRequest) bool {
		return len(req.Messages) > 0 && req.Messages[0].OrderingKey == key
	}
}

// messages builds perKey messages for each key, interleaved, with their
// sequence number in the x-seq header.
func messages(topic string, keys []string, perKey int) []*exactly.Message {
	var out []*exactly.Message
	for seq := range perKey {
		for _, k := range keys {
			out = append(out, &exactly.Message{
				ID: exactly.NewID(), Topic: topic, Key: k,
				Payload:   fmt.Appendf(nil, "%s:%d", k, seq),
				Headers:   map[string]string{"x-seq": strconv.Itoa(seq)},
				CreatedAt: time.Now(),
			})
		}
	}
	return out
}

// pgOutbox returns a pool on the test PostgreSQL and an outbox table of the
// test's own in it.
func pgOutbox(t *testing.T, prefix string) (*pgxpool.Pool, *outbox.Outbox) {
	t.Helper()
	testenv.Need(t, testenv.Postgres)
	pool, err := pgxpool.New(context.Background(), testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool, exactlytest.MigratedOutbox(t, pool, outbox.Postgres, prefix)
}
