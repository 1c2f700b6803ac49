package exactlyprom_test

import (
	"context"
	"database/sql"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	_ "modernc.org/sqlite"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/exactlyprom"
	"github.com/exactlyonce/exactly/inbox"
)

// A real SQL inbox on SQLite handles one message three times: the
// collector shows one processed, two duplicates, and a failure.
func TestInboxCollector(t *testing.T) {
	db, err := sql.Open("sqlite", "file:"+filepath.Join(t.TempDir(), "in.db")+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	in, err := inbox.NewSQL(inbox.Config{Dialect: inbox.SQLite, Consumer: "promotions"})
	if err != nil {
		t.Fatal(err)
	}
	if err := in.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	h := in.Handler(db, func(context.Context, *sql.Tx, *exactly.Message) error { return nil })
	msg := &exactly.Message{ID: exactly.NewID(), Topic: "t"}
	for range 3 {
		if err := h(ctx, msg); err != nil {
			t.Fatal(err)
		}
	}
	failing := in.Handler(db, func(context.Context, *sql.Tx, *exactly.Message) error { return context.DeadlineExceeded })
	if err := failing(ctx, &exactly.Message{ID: exactly.NewID(), Topic: "t"}); err == nil {
		t.Fatal("failing handler returned nil")
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(exactlyprom.Inbox("promotions", in.Stats))
	want := `
# HELP exactly_inbox_duplicates_total Deliveries suppressed as duplicates.
# TYPE exactly_inbox_duplicates_total counter
exactly_inbox_duplicates_total{consumer="promotions"} 2
# HELP exactly_inbox_failed_total Deliveries not processed (handler or store failure); they are retried.
# TYPE exactly_inbox_failed_total counter
exactly_inbox_failed_total{consumer="promotions"} 1
# HELP exactly_inbox_processed_total Effects applied and recorded as done.
# TYPE exactly_inbox_processed_total counter
exactly_inbox_processed_total{consumer="promotions"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"exactly_inbox_processed_total", "exactly_inbox_duplicates_total", "exactly_inbox_failed_total"); err != nil {
		t.Fatal(err)
	}
	if n, err := testutil.GatherAndCount(reg); err != nil || n != 7 {
		t.Errorf("%d metrics (%v), want 7", n, err)
	}
	// A second collector for the same consumer is a registration error.
	if err := reg.Register(exactlyprom.Inbox("promotions", in.Stats)); err == nil {
		t.Error("a duplicate collector was accepted")
	}
}
