// Package cpumeter tells where a benchmark row's time went on this 2-core
// machine: this process, the PostgreSQL processes serving it (the backends
// of the benchmark's own connections plus the WAL writer, checkpointer and
// background writer), one broker or cache server, and the whole machine
// (which also counts whatever else runs beside the benchmark). Linux only;
// elsewhere it reports nothing.
package cpumeter

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// userHZ is the unit of /proc/<pid>/stat times; 100 on every Linux build
// that matters.
const userHZ = 100

// Backends are the PostgreSQL backend pids of the benchmark's connections,
// collected as connections open.
type Backends struct {
	mu   sync.Mutex
	pids map[int]bool
}

func (b *Backends) Add(pid int) {
	b.mu.Lock()
	if b.pids == nil {
		b.pids = map[int]bool{}
	}
	b.pids[pid] = true
	b.mu.Unlock()
}

func (b *Backends) List() []int {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]int, 0, len(b.pids))
	for p := range b.pids {
		out = append(out, p)
	}
	return out
}

// Sample is a snapshot of CPU time used so far.
type Sample struct {
	at      time.Time
	self    time.Duration
	pg      time.Duration
	server  time.Duration
	machine time.Duration // busy time of all CPUs
	ok      bool
}

// Take samples the CPU time of this process, of the PostgreSQL processes
// in pg (and the shared writers), of every process named server, and of
// the machine.
func Take(pg *Backends, server string) Sample {
	s := Sample{at: time.Now()}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err == nil {
		s.self = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	machine, err := machineBusy()
	if err != nil {
		return s
	}
	s.machine, s.ok = machine, true
	pids := pg.List()
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, dir := range procs {
		comm, err := os.ReadFile(dir + "/comm")
		if err != nil {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(dir))
		switch name := strings.TrimSpace(string(comm)); {
		case name == server:
			s.server += procCPU(pid)
		case name == "postgres":
			if containsInt(pids, pid) || isPGAux(dir) {
				s.pg += procCPU(pid)
			}
		}
	}
	return s
}

// isPGAux reports whether the postgres process is one that writes on
// behalf of every session: the WAL writer, the checkpointer, the
// background writer.
func isPGAux(dir string) bool {
	cmd, err := os.ReadFile(dir + "/cmdline")
	if err != nil {
		return false
	}
	for _, aux := range []string{"walwriter", "checkpointer", "background writer"} {
		if bytes.Contains(cmd, []byte(aux)) {
			return true
		}
	}
	return false
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// procCPU is the user+system time of pid so far.
func procCPU(pid int) time.Duration {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// The command name in parentheses may hold spaces: skip past it.
	i := bytes.LastIndexByte(raw, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(raw[i+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / userHZ
}

// machineBusy is the non-idle time of all CPUs so far, from /proc/stat.
func machineBusy() (time.Duration, error) {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("unexpected /proc/stat")
	}
	var busy int64
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if i >= 7 { // guest times are already counted in user
			break
		}
		busy += n
	}
	return time.Duration(busy) * time.Second / userHZ, nil
}

// cpuNote describes the CPU used between two samples, in cores (CPU seconds
// per second of wall time).
// Note describes the CPU used between a and b, in cores.
func Note(a, b Sample, cores int, server string) string {
	if !a.ok || !b.ok {
		return ""
	}
	wall := b.at.Sub(a.at).Seconds()
	if wall <= 0 {
		return ""
	}
	c := func(d time.Duration) float64 { return d.Seconds() / wall }
	return fmt.Sprintf("CPU cores used: bench %.2f, postgres %.2f, %s %.2f; machine %.2f of %d",
		c(b.self-a.self), c(b.pg-a.pg), server, c(b.server-a.server), c(b.machine-a.machine), cores)
}
