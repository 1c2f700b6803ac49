package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
)

// buildExactly builds the command into a temporary directory.
func buildExactly(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "exactly")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// relayEnvCleared is the environment without any EXACTLY_* variable, so the
// caller's shell does not configure the relay under test.
func relayEnvCleared() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "EXACTLY_") {
			env = append(env, kv)
		}
	}
	return env
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// syncBuffer collects a subprocess's output for the test to read.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRelayCommand(t *testing.T) {
	bin := buildExactly(t)
	t.Run("BadFlags", func(t *testing.T) { testRelayBadFlags(t, bin) })
	t.Run("PostgresNATS", func(t *testing.T) { testRelayPostgresNATS(t, bin) })
	t.Run("PostgresKafka", func(t *testing.T) { testRelayPostgresKafka(t, bin) })
	t.Run("PostgresAMQP", func(t *testing.T) { testRelayPostgresAMQP(t, bin) })
	t.Run("CDCKafkaExactlyOnce", func(t *testing.T) { testRelayCDCKafkaExactlyOnce(t, bin) })
}

func testRelayBadFlags(t *testing.T, bin string) {
	const dsn = "postgres://u:secret@127.0.0.1:1/db"
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"--broker", "nats", "--nats-url", "nats://127.0.0.1:1"}, nil, "--db is required"},
		{[]string{"--db", dsn, "--broker", "rabbit"}, nil, `--broker: unknown broker "rabbit"`},
		{[]string{"--db", dsn}, nil, "--broker is required"},
		{[]string{"--db", dsn}, []string{"EXACTLY_BROKER=sqs"}, `--broker: unknown broker "sqs"`},
		{[]string{"--db", dsn, "--broker", "kafka"}, nil, "--kafka-brokers is required"},
		{[]string{"--db", dsn, "--broker", "nats"}, nil, "--nats-url is required"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--poll-interval", "soon"}, nil, `invalid argument "soon" for "--poll-interval"`},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--retention", "-1h"}, nil, "--retention must not be negative"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--batch-size", "-5"}, nil, "--batch-size must not be negative"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x"}, []string{"EXACTLY_POLL_INTERVAL=often"}, "EXACTLY_POLL_INTERVAL (for --poll-interval)"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--log-format", "xml"}, nil, "--log-format"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--log-level", "loud"}, nil, "--log-level"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--admin-addr", "nowhere"}, nil, "--admin-addr"},
		{[]string{"--db", "oracle://u:secret@x/db", "--broker", "nats", "--nats-url", "nats://x"}, nil, "unrecognised database DSN"},
		{[]string{"--broker", "nats", "--nats-url", "nats://x"}, []string{"EXACTLY_DB=" + dsn}, "cannot reach the database"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x"}, nil, "cannot reach the database"},
		{[]string{"--db", dsn, "--broker", "amqp"}, nil, "--amqp-url is required"},
		{[]string{"--db", dsn, "--broker", "amqp", "--amqp-url", "http://u:secret@x"}, nil, "--amqp-url: invalid URL http://u:***@x"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "http://x"}, nil, "--nats-url: want nats://"},
		{[]string{"--db", dsn, "--source", "cdc", "--broker", "nats", "--nats-url", "nats://x", "--kafka-exactly-once"}, nil, `--kafka-exactly-once needs --broker kafka, not "nats"`},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--slot", "s1"}, nil, "--slot is for --source cdc, not poll"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--debezium-table", "outbox"}, nil, "--debezium-table is for --source cdc, not poll"},
		{[]string{"--db", dsn, "--source", "cdc", "--broker", "nats", "--nats-url", "nats://x"}, nil, "cannot reach the database"},
		{[]string{"--db", "sqlite:x.db", "--source", "cdc", "--broker", "nats", "--nats-url", "nats://x"}, nil, "--source: the cdc source needs PostgreSQL"},
		{[]string{"--db", dsn, "--source", "binlog", "--broker", "nats", "--nats-url", "nats://x"}, nil, `--source: unknown source "binlog"`},
		{[]string{"--db", dsn, "--broker", "kafka", "--kafka-brokers", "k:1", "--kafka-sasl", "gssapi"}, nil, `--kafka-sasl: unknown mechanism "gssapi"`},
		{[]string{"--db", dsn, "--broker", "kafka", "--kafka-brokers", "k:1", "--kafka-sasl", "plain", "--kafka-user", "u"}, nil, "--kafka-sasl needs --kafka-user and --kafka-password"},
		{[]string{"--db", dsn, "--broker", "kafka", "--kafka-brokers", "k:1", "--kafka-user", "u"}, []string{"EXACTLY_KAFKA_PASSWORD=secret"}, "--kafka-user and --kafka-password need --kafka-sasl"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--kafka-sasl", "plain"}, nil, "are for --broker kafka, not nats"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--tls-ca", "/nonexistent/ca.pem"}, nil, "--tls-ca: open /nonexistent/ca.pem"},
		{[]string{"--db", dsn, "--broker", "nats", "--nats-url", "nats://x", "--tls-cert", "/nonexistent/c.pem"}, nil, "--tls-cert and --tls-key go together"},
		{[]string{"--config", "/nonexistent/relay.conf"}, nil, "--config: open /nonexistent/relay.conf"},
		{[]string{"--config", badConfig(t, "broker = nats\nfrobnicate = 3\n")}, nil, `line 2: unknown setting "frobnicate"`},
		{[]string{"--config", badConfig(t, "# comment\nbatch-size = lots\n")}, nil, `line 2: invalid value "lots" for batch-size`},
		{[]string{"--config", badConfig(t, "kafka-password = secret\nmax-attempts = x\n")}, nil, "line 2: invalid value"},
		{nil, []string{"EXACTLY_CONFIG=" + badConfig(t, "db = "+dsn+"\nbroker = nats\nnats-url = nats://127.0.0.1:1\n")}, "cannot reach the database postgres://u:***@127.0.0.1:1/db"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cmd := exec.CommandContext(ctx, bin, append([]string{"relay"}, tc.args...)...)
		cmd.Env = append(relayEnvCleared(), tc.env...)
		out, err := cmd.CombinedOutput()
		cancel()
		var ee *exec.ExitError
		switch {
		case !errors.As(err, &ee):
			t.Errorf("%v %v: want a non-zero exit, got %v\n%s", tc.env, tc.args, err, out)
		case ee.ExitCode() <= 0:
			t.Errorf("%v %v: exit code %d\n%s", tc.env, tc.args, ee.ExitCode(), out)
		}
		s := string(out)
		if !strings.Contains(s, tc.want) {
			t.Errorf("%v %v: output lacks %q:\n%s", tc.env, tc.args, tc.want, s)
		}
		if strings.Contains(s, "secret") {
			t.Errorf("%v %v: the password leaked:\n%s", tc.env, tc.args, s)
		}
		if strings.Contains(s, "panic") || strings.Contains(s, "goroutine ") {
			t.Errorf("%v %v: panicked:\n%s", tc.env, tc.args, s)
		}
	}
}

