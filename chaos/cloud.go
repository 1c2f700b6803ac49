package chaos

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/aws-sdk-go-v2/service/sqs/types"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/exactlyonce/exactly"
)

// chaosDir is the directory of this package's source (chaos/).
func chaosDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(file)
}

// repoRoot is the root of this source tree (chaos/..), where
// scripts/aws-emulator and its install live.
func repoRoot() string { return filepath.Dir(chaosDir()) }

// nodeBin is the Node.js binary fauxqs runs under: CHAOS_NODE, else node
// on the PATH.
func nodeBin() string {
	if v := os.Getenv("CHAOS_NODE"); v != "" {
		return v
	}
	if p, err := exec.LookPath("node"); err == nil {
		return p
	}
	return "node"
}

// fauxqsApp returns fauxqs's dist/app.js: CHAOS_FAUXQS_APP, else the copy
// scripts/aws-emulator installs into .cache/fauxqs (installing it when it is
// missing or not of the pinned lock, by starting and stopping the emulator
// once).
func fauxqsApp(ctx context.Context) (string, error) {
	if v := os.Getenv("CHAOS_FAUXQS_APP"); v != "" {
		return v, nil
	}
	root := repoRoot()
	dir := filepath.Join(root, ".cache", "fauxqs")
	app := filepath.Join(dir, "node_modules", "fauxqs", "dist", "app.js")
	installed := func() bool {
		want, err1 := os.ReadFile(filepath.Join(root, "scripts", "fauxqs", "package-lock.json"))
		have, err2 := os.ReadFile(filepath.Join(dir, "installed.lock"))
		_, err3 := os.Stat(app)
		return err1 == nil && err2 == nil && err3 == nil && bytes.Equal(want, have)
	}
	if installed() {
		return app, nil
	}
	script := filepath.Join(root, "scripts", "aws-emulator")
	out, err := exec.CommandContext(ctx, script, "start").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", fmt.Errorf("chaos: installing fauxqs with %s: %w: %s", script, err, ee.Stderr)
		}
		return "", fmt.Errorf("chaos: installing fauxqs with %s: %w", script, err)
	}
	endpoint := strings.TrimSpace(string(out))
	if i := strings.LastIndex(endpoint, ":"); i >= 0 {
		_ = exec.CommandContext(ctx, script, "stop", endpoint[i+1:]).Run()
	}
	if !installed() {
		return "", fmt.Errorf("chaos: %s ran but fauxqs is not installed in %s", script, dir)
	}
	return app, nil
}

// sqsClient is an SQS client of the emulator at endpoint (no credentials
// are checked there).
func sqsClient(endpoint string) *awssqs.Client {
	return awssqs.NewFromConfig(aws.Config{Region: "us-east-1", BaseEndpoint: aws.String(endpoint),
		Credentials: credentials.NewStaticCredentialsProvider("chaos", "chaos", "")})
}

// setupSQS creates the FIFO queue and its consumer's dead-letter queue.
func (h *harness) setupSQS(ctx context.Context) error {
	c := sqsClient("http://" + h.sqsAddr)
	for _, q := range []struct {
		name string
		url  *string
	}{{sqsQueue, &h.sqsQueueURL}, {sqsDLQ, &h.sqsDLQURL}} {
		out, err := c.CreateQueue(ctx, &awssqs.CreateQueueInput{QueueName: aws.String(q.name),
			Attributes: map[string]string{"FifoQueue": "true", "MessageRetentionPeriod": "86400"}})
		if err != nil {
			return err
		}
		*q.url = aws.ToString(out.QueueUrl)
	}
	return nil
}

// pubsubClient is a client of the Pub/Sub server at addr (pstest: no
// credentials, plain gRPC).
func pubsubClient(ctx context.Context, addr string) (*gpubsub.Client, error) {
	return gpubsub.NewClient(ctx, pubsubProject, option.WithEndpoint(addr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())), option.WithTelemetryDisabled())
}

func pubsubTopicName(id string) string { return "projects/" + pubsubProject + "/topics/" + id }
func pubsubSubName(id string) string   { return "projects/" + pubsubProject + "/subscriptions/" + id }

// setupPubsub creates the topic and its dead-letter topic, the consumers'
// subscription (message ordering on) and an audit subscription on each
// topic, which only the checker reads: every copy the server stored.
func (h *harness) setupPubsub(ctx context.Context) error {
	c, err := pubsubClient(ctx, h.psAddr)
	if err != nil {
		return err
	}
	defer c.Close()
	for _, t := range []string{pubsubTopic, pubsubDLQ} {
		if _, err := c.TopicAdminClient.CreateTopic(ctx, &pb.Topic{Name: pubsubTopicName(t)}); err != nil {
			return err
		}
	}
	for _, s := range []*pb.Subscription{
		{Name: pubsubSubName(pubsubSub), Topic: pubsubTopicName(pubsubTopic), AckDeadlineSeconds: 10, EnableMessageOrdering: true},
		{Name: pubsubSubName(pubsubAudit), Topic: pubsubTopicName(pubsubTopic), AckDeadlineSeconds: 600},
		{Name: pubsubSubName(pubsubDLQAudit), Topic: pubsubTopicName(pubsubDLQ), AckDeadlineSeconds: 600},
	} {
		if _, err := c.SubscriptionAdminClient.CreateSubscription(ctx, s); err != nil {
			return err
		}
	}
	return nil
}

