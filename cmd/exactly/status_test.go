package main

import (
	"context"
	"encoding/json"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// TestOutboxStatusBlockedKeys: a pending message whose publishes failed (as
// the relay records them) shows in `outbox status`: the failing count, the
// key it holds back with the messages waiting behind it, its attempts, last
// error and next attempt, in text and in JSON.
func TestOutboxStatusBlockedKeys(t *testing.T) {
	db, table, _, pending := outboxFixture(t)
	ctx := context.Background()
	head := pending[0] // orders, key o-3
	next := time.Now().Add(4 * time.Minute)
	if _, err := db.ExecContext(ctx, "UPDATE "+table+" SET attempts = 7, last_error = $1, next_attempt_at = $2 WHERE id = $3",
		"nats: no stream captures subject \"orders\"\nsecond line", next.UnixMilli(), head.ID); err != nil {
		t.Fatal(err)
	}
	dsn := testenv.PostgresDSN()
	out := mustRun(t, outboxCmd(), "status", "--db", dsn, "--table", table)
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^failing\s+1$`),
		regexp.MustCompile(`(?m)^blocked keys\s+1$`),
		regexp.MustCompile(`(?m)^oldest failing age\s+\d`),
		regexp.MustCompile(`(?m)^TOPIC\s+KEY\s+WAITING\s+ATTEMPTS\s+NEXT ATTEMPT\s+AGE\s+ID\s+LAST ERROR$`),
		regexp.MustCompile(`(?m)^orders\s+o-3\s+1\s+7\s+in (3m5\ds|4m0s)\s+\S+\s+` + regexp.QuoteMeta(head.ID) + `\s+nats: no stream captures subject "orders" second line$`),
	} {
		if !want.MatchString(out) {
			t.Errorf("status lacks %s:\n%s", want, out)
		}
	}

	out = mustRun(t, outboxCmd(), "status", "--db", dsn, "--table", table, "--json")
	var st statusJSON
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if st.Failing.Messages != 1 || st.Failing.BlockedKeys != 1 || st.Failing.OldestFailingAgeSeconds <= 0 || len(st.Blocked) != 1 {
		t.Fatalf("status --json failing: %+v, blocked %+v", st.Failing, st.Blocked)
	}
	b := st.Blocked[0]
	if b.ID != head.ID || b.Topic != "orders" || b.Key != "o-3" || b.Attempts != 7 || !strings.Contains(b.LastError, "no stream") ||
		b.NextAttemptAt.UnixMilli() != next.UnixMilli() || b.Waiting != 1 || b.AgeSeconds <= 0 {
		t.Errorf("status --json blocked: %+v", b)
	}

	// Nothing failing: zeros, an empty list, no table.
	if _, err := db.ExecContext(ctx, "UPDATE "+table+" SET attempts = 0 WHERE id = $1", head.ID); err != nil {
		t.Fatal(err)
	}
	out = mustRun(t, outboxCmd(), "status", "--db", dsn, "--table", table)
	if !regexp.MustCompile(`(?m)^blocked keys\s+0$`).MatchString(out) || !regexp.MustCompile(`(?m)^oldest failing age\s+-$`).MatchString(out) ||
		strings.Contains(out, "LAST ERROR") {
		t.Errorf("status with nothing failing:\n%s", out)
	}
	out = mustRun(t, outboxCmd(), "status", "--db", dsn, "--table", table, "--json")
	if !strings.Contains(out, `"blocked": []`) {
		t.Errorf("status --json with nothing failing: want an empty blocked list\n%s", out)
	}
}

// TestRelayMetricsFailing: the relay daemon exports the keys held back and
// the oldest failing message; the cdc source, which keeps its attempts in
// memory, does not export gauges that would always read 0.
func TestRelayMetricsFailing(t *testing.T) {
	m := newRelayMetrics(func() float64 { return 1 })
	m.hooks().Failing(relay.FailingReport{
		Table:       outbox.Failing{Messages: 3, BlockedKeys: 2, OldestAge: 90 * time.Second},
		BlockedKeys: 1, OldestBlocked: time.Minute,
	})
	for name, want := range map[string]float64{
		"exactly_relay_blocked_keys": 1, "exactly_outbox_failing": 3, "exactly_outbox_blocked_keys": 2,
		"exactly_outbox_oldest_failing_seconds": 90,
	} {
		got, err := testutil.GatherAndCount(m.reg, name)
		if err != nil || got != 1 {
			t.Errorf("%s: %d series (%v), want 1", name, got, err)
			continue
		}
		mfs, _ := m.reg.Gather()
		for _, mf := range mfs {
			if mf.GetName() == name {
				if v := mf.GetMetric()[0].GetGauge().GetValue(); v != want {
					t.Errorf("%s = %v, want %v", name, v, want)
				}
			}
		}
	}
	cdc := newRelayMetrics(func() float64 { return 1 })
	cdc.registerCDC()
	if n, _ := testutil.GatherAndCount(cdc.reg, "exactly_outbox_failing", "exactly_relay_blocked_keys"); n != 0 {
		t.Errorf("the cdc source exports %d failing gauges of the polling relay", n)
	}
}
