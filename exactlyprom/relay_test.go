package exactlyprom_test

import (
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlyprom"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

// The relay's hooks move its metrics; a CDC relay exports the slot's lag
// instead of the polling relay's failing gauges.
func TestRelayCollector(t *testing.T) {
	t.Parallel()
	m := exactlyprom.NewRelay(exactlyprom.RelayConfig{Partitions: func() int { return 4 }})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m)
	h := m.Hooks()
	msg := &exactly.Message{ID: exactly.NewID(), Topic: "t"}
	h.Published([]*exactly.Message{msg, msg}, 3*time.Millisecond)
	h.Failed(msg, 1, errors.New("down"))
	h.Dead(msg, errors.New("too large"))
	h.Backlog(7, time.Minute)
	h.Failing(relay.FailingReport{Table: outbox.Failing{Messages: 3, BlockedKeys: 2, OldestAge: 90 * time.Second}, BlockedKeys: 1})
	for name, want := range map[string]float64{
		"exactly_relay_published_total": 2, "exactly_relay_failed_total": 1, "exactly_relay_dead_total": 1,
		"exactly_relay_partitions_held": 4, "exactly_outbox_pending": 7, "exactly_outbox_oldest_pending_seconds": 60,
		"exactly_relay_blocked_keys": 1, "exactly_outbox_failing": 3, "exactly_outbox_blocked_keys": 2,
		"exactly_outbox_oldest_failing_seconds": 90,
	} {
		if got := gathered(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if n, err := testutil.GatherAndCount(reg, "exactly_cdc_slot_lag_bytes"); err != nil || n != 0 {
		t.Errorf("the polling relay exports the slot lag (%d, %v)", n, err)
	}

	cdc := exactlyprom.NewRelay(exactlyprom.RelayConfig{CDC: true})
	creg := prometheus.NewPedanticRegistry()
	creg.MustRegister(cdc)
	cdc.Lag(4096, 2.5)
	if got := gathered(t, creg, "exactly_cdc_slot_lag_bytes"); got != 4096 {
		t.Errorf("exactly_cdc_slot_lag_bytes = %v, want 4096", got)
	}
	if n, _ := testutil.GatherAndCount(creg, "exactly_outbox_failing", "exactly_relay_blocked_keys", "exactly_relay_partitions_held"); n != 0 {
		t.Errorf("the CDC relay exports %d gauges it cannot fill", n)
	}
}

// gathered returns the value of the one series of the counter or gauge name.
func gathered(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		m := mf.GetMetric()[0]
		if c := m.GetCounter(); c != nil {
			return c.GetValue()
		}
		return m.GetGauge().GetValue()
	}
	t.Fatalf("no %s", name)
	return 0
}
