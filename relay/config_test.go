package relay

import (
	"context"
	"database/sql"
	"strings"
	"testing"

	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/outbox"
)

// PipelineDepth is refused out of its bounds, naming it, and defaults to
// defaultPipelineDepth.
func TestPipelineDepthBounds(t *testing.T) {
	ob, err := outbox.New(outbox.Config{Dialect: outbox.SQLite})
	if err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite", ":memory:")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	pub := exactly.PublisherFunc(func(context.Context, []*exactly.Message) error { return nil })
	for depth, want := range map[int]string{-1: "Config.PipelineDepth must not be negative", 257: "Config.PipelineDepth 257 is above the limit of 256"} {
		_, err := New(Config{Outbox: ob, DB: db, Publisher: pub, PipelineDepth: depth})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("PipelineDepth %d: %v, want %q", depth, err, want)
		}
	}
	cfg := Config{Outbox: ob, DB: db, Publisher: pub}
	if c, err := cfg.withDefaults(); err != nil || c.PipelineDepth != defaultPipelineDepth {
		t.Fatalf("default PipelineDepth %d (%v), want %d", c.PipelineDepth, err, defaultPipelineDepth)
	}
}