// relayProc is a running `exactly relay`.
type relayProc struct {
	cmd   *exec.Cmd
	out   *syncBuffer
	admin string
	done  chan struct{} // closed when the process exited
	err   error         // its exit status, once done is closed
}

func startRelay(t *testing.T, bin, admin string, args ...string) *relayProc {
	t.Helper()
	return startRelayEnv(t, bin, admin, nil, args...)
}

// startRelayEnv starts `exactly relay` with env added to a clean environment.
func startRelayEnv(t *testing.T, bin, admin string, env []string, args ...string) *relayProc {
	t.Helper()
	p := &relayProc{out: &syncBuffer{}, admin: admin, done: make(chan struct{})}
	p.cmd = exec.Command(bin, append([]string{"relay", "--admin-addr", admin}, args...)...)
	p.cmd.Env = append(relayEnvCleared(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// stop sends SIGTERM and requires a clean exit within 10s.
func (p *relayProc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
		if p.err != nil {
			t.Fatalf("relay exited with %v after SIGTERM\n%s", p.err, p.out)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("relay did not exit within 10s of SIGTERM\n%s", p.out)
	}
	if strings.Contains(p.out.String(), "secret") {
		t.Errorf("the log shows the password:\n%s", p.out)
	}
}

func (p *relayProc) get(path string) (int, string, error) {
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + p.admin + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// metric returns the value of an unlabelled metric in a /metrics scrape.
func metric(body, name string) (float64, bool) {
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == name {
			v, err := strconv.ParseFloat(f[1], 64)
			return v, err == nil
		}
	}
	return 0, false
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t *testing.T, p *relayProc, what string, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		var ok bool
		if ok, last = cond(); ok {
			return
		}
		select {
		case <-p.done:
			t.Fatalf("%s: the relay exited (%v)\n%s", what, p.err, p.out)
		case <-time.After(100 * time.Millisecond):
		}
	}
	t.Fatalf("%s: timed out (%s)\n%s", what, last, p.out)
}

func testRelayPostgresNATS(t *testing.T, bin string) {
	testenv.Need(t, testenv.Postgres)
	testenv.Need(t, testenv.NATS)
	db := pgDB(t)
	ctx := context.Background()

	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_cmd_ob")
	table := ob.Table()

	nc, err := natsgo.Connect(testenv.NATSURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	streamName := strings.ToUpper(uniqueName("RELAY_CMD"))
	subject := "exactlytest." + strings.ToLower(streamName)
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: streamName, Subjects: []string{subject}, Storage: jetstream.MemoryStorage})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { js.DeleteStream(context.Background(), streamName) })

	streamMsgs := func() (bool, uint64, string) {
		info, err := stream.Info(ctx)
		if err != nil {
			return false, 0, err.Error()
		}
		return true, info.State.Msgs, fmt.Sprintf("stream holds %d", info.State.Msgs)
	}
	// checkStream requires the stream to hold exactly the messages of ids,
	// each once, with its Nats-Msg-Id.
	checkStream := func(ids []string) {
		t.Helper()
		want := map[string]bool{}
		for _, id := range ids {
			want[id] = true
		}
		info, err := stream.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.State.Msgs != uint64(len(ids)) {
			t.Fatalf("stream holds %d messages, want %d", info.State.Msgs, len(ids))
		}
		seen := map[string]bool{}
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
			m, err := stream.GetMsg(ctx, seq)
			if err != nil {
				t.Fatalf("message %d: %v", seq, err)
			}
			id := m.Header.Get(natsgo.MsgIdHdr)
			if !want[id] {
				t.Errorf("message %d has Nats-Msg-Id %q, not one enqueued", seq, id)
			}
			if seen[id] {
				t.Errorf("message %s stored twice", id)
			}
			seen[id] = true
		}
		if len(seen) != len(want) {
			t.Errorf("%d distinct messages in the stream, want %d", len(seen), len(want))
		}
	}

	ids := enqueueN(t, db, ob, subject, 0, 200)
	args := []string{"--db", testenv.PostgresDSN(), "--table", table, "--broker", "nats", "--nats-url", testenv.NATSURL(),
		"--partitions", "4", "--poll-interval", "200ms", "--log-format", "json"}
	p := startRelay(t, bin, freeAddr(t), args...)
	waitFor(t, p, "200 messages in the stream", 30*time.Second, func() (bool, string) {
		ok, n, s := streamMsgs()
		return ok && n >= 200, s
	})
	waitFor(t, p, "metrics show 200 published", 10*time.Second, func() (bool, string) {
		code, body, err := p.get("/metrics")
		if err != nil || code != 200 {
			return false, fmt.Sprintf("/metrics: %d %v", code, err)
		}
		v, ok := metric(body, "exactly_relay_published_total")
		held, _ := metric(body, "exactly_relay_partitions_held")
		return ok && v == 200 && held == 4, fmt.Sprintf("published %v, partitions held %v", v, held)
	})
	_, body, _ := p.get("/metrics")
	for _, name := range []string{"exactly_relay_failed_total", "exactly_relay_dead_total", "exactly_relay_publish_seconds_count",
		"exactly_outbox_pending", "exactly_outbox_oldest_pending_seconds"} {
		if _, ok := metric(body, name); !ok {
			t.Errorf("/metrics lacks %s:\n%s", name, body)
		}
	}
	waitFor(t, p, "/readyz 200", 10*time.Second, func() (bool, string) {
		code, body, err := p.get("/readyz")
		return err == nil && code == 200, fmt.Sprintf("/readyz: %d %q %v", code, body, err)
	})
	if code, _, err := p.get("/healthz"); err != nil || code != 200 {
		t.Errorf("/healthz: %d %v", code, err)
	}
	checkStream(ids)
	p.stop(t)
	if !strings.Contains(p.out.String(), `"msg":"relay started"`) {
		t.Errorf("no JSON start log:\n%s", p.out)
	}

	// Written while no relay runs: the next one publishes them.
	ids = append(ids, enqueueN(t, db, ob, subject, 200, 50)...)
	p = startRelay(t, bin, freeAddr(t), args...)
	waitFor(t, p, "250 messages in the stream", 30*time.Second, func() (bool, string) {
		ok, n, s := streamMsgs()
		return ok && n >= 250, s
	})
	waitFor(t, p, "outbox drained", 10*time.Second, func() (bool, string) {
		st, err := ob.Status(ctx, db)
		if err != nil {
			return false, err.Error()
		}
		return st.Pending == 0 && st.Dead == 0, fmt.Sprintf("pending %d dead %d", st.Pending, st.Dead)
	})
	waitFor(t, p, "metrics show 50 published", 10*time.Second, func() (bool, string) {
		_, body, _ := p.get("/metrics")
		v, ok := metric(body, "exactly_relay_published_total")
		return ok && v == 50, fmt.Sprintf("published %v", v)
	})
	checkStream(ids)
	p.stop(t)
	if code, _, err := p.get("/healthz"); err == nil {
		t.Errorf("/healthz still answers %d after the relay exited", code)
	}
}

