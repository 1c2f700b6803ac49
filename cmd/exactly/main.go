// Command exactly is the toolkit's CLI and daemon: the demo, the relay
// service, the schema migrations and the operator commands for the outbox
// and the inbox.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	hide "github.com/exactlyonce/exactly/internal/redact"
)

// exitError carries a specific exit code out of a command.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

// logOutput receives every log line: stderr, through the redaction.
var logOutput io.Writer = hide.Writer(os.Stderr)

// errorLogFormat is the --log-format a command settled on, so that the
// error it fails with is printed in that format too.
var errorLogFormat string

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "exactly",
		Short:         "Exactly-once processing in effect on at-least-once brokers",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       versionLine(),
	}
	root.SetVersionTemplate("{{.Version}}\n")
	root.AddCommand(demoCmd(), migrateCmd(), outboxCmd(), inboxCmd(), relayCmd(), consoleCmd(), versionCmd())
	return root
}

func main() {
	registerSecrets(os.Args[1:], os.Environ())
	stdout := hide.Writer(os.Stdout)
	slog.SetDefault(slog.New(slog.NewTextHandler(logOutput, nil)))
	log.SetOutput(logOutput)
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(logOutput, "panic: %v\n\n%s", r, debug.Stack())
			os.Exit(2)
		}
	}()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	root := newRoot()
	root.SetOut(stdout)
	root.SetErr(logOutput)
	err := root.ExecuteContext(ctx)
	stop()
	if err != nil {
		printError(logOutput, err, chosenLogFormat(os.Args[1:], os.Getenv("EXACTLY_LOG_FORMAT")))
		var ee *exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		os.Exit(2)
	}
}

// printError prints the error a command failed with, redacted, as a JSON
// log record when the chosen log format is json.
func printError(w io.Writer, err error, format string) {
	msg := hide.String(err.Error())
	if format == "json" {
		slog.New(slog.NewJSONHandler(w, nil)).Error(msg)
		return
	}
	fmt.Fprintln(w, "exactly:", msg)
}

// chosenLogFormat is the log format the failed command chose, or, when it
// failed before choosing (a flag it could not parse), the one its
// arguments or EXACTLY_LOG_FORMAT name.
func chosenLogFormat(args []string, env string) string {
	if errorLogFormat != "" {
		return errorLogFormat
	}
	if len(args) == 0 || args[0] != "relay" { // the one command with --log-format
		return ""
	}
	format := ""
	for i, a := range args {
		if a == "--" {
			break
		}
		if v, ok := strings.CutPrefix(a, "--log-format="); ok {
			format = v
		} else if a == "--log-format" && i+1 < len(args) {
			format = args[i+1]
		}
	}
	if format == "" {
		format = env
	}
	return format
}

// registerSecrets hides, before anything is printed, the secrets the
// command line and the EXACTLY_* environment hold.
func registerSecrets(args, environ []string) {
	for i, a := range args {
		hide.AddFrom(a)
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "--") || !secretFlags[name] {
			continue
		}
		if hasValue {
			hide.Add(value)
		} else if i+1 < len(args) {
			hide.Add(args[i+1])
		}
	}
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(k, "EXACTLY_") {
			continue
		}
		if secretFlags[strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(k, "EXACTLY_"), "_", "-"))] {
			hide.Add(v)
		} else {
			hide.AddFrom(v)
		}
	}
}

// loopbackAddr tells whether a host:port listens only on this machine.
func loopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// runSafely runs r, turning a panic into an error whose message is
// redacted like every other.
func runSafely(ctx context.Context, r relayRunner) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("relay panicked: %s\n%s", hide.String(fmt.Sprint(p)), hide.String(string(debug.Stack())))
		}
	}()
	return r.Run(ctx)
}
