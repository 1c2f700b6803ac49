package main

import (
	"database/sql"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/exactlyonce/exactly/console"
	"github.com/exactlyonce/exactly/exactlytest"
	"github.com/exactlyonce/exactly/internal/testenv"
	"github.com/exactlyonce/exactly/outbox"
)

// The console on a CDC relay's admin server (relay --source cdc --console,
// a private PostgreSQL with wal_level=logical) shows the relay's slot
// streaming, with its lag in bytes from the server and in seconds from the
// relay in the same process; the relays page says so in HTML too.
func TestConsoleOnTheCDCRelay(t *testing.T) {
	bin := buildExactly(t)
	pg := testenv.LogicalPostgres(t, nil)
	dsn := pg.DSN("test")
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	ob := exactlytest.MigratedOutbox(t, db, outbox.Postgres, "console_cmd_cdc")
	const topic, slot = "console-cmd-cdc", "console_cmd_cdc"
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	p := startRelay(t, bin, freeAddr(t), "--db", dsn, "--table", ob.Table(), "--source", "cdc", "--slot", slot,
		"--broker", "kafka", "--kafka-brokers", strings.Join(cluster.ListenAddrs(), ","), "--console")
	enqueueN(t, db, ob, topic, 0, 50)
	waitPublished(t, p, db, ob, 50)
	var rl console.RelaysPage
	waitFor(t, p, "the slot streaming with its lag in seconds", 20*time.Second, func() (bool, string) {
		code, body, err := p.get("/console/relays?format=json")
		if err != nil || code != http.StatusOK || json.Unmarshal([]byte(body), &rl) != nil {
			return false, body
		}
		return len(rl.Slots) == 1 && rl.Slots[0].Active && rl.Slots[0].LagSeconds != nil, body
	})
	if s := rl.Slots[0]; s.Name != slot || !s.Exists || s.LagBytes < 0 || s.Confirmed == "" || *s.LagSeconds < 0 {
		t.Errorf("the slot as the console shows it: %+v", s)
	}
	if code, body, err := p.get("/console/relays"); err != nil || code != http.StatusOK || !strings.Contains(body, slot) || strings.Contains(body, "idle (no relay connected)") {
		t.Errorf("GET /console/relays: %d %v\n%s", code, err, body)
	}
	p.stop(t)
}
