package main

import (
	"context"
	"errors"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssns "github.com/aws/aws-sdk-go-v2/service/sns"
	awssqs "github.com/aws/aws-sdk-go-v2/service/sqs"
	sqstypes "github.com/aws/aws-sdk-go-v2/service/sqs/types"

	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/sqstest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
)

// awsSecret stands for a secret key in the environment; no output may
// carry it.
const awsSecret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"

// awsEnv is the environment of a relay against the emulator: static
// credentials through the standard chain, no shared files, no EC2 metadata.
func awsEnv(t *testing.T) []string {
	return append(relayEnvCleared(), "AWS_ACCESS_KEY_ID=AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY="+awsSecret,
		"AWS_EC2_METADATA_DISABLED=true", "AWS_CONFIG_FILE="+t.TempDir()+"/none", "AWS_SHARED_CREDENTIALS_FILE="+t.TempDir()+"/none",
		"AWS_REGION=", "AWS_DEFAULT_REGION=", "AWS_PROFILE=")
}

func TestRelayAWS(t *testing.T) {
	bin := buildExactly(t)
	t.Run("BadFlags", func(t *testing.T) { testRelayAWSBadFlags(t, bin) })
	t.Run("Unreachable", func(t *testing.T) { testRelayAWSUnreachable(t, bin) })
	t.Run("SQS", func(t *testing.T) { testRelayPostgresSQS(t, bin) })
	t.Run("SNS", func(t *testing.T) { testRelayPostgresSNS(t, bin) })
}

func testRelayAWSBadFlags(t *testing.T, bin string) {
	const dsn = "postgres://u:secret@127.0.0.1:1/db"
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--broker", "sqs", "--sqs-queues", "orders"}, `--sqs-queues: "orders" is not topic=value`},
		{[]string{"--broker", "sqs", "--sqs-queues", "a=q1,a=q2"}, `topic "a" is mapped twice`},
		{[]string{"--broker", "sqs", "--sns-topics", "a=arn:aws:sns:us-east-1:1:a"}, "are for --broker sns, not sqs"},
		{[]string{"--broker", "sns", "--sqs-queues", "a=q"}, "--sqs-queues is for --broker sqs, not sns"},
		{[]string{"--broker", "sns", "--sns-topics", "a=orders"}, `maps to "orders", which is not an ARN`},
		{[]string{"--broker", "sns", "--sns-arn-prefix", "orders-"}, "is not the start of an ARN"},
		{[]string{"--broker", "sqs", "--aws-endpoint", "127.0.0.1:4566"}, "--aws-endpoint: want http://host:port"},
		{[]string{"--broker", "sqs", "--tls"}, "are not for --broker sqs"},
		{[]string{"--broker", "nats", "--nats-url", "nats://x", "--aws-region", "us-east-1"}, "are for --broker sqs and sns, not nats"},
		{[]string{"--broker", "sqs", "--aws-region", "us-east-1"}, "cannot reach the database"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cmd := exec.CommandContext(ctx, bin, append([]string{"relay", "--db", dsn}, tc.args...)...)
		cmd.Env = awsEnv(t)
		out, err := cmd.CombinedOutput()
		cancel()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() <= 0 {
			t.Errorf("%v: want a non-zero exit, got %v\n%s", tc.args, err, out)
		}
		if !strings.Contains(string(out), tc.want) {
			t.Errorf("%v: output lacks %q:\n%s", tc.args, tc.want, out)
		}
		if strings.Contains(string(out), "secret") || strings.Contains(string(out), awsSecret) {
			t.Errorf("%v: a secret leaked:\n%s", tc.args, out)
		}
	}
}