// readSQS builds the broker log of the SQS pipeline. The queue cannot be
// read after the run (the consumers deleted what they applied), so it comes
// from the deliveries: a written message is on the broker when it was
// delivered, and per key the first deliveries, in the order they were
// received, are the queue's order of that group. The copies SQS dropped as
// duplicates within its 5-minute deduplication window are not visible, a
// copy stored after it is a delivery of its own (dup delivered). Dead
// letters are the messages in the dead-letter queue.
func (h *harness) readSQS(ctx context.Context, pool *pgxpool.Pool, pipeline string) (*brokerLog, error) {
	l := &brokerLog{copies: map[string]int{}}
	rows, err := pool.Query(ctx, `SELECT d.msg_id, w.key, w.seq FROM chaos_deliveries d JOIN chaos_written w ON w.msg_id = d.msg_id
		WHERE d.pipeline = $1 ORDER BY d.id`, pipeline)
	if err != nil {
		return nil, err
	}
	order := orderTracker{}
	for rows.Next() {
		var id, key string
		var seq int64
		if err := rows.Scan(&id, &key, &seq); err != nil {
			return nil, err
		}
		if l.copies[id] == 0 {
			l.copies[id] = 1
			if !order.see(key, seq) {
				l.orderViol++
			}
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	c := sqsClient("http://" + h.sqsAddr)
	out, err := c.GetQueueAttributes(ctx, &awssqs.GetQueueAttributesInput{QueueUrl: aws.String(h.sqsDLQURL),
		AttributeNames: []types.QueueAttributeName{types.QueueAttributeNameApproximateNumberOfMessages, types.QueueAttributeNameApproximateNumberOfMessagesNotVisible}})
	if err != nil {
		return nil, fmt.Errorf("dead-letter queue: %w", err)
	}
	for _, v := range out.Attributes {
		n, _ := strconv.Atoi(v)
		l.deadLetter += n
	}
	return l, nil
}

// readPubsub reads every copy the server stored from the audit
// subscriptions, directly (not through the proxy). pstest numbers its
// messages in the order it stored them (m0, m1, ...): that is the broker
// order.
func (h *harness) readPubsub(ctx context.Context) (*brokerLog, error) {
	c, err := pubsubClient(ctx, h.psAddr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	type stored struct {
		n   int
		msg *pb.PubsubMessage
	}
	drain := func(sub string) ([]stored, error) {
		var out []stored
		seen := map[string]bool{}
		for empty := 0; empty < 2; {
			pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			res, err := c.SubscriptionAdminClient.Pull(pctx, &pb.PullRequest{Subscription: pubsubSubName(sub), MaxMessages: 1000})
			cancel()
			switch {
			case err != nil && ctx.Err() == nil && (errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded):
				empty++
				continue
			case err != nil:
				return nil, err
			case len(res.ReceivedMessages) == 0:
				empty++
				continue
			}
			empty = 0
			acks := make([]string, 0, len(res.ReceivedMessages))
			for _, m := range res.ReceivedMessages {
				acks = append(acks, m.AckId)
				id := m.Message.GetMessageId()
				if seen[id] {
					continue
				}
				seen[id] = true
				n, err := strconv.Atoi(strings.TrimPrefix(id, "m"))
				if err != nil {
					return nil, fmt.Errorf("message id %q is not pstest's m<n>", id)
				}
				out = append(out, stored{n, m.Message})
			}
			if err := c.SubscriptionAdminClient.Acknowledge(ctx, &pb.AcknowledgeRequest{Subscription: pubsubSubName(sub), AckIds: acks}); err != nil {
				return nil, err
			}
		}
		slices.SortFunc(out, func(a, b stored) int { return a.n - b.n })
		return out, nil
	}
	msgs, err := drain(pubsubAudit)
	if err != nil {
		return nil, err
	}
	l := &brokerLog{copies: map[string]int{}}
	order := orderTracker{}
	for _, m := range msgs {
		id := m.msg.Attributes[exactly.HeaderID]
		l.copies[id]++
		if l.copies[id] == 1 {
			if key, seq, ok := seqOf(m.msg.Data); ok && !order.see(key, seq) {
				l.orderViol++
			}
		}
	}
	dead, err := drain(pubsubDLQAudit)
	if err != nil {
		return nil, err
	}
	l.deadLetter = len(dead)
	return l, nil
}
