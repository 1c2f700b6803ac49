package main

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/exactlyonce/exactly/internal/testenv"
)

// checkDemoTable requires the demo's final table to show every order
// applied, none lost, none applied twice, and every fault kind injected at
// least once.
func checkDemoTable(t *testing.T, out string, orders int) {
	t.Helper()
	n := strconv.Itoa(orders)
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^  orders written\s+` + n + `\s`),
		regexp.MustCompile(`(?m)^  effects applied\s+` + n + `\s`),
		regexp.MustCompile(`(?m)^  lost\s+0\s`),
		regexp.MustCompile(`(?m)^  applied twice\s+0\s`),
		regexp.MustCompile(`(?m)^  outbox pending / dead\s+0/0\s`),
		regexp.MustCompile(`(?m)^  dead-lettered\s+0\s`),
		regexp.MustCompile(`(?m)^    publish ack lost \(a timeout after the broker accepted\)\s+[1-9]\d*$`),
		regexp.MustCompile(`(?m)^    relay crash after the broker confirmed, before mark-sent\s+[1-9]\d*$`),
		regexp.MustCompile(`(?m)^    consumer crash after the effect, before the (offset commit|ack|commit)\s+[1-9]\d*$`),
		regexp.MustCompile(`(?m)^    rebalance \(a member left the group, another joined\)\s+[1-9]\d*$`),
		regexp.MustCompile(`(?m)^OK: every order's promotion applied exactly once`),
	} {
		if !want.MatchString(out) {
			t.Errorf("demo output lacks %s:\n%s", want, out)
		}
	}
	// The points owed equal the points applied.
	m := regexp.MustCompile(`(?m)^  customer points\s+(\d+)/(\d+)\s`).FindStringSubmatch(out)
	if m == nil || m[1] != m[2] {
		t.Errorf("customer points do not balance (%v):\n%s", m, out)
	}
	// Duplicates really happened, and were absorbed.
	d := regexp.MustCompile(`(?m)^  deliveries\s+(\d+)\s+(\d+) duplicates`).FindStringSubmatch(out)
	if d == nil {
		t.Fatalf("no deliveries row:\n%s", out)
	}
	if dups, _ := strconv.Atoi(d[2]); dups == 0 {
		t.Errorf("no duplicate deliveries: the faults proved nothing:\n%s", out)
	}
}

func runDemoT(t *testing.T, o demoOptions) string {
	t.Helper()
	if o.writers == 0 {
		o.writers = 4
	}
	if o.timeout == 0 {
		// Far above the few seconds a run takes, so that a machine busy
		// with other test packages does not turn a slow run into a failure.
		o.timeout = 2 * time.Minute
	}
	if o.relay == "" {
		o.relay = sourcePoll
	}
	if o.offsets == "" {
		o.offsets = offsetsKafka
	}
	var out bytes.Buffer
	start := time.Now()
	if err := runDemo(context.Background(), &out, o); err != nil {
		t.Fatalf("demo failed after %s: %v\n%s", time.Since(start), err, out.String())
	}
	return out.String()
}

// The demo on its embedded defaults: SQLite, kfake, the SQL inbox.
func TestDemo(t *testing.T) {
	out := runDemoT(t, demoOptions{orders: 2000, seed: 7})
	checkDemoTable(t, out, 2000)
	if !strings.Contains(out, "SQLite (embedded) outbox -> poll relay -> in-process Kafka (kfake)") {
		t.Errorf("unexpected set-up line:\n%s", out)
	}
}

