package main

import (
	"bytes"
	"context"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The demo is the main job: it must finish with nothing lost, every fault
// kind injected, and say so.
func TestDemo(t *testing.T) {
	var out bytes.Buffer
	err := runDemo(context.Background(), &out, demoOptions{orders: 2000, writers: 4, timeout: 50 * time.Second, seed: 7})
	if err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out.String())
	}
	s := out.String()
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`orders written\s+2000`),
		regexp.MustCompile(`distinct events delivered\s+2000`),
		regexp.MustCompile(`LOST\s+0`),
		regexp.MustCompile(`copies with other content\s+0`),
		regexp.MustCompile(`faults injected: [1-9]\d* lost publish acks, [1-9]\d* relay crashes`),
	} {
		if !want.MatchString(s) {
			t.Errorf("demo output lacks %s:\n%s", want, s)
		}
	}
	if !strings.Contains(s, "OK: nothing lost") {
		t.Errorf("no OK line:\n%s", s)
	}
}

func TestMigrateBadInput(t *testing.T) {
	for _, tc := range []struct{ args, want string }{
		{"migrate", "no database given"},
		{"migrate --db oracle://x", "unrecognised database DSN"},
		{"migrate --db postgres://u:secret@127.0.0.1:1/db --table bad;name", "unsafe table name"},
		{"migrate --db postgres://u:secret@127.0.0.1:1/db", "cannot reach the database"},
	} {
		cmd := migrateCmd()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs(strings.Fields(tc.args)[1:])
		err := cmd.ExecuteContext(context.Background())
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.args, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("%s: the password leaked into the error: %v", tc.args, err)
		}
	}
}
