package nats

import (
	"testing"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/exactlyonce/exactly"
)

func benchMessage() *exactly.Message {
	return &exactly.Message{
		ID: "0193f1c2-7a4e-7b1d-9c3e-5f6a7b8c9d0e", Topic: "orders.created", Key: "customer-42",
		Payload:   make([]byte, 200),
		Headers:   map[string]string{"content-type": "application/json", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
		CreatedAt: time.Date(2026, 12, 4, 18, 0, 0, 123456789, time.UTC),
	}
}

// The conversion the relay does per message: its allocations are what
// BenchmarkMessage reports (go test ./nats -run '^$' -bench Message -benchmem).
func TestMessageHeaders(t *testing.T) {
	p := &Publisher{}
	m := benchMessage()
	m.Headers[exactly.HeaderID] = "stale" // ours win
	m.Headers[jetstream.MsgIDHeader] = "stale"
	nm, err := p.message(m)
	if err != nil {
		t.Fatal(err)
	}
	want := natsgo.Header{
		jetstream.MsgIDHeader:   {m.ID},
		exactly.HeaderID:        {m.ID},
		exactly.HeaderKey:       {m.Key},
		exactly.HeaderCreatedAt: {"2026-12-04T18:00:00.123456789Z"},
		"content-type":          {"application/json"},
		"traceparent":           {m.Headers["traceparent"]},
	}
	if len(nm.Header) != len(want) {
		t.Fatalf("headers %v, want %v", nm.Header, want)
	}
	for k, v := range want {
		if got := nm.Header[k]; len(got) != 1 || got[0] != v[0] {
			t.Errorf("header %s = %q, want %q", k, got, v)
		}
	}
	// Each value is a slice of its own: adding to one header leaves the
	// others as they were.
	nm.Header.Add("content-type", "text/plain")
	for k, v := range want {
		if k != "content-type" && nm.Header.Get(k) != v[0] {
			t.Errorf("after adding to content-type, header %s = %q, want %q", k, nm.Header.Get(k), v[0])
		}
	}
	if nm.Subject != m.Topic || len(nm.Data) != len(m.Payload) {
		t.Errorf("subject %q, %d payload bytes", nm.Subject, len(nm.Data))
	}
}

func BenchmarkMessage(b *testing.B) {
	p := &Publisher{}
	m := benchMessage()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := p.message(m); err != nil {
			b.Fatal(err)
		}
	}
}
