package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	gpubsub "cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
)

const pstestEnv = "EXACTLY_TEST_PSTEST_PROCESS"

// TestPstestProcess is not a test: run by startPstest as a process of its
// own, it serves a pstest server on a loopback port, prints the address and
// serves until its standard input closes.
func TestPstestProcess(t *testing.T) {
	if os.Getenv(pstestEnv) != "1" {
		t.Skip("the pstest server process of the Pub/Sub relay test")
	}
	srv := pstest.NewServerWithAddress("127.0.0.1:0")
	fmt.Printf("pstest-addr=%s\n", srv.Addr)
	_, _ = io.Copy(io.Discard, os.Stdin)
	_ = srv.Close()
}

// startPstest starts a pstest server in a process of its own and returns
// its address.
func startPstest(t *testing.T) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestPstestProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), pstestEnv+"=1")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = stdin.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "pstest-addr="); ok {
				addr <- a
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case a := <-addr:
		return a
	case <-time.After(30 * time.Second):
		t.Fatal("the pstest process did not print its address within 30s")
		return ""
	}
}

func TestRelayPubsub(t *testing.T) {
	bin := buildExactly(t)
	t.Run("BadFlags", func(t *testing.T) { testRelayPubsubBadFlags(t, bin) })
	t.Run("Unreachable", func(t *testing.T) { testRelayPubsubUnreachable(t, bin) })
	t.Run("Postgres", func(t *testing.T) { testRelayPostgresPubsub(t, bin) })
}

func testRelayPubsubBadFlags(t *testing.T, bin string) {
	const dsn = "postgres://u:secret@127.0.0.1:1/db"
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"--db", dsn, "--broker", "pubsub"}, nil, "--pubsub-project is required with --broker pubsub"},
		{[]string{"--db", dsn, "--broker", "pubsub", "--pubsub-project", "p", "--pubsub-topics", "orders"}, nil, `--pubsub-topics: "orders" is not topic=pubsub-topic`},
		{[]string{"--db", dsn, "--broker", "pubsub", "--pubsub-project", "p", "--pubsub-topics", "orders=a/b"}, nil, `--pubsub-topics: orders: topic "a/b" is not a Pub/Sub topic ID`},
		{[]string{"--db", dsn, "--broker", "pubsub", "--pubsub-project", "p", "--pubsub-topics", "a=orders,a=other"}, nil, `topic "a" is mapped twice`},
		{[]string{"--db", dsn, "--broker", "pubsub", "--pubsub-project", "p", "--tls"}, nil, "are not for --broker pubsub"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--pubsub-project", "p"}, nil, "are for --broker pubsub, not nats"},
		{[]string{"--db", dsn, "--broker", "pubsub"}, []string{"EXACTLY_PUBSUB_PROJECT=p", "EXACTLY_PUBSUB_TOPICS=x=goog-x"}, "--pubsub-topics"},
		{[]string{"--db", dsn, "--broker", "pubsub", "--pubsub-project", "p"}, nil, "cannot reach the database"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cmd := exec.CommandContext(ctx, bin, append([]string{"relay"}, tc.args...)...)
		cmd.Env = append(relayEnvCleared(), tc.env...)
		out, err := cmd.CombinedOutput()
		cancel()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() <= 0 {
			t.Errorf("%v: want a non-zero exit, got %v\n%s", tc.args, err, out)
		}
		if !strings.Contains(string(out), tc.want) {
			t.Errorf("%v %v: output lacks %q:\n%s", tc.args, tc.env, tc.want, out)
		}
		if strings.Contains(string(out), "secret") {
			t.Errorf("%v: the password leaked:\n%s", tc.args, out)
		}
	}
}

