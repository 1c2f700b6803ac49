package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
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
		{[]string{"--db", dsn}, []string{"EXACTLY_BROKER=zeromq"}, `--broker: unknown broker "zeromq"`},
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

// The config file is bounded, a setting given twice is refused naming both
// lines, and long values are cut in the messages.
func TestRelayConfigFile(t *testing.T) {
	bin := buildExactly(t)
	huge := filepath.Join(t.TempDir(), "huge.conf")
	if err := os.WriteFile(huge, append([]byte("broker = nats\nbatch-size = "), bytes.Repeat([]byte("9"), 10<<20)...), 0o600); err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("x", 900<<10)
	for _, tc := range []struct {
		name, config string
		want         []string
	}{
		{"DevZero", "/dev/zero", []string{"--config /dev/zero: larger than the limit of 1 MiB"}},
		{"TenMegabyteLine", huge, []string{"larger than the limit of 1 MiB"}},
		{"LongValue", badConfig(t, "broker = nats\nbatch-size = "+long+"\n"), []string{`line 2: invalid value "xxxx`, "bytes in all", "for batch-size: want a whole number"}},
		{"LongName", badConfig(t, long+" = 1\n"), []string{`line 1: unknown setting "xxxx`, "bytes in all"}},
		{"Duplicate", badConfig(t, "# relay\nbroker = nats\nnats-url = nats://127.0.0.1:1\n\nbroker = kafka\n"),
			[]string{`"broker" is set twice, on line 2 and line 5`}},
		{"DuplicateSameValue", badConfig(t, "batch-size = 10\nbatch-size = 10\n"), []string{`"batch-size" is set twice, on line 1 and line 2`}},
		{"NotText", badConfig(t, "broker = nats\n\xff\xfe\n"), []string{"not UTF-8 text"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := runExactly(t, bin, nil, "relay", "--config", tc.config, "--db", "postgres://u@127.0.0.1:1/db", "--admin-addr", "127.0.0.1:0")
			if code == 0 {
				t.Fatalf("exit 0:\n%.2000s", out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%.2000s", w, out)
				}
			}
			if len(out) > 1000 {
				t.Errorf("a %d-byte message:\n%.2000s", len(out), out)
			}
		})
	}
}