// The same demo against real services and with the other strategies.
func TestDemoStrategies(t *testing.T) {
	t.Run("Postgres", func(t *testing.T) {
		testenv.Need(t, testenv.Postgres)
		out := runDemoT(t, demoOptions{orders: 1000, seed: 11, db: testenv.PostgresDSN()})
		checkDemoTable(t, out, 1000)
		requireNoDemoSchema(t)
	})
	t.Run("MySQL", func(t *testing.T) {
		testenv.Need(t, testenv.MariaDB)
		out := runDemoT(t, demoOptions{orders: 500, seed: 12, db: "mysql://" + testenv.MySQLDSN()})
		checkDemoTable(t, out, 500)
	})
	t.Run("Redis", func(t *testing.T) {
		testenv.Need(t, testenv.Redis)
		out := runDemoT(t, demoOptions{orders: 1000, seed: 13, redis: "redis://" + testenv.Redis.Addr + "/0"})
		checkDemoTable(t, out, 1000)
		if !strings.Contains(out, "-> Redis inbox") || !strings.Contains(out, "by the Redis inbox") {
			t.Errorf("not the Redis inbox:\n%s", out)
		}
	})
	t.Run("NATS", func(t *testing.T) {
		testenv.Need(t, testenv.NATS)
		out := runDemoT(t, demoOptions{orders: 1000, seed: 14, nats: testenv.NATSURL()})
		checkDemoTable(t, out, 1000)
		if !strings.Contains(out, "-> NATS JetStream ->") {
			t.Errorf("not NATS:\n%s", out)
		}
	})
	t.Run("KafkaOffsetsInPostgres", func(t *testing.T) {
		testenv.Need(t, testenv.Postgres)
		out := runDemoT(t, demoOptions{orders: 1000, seed: 15, db: testenv.PostgresDSN(), offsets: offsetsDB})
		checkDemoTable(t, out, 1000)
		if !strings.Contains(out, "offsets and id claims stored in the effect's transaction") {
			t.Errorf("not the offsets-in-DB strategy:\n%s", out)
		}
	})
	t.Run("CDC", func(t *testing.T) {
		pg := testenv.LogicalPostgres(t, nil)
		out := runDemoT(t, demoOptions{orders: 1000, seed: 17, db: pg.DSN("test"), relay: sourceCDC})
		checkDemoTable(t, out, 1000)
		if !strings.Contains(out, "outbox -> cdc relay ->") {
			t.Errorf("not the cdc relay:\n%s", out)
		}
		db, err := sql.Open("pgx", pg.DSN("test"))
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		var slots, pubs int
		if err := db.QueryRow(`SELECT (SELECT count(*) FROM pg_replication_slots), (SELECT count(*) FROM pg_publication)`).Scan(&slots, &pubs); err != nil {
			t.Fatal(err)
		}
		if slots != 0 || pubs != 0 {
			t.Errorf("the demo left %d replication slots and %d publications behind", slots, pubs)
		}
	})
	t.Run("ExternalKafka", func(t *testing.T) {
		// A Kafka the demo did not start: the --kafka path creates and
		// deletes its own topics.
		cluster, err := kfake.NewCluster(kfake.NumBrokers(1))
		if err != nil {
			t.Fatal(err)
		}
		defer cluster.Close()
		out := runDemoT(t, demoOptions{orders: 1000, seed: 16, kafka: strings.Join(cluster.ListenAddrs(), ",")})
		checkDemoTable(t, out, 1000)
		if !strings.Contains(out, "-> Kafka ->") {
			t.Errorf("not the external Kafka:\n%s", out)
		}
	})
}

// requireNoDemoSchema checks that the demo removed what it created.
func requireNoDemoSchema(t *testing.T) {
	t.Helper()
	db := pgDB(t)
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'exactly_demo_%'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("%d exactly_demo_* schemas left behind", n)
	}
}

// Bad flags, a bad DSN and unreachable services: a clear error, a non-zero
// exit, no panic, no password in the output.
func TestDemoBadInput(t *testing.T) {
	bin := buildExactly(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--orders", "5"}, "--orders 5"},
		{[]string{"--writers", "0"}, "--writers 0"},
		{[]string{"--relay", "cdc"}, "--relay: the cdc source needs PostgreSQL"},
		{[]string{"--relay", "cdc", "--db", "postgres://u:secret@127.0.0.1:1/db"}, "--db: cannot reach the database postgres://u:***@127.0.0.1:1/db"},
		{[]string{"--relay", "wal"}, `--relay: unknown source "wal"`},
		{[]string{"--inbox", "memcached"}, `--inbox: unknown inbox "memcached"`},
		{[]string{"--inbox", "redis"}, "--inbox redis needs --redis"},
		{[]string{"--offsets", "zookeeper"}, `--offsets: unknown value "zookeeper"`},
		{[]string{"--offsets", "db", "--nats", "nats://127.0.0.1:4222"}, "--offsets db is for Kafka"},
		{[]string{"--kafka", "k:9092", "--nats", "nats://x:4222"}, "--kafka and --nats both given"},
		{[]string{"--db", "oracle://u:secret@x/db"}, "--db: unrecognised database DSN"},
		{[]string{"--db", "postgres://u:secret@127.0.0.1:1/db"}, "--db: cannot reach the database postgres://u:***@127.0.0.1:1/db"},
		{[]string{"--nats", "nats://u:secret@127.0.0.1:1"}, "--nats: cannot connect to NATS at nats://u:***@127.0.0.1:1"},
		{[]string{"--redis", "redis://:secret@127.0.0.1:1/0"}, "--redis: cannot reach Redis at redis://:***@127.0.0.1:1/0"},
		{[]string{"--kafka", "127.0.0.1:1"}, "--kafka: cannot reach Kafka at 127.0.0.1:1"},
		{[]string{"--bogus"}, "unknown flag: --bogus"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
		cmd := exec.CommandContext(ctx, bin, append([]string{"demo"}, tc.args...)...)
		cmd.Env = relayEnvCleared()
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
		if strings.Contains(s, "secret") {
			t.Errorf("%v: the password leaked:\n%s", tc.args, s)
		}
		if strings.Contains(s, "panic") || strings.Contains(s, "goroutine ") {
			t.Errorf("%v: panicked:\n%s", tc.args, s)
		}
	}
}
