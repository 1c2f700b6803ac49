package chaos

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Binaries of the services the suite owns. Each run starts private
// instances on free ports, so the shared servers other tests use are never
// bounced.
var (
	natsServerBin  = envOr("CHAOS_NATS_SERVER", "/usr/sbin/nats-server")
	redisServerBin = envOr("CHAOS_REDIS_SERVER", "/usr/bin/redis-server")
)

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// dialReady returns a ready function for proc.start that ignores stdout and
// reports ready once addr accepts TCP connections; it is polled from a
// goroutine started here.
func waitTCP(ctx context.Context, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s does not accept connections: %w", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// buildWorker compiles chaos/cmd/worker and chaos/cmd/pstest into dir and
// returns the worker's path (pstest is beside it). race builds them with the
// race detector (slower workers, more checking).
func buildWorker(ctx context.Context, dir string, race bool) (string, error) {
	out := filepath.Join(dir, "worker")
	args := []string{"build", "-o", dir + string(filepath.Separator)}
	if race {
		args = append(args, "-race")
	}
	args = append(args, "github.com/exactlyonce/exactly/chaos/cmd/worker", "github.com/exactlyonce/exactly/chaos/cmd/pstest")
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = chaosDir() // inside the module of the chaos suite, wherever the caller runs
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %s: %w: %s", strings.Join(args, " "), err, b)
	}
	return out, nil
}

// checkBinaries reports the first service binary missing on this machine
// for the pipelines named.
func checkBinaries(pipelines []string) error {
	for _, b := range []string{natsServerBin, redisServerBin} {
		if _, err := os.Stat(b); err != nil {
			return fmt.Errorf("chaos: %s is needed: %w", b, err)
		}
	}
	for _, name := range pipelines {
		if Pipelines[name].Broker == "sqs" {
			if _, err := exec.LookPath(nodeBin()); err != nil {
				return fmt.Errorf("chaos: the SQS pipeline runs fauxqs under Node.js 20 or later (node, or CHAOS_NODE): %w", err)
			}
			break
		}
	}
	if _, err := exec.LookPath("go"); err != nil {
		return fmt.Errorf("chaos: the go command is needed to build the workers: %w", err)
	}
	return nil
}

func itoa(n int) string { return strconv.Itoa(n) }
