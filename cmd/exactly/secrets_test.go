package main

import (
	"context"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
)

// canary is the secret the sweep plants; it must never be printed.
const canary = "Zq7CanaryS3cret"

// runExactly runs the binary with env added to a clean environment and
// returns what it printed on stdout and stderr, and its exit code.
func runExactly(t *testing.T, bin string, env []string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(relayEnvCleared(), env...)
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%v: %v", args, err)
	}
	return string(out), code
}

// TestSecretsNeverPrinted plants a canary secret in every flag, variable
// and config key that can hold one, with unreachable targets and bad
// values, and fails if the canary shows in the output; then it runs a relay
// whose DSN and NATS URL hold it and reads the admin endpoints too.
func TestSecretsNeverPrinted(t *testing.T) {
	bin := buildExactly(t)
	db := pgDB(t)
	testenv.Need(t, testenv.NATS)
	testenv.Need(t, testenv.RabbitMQ)
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "relay_canary")
	pg := testenv.PostgresDSN() // reachable, trust authentication: a password is accepted and ignored
	withPassword := strings.Replace(pg, "://postgres@", "://postgres:"+canary+"@", 1)
	if withPassword == pg {
		t.Fatalf("cannot place a password in %s", pg)
	}
	sep := "?"
	if strings.Contains(pg, "?") {
		sep = "&"
	}
	withParam := pg + sep + "password=" + canary

	dsns := []string{
		"postgres://u:" + canary + "@127.0.0.1:1/db",
		"postgres://u@127.0.0.1:1/db?password=" + canary,
		"postgres://u@127.0.0.1:1/db?sslmode=disable&password=" + canary + "&connect_timeout=2",
		"postgresql://u@127.0.0.1:1/db?sslpassword=" + canary,
		"host=127.0.0.1 port=1 user=u password=" + canary + " dbname=db",
		"mysql://root:" + canary + "@tcp(127.0.0.1:1)/test",
		"oracle://u:" + canary + "@x/db",
	}
	type run struct {
		env  []string
		args []string
	}
	var runs []run
	relayTo := []string{"--broker", "nats", "--nats-url", "nats://127.0.0.1:1", "--admin-addr", "127.0.0.1:0"}
	for _, dsn := range dsns {
		runs = append(runs,
			run{nil, append([]string{"relay", "--db", dsn}, relayTo...)},
			run{nil, append([]string{"relay", "--db", dsn, "--log-format", "json"}, relayTo...)},
			run{nil, append([]string{"relay", "--db", dsn, "--source", "cdc"}, relayTo...)},
			run{[]string{"EXACTLY_DB=" + dsn}, append([]string{"relay"}, relayTo...)},
			run{nil, []string{"relay", "--config", badConfig(t, "db = "+dsn+"\nbroker = nats\nnats-url = nats://127.0.0.1:1\nadmin-addr = 127.0.0.1:0\n")}},
			run{nil, []string{"outbox", "status", "--db", dsn}},
			run{nil, []string{"outbox", "dead", "list", "--db", dsn}},
			run{[]string{"EXACTLY_DB=" + dsn}, []string{"inbox", "gc", "--consumer", "c", "--older-than", "1h"}},
			run{nil, []string{"migrate", "--db", dsn}},
			run{nil, []string{"demo", "--db", dsn, "--orders", "100", "--timeout", "5s"}},
		)
	}
	for _, target := range [][]string{
		{"--nats", "nats://" + canary + "@127.0.0.1:1"},
		{"--nats", "nats://u:" + canary + "@127.0.0.1:1"},
		{"--redis", "redis://u:" + canary + "@127.0.0.1:1"},
		{"--redis", "redis://127.0.0.1:1?password=" + canary},
	} {
		runs = append(runs, run{nil, append([]string{"demo", "--orders", "100", "--timeout", "5s"}, target...)})
	}
	reach := []string{"relay", "--db", pg, "--table", ob.Table(), "--admin-addr", "127.0.0.1:0"}
	for _, r := range [][]string{
		{"--broker", "nats", "--nats-url", "nats://" + canary + "@127.0.0.1:1"},
		{"--broker", "nats", "--nats-url", "nats://u:" + canary + "@127.0.0.1:1"},
		{"--broker", "nats", "--nats-url", "tls://" + canary + "@127.0.0.1:1"},
		{"--broker", "nats", "--nats-url", "nats://127.0.0.1:1", "--nats-user", "u", "--nats-password", canary},
		{"--broker", "nats", "--nats-url", "nats://127.0.0.1:1", "--nats-user", "u", "--nats-password=" + canary},
		{"--broker", "nats", "--nats-url", "http://" + canary + "@x"},
		{"--broker", "amqp", "--amqp-url", "amqp://u:" + canary + "@127.0.0.1:1/"},
		{"--broker", "amqp", "--amqp-url", "amqp://u:" + canary + "%zz@127.0.0.1:1/"},
		{"--broker", "amqp", "--amqp-url", "amqp://u:" + canary + "@h:notaport/"},
		{"--broker", "amqp", "--amqp-url", "amqp://guest:" + canary + "@" + testenv.RabbitMQ.Addr + "/"},
		{"--broker", "amqp", "--amqp-url", "http://u:" + canary + "@x"},
		{"--broker", "kafka", "--kafka-brokers", "127.0.0.1:1", "--kafka-sasl", "plain", "--kafka-user", "u", "--kafka-password", canary},
		{"--broker", "kafka", "--kafka-brokers", "127.0.0.1:1", "--kafka-sasl", "scram-sha-256", "--kafka-user", "u", "--kafka-password", canary},
		{"--broker", "kafka", "--kafka-brokers", "127.0.0.1:1", "--kafka-password", canary},
		{"--broker", "nats", "--nats-url", "nats://127.0.0.1:1", "--kafka-password", canary},
		// URLs given to settings of another type.
		{"--broker", "nats", "--nats-url", "nats://127.0.0.1:1", "--batch-size", "postgres://u:" + canary + "@h/db"},
		{"--broker", "nats", "--nats-url", "nats://127.0.0.1:1", "--lease-ttl", "amqp://u:" + canary + "@h/"},
		{"--broker", "nats", "--nats-url", "nats://127.0.0.1:1", "--tls-ca", "/nonexistent/" + canary + "?password=" + canary},
	} {
		runs = append(runs, run{nil, append(append([]string{}, reach...), r...)})
	}
	for _, env := range [][]string{
		{"EXACTLY_BROKER=nats", "EXACTLY_NATS_URL=nats://" + canary + "@127.0.0.1:1"},
		{"EXACTLY_BROKER=nats", "EXACTLY_NATS_URL=nats://127.0.0.1:1", "EXACTLY_NATS_USER=u", "EXACTLY_NATS_PASSWORD=" + canary},
		{"EXACTLY_BROKER=amqp", "EXACTLY_AMQP_URL=amqp://u:" + canary + "@127.0.0.1:1/"},
		{"EXACTLY_BROKER=amqp", "EXACTLY_AMQP_URL=amqp://u:" + canary + "%zz@127.0.0.1:1/"},
		{"EXACTLY_BROKER=kafka", "EXACTLY_KAFKA_BROKERS=127.0.0.1:1", "EXACTLY_KAFKA_SASL=plain", "EXACTLY_KAFKA_USER=u", "EXACTLY_KAFKA_PASSWORD=" + canary},
		{"EXACTLY_BROKER=nats", "EXACTLY_NATS_URL=nats://127.0.0.1:1", "EXACTLY_BATCH_SIZE=postgres://u:" + canary + "@h/db"},
		{"EXACTLY_BROKER=nats", "EXACTLY_NATS_URL=nats://127.0.0.1:1", "EXACTLY_MAX_ATTEMPTS=amqp://u:" + canary + "@h/"},
		{"EXACTLY_BROKER=nats", "EXACTLY_NATS_URL=nats://127.0.0.1:1", "EXACTLY_POLL_INTERVAL=password=" + canary},
		{"EXACTLY_BROKER=nats", "EXACTLY_NATS_URL=nats://127.0.0.1:1", "EXACTLY_KAFKA_PASSWORD=" + canary},
	} {
		runs = append(runs, run{env, reach})
	}
	for _, conf := range []string{
		"broker = nats\nnats-url = nats://" + canary + "@127.0.0.1:1\n",
		"broker = amqp\namqp-url = amqp://u:" + canary + "%zz@127.0.0.1:1/\n",
		"broker = kafka\nkafka-brokers = 127.0.0.1:1\nkafka-sasl = plain\nkafka-user = u\nkafka-password = " + canary + "\n",
		"broker = nats\nnats-url = nats://127.0.0.1:1\nnats-user = u\nnats-password = " + canary + "\nmax-attempts = x\n",
		"kafka-password = " + canary + "\nbatch-size = lots\n",
		"nats-password = " + canary + "\nnats-password = " + canary + "\n",
		"broker = nats\nnats-url = nats://127.0.0.1:1\nbatch-size = postgres://u:" + canary + "@h/db\n",
		"broker = nats\nnats-url = nats://127.0.0.1:1\nmax-attempts = amqp://u:" + canary + "@h/\n",
		"broker = nats\nnats-url = nats://127.0.0.1:1\nshutdown-timeout = token=" + canary + "\n",
		"broker = nats\nnats-url = nats://" + canary + "@127.0.0.1:1\nnats-url = nats://x\n",
		"broker = nats\npassword=" + canary + "\n",
		"broker = nats\nthis line has the secret " + canary + " and no equals sign\n",
	} {
		runs = append(runs, run{nil, append(append([]string{}, reach...), "--config", badConfig(t, conf))})
		runs = append(runs, run{nil, append(append([]string{}, reach...), "--config", badConfig(t, conf), "--log-format", "json")})
	}

	for _, r := range runs {
		out, code := runExactly(t, bin, r.env, r.args...)
		if code == 0 {
			t.Errorf("%v %v: exit 0, want a failure\n%s", r.env, r.args, out)
		}
		if strings.Contains(out, canary) {
			t.Errorf("%v %v: the canary secret was printed:\n%s", r.env, r.args, out)
		}
		if strings.Contains(out, "goroutine ") {
			t.Errorf("%v %v: panicked:\n%s", r.env, r.args, out)
		}
	}

	// A running relay: its DSN holds the canary twice over, its NATS URL is
	// a token URL, and its logs are at debug level; neither the logs nor
	// the admin endpoints may show it.
	for _, format := range []string{"text", "json"} {
		admin := freeAddr(t)
		p := startRelayEnv(t, bin, admin, []string{"EXACTLY_NATS_URL=nats://" + canary + "@" + testenv.NATS.Addr},
			"--db", withPassword, "--table", ob.Table(), "--broker", "nats", "--log-level", "debug", "--log-format", format)
		waitFor(t, p, "/readyz 200", 30*time.Second, func() (bool, string) {
			code, body, err := p.get("/readyz")
			return err == nil && code == 200, body
		})
		for _, path := range []string{"/metrics", "/healthz", "/readyz"} {
			code, body, err := p.get(path)
			if err != nil || code != 200 || strings.Contains(body, canary) {
				t.Errorf("%s %s: %d %v\n%s", format, path, code, err, body)
			}
		}
		p.stop(t)
		if out := p.out.String(); strings.Contains(out, canary) || !strings.Contains(out, "relay started") {
			t.Errorf("%s: the log shows the canary, or the relay did not start:\n%s", format, out)
		}
	}
	// The same with the password as a DSN parameter, stopped by SIGINT.
	p := startRelay(t, bin, freeAddr(t), "--db", withParam, "--table", ob.Table(), "--broker", "nats",
		"--nats-url", testenv.NATSURL(), "--nats-user", "ignored", "--nats-password", canary, "--log-level", "debug")
	waitFor(t, p, "started", 30*time.Second, func() (bool, string) {
		return strings.Contains(p.out.String(), "relay started"), ""
	})
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	<-p.done
	if out := p.out.String(); strings.Contains(out, canary) {
		t.Errorf("the log shows the canary:\n%s", out)
	}
}