// An emulator address nothing listens on: the relay does not start, and
// says where it looked.
func testRelayPubsubUnreachable(t *testing.T, bin string) {
	db := pgDB(t)
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_cmd_ps_unreach")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "relay", "--db", testenv.PostgresDSN(), "--table", ob.Table(),
		"--admin-addr", "127.0.0.1:0", "--broker", "pubsub", "--pubsub-project", "p")
	cmd.Env = append(relayEnvCleared(), "PUBSUB_EMULATOR_HOST="+freeAddr(t))
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() <= 0 {
		t.Fatalf("want a non-zero exit, got %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "cannot reach the Pub/Sub emulator at 127.0.0.1:") {
		t.Fatalf("output lacks where it looked:\n%s", out)
	}
}

// The built binary against a pstest server in a process of its own, found
// through PUBSUB_EMULATOR_HOST: one outbox topic mapped by --pubsub-topics,
// one published under its own name; every message once, each key in order
// on ordered subscriptions.
func testRelayPostgresPubsub(t *testing.T, bin string) {
	db := pgDB(t)
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_cmd_pubsub")
	addr := startPstest(t)
	const project = "exactly-cli"
	ctx := context.Background()
	client, err := gpubsub.NewClient(ctx, project, option.WithEndpoint(addr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	mapped := strings.ReplaceAll(uniqueName("orders-v1"), "_", "-")
	plain := strings.ReplaceAll(uniqueName("payments"), "_", "-")
	for _, topic := range []string{mapped, plain} {
		name := "projects/" + project + "/topics/" + topic
		if _, err := client.TopicAdminClient.CreateTopic(ctx, &pb.Topic{Name: name}); err != nil {
			t.Fatal(err)
		}
		if _, err := client.SubscriptionAdminClient.CreateSubscription(ctx, &pb.Subscription{
			Name: "projects/" + project + "/subscriptions/" + topic, Topic: name, EnableMessageOrdering: true, AckDeadlineSeconds: 10,
		}); err != nil {
			t.Fatal(err)
		}
	}
	ordersIDs := enqueueN(t, db, ob, "orders", 0, 70)
	plainIDs := enqueueN(t, db, ob, plain, 70, 30)

	p := startRelayEnv(t, bin, freeAddr(t), []string{"PUBSUB_EMULATOR_HOST=" + addr, "EXACTLY_PUBSUB_PROJECT=" + project},
		"--db", testenv.PostgresDSN(), "--table", ob.Table(), "--broker", "pubsub", "--pubsub-topics", "orders="+mapped,
		"--poll-interval", "100ms")
	waitPublished(t, p, db, ob, 100)
	checkDelivered(t, receiveOrdered(t, client, mapped, len(ordersIDs)), ordersIDs)
	checkDelivered(t, receiveOrdered(t, client, plain, len(plainIDs)), plainIDs)
	p.stop(t)
	if out := p.out.String(); !strings.Contains(out, "relay started") || !strings.Contains(out, "broker=pubsub") {
		t.Errorf("the log lacks the start:\n%s", out)
	}
}

// receiveOrdered receives n messages from the subscription named like topic
// and returns their exactly-id attributes, failing unless every key (the
// ordering key, k-<n> from enqueueN) arrives in the order of its payloads.
func receiveOrdered(t *testing.T, client *gpubsub.Client, topic string, n int) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var (
		mu   sync.Mutex
		ids  []string
		last = map[string]int{}
		bad  []string
	)
	err := client.Subscriber(topic).Receive(ctx, func(_ context.Context, m *gpubsub.Message) {
		mu.Lock()
		defer mu.Unlock()
		seq, _ := strconv.Atoi(strings.TrimPrefix(string(m.Data), "m-"))
		if prev, ok := last[m.OrderingKey]; ok && seq < prev {
			bad = append(bad, fmt.Sprintf("key %s: m-%d after m-%d", m.OrderingKey, seq, prev))
		}
		last[m.OrderingKey] = seq
		ids = append(ids, m.Attributes[exactly.HeaderID])
		m.Ack()
		if len(ids) >= n {
			cancel()
		}
	})
	if err != nil {
		t.Fatalf("receiving from %s: %v", topic, err)
	}
	if len(bad) > 0 {
		t.Errorf("per-key order broken: %v", bad)
	}
	return ids
}
