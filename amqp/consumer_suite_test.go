package amqp_test

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/amqp"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/consume"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// TestConsumerSuite holds the Consumer to the contract every consumer
// keeps, on RabbitMQ with the SQL inbox on PostgreSQL.
func TestConsumerSuite(t *testing.T) {
	t.Parallel()
	exactlytest.RunConsumerSuite(t, consumerHarness(t, suiteConsumer, time.Minute))
}

// newTestConsumer builds one consumer of queue for the suite.
type newTestConsumer func(t *testing.T, queue string, cfg exactly.ConsumerConfig) exactlytest.TestConsumer

func consumerHarness(t *testing.T, newConsumer newTestConsumer, timeout time.Duration) exactlytest.ConsumerHarness {
	b := connect(t)
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(40)
	t.Cleanup(func() { db.Close() })
	return exactlytest.ConsumerHarness{
		DB: db,
		Setup: func(t *testing.T) exactlytest.ConsumerSource {
			q := b.queue(t, nil)
			return exactlytest.ConsumerSource{
				Topic:     q,
				Publisher: b.publisher(t),
				PublishWithoutID: func(t *testing.T, payload []byte) {
					b.publishRaw(t, q, amqp091.Publishing{Body: payload, Headers: amqp091.Table{"x-from": "legacy"}})
				},
				New: func(t *testing.T, cfg exactly.ConsumerConfig) exactlytest.TestConsumer {
					return newConsumer(t, q, cfg)
				},
			}
		},
		Ordering: exactlytest.OrderPerKey,
		NoID:     exactlytest.NoIDDeadLettered,
		// RabbitMQ takes no delivery back from a live channel; its
		// consumer_timeout closes the channel instead.
		AckDeadline: 0,
		Timeout:     timeout,
	}
}

// suiteConsumer is a Consumer dialing through sockets the suite can cut.
func suiteConsumer(t *testing.T, queue string, shared exactly.ConsumerConfig) exactlytest.TestConsumer {
	var s sockets
	c, err := amqp.NewConsumer(brokerURL(), amqp.ConsumerConfig{
		ConsumerConfig:      shared,
		Queue:               queue,
		DialConfig:          s.config(),
		ReconnectBackoff:    20 * time.Millisecond,
		ReconnectMaxBackoff: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("NewConsumer: %v", err)
	}
	return exactlytest.TestConsumer{
		Run:      c.Run,
		Stats:    func() exactly.ConsumerStats { return c.Stats().ConsumerStats },
		Crash:    s.cut,
		LoseAcks: s.loseWrites,
	}
}

// TestConsumerSuiteCatchesAckBeforeEffect runs the suite, in a child
// process, against a consumer that acknowledges each delivery as it
// arrives, before its effect: the suite must fail it, in the cases where
// that loses a message, and pass it where it does not.
func TestConsumerSuiteCatchesAckBeforeEffect(t *testing.T) {
	if os.Getenv("EXACTLY_TEST_BROKEN_CONSUMER") == "1" {
		// What it loses never comes: a short wait is enough to see it.
		exactlytest.RunConsumerSuite(t, consumerHarness(t, ackFirstConsumer, 10*time.Second))
		return
	}
	t.Parallel()
	connect(t)
	testenv.Need(t, testenv.Postgres)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestConsumerSuiteCatchesAckBeforeEffect$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "EXACTLY_TEST_BROKEN_CONSUMER=1")
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		t.Fatalf("the suite against a consumer that acks first: %v, want it to fail; output:\n%s", err, out)
	}
	const name = "TestConsumerSuiteCatchesAckBeforeEffect/"
	for _, c := range []string{"CrashBeforeEffect", "DeadLetterHeldUntilConfirmed", "GracefulShutdown"} {
		if !strings.Contains(string(out), "--- FAIL: "+name+c+" ") {
			t.Errorf("case %s did not fail for a consumer that acks before the effect", c)
		}
	}
	// The same consumer handles a run without faults well enough: the
	// suite fails it for the ack, not for everything.
	if !strings.Contains(string(out), "--- PASS: "+name+"HandlesEachOnce ") {
		t.Errorf("HandlesEachOnce did not pass for a consumer that only acks too early")
	}
	if t.Failed() {
		t.Logf("the child's output:\n%s", out)
	}
}

// ackFirstConsumer is the bug the suite exists to catch: it consumes with
// automatic acknowledgement, so the broker forgets each delivery as it
// sends it, and only then runs the shared handler policy.
func ackFirstConsumer(t *testing.T, queue string, shared exactly.ConsumerConfig) exactlytest.TestConsumer {
	cfg, err := shared.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	policy, err := consume.FromConfig(cfg, cfg.DeadLetter)
	if err != nil {
		t.Fatal(err)
	}
	var (
		s     sockets
		stats consume.Stats
	)
	run := func(ctx context.Context) error {
		conn, err := amqp091.DialConfig(brokerURL(), s.config())
		if err != nil {
			return err
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			return err
		}
		deliveries, err := ch.Consume(queue, "", true, false, false, false, nil)
		if err != nil {
			return err
		}
		for {
			select {
			case <-ctx.Done():
				return nil
			case d, ok := <-deliveries:
				if !ok {
					return errors.New("the channel closed")
				}
				stats.Received.Add(1)
				m := &exactly.Message{ID: d.MessageId, Topic: d.RoutingKey, Payload: d.Body, Headers: map[string]string{}}
				for k, v := range d.Headers {
					switch s, _ := v.(string); k {
					case exactly.HeaderID:
					case exactly.HeaderKey:
						m.Key = s
					default:
						m.Headers[k] = s
					}
				}
				h := cfg.Handler
				if m.ID == "" {
					m.ID = "noid-" + string(d.Body)
					h = func(context.Context, *exactly.Message) error { return exactly.ErrNoID }
				}
				_, _ = policy.Process(ctx, h, m, 1, &stats)
			}
		}
	}
	return exactlytest.TestConsumer{
		Run:   run,
		Stats: stats.Load,
		Crash: s.cut,
	}
}
