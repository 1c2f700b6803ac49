package kafka_test

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/kafka"
)

// TestProcessorHooksSeeTheInputMessage: the hooks receive the input
// decoded as the consumers decode it (id from the exactly-id header, key,
// payload, headers), and the outputs' ids derive from that id.
func TestProcessorHooksSeeTheInputMessage(t *testing.T) {
	t.Parallel()
	ec := newEOSCluster(t)
	ec.createTopic(t, 1, "in")
	ec.createTopic(t, 1, "out")
	ec.createTopic(t, 1, "in.dlq")
	const n = 20
	cl, err := kgo.NewClient(kgo.SeedBrokers(ec.seeds...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var recs []*kgo.Record
	for i := range n {
		recs = append(recs, &kgo.Record{Topic: "in", Key: []byte("k" + strconv.Itoa(i)), Value: []byte(strconv.Itoa(i)),
			Headers: []kgo.RecordHeader{{Key: "h", Value: []byte("v" + strconv.Itoa(i))}, {Key: exactly.HeaderID, Value: []byte("id-" + strconv.Itoa(i))}}})
	}
	if err := cl.ProduceSync(t.Context(), recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	handled := map[string]*exactly.Message{}
	failed := map[string]int{}
	var dead []*exactly.Message
	check := func(what string, m *exactly.Message) {
		i, err := strconv.Atoi(string(m.Payload))
		s := strconv.Itoa(i)
		if err != nil || m.ID != "id-"+s || m.Key != "k"+s || m.Topic != "in" || m.Headers["h"] != "v"+s || m.CreatedAt.IsZero() {
			t.Errorf("%s hook got %+v", what, m)
		}
	}
	cfg := processorConfig(ec, "hooks", "a", "in")
	cfg.Logger = slog.New(slog.DiscardHandler)
	cfg.Hooks = exactly.ConsumerHooks{
		Handled: func(m *exactly.Message, _ time.Duration) {
			check("Handled", m)
			mu.Lock()
			defer mu.Unlock()
			handled[m.ID] = m
		},
		Failed: func(m *exactly.Message, attempt int, _ error) {
			check("Failed", m)
			mu.Lock()
			defer mu.Unlock()
			failed[m.ID]++
		},
		DeadLettered: func(m *exactly.Message, _ error) {
			check("DeadLettered", m)
			mu.Lock()
			defer mu.Unlock()
			dead = append(dead, m)
		},
	}
	p, err := kafka.NewProcessor(cfg, func(ctx context.Context, rec *kgo.Record) ([]exactly.Message, error) {
		if string(rec.Value) == "7" {
			return nil, errors.New("seven")
		}
		return copyTo("out")(ctx, rec)
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := runProcessor(t, p)
	waitFor(t, 30*time.Second, "all input processed", func() bool { return p.Stats().Processed == n })
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	for _, r := range ec.read(t, "out", true, n-1, 20*time.Second) {
		var id string
		for _, h := range r.Headers {
			if h.Key == exactly.HeaderID {
				id = string(h.Value)
			}
		}
		if want := kafka.OutputID("id-"+string(r.Value), 0); id != want {
			t.Errorf("output %s has id %q, want %q", r.Value, id, want)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	// A transaction may abort and run again, so a hook may see a record
	// more than once; every record must be seen.
	if len(handled) != n-1 || handled["id-7"] != nil {
		t.Errorf("Handled saw %d inputs, want %d (all but id-7)", len(handled), n-1)
	}
	if len(failed) != 1 || failed["id-7"] < cfg.Retry.MaxAttempts {
		t.Errorf("Failed saw %v, want id-7 %d times", failed, cfg.Retry.MaxAttempts)
	}
	if len(dead) == 0 || dead[0].ID != "id-7" {
		t.Errorf("DeadLettered saw %d messages (first %+v), want id-7", len(dead), dead)
	}
}