// badConfig writes a config file for the relay and returns its path.
func badConfig(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "relay.conf")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// enqueueN writes n messages to topic in one transaction and returns their ids.
func enqueueN(t *testing.T, db *sql.DB, ob *outbox.Outbox, topic string, from, n int) []string {
	t.Helper()
	ctx := context.Background()
	msgs := make([]*exactly.Message, n)
	for i := range msgs {
		msgs[i] = &exactly.Message{Topic: topic, Key: fmt.Sprintf("k-%d", (from+i)%7), Payload: fmt.Appendf(nil, "m-%d", from+i)}
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Enqueue(ctx, tx, msgs...); err != nil {
		tx.Rollback()
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	ids := make([]string, n)
	for i, m := range msgs {
		ids[i] = m.ID
	}
	return ids
}

// checkDelivered requires got (the ids read from the broker) to hold each
// of want exactly once.
func checkDelivered(t *testing.T, got, want []string) {
	t.Helper()
	seen := map[string]int{}
	for _, id := range got {
		seen[id]++
	}
	for _, id := range want {
		if seen[id] != 1 {
			t.Errorf("message %s delivered %d times", id, seen[id])
		}
	}
	if len(got) != len(want) {
		t.Errorf("%d messages on the broker, want %d", len(got), len(want))
	}
}

// waitPublished waits until the relay's metrics show n published and the
// outbox is empty.
func waitPublished(t *testing.T, p *relayProc, db *sql.DB, ob *outbox.Outbox, n float64) {
	t.Helper()
	waitFor(t, p, fmt.Sprintf("metrics show %v published", n), 30*time.Second, func() (bool, string) {
		_, body, err := p.get("/metrics")
		if err != nil {
			return false, err.Error()
		}
		v, _ := metric(body, "exactly_relay_published_total")
		return v == n, fmt.Sprintf("published %v", v)
	})
	st, err := ob.Status(context.Background(), db)
	if err != nil || st.Pending != 0 || st.Dead != 0 {
		t.Fatalf("outbox after publishing: %+v %v", st, err)
	}
}

// Kafka (kfake in this process), configured through a config file whose
// settings flags and the environment override.
func testRelayPostgresKafka(t *testing.T, bin string) {
	db := pgDB(t)
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_cmd_kafka")
	const topic = "relay-cmd-orders"
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	ids := enqueueN(t, db, ob, topic, 0, 120)

	conf := badConfig(t, fmt.Sprintf("# the relay's settings\nbroker = kafka\nkafka-brokers = %s\ntable = %s\npartitions = 2\npoll-interval = 100ms\nlog-format = text\n",
		strings.Join(cluster.ListenAddrs(), ","), ob.Table()))
	p := startRelayEnv(t, bin, freeAddr(t), []string{"EXACTLY_DB=" + testenv.PostgresDSN(), "EXACTLY_LOG_FORMAT=json"},
		"--config", conf, "--partitions", "4")
	waitPublished(t, p, db, ob, 120)
	_, body, _ := p.get("/metrics")
	if held, _ := metric(body, "exactly_relay_partitions_held"); held != 4 {
		t.Errorf("partitions held %v: the flag should win over the config file", held)
	}
	checkDelivered(t, kafkaIDs(t, cluster.ListenAddrs(), topic, len(ids)), ids)
	p.stop(t)
	if !strings.Contains(p.out.String(), `"msg":"relay started"`) || !strings.Contains(p.out.String(), `"broker":"kafka"`) {
		t.Errorf("the environment's JSON log format should win over the config file's text:\n%s", p.out)
	}
}

// RabbitMQ through the default exchange: the topic is the queue.
func testRelayPostgresAMQP(t *testing.T, bin string) {
	testenv.Need(t, testenv.RabbitMQ)
	db := pgDB(t)
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_cmd_amqp")
	url := "amqp://guest:guest@" + testenv.RabbitMQ.Addr + "/"
	queue := uniqueName("relay-cmd")
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(queue, false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	defer ch.QueueDelete(queue, false, false, false)
	ids := enqueueN(t, db, ob, queue, 0, 80)

	p := startRelayEnv(t, bin, freeAddr(t), []string{"EXACTLY_AMQP_URL=" + url},
		"--db", testenv.PostgresDSN(), "--table", ob.Table(), "--broker", "amqp", "--poll-interval", "100ms")
	waitPublished(t, p, db, ob, 80)
	var got []string
	for {
		d, ok, err := ch.Get(queue, true)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		got = append(got, d.MessageId)
	}
	checkDelivered(t, got, ids)
	p.stop(t)
	if strings.Contains(p.out.String(), "guest:guest") {
		t.Errorf("the log shows the AMQP password:\n%s", p.out)
	}
}

// A reachable database and an unreachable broker: the relay does not start.
func TestRelayUnreachableBroker(t *testing.T) {
	bin := buildExactly(t)
	db := pgDB(t)
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_cmd_unreach")
	base := []string{"relay", "--db", testenv.PostgresDSN(), "--table", ob.Table(), "--admin-addr", "127.0.0.1:0"}
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"--broker", "kafka", "--kafka-brokers", "127.0.0.1:1", "--kafka-sasl", "scram-sha-512", "--kafka-user", "u"},
			[]string{"EXACTLY_KAFKA_PASSWORD=secret"}, "cannot reach Kafka at 127.0.0.1:1"},
		{[]string{"--broker", "nats", "--nats-url", "nats://u:secret@127.0.0.1:1"}, nil, "cannot connect to NATS at nats://u:***@127.0.0.1:1"},
		{[]string{"--broker", "nats", "--nats-url", "nats://127.0.0.1:1", "--nats-user", "u"}, []string{"EXACTLY_NATS_PASSWORD=secret"}, "cannot connect to NATS"},
		{[]string{"--broker", "amqp", "--amqp-url", "amqp://u:secret@127.0.0.1:1/"}, nil, "cannot connect to AMQP at amqp://u:***@127.0.0.1:1/"},
		{[]string{"--broker", "amqp", "--amqp-url", "amqp://guest:secret@" + testenv.RabbitMQ.Addr + "/"}, nil, "cannot connect to AMQP"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cmd := exec.CommandContext(ctx, bin, append(base, tc.args...)...)
		cmd.Env = append(relayEnvCleared(), tc.env...)
		out, err := cmd.CombinedOutput()
		cancel()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() <= 0 {
			t.Errorf("%v: want a non-zero exit, got %v\n%s", tc.args, err, out)
		}
		s := string(out)
		if !strings.Contains(s, tc.want) {
			t.Errorf("%v: output lacks %q:\n%s", tc.args, tc.want, s)
		}
		if strings.Contains(s, "secret") || strings.Contains(s, "panic") {
			t.Errorf("%v: a secret leaked or it panicked:\n%s", tc.args, s)
		}
	}
}

// The cdc source on a private PostgreSQL with wal_level=logical, publishing
// to Kafka (kfake) in exactly-once mode: every message once in
// read_committed output, the slot lag exported, SIGTERM exits 0, and a
// second start resumes from the slot with the rows written while it was
// down.
func testRelayCDCKafkaExactlyOnce(t *testing.T, bin string) {
	pg := testenv.LogicalPostgres(t, nil)
	dsn := pg.DSN("test")
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() }) // after the outbox's own cleanup
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_cmd_cdc")
	const topic = "relay-cmd-cdc"
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	brokers := strings.Join(cluster.ListenAddrs(), ",")
	args := []string{"--db", dsn, "--table", ob.Table(), "--source", "cdc", "--slot", "relay_cmd_cdc",
		"--broker", "kafka", "--kafka-brokers", brokers, "--kafka-exactly-once"}

	ids := enqueueN(t, db, ob, topic, 0, 150)
	p := startRelay(t, bin, freeAddr(t), args...)
	waitPublished(t, p, db, ob, 150)
	_, body, _ := p.get("/metrics")
	if _, ok := metric(body, "exactly_cdc_slot_lag_bytes"); !ok {
		t.Errorf("no exactly_cdc_slot_lag_bytes in /metrics:\n%s", body)
	}
	if code, _, _ := p.get("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz %d while streaming", code)
	}
	p.stop(t)

	ids = append(ids, enqueueN(t, db, ob, topic, 150, 50)...)
	p = startRelay(t, bin, freeAddr(t), args...)
	waitPublished(t, p, db, ob, 50)
	p.stop(t)

	checkDelivered(t, kafkaIDs(t, cluster.ListenAddrs(), topic, len(ids)), ids)
}

// kafkaIDs reads the exactly-id of every committed record of topic
// (read_committed) until it has n, then for half a second more, so that
// records beyond the n expected show up too.
func kafkaIDs(t *testing.T, seeds []string, topic string, n int) []string {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var got []string
	poll := func(ctx context.Context) {
		cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) {
			id := "record without " + exactly.HeaderID
			for _, h := range r.Headers {
				if h.Key == exactly.HeaderID {
					id = string(h.Value)
				}
			}
			got = append(got, id)
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for len(got) < n && ctx.Err() == nil {
		poll(ctx)
	}
	extra, cancelExtra := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancelExtra()
	for extra.Err() == nil {
		poll(extra)
	}
	return got
}