// Every tunable of relay.Config and pgcdc.Config has a flag, a variable
// and a config key; a bad value is refused with an error naming the
// setting and where it came from; a good one is taken (the start-up log
// lists it).
func TestRelayTunables(t *testing.T) {
	bin := buildExactly(t)
	const dsn = "postgres://u@127.0.0.1:1/db"
	base := func(source string, eos bool) []string {
		args := []string{"relay", "--db", dsn, "--admin-addr", "127.0.0.1:0", "--source", source}
		if eos {
			return append(args, "--broker", "kafka", "--kafka-brokers", "127.0.0.1:1", "--kafka-exactly-once")
		}
		return append(args, "--broker", "nats", "--nats-url", "nats://127.0.0.1:1")
	}
	check := func(what string, env []string, args []string, want ...string) {
		t.Helper()
		out, code := runExactly(t, bin, env, args...)
		if code == 0 {
			t.Errorf("%s: exit 0\n%s", what, out)
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: output lacks %q:\n%s", what, w, out)
			}
		}
	}
	var tu relayTuning
	tunables := tu.tunables()
	for _, want := range []string{"strict-order", "shutdown-timeout", "lease-ttl", "initial-backoff", "max-backoff", "max-attempts", "batch-size",
		"poll-interval", "retention", "partitions", "instance-id", "max-pending", "heartbeat-interval", "status-interval", "lag-interval",
		"publication", "kafka-transactional-id", "kafka-checkpoint-topic", "kafka-transaction-timeout"} {
		if !slicesContainsFunc(tunables, func(t tunable) bool { return t.name == want }) {
			t.Errorf("no tunable %s", want)
		}
	}
	good := map[string]string{}
	for _, tn := range tunables {
		source := sourcePoll
		if tn.source == sourceCDC {
			source = sourceCDC
		}
		args := base(source, tn.eos)
		env := envName(tn.name)
		var bad, tooBig string
		switch tn.ptr.(type) {
		case *int:
			bad, good[tn.name] = "many", "100"
			if tn.max > 0 {
				tooBig = fmt.Sprint(tn.max + 1)
			}
		case *time.Duration:
			bad, good[tn.name] = "soon", "2s"
			if tn.max > 0 {
				tooBig = (time.Duration(tn.max) + time.Second).String()
			}
		case *bool:
			bad, good[tn.name] = "perhaps", "true"
		case *string:
			good[tn.name] = "relay_x"
			if tn.re != nil {
				bad = "Bad-Name"
			}
		}
		if _, isString := tn.ptr.(*string); bad != "" && isString {
			check(tn.name+" flag", nil, append(args, "--"+tn.name, bad), "--"+tn.name+` "`+bad+`": use`)
			check(tn.name+" env", []string{env + "=" + bad}, args, "--"+tn.name+" (from "+env+")")
			check(tn.name+" config", nil, append(args, "--config", badConfig(t, "\n"+tn.name+" = "+bad+"\n")), "--"+tn.name+" (from --config", "line 2)")
		} else if bad != "" {
			check(tn.name+" flag", nil, append(args, "--"+tn.name+"="+bad), "--"+tn.name)
			check(tn.name+" env", []string{env + "=" + bad}, args, env+" (for --"+tn.name+")")
			check(tn.name+" config", nil, append(args, "--config", badConfig(t, "\n"+tn.name+" = "+bad+"\n")), "line 2", "for "+tn.name)
		}
		if tooBig != "" {
			check(tn.name+" flag too big", nil, append(args, "--"+tn.name, tooBig), "--"+tn.name+" "+tooBig+" is above the limit")
			check(tn.name+" env too big", []string{env + "=" + tooBig}, args, "--"+tn.name+" (from "+env+") ", "is above the limit")
			conf := badConfig(t, "# tunables\n"+tn.name+" = "+tooBig+"\n")
			check(tn.name+" config too big", nil, append(args, "--config", conf), fmt.Sprintf("--%s (from --config %s line 2) ", tn.name, conf), "is above the limit")
		}
		switch {
		case tn.source == sourcePoll:
			check(tn.name+" with cdc", nil, append(base(sourceCDC, false), "--"+tn.name+"="+good[tn.name]), "--"+tn.name+" is for --source poll, not cdc")
		case tn.source == sourceCDC && !tn.eos:
			check(tn.name+" with poll", nil, append(base(sourcePoll, false), "--"+tn.name+"="+good[tn.name]), "--"+tn.name+" is for --source cdc, not poll")
		case tn.eos:
			check(tn.name+" without eos", nil, append(base(sourceCDC, false), "--"+tn.name+"="+good[tn.name]), "--"+tn.name+" is for --kafka-exactly-once")
		}
	}
	check("lease-ttl below the minimum", nil, append(base(sourcePoll, false), "--lease-ttl", "100ms"), "--lease-ttl 100ms is below the minimum of 300ms")
	check("max-backoff below initial-backoff", []string{"EXACTLY_INITIAL_BACKOFF=10m"}, base(sourcePoll, false),
		"--max-backoff 5m0s is below --initial-backoff (from EXACTLY_INITIAL_BACKOFF) 10m0s")
	check("max-pending below batch-size", nil, append(base(sourceCDC, false), "--max-pending", "10", "--batch-size", "20"), "--max-pending 10 is below the batch size 20")
	check("negative", nil, append(base(sourcePoll, false), "--shutdown-timeout", "-1s"), "--shutdown-timeout must not be negative")

	// Good values for every tunable of each source are taken, and listed.
	for _, run := range []struct {
		source string
		eos    bool
	}{{sourcePoll, false}, {sourceCDC, true}} {
		args := base(run.source, run.eos)
		var env []string
		var conf strings.Builder
		var want []string
		i := 0
		for _, tn := range tunables {
			if tn.source != "" && tn.source != run.source {
				continue
			}
			// One third each from flags, the environment and the config file.
			switch i % 3 {
			case 0:
				args = append(args, "--"+tn.name+"="+good[tn.name])
			case 1:
				env = append(env, envName(tn.name)+"="+good[tn.name])
			case 2:
				fmt.Fprintf(&conf, "%s = %s\n", tn.name, good[tn.name])
			}
			i++
			want = append(want, strings.ReplaceAll(tn.name, "-", "_")+"="+good[tn.name])
		}
		args = append(args, "--config", badConfig(t, conf.String()))
		check(run.source+" good values", env, args, append(want, "relay settings", "cannot reach the database")...)
	}
}

