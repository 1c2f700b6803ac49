package main

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// `exactly version` and `exactly --version` report the module, the VCS
// revision and the Go version from the binary's build information.
func TestVersion(t *testing.T) {
	rev, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Fatalf("git rev-parse HEAD: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "exactly")
	if out, err := exec.Command("go", "build", "-buildvcs=true", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, code := runExactly(t, bin, nil, "version")
	for _, want := range []string{"module      github.com/exactlyonce/exactly", "revision    " + strings.TrimSpace(string(rev)),
		"time        20", "go          " + runtime.Version()} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("version (exit %d) lacks %q:\n%s", code, want, out)
		}
	}
	out, code = runExactly(t, bin, nil, "--version")
	if code != 0 || !strings.HasPrefix(out, "exactly ") || !strings.Contains(out, "revision "+strings.TrimSpace(string(rev))) ||
		!strings.Contains(out, runtime.Version()) || strings.Count(out, "\n") != 1 {
		t.Errorf("--version (exit %d):\n%s", code, out)
	}
}
