// Package pginstance runs a private PostgreSQL server for tests and soak
// runs that need settings the shared server does not have (wal_level=logical)
// or that must restart or kill the server. It uses initdb and pg_ctl from the
// PostgreSQL server package installed on the machine; as root it runs them as
// the postgres user, since PostgreSQL refuses to run as root.
package pginstance

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// Options configure Start.
type Options struct {
	// Dir holds the data directory, socket and log. Empty: a new temporary
	// directory, removed by Remove.
	Dir string
	// Port to listen on at 127.0.0.1; 0 picks a free one.
	Port int
	// Settings are written to postgresql.conf after the defaults
	// (wal_level=logical, replication slots and senders, fsync off).
	Settings map[string]string
	// BinDir holds initdb and pg_ctl; empty: found under
	// /usr/lib/postgresql/<version>/bin, or EXACTLY_PG_BINDIR.
	BinDir string
}

// Instance is a running (or stopped) private server.
type Instance struct {
	Dir     string // base directory: data/, log, socket
	DataDir string
	Port    int
	binDir  string
	ownsDir bool
	asUser  string // run commands as this user ("" = current)
}

// Start creates the cluster if Dir holds none yet, starts the server, waits
// until it accepts connections and makes sure a database named test exists.
func Start(ctx context.Context, o Options) (*Instance, error) {
	bin, err := findBinDir(o.BinDir)
	if err != nil {
		return nil, err
	}
	in := &Instance{Dir: o.Dir, Port: o.Port, binDir: bin}
	if os.Geteuid() == 0 {
		in.asUser = "postgres"
	}
	if in.Dir == "" {
		d, err := os.MkdirTemp("", "exactly-pg-")
		if err != nil {
			return nil, err
		}
		in.Dir, in.ownsDir = d, true
	} else if err := os.MkdirAll(in.Dir, 0o755); err != nil {
		return nil, err
	}
	if err := in.chown(in.Dir); err != nil {
		return nil, err
	}
	in.DataDir = filepath.Join(in.Dir, "data")
	if in.Port == 0 {
		if in.Port, err = freePort(); err != nil {
			return nil, err
		}
	}
	if _, err := os.Stat(filepath.Join(in.DataDir, "PG_VERSION")); errors.Is(err, os.ErrNotExist) {
		if err := in.run(ctx, "initdb", "-D", in.DataDir, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"); err != nil {
			return nil, fmt.Errorf("pginstance: initdb: %w", err)
		}
		conf := map[string]string{
			"wal_level":               "logical",
			"max_replication_slots":   "20",
			"max_wal_senders":         "20",
			"fsync":                   "off",
			"full_page_writes":        "off",
			"listen_addresses":        "'127.0.0.1'",
			"max_connections":         "200",
			"shared_buffers":          "128MB",
			"wal_sender_timeout":      "10s",
			"unix_socket_directories": "'" + in.Dir + "'",
		}
		for k, v := range o.Settings {
			conf[k] = v
		}
		keys := make([]string, 0, len(conf))
		for k := range conf {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var b strings.Builder
		b.WriteString("\n# pginstance\n")
		for _, k := range keys {
			fmt.Fprintf(&b, "%s = %s\n", k, conf[k])
		}
		f, err := os.OpenFile(filepath.Join(in.DataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			return nil, err
		}
		if _, err := f.WriteString(b.String()); err != nil {
			f.Close()
			return nil, err
		}
		if err := f.Close(); err != nil {
			return nil, err
		}
	}
	if err := in.Start(ctx); err != nil {
		return nil, err
	}
	conn, err := pgx.Connect(ctx, in.DSN("postgres"))
	if err != nil {
		return nil, err
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_database WHERE datname = 'test'").Scan(&n); err != nil {
		return nil, err
	}
	if n == 0 {
		if _, err := conn.Exec(ctx, "CREATE DATABASE test"); err != nil {
			return nil, err
		}
	}
	return in, nil
}

// DSN is a pgx URL for database db on this instance.
func (in *Instance) DSN(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", in.Port, db)
}

// Addr is host:port.
func (in *Instance) Addr() string { return "127.0.0.1:" + strconv.Itoa(in.Port) }

// Start starts a stopped server and waits until it accepts connections.
func (in *Instance) Start(ctx context.Context) error {
	err := in.run(ctx, "pg_ctl", "-D", in.DataDir, "-l", filepath.Join(in.Dir, "log"), "-w", "-t", "60",
		"-o", fmt.Sprintf("-p %d", in.Port), "start")
	if err != nil {
		return fmt.Errorf("pginstance: start on port %d: %w (log: %s)", in.Port, err, in.tailLog())
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := pgx.Connect(ctx, in.DSN("postgres"))
		if err == nil {
			c.Close(ctx)
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pginstance: server on port %d does not accept connections: %w", in.Port, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop shuts the server down: mode "fast" (clients disconnected, clean
// checkpoint) or "immediate" (like a crash: recovery runs at next start).
func (in *Instance) Stop(ctx context.Context, mode string) error {
	if mode == "" {
		mode = "fast"
	}
	if err := in.run(ctx, "pg_ctl", "-D", in.DataDir, "-m", mode, "-w", "-t", "60", "stop"); err != nil {
		return fmt.Errorf("pginstance: stop (%s): %w", mode, err)
	}
	return nil
}

// Restart stops (mode as for Stop) and starts the server again.
func (in *Instance) Restart(ctx context.Context, mode string) error {
	if err := in.Stop(ctx, mode); err != nil {
		return err
	}
	return in.Start(ctx)
}

// Running reports whether the postmaster is up.
func (in *Instance) Running(ctx context.Context) bool {
	return in.run(ctx, "pg_ctl", "-D", in.DataDir, "status") == nil
}

// Remove stops the server (immediately) if it runs and deletes the
// directory when Start created it.
func (in *Instance) Remove() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if in.Running(ctx) {
		_ = in.Stop(ctx, "immediate")
	}
	if in.ownsDir {
		return os.RemoveAll(in.Dir)
	}
	return nil
}

func (in *Instance) run(ctx context.Context, tool string, args ...string) error {
	path := filepath.Join(in.binDir, tool)
	var cmd *exec.Cmd
	if in.asUser != "" {
		cmd = exec.CommandContext(ctx, "runuser", append([]string{"-u", in.asUser, "--", path}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, path, args...)
	}
	// pg_ctl start leaves the postmaster running; it must not die with the
	// caller's process group on a test's SIGINT, nor keep our pipes open.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Dir = in.Dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", tool, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (in *Instance) chown(dir string) error {
	if in.asUser == "" {
		return nil
	}
	u, err := user.Lookup(in.asUser)
	if err != nil {
		return fmt.Errorf("pginstance: running as root needs the %s user: %w", in.asUser, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}
	return os.Chown(dir, uid, gid)
}

func (in *Instance) tailLog() string {
	b, _ := os.ReadFile(filepath.Join(in.Dir, "log"))
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

func findBinDir(dir string) (string, error) {
	if dir == "" {
		dir = os.Getenv("EXACTLY_PG_BINDIR")
	}
	if dir != "" {
		if _, err := os.Stat(filepath.Join(dir, "initdb")); err != nil {
			return "", fmt.Errorf("pginstance: no initdb in %s: %w", dir, err)
		}
		return dir, nil
	}
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(found) == 0 {
		return "", errors.New("pginstance: initdb not found under /usr/lib/postgresql/*/bin (install the PostgreSQL server package or set EXACTLY_PG_BINDIR)")
	}
	sort.Strings(found)
	return filepath.Dir(found[len(found)-1]), nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
