package chaos

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is one supervised OS process: a worker role, nats-server,
// redis-server or kfaked. Each start is an incarnation with its own name
// (role#n), which the worker records with its effects.
type proc struct {
	h    *harness
	role string // e.g. "consumer-kafka-db"
	path string
	args []string
	env  []string

	mu      sync.Mutex
	n       int // incarnations started
	cmd     *exec.Cmd
	name    string // current incarnation
	exited  chan struct{}
	stopped bool // the harness ended it on purpose (kill, stop)
	paused  bool
}

// start starts a new incarnation; ready, when set, is called with each
// stdout line until it returns true, and start waits for that (or fails).
func (p *proc) start(ctx context.Context, ready func(line string) bool) error {
	p.mu.Lock()
	p.n++
	name := fmt.Sprintf("%s#%d", p.role, p.n)
	logf, err := os.OpenFile(filepath.Join(p.h.dir, "logs", strings.ReplaceAll(p.role, "/", "_")+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		p.mu.Unlock()
		return err
	}
	fmt.Fprintf(logf, "=== %s started %s\n", name, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(p.path, p.args...)
	cmd.Env = append(append(os.Environ(), p.env...), "CHAOS_NAME="+name)
	cmd.Stderr = logf
	// The child dies with the orchestrator, and stays out of its process
	// group so a terminal's ^C reaches the orchestrator only.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		p.mu.Unlock()
		logf.Close()
		return err
	}
	if err := cmd.Start(); err != nil {
		p.mu.Unlock()
		logf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	exited := make(chan struct{})
	p.cmd, p.name, p.exited, p.stopped, p.paused = cmd, name, exited, false, false
	p.mu.Unlock()

	readyc := make(chan struct{})
	var once sync.Once
	if ready == nil {
		once.Do(func() { close(readyc) })
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := sc.Text()
			if ready != nil && ready(line) {
				once.Do(func() { close(readyc) })
			}
			if rest, ok := strings.CutPrefix(line, "CHAOS-EVENT "); ok {
				if kind, id, ok := strings.Cut(rest, " "); ok {
					p.h.events.add(id, kind)
				}
				continue
			}
			fmt.Fprintln(logf, line)
		}
		_, _ = io.Copy(io.Discard, out)
		err := cmd.Wait()
		fmt.Fprintf(logf, "=== %s exited %s: %v\n", name, time.Now().Format(time.RFC3339Nano), err)
		logf.Close()
		p.mu.Lock()
		unexpected := !p.stopped
		p.mu.Unlock()
		if unexpected {
			p.h.problem("%s exited on its own: %v (log %s)", name, err, logf.Name())
		}
		close(exited)
	}()
	select {
	case <-readyc:
		return nil
	case <-exited:
		return fmt.Errorf("%s exited before it was ready (log in %s)", name, p.h.dir)
	case <-time.After(60 * time.Second):
		p.kill()
		return fmt.Errorf("%s not ready after 60s", name)
	case <-ctx.Done():
		p.kill()
		return ctx.Err()
	}
}

// current returns the running incarnation's name.
func (p *proc) current() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.name
}

// signal sends sig to the running incarnation and, for ending signals,
// waits until it exited (SIGKILL after grace for SIGTERM).
func (p *proc) end(sig syscall.Signal, grace time.Duration) string {
	p.mu.Lock()
	cmd, exited, name := p.cmd, p.exited, p.name
	if cmd == nil {
		p.mu.Unlock()
		return ""
	}
	p.stopped = true
	if p.paused {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		p.paused = false
	}
	p.mu.Unlock()
	_ = cmd.Process.Signal(sig)
	select {
	case <-exited:
	case <-time.After(grace):
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-exited
	}
	p.mu.Lock()
	if p.cmd == cmd {
		p.cmd = nil
	}
	p.mu.Unlock()
	return name
}

// kill ends the incarnation with SIGKILL: no cleanup of any kind.
func (p *proc) kill() string { return p.end(syscall.SIGKILL, time.Minute) }

// stop ends it with SIGTERM, its graceful shutdown.
func (p *proc) stop() string { return p.end(syscall.SIGTERM, 20*time.Second) }

// pause stops the process (SIGSTOP): it keeps its connections and state
// and wakes up later as it was, unaware of the time that passed.
func (p *proc) pause() (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return "", errors.New("not running")
	}
	p.paused = true
	return p.name, p.cmd.Process.Signal(syscall.SIGSTOP)
}

func (p *proc) resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil && p.paused {
		_ = p.cmd.Process.Signal(syscall.SIGCONT)
		p.paused = false
	}
}

// events collects the CHAOS-EVENT lines of every worker.
type events struct {
	mu   sync.Mutex
	byID map[string][]string
}

func (e *events) add(id, kind string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.byID == nil {
		e.byID = map[string][]string{}
	}
	e.byID[id] = append(e.byID[id], kind)
}

func (e *events) of(id string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.byID[id]
}
