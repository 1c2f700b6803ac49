package amqp_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/amqp"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// brokerURL is the URL of the test RabbitMQ.
func brokerURL() string {
	if u := os.Getenv("EXACTLY_TEST_AMQP_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@" + testenv.RabbitMQ.Addr + "/"
}

// testBroker is an admin connection to the test RabbitMQ, for declaring,
// inspecting and deleting the queues a test uses.
type testBroker struct {
	conn *amqp091.Connection
}

func connect(t *testing.T) *testBroker {
	t.Helper()
	testenv.Need(t, testenv.RabbitMQ)
	conn, err := amqp091.Dial(brokerURL())
	if err != nil {
		t.Fatalf("connecting to RabbitMQ at %s: %v", testenv.RabbitMQ.Addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	return &testBroker{conn: conn}
}

// do runs fn on a fresh channel: a refused operation closes its channel.
func (b *testBroker) do(t *testing.T, fn func(ch *amqp091.Channel) error) error {
	t.Helper()
	ch, err := b.conn.Channel()
	if err != nil {
		t.Fatalf("opening an admin channel: %v", err)
	}
	defer ch.Close()
	return fn(ch)
}

// queue declares a fresh queue with args and deletes it, and its
// dead-letter queue, when the test ends. The queues also expire on their
// own if a test run dies before its cleanup.
func (b *testBroker) queue(t *testing.T, args amqp091.Table) string {
	t.Helper()
	name := "exactly-test-" + exactly.NewID()
	a := amqp091.Table{"x-expires": int32(10 * 60 * 1000)}
	for k, v := range args {
		a[k] = v
	}
	if err := b.do(t, func(ch *amqp091.Channel) error {
		_, err := ch.QueueDeclare(name, false, false, false, false, a)
		return err
	}); err != nil {
		t.Fatalf("declaring queue %s: %v", name, err)
	}
	t.Cleanup(func() {
		for _, q := range []string{name, name + ".dlq"} {
			_ = b.do(t, func(ch *amqp091.Channel) error {
				_, err := ch.QueueDelete(q, false, false, false)
				return err
			})
		}
	})
	return name
}

// ready returns how many messages queue holds ready for delivery.
func (b *testBroker) ready(t *testing.T, queue string) int {
	t.Helper()
	var n int
	if err := b.do(t, func(ch *amqp091.Channel) error {
		q, err := ch.QueueDeclarePassive(queue, false, false, false, false, nil)
		n = q.Messages
		return err
	}); err != nil {
		t.Fatalf("inspecting queue %s: %v", queue, err)
	}
	return n
}

// read returns up to n messages of queue in queue order, without removing
// them: it waits up to timeout for the queue to hold n, consumes what it
// holds without acknowledging, and closes its channel, which puts them back
// where they were.
func (b *testBroker) read(t *testing.T, queue string, n int, timeout time.Duration) []exactlytest.Received {
	t.Helper()
	deadline := time.Now().Add(timeout)
	have := b.ready(t, queue)
	for have < n && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		have = b.ready(t, queue)
	}
	want := min(have, n)
	if want == 0 {
		return nil
	}
	ch, err := b.conn.Channel()
	if err != nil {
		t.Fatalf("opening a channel: %v", err)
	}
	defer ch.Close()
	deliveries, err := ch.Consume(queue, "", false, false, false, false, nil)
	if err != nil {
		t.Fatalf("consuming %s: %v", queue, err)
	}
	out := make([]exactlytest.Received, 0, want)
	timer := time.NewTimer(timeout + 10*time.Second)
	defer timer.Stop()
	for len(out) < want {
		select {
		case d, ok := <-deliveries:
			if !ok {
				t.Fatalf("the channel reading %s closed", queue)
			}
			out = append(out, received(d))
		case <-timer.C:
			t.Fatalf("read %d of the %d messages %s holds", len(out), want, queue)
		}
	}
	return out
}

func received(d amqp091.Delivery) exactlytest.Received {
	h := make(map[string]string, len(d.Headers))
	for k, v := range d.Headers {
		s, _ := v.(string)
		h[k] = s
	}
	return exactlytest.Received{
		ID:       h[exactly.HeaderID],
		NativeID: d.MessageId,
		Key:      h[exactly.HeaderKey],
		Payload:  d.Body,
		Headers:  h,
	}
}

// get takes one message off queue, waiting up to timeout for one.
func (b *testBroker) get(t *testing.T, queue string, timeout time.Duration) (amqp091.Delivery, bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var (
			d  amqp091.Delivery
			ok bool
		)
		if err := b.do(t, func(ch *amqp091.Channel) error {
			var err error
			d, ok, err = ch.Get(queue, true)
			return err
		}); err != nil {
			t.Fatalf("getting from %s: %v", queue, err)
		}
		if ok || time.Now().After(deadline) {
			return d, ok
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// publishRaw publishes p to queue through the default exchange, as a
// producer that knows nothing of exactly would.
func (b *testBroker) publishRaw(t *testing.T, queue string, p amqp091.Publishing) {
	t.Helper()
	if err := b.do(t, func(ch *amqp091.Channel) error {
		if err := ch.Confirm(false); err != nil {
			return err
		}
		dc, err := ch.PublishWithDeferredConfirm("", queue, true, false, p)
		if err != nil {
			return err
		}
		if !dc.Wait() {
			return errors.New("nacked")
		}
		return nil
	}); err != nil {
		t.Fatalf("publishing to %s: %v", queue, err)
	}
}

func (b *testBroker) publisher(t *testing.T, opts ...amqp.PublisherOption) *amqp.Publisher {
	t.Helper()
	p, err := amqp.NewPublisher(brokerURL(), append([]amqp.PublisherOption{testLogger(t)}, opts...)...)
	if err != nil {
		t.Fatalf("NewPublisher: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func publish(t *testing.T, p exactly.Publisher, msgs ...*exactly.Message) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := p.Publish(ctx, msgs); err != nil {
		t.Fatalf("Publish(%d messages): %v", len(msgs), err)
	}
}

// messages builds n messages for queue over the given keys, payload
// "key/seq".
func messages(queue string, keys []string, n int) []*exactly.Message {
	msgs := make([]*exactly.Message, n)
	for i := range msgs {
		k := keys[i%len(keys)]
		msgs[i] = &exactly.Message{
			ID: exactly.NewID(), Topic: queue, Key: k,
			Payload:   fmt.Appendf(nil, "%s/%d", k, i/len(keys)),
			Headers:   map[string]string{"x-seq": strconv.Itoa(i)},
			CreatedAt: time.Now(),
		}
	}
	return msgs
}

// sockets is a Dial for amqp091.Config that keeps the connections it
// opens, so a test can cut them as a network failure or a crash would.
type sockets struct {
	mu    sync.Mutex
	conns []*socket
}

func (s *sockets) dial(network, addr string) (net.Conn, error) {
	c, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	if err := c.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		c.Close()
		return nil, err
	}
	sc := &socket{Conn: c}
	s.mu.Lock()
	s.conns = append(s.conns, sc)
	s.mu.Unlock()
	return sc, nil
}

func (s *sockets) config() amqp091.Config { return amqp091.Config{Dial: s.dial} }

func (s *sockets) dialed() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// cut closes every socket opened so far: the client sees a dead
// connection, the broker a vanished peer.
func (s *sockets) cut() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
}

// loseWrites makes every open socket swallow what is written from now on
// and close after the first write: what the client sends next (an ack)
// never reaches the broker, though the client saw it sent.
func (s *sockets) loseWrites() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.blackhole.Store(true)
	}
}

// localPorts returns the local ports of the sockets opened so far.
func (s *sockets) localPorts() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int
	for _, c := range s.conns {
		if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
			out = append(out, a.Port)
		}
	}
	return out
}

