package nats_test

import (
	"bytes"
	"database/sql"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/nats"
)

// suiteAckWait is the AckWait of the suite's consumers: short, so a crashed
// consumer's messages come back quickly, and long enough that a slow
// handler must be kept owned by the consumer's in-progress signals.
const suiteAckWait = time.Second

// TestConsumerSuite holds the Consumer to the contract every consumer
// keeps, on NATS JetStream with the SQL inbox on PostgreSQL.
func TestConsumerSuite(t *testing.T) {
	t.Parallel()
	s := connect(t)
	testenv.Need(t, testenv.Postgres)
	db, err := sql.Open("pgx", testenv.PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(40)
	t.Cleanup(func() { db.Close() })
	exactlytest.RunConsumerSuite(t, exactlytest.ConsumerHarness{
		DB: db,
		Setup: func(t *testing.T) exactlytest.ConsumerSource {
			stream, subject := names()
			s.createStream(t, stream, subject, nil)
			durable := "C_" + stream
			return exactlytest.ConsumerSource{
				Topic:     subject,
				Publisher: s.publisher(t),
				PublishWithoutID: func(t *testing.T, payload []byte) {
					if _, err := s.js.PublishMsg(t.Context(), &natsgo.Msg{Subject: subject, Data: payload}); err != nil {
						t.Fatalf("publishing without an id: %v", err)
					}
				},
				New: func(t *testing.T, cfg exactly.ConsumerConfig) exactlytest.TestConsumer {
					return suiteConsumer(t, nats.ConsumerConfig{
						ConsumerConfig: cfg,
						Stream:         stream,
						Durable:        durable,
						FilterSubjects: []string{subject},
						AckWait:        suiteAckWait,
					})
				},
			}
		},
		Ordering:    exactlytest.OrderPerKey,
		NoID:        exactlytest.NoIDDeadLettered,
		AckDeadline: suiteAckWait,
	})
}

// suiteConsumer is a Consumer on a connection of its own, dialed through
// sockets the suite can cut.
func suiteConsumer(t *testing.T, cfg nats.ConsumerConfig) exactlytest.TestConsumer {
	t.Helper()
	d := &natsSockets{}
	nc, err := natsgo.Connect(testenv.NATSURL(), natsgo.Name(t.Name()), natsgo.SetCustomDialer(d),
		natsgo.ReconnectWait(50*time.Millisecond), natsgo.MaxReconnects(-1))
	if err != nil {
		t.Fatalf("connecting to NATS: %v", err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	c, err := nats.NewConsumer(js, cfg)
	if err != nil {
		t.Fatalf("NewConsumer: %v", err)
	}
	return exactlytest.TestConsumer{
		Run:   c.Run,
		Stats: func() exactly.ConsumerStats { return c.Stats().ConsumerStats },
		// A killed process: its socket goes without a goodbye, and the
		// connection never comes back.
		Crash: func() {
			d.cut()
			nc.Close()
		},
		LoseAcks: d.loseAcks,
	}
}

// natsSockets is a natsgo.CustomDialer that keeps the sockets it opens, so
// a test can cut them as a crash would, or make an acknowledgement vanish.
type natsSockets struct {
	mu    sync.Mutex
	conns []*natsSocket
}

func (s *natsSockets) Dial(network, addr string) (net.Conn, error) {
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	sc := &natsSocket{Conn: c}
	s.mu.Lock()
	s.conns = append(s.conns, sc)
	s.mu.Unlock()
	return sc, nil
}

func (s *natsSockets) cut() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
}

// loseAcks makes the open sockets swallow the next write that carries an
// acknowledgement, and close: the client saw the ack sent, the server never
// got it, and the client reconnects on a new socket.
func (s *natsSockets) loseAcks() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.loseAck.Store(true)
	}
}

type natsSocket struct {
	net.Conn
	loseAck atomic.Bool
}

// ackPayload is what an acknowledgement (Ack, DoubleAck) carries.
var ackPayload = []byte("+ACK")

func (c *natsSocket) Write(p []byte) (int, error) {
	if c.loseAck.Load() && bytes.Contains(p, ackPayload) {
		c.Conn.Close()
		return len(p), nil
	}
	return c.Conn.Write(p)
}
