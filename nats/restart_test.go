package nats_test

import (
	"context"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/nats"
)

// privateServer is a nats-server of the test's own, on a free port, with
// its JetStream store in a directory that outlives restarts.
type privateServer struct {
	bin, addr, dir string
	cmd            *exec.Cmd
}

func startPrivateServer(t *testing.T) *privateServer {
	t.Helper()
	bin := "/usr/sbin/nats-server"
	if _, err := os.Stat(bin); err != nil {
		if testenv.InCI() {
			t.Fatalf("this test needs %s: %v", bin, err)
		}
		t.Skipf("this test needs %s: %v", bin, err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	s := &privateServer{bin: bin, addr: addr, dir: t.TempDir()}
	s.start(t)
	t.Cleanup(s.stop)
	return s
}

func (s *privateServer) start(t *testing.T) {
	t.Helper()
	host, port, _ := net.SplitHostPort(s.addr)
	s.cmd = exec.Command(s.bin, "-a", host, "-p", port, "-js", "-sd", s.dir)
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", s.addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server on %s does not accept connections: %v", s.addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *privateServer) stop() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Signal(os.Interrupt)
	s.cmd.Wait()
	s.cmd = nil
}

// TestConsumerStartsWhileServerDown: Run is called while the server is
// restarting; it waits for it instead of failing, then handles the message.
func TestConsumerStartsWhileServerDown(t *testing.T) {
	t.Parallel()
	srv := startPrivateServer(t)
	nc, err := natsgo.Connect("nats://"+srv.addr, natsgo.MaxReconnects(-1), natsgo.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "ORDERS", Subjects: []string{"orders.>"}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	pub, err := nats.NewPublisher(js)
	if err != nil {
		t.Fatal(err)
	}
	msg := &exactly.Message{ID: exactly.NewID(), Topic: "orders.created", Payload: []byte("1")}
	if err := pub.Publish(ctx, []*exactly.Message{msg}); err != nil {
		t.Fatal(err)
	}

	srv.stop()
	handled := make(chan string, 10)
	c, err := nats.NewConsumer(js, nats.ConsumerConfig{
		ConsumerConfig: exactly.ConsumerConfig{
			Handler: func(ctx context.Context, m *exactly.Message) error { handled <- m.ID; return nil },
			Logger:  slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
		},
		Stream: "ORDERS", Durable: "restart", FilterSubjects: []string{"orders.created"},
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx) }()

	select {
	case err := <-done:
		t.Fatalf("Run returned while the server was down: %v", err)
	case <-time.After(8 * time.Second): // longer than a JetStream request's timeout (5 s)
	}
	srv.start(t)
	select {
	case id := <-handled:
		if id != msg.ID {
			t.Fatalf("handled %s, want %s", id, msg.ID)
		}
	case err := <-done:
		t.Fatalf("Run returned: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the message was not handled within 30 s of the server's restart")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v after its context ended", err)
	}
}