func slicesContainsFunc[T any](s []T, f func(T) bool) bool {
	for _, v := range s {
		if f(v) {
			return true
		}
	}
	return false
}

// --admin-addr beyond loopback warns that the endpoints have no auth.
func TestRelayAdminAddrWarning(t *testing.T) {
	bin := buildExactly(t)
	for _, tc := range []struct {
		addr string
		warn bool
	}{{"0.0.0.0:0", true}, {":0", true}, {"192.0.2.1:9464", true}, {"127.0.0.1:0", false}, {"localhost:0", false}, {"[::1]:0", false}} {
		out, _ := runExactly(t, bin, nil, "relay", "--db", "postgres://u@127.0.0.1:1/db", "--broker", "nats", "--nats-url", "nats://127.0.0.1:1",
			"--admin-addr", tc.addr)
		if got := strings.Contains(out, "have no authentication"); got != tc.warn {
			t.Errorf("--admin-addr %s: warning %v, want %v:\n%s", tc.addr, got, tc.warn, out)
		}
		if !strings.Contains(out, "cannot reach the database") {
			t.Errorf("--admin-addr %s: did not get to the database:\n%s", tc.addr, out)
		}
	}
}

// With --log-format json (flag, variable or config key) a start-up error is
// a JSON log record too.
func TestStartupErrorsInLogFormat(t *testing.T) {
	bin := buildExactly(t)
	for _, tc := range []struct {
		env  []string
		args []string
		want string
	}{
		{nil, []string{"--log-format", "json", "--db", "oracle://x/db"}, "unrecognised database DSN"},
		{nil, []string{"--log-format=json", "--batch-size", "lots"}, `invalid argument "lots"`},
		{nil, []string{"--log-format", "json", "--frobnicate"}, "unknown flag: --frobnicate"},
		{[]string{"EXACTLY_LOG_FORMAT=json"}, []string{"--db", "postgres://u@127.0.0.1:1/db", "--broker", "rabbit"}, `unknown broker "rabbit"`},
		{[]string{"EXACTLY_LOG_FORMAT=json", "EXACTLY_BATCH_SIZE=x"}, nil, "EXACTLY_BATCH_SIZE (for --batch-size)"},
		{nil, []string{"--config", badConfig(t, "log-format = json\nbroker = nats\nnats-url = nats://127.0.0.1:1\n"), "--db", "postgres://u@127.0.0.1:1/db",
			"--admin-addr", "127.0.0.1:0"}, "cannot reach the database"},
	} {
		out, code := runExactly(t, bin, tc.env, append([]string{"relay"}, tc.args...)...)
		if code == 0 {
			t.Errorf("%v %v: exit 0\n%s", tc.env, tc.args, out)
			continue
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		last := lines[len(lines)-1]
		var rec struct{ Level, Msg string }
		if err := json.Unmarshal([]byte(last), &rec); err != nil || rec.Level != "ERROR" || !strings.Contains(rec.Msg, tc.want) {
			t.Errorf("%v %v: want a JSON error record with %q, got %v:\n%s", tc.env, tc.args, tc.want, err, out)
		}
	}
	// Text stays text.
	out, _ := runExactly(t, bin, nil, "relay", "--db", "oracle://x/db")
	if !strings.HasPrefix(out, "exactly: --db: unrecognised database DSN") {
		t.Errorf("text error: %s", out)
	}
}

type panickingRunner struct{ msg string }

func (p panickingRunner) Run(context.Context) error { panic(p.msg) }
func (panickingRunner) Partitions() int             { return 0 }

// A panic in the relay becomes an error, its message redacted.
func TestRelayPanicRedacted(t *testing.T) {
	err := runSafely(context.Background(), panickingRunner{"lost postgres://u:" + canary + "@h/db and password=" + canary})
	if err == nil || !strings.Contains(err.Error(), "relay panicked: lost postgres://u:***@h/db and password=***") || strings.Contains(err.Error(), canary) {
		t.Errorf("runSafely: %v", err)
	}
}