// An endpoint nothing listens on: the relay does not start, and says where
// it looked, without the secret key.
func testRelayAWSUnreachable(t *testing.T, bin string) {
	db := pgDB(t)
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_cmd_sqs_unreach")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	endpoint := "http://" + freeAddr(t)
	cmd := exec.CommandContext(ctx, bin, "relay", "--db", testenv.PostgresDSN(), "--table", ob.Table(),
		"--admin-addr", "127.0.0.1:0", "--broker", "sqs", "--aws-region", "us-east-1", "--aws-endpoint", endpoint)
	cmd.Env = awsEnv(t)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() <= 0 {
		t.Fatalf("want a non-zero exit, got %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "cannot reach SQS at "+endpoint) {
		t.Fatalf("output lacks where it looked:\n%s", out)
	}
	if strings.Contains(string(out), awsSecret) {
		t.Fatalf("the secret key leaked:\n%s", out)
	}
}

// readIDs reads n messages from the queue at url and returns their ids,
// failing unless every key (k-<n> from enqueueN) arrives in the order of
// its payloads when ordered.
func readIDs(t *testing.T, queues *sqstest.SQSQueues, url string, n int, ordered bool) []string {
	t.Helper()
	got := queues.Read(t, url, n, 30*time.Second)
	last := map[string]int{}
	ids := make([]string, len(got))
	for i, r := range got {
		ids[i] = r.ID
		seq, _ := strconv.Atoi(strings.TrimPrefix(string(r.Payload), "m-"))
		if prev, ok := last[r.Key]; ordered && ok && seq < prev {
			t.Errorf("key %s: m-%d after m-%d", r.Key, seq, prev)
		}
		last[r.Key] = seq
	}
	return ids
}

// The built binary against the emulator: one outbox topic mapped by
// --sqs-queues to a FIFO queue (each key in order, once), one published to
// the standard queue of its own name.
func testRelayPostgresSQS(t *testing.T, bin string) {
	db := pgDB(t)
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_cmd_sqs")
	queues := sqstest.NewSQSQueues(t)
	fifo, plain := sqstest.QueueName(true), sqstest.QueueName(false)
	fifoURL := queues.CreateQueue(t, fifo, nil)
	plainURL := queues.CreateQueue(t, plain, nil)
	ordersIDs := enqueueN(t, db, ob, "orders", 0, 70)
	plainIDs := enqueueN(t, db, ob, plain, 70, 30)

	p := startRelayEnv(t, bin, freeAddr(t), append(awsEnv(t), "EXACTLY_AWS_ENDPOINT="+testenv.SQSEndpoint()),
		"--db", testenv.PostgresDSN(), "--table", ob.Table(), "--broker", "sqs", "--aws-region", testenv.AWSRegion,
		"--sqs-queues", "orders="+fifo, "--poll-interval", "100ms")
	waitPublished(t, p, db, ob, 100)
	checkDelivered(t, readIDs(t, queues, fifoURL, len(ordersIDs), true), ordersIDs)
	checkDelivered(t, readIDs(t, queues, plainURL, len(plainIDs), false), plainIDs)
	p.stop(t)
	out := p.out.String()
	if !strings.Contains(out, "relay started") || !strings.Contains(out, "broker=sqs") {
		t.Errorf("the log lacks the start:\n%s", out)
	}
	if strings.Contains(out, awsSecret) {
		t.Errorf("the secret key leaked:\n%s", out)
	}
}

// The built binary publishing to an SNS FIFO topic named by --sns-topics,
// read through a FIFO queue subscribed with raw delivery.
func testRelayPostgresSNS(t *testing.T, bin string) {
	db := pgDB(t)
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_cmd_sns")
	queues := sqstest.NewSQSQueues(t)
	client := awssns.NewFromConfig(testenv.AWSConfig(t))
	name := sqstest.QueueName(true)
	topic, err := client.CreateTopic(t.Context(), &awssns.CreateTopicInput{Name: aws.String(name), Attributes: map[string]string{"FifoTopic": "true"}})
	if err != nil {
		t.Fatal(err)
	}
	arn := aws.ToString(topic.TopicArn)
	t.Cleanup(func() {
		_, _ = client.DeleteTopic(context.Background(), &awssns.DeleteTopicInput{TopicArn: aws.String(arn)})
	})
	url := queues.CreateQueue(t, name, nil)
	qa, err := queues.Client.GetQueueAttributes(t.Context(), &awssqs.GetQueueAttributesInput{
		QueueUrl: aws.String(url), AttributeNames: []sqstypes.QueueAttributeName{sqstypes.QueueAttributeNameQueueArn}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.Subscribe(t.Context(), &awssns.SubscribeInput{TopicArn: aws.String(arn), Protocol: aws.String("sqs"),
		Endpoint:   aws.String(qa.Attributes[string(sqstypes.QueueAttributeNameQueueArn)]),
		Attributes: map[string]string{"RawMessageDelivery": "true"}}); err != nil {
		t.Fatal(err)
	}
	ids := enqueueN(t, db, ob, "events", 0, 9)

	p := startRelayEnv(t, bin, freeAddr(t), awsEnv(t),
		"--db", testenv.PostgresDSN(), "--table", ob.Table(), "--broker", "sns", "--aws-region", testenv.AWSRegion,
		"--aws-endpoint", testenv.SQSEndpoint(), "--sns-topics", "events="+arn, "--poll-interval", "100ms")
	waitPublished(t, p, db, ob, float64(len(ids)))
	checkDelivered(t, readIDs(t, queues, url, len(ids), true), ids)
	p.stop(t)
	if out := p.out.String(); !strings.Contains(out, "broker=sns") || strings.Contains(out, awsSecret) {
		t.Errorf("the log lacks the start, or carries the secret key:\n%s", out)
	}
}