// cutAfter makes every open socket close once n more bytes have been
// written to it: a connection that dies in the middle of a batch.
func (s *sockets) cutAfter(n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.limit.Store(c.written.Load() + n)
	}
}

type socket struct {
	net.Conn
	blackhole atomic.Bool
	written   atomic.Int64
	limit     atomic.Int64 // close once written passes it; 0: no limit
}

func (c *socket) Write(p []byte) (int, error) {
	if c.blackhole.Load() {
		c.Conn.Close()
		return len(p), nil
	}
	if limit := c.limit.Load(); limit > 0 && c.written.Add(int64(len(p))) > limit {
		c.Conn.Close()
		return 0, net.ErrClosed
	}
	n, err := c.Conn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

// closeFromBroker makes RabbitMQ close the connections whose client ports
// are given, as an operator or a broker shutdown does (connection.close
// with CONNECTION_FORCED). It reports false when rabbitmqctl is not
// available.
func closeFromBroker(t *testing.T, ports []int) bool {
	t.Helper()
	if _, err := exec.LookPath("rabbitmqctl"); err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	// The table output, not JSON: close_connection wants the pid as the
	// table prints it (<rabbit@host.1.2.3>), JSON prints #PID<1.2.3>.
	out, err := exec.CommandContext(ctx, "rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "peer_port").Output()
	if err != nil {
		t.Logf("rabbitmqctl list_connections: %v", err)
		return false
	}
	type conn struct {
		PID      string
		PeerPort int
	}
	var conns []conn
	for line := range strings.Lines(string(out)) {
		pid, port, ok := strings.Cut(strings.TrimSpace(line), "\t")
		if n, err := strconv.Atoi(port); ok && err == nil {
			conns = append(conns, conn{pid, n})
		}
	}
	closed := 0
	for _, c := range conns {
		for _, p := range ports {
			if c.PeerPort != p {
				continue
			}
			if out, err := exec.CommandContext(ctx, "rabbitmqctl", "-q", "close_connection", c.PID, "exactly test: forced close").CombinedOutput(); err != nil {
				t.Logf("rabbitmqctl close_connection %s: %v: %s", c.PID, err, out)
				return false
			}
			closed++
		}
	}
	return closed > 0
}

// effects counts what a handler applied, per message ID.
type effects struct {
	mu          sync.Mutex
	count       map[string]int
	redelivered map[string]int
	order       []*exactly.Message
}

func newEffects() *effects {
	return &effects{count: make(map[string]int), redelivered: make(map[string]int)}
}

func (e *effects) apply(ctx context.Context, m *exactly.Message) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.count[m.ID]++
	if info, ok := amqp.DeliveryInfoFrom(ctx); ok && info.Redelivered {
		e.redelivered[m.ID]++
	}
	e.order = append(e.order, m)
	return e.count[m.ID]
}

func (e *effects) of(id string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.count[id]
}

func (e *effects) redeliveries(id string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.redelivered[id]
}

func (e *effects) distinct() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.count)
}

