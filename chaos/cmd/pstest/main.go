// Command pstest runs the Pub/Sub fake of the Go client library
// (cloud.google.com/go/pubsub/v2/pstest) as a process of its own, so that
// the chaos suite can put a fault proxy in front of it and its clients can
// be killed and paused apart from it. It listens on 127.0.0.1:-port (a free
// port when 0) and prints "READY host:port" once it accepts connections.
//
// pstest keeps every topic, subscription and message in memory: a restart
// starts empty. The suite therefore never restarts it.
//
//	go -C chaos run ./cmd/pstest -port 8085
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"cloud.google.com/go/pubsub/v2/pstest"
)

func main() {
	port := flag.Int("port", 0, "port on 127.0.0.1 (0: a free one)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	srv := pstest.NewServerWithAddress(fmt.Sprintf("127.0.0.1:%d", *port))
	fmt.Println("READY", srv.Addr)
	<-ctx.Done()
	if err := srv.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "pstest:", err)
		os.Exit(1)
	}
}