func (e *effects) total() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.order)
}

func (e *effects) applied() []*exactly.Message {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]*exactly.Message(nil), e.order...)
}

// lost returns the IDs of msgs whose effect was never applied.
func (e *effects) lost(msgs []*exactly.Message) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for _, m := range msgs {
		if e.count[m.ID] == 0 {
			out = append(out, m.ID)
		}
	}
	return out
}

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// run starts c and stops it when the test ends, failing the test if Run
// returns an error or does not return in time.
func run(t *testing.T, c *amqp.Consumer) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run = %v, want nil after cancel", err)
				}
			case <-time.After(20 * time.Second):
				t.Errorf("Run did not return within 20s of its context ending")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// fastRetry keeps retries quick in tests.
var fastRetry = exactly.RetryPolicy{MaxAttempts: 3, InitialBackoff: 5 * time.Millisecond, MaxBackoff: 20 * time.Millisecond}

// consumerConfig is the configuration the tests start from: quick
// retries and reconnects, logs to the test's output.
func consumerConfig(t *testing.T, queue string, h exactly.Handler) amqp.ConsumerConfig {
	return amqp.ConsumerConfig{
		ConsumerConfig:      exactly.ConsumerConfig{Handler: h, Retry: fastRetry, Logger: testSlog(t)},
		Queue:               queue,
		ReconnectBackoff:    20 * time.Millisecond,
		ReconnectMaxBackoff: 200 * time.Millisecond,
	}
}

// consumer returns a Consumer of queue running h, with consumerConfig as
// edited by edits.
func consumer(t *testing.T, queue string, h exactly.Handler, edits ...func(*amqp.ConsumerConfig)) *amqp.Consumer {
	t.Helper()
	cfg := consumerConfig(t, queue, h)
	for _, edit := range edits {
		edit(&cfg)
	}
	c, err := amqp.NewConsumer(brokerURL(), cfg)
	if err != nil {
		t.Fatalf("NewConsumer: %v", err)
	}
	return c
}

// dialVia makes a consumer dial through s.
func dialVia(s *sockets) func(*amqp.ConsumerConfig) {
	return func(c *amqp.ConsumerConfig) { c.DialConfig = s.config() }
}

// listenAndClose returns an address where nothing listens.
func listenAndClose() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	return addr, ln.Close()
}

// testLogger sends a publisher's logs to the test's output.
func testLogger(t *testing.T) amqp.PublisherOption { return amqp.Logger(testSlog(t)) }

// testSlog is a logger writing to the test's output.
func testSlog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}
