package console_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/exactlyonce/exactly/console"
	"github.com/exactlyonce/exactly/internal/outboxstore"
)

// get fetches path from the console and returns the status and body.
func get(t *testing.T, h http.Handler, path string, accept string) (int, string, http.Header) {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, path, nil)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String(), rec.Header()
}

func getJSON(t *testing.T, h http.Handler, path string, v any) http.Header {
	t.Helper()
	code, body, hdr := get(t, h, path, "application/json")
	if code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, code, body)
	}
	if err := json.Unmarshal([]byte(body), v); err != nil {
		t.Fatalf("GET %s: %v\n%s", path, err, body)
	}
	return hdr
}

// post sends a form to the console, with the headers given.
func post(t *testing.T, h http.Handler, path string, form url.Values, hdr map[string]string) (int, string) {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

func TestPagesShowTheKnownRows(t *testing.T) {
	t.Parallel()
	b := setup(t, false)
	h := b.console
	pages := map[string][]string{
		"/":                    {"Overview", "orders", "payments", "<svg", "read-only"},
		"/dead":                {"dead-1", "dead-2", "dead-3", "schema v2 rejected the payload"},
		"/dead?topic=payments": {"dead-2", "dead-3"},
		"/blocked":             {failingID, "k-blocked", "broker refused: quota exceeded"},
		"/relays":              {"relay-a", "console_test_no_such_slot", "missing"},
		"/inbox":               {b.inbox, "promotions", "audit"},
		"/find?id=" + sentID:   {"sent", "promotions", "audit", "paid 9"},
		"/find?id=dead-2":      {"dead", "00 01 fe ff"},
		"/find?id=nope":        {"No row with this id"},
	}
	for path, want := range pages {
		code, body, hdr := get(t, h, path, "")
		if code != http.StatusOK {
			t.Errorf("GET %s: %d\n%s", path, code, body)
			continue
		}
		if ct := hdr.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
			t.Errorf("GET %s: Content-Type %q", path, ct)
		}
		if csp := hdr.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") {
			t.Errorf("GET %s: Content-Security-Policy %q", path, csp)
		}
		for _, w := range want {
			if !strings.Contains(body, w) {
				t.Errorf("GET %s: no %q in the page", path, w)
			}
		}
	}
	if code, body, _ := get(t, h, "/dead?topic=payments", ""); code == http.StatusOK && strings.Contains(body, "dead-1") {
		t.Errorf("the topic filter let dead-1 (orders) through")
	}
	if code, body, _ := get(t, h, "/dead?error=SCHEMA", ""); code != http.StatusOK || !strings.Contains(body, "dead-1") || strings.Contains(body, "dead-2") {
		t.Errorf("the error filter: %d, dead-1 %v, dead-2 %v", code, strings.Contains(body, "dead-1"), strings.Contains(body, "dead-2"))
	}
	if code, _, _ := get(t, h, "/dead?limit=x", ""); code != http.StatusBadRequest {
		t.Errorf("a bad limit: %d, want 400", code)
	}
	if code, body, _ := get(t, h, "/static/app.js", ""); code != http.StatusOK || !strings.Contains(body, "select-all") {
		t.Errorf("the embedded script: %d", code)
	}
}

func TestPagesAsJSON(t *testing.T) {
	t.Parallel()
	b := setup(t, false)
	h := b.console

	var ov console.Overview
	getJSON(t, h, "/?format=json", &ov)
	if ov.Pending != 5 || ov.Dead != 3 || ov.Failing != 1 || ov.BlockedKeys != 1 || ov.RateSource != "estimate" {
		t.Errorf("overview: %+v", ov)
	}
	topics := map[string]console.TopicRow{}
	for _, tr := range ov.Topics {
		topics[tr.Topic] = tr
	}
	if o, p := topics["orders"], topics["payments"]; o.Pending != 5 || o.Dead != 1 || p.Pending != 0 || p.Dead != 2 {
		t.Errorf("topics: %+v", ov.Topics)
	}
	if p := topics["payments"].PublishedPerSecond; p == nil || *p <= 0 {
		t.Errorf("payments kept a row sent now: published/s %v, want > 0", p)
	}
	if topics["orders"].PublishedPerSecond != nil {
		t.Errorf("orders sent nothing: published/s %v, want null", *topics["orders"].PublishedPerSecond)
	}

	var dead console.DeadPage
	getJSON(t, h, "/dead?format=json", &dead)
	if len(dead.Messages) != 3 || dead.Messages[0].ID != "dead-1" || dead.Messages[0].Attempts != 5 ||
		dead.Messages[0].Headers["trace"] != "t-1" || dead.More {
		t.Errorf("dead: %+v", dead)
	}
	getJSON(t, h, "/dead?format=json&limit=2", &dead)
	if len(dead.Messages) != 2 || !dead.More {
		t.Errorf("dead, limit 2: %d messages, more %v", len(dead.Messages), dead.More)
	}

	var bl console.BlockedPage
	getJSON(t, h, "/blocked?format=json", &bl)
	if len(bl.Messages) != 1 || bl.Messages[0].ID != failingID || bl.Messages[0].Waiting != 2 || bl.Messages[0].Attempts != 2 ||
		time.Until(bl.Messages[0].NextAttemptAt) < 30*time.Minute {
		t.Errorf("blocked: %+v", bl)
	}

	var rl console.RelaysPage
	getJSON(t, h, "/relays?format=json", &rl)
	if len(rl.Leases) != 4 || len(rl.Owners) != 1 || rl.Owners[0].Owner != "relay-a" || len(rl.Owners[0].Partitions) != 2 ||
		rl.Owners[0].HeartbeatAgeSeconds == nil || *rl.Owners[0].HeartbeatAgeSeconds > 60 {
		t.Errorf("relays: %+v", rl)
	}
	if len(rl.Slots) != 1 || rl.Slots[0].Exists || rl.InProcess != nil {
		t.Errorf("slots: %+v, in process %v", rl.Slots, rl.InProcess)
	}

	var in console.InboxPage
	getJSON(t, h, "/inbox?format=json", &in)
	if len(in.Tables) != 1 || len(in.Tables[0].Consumers) != 2 {
		t.Fatalf("inbox: %+v", in)
	}
	for _, c := range in.Tables[0].Consumers {
		if c.Records != 1 || c.Processed == nil || *c.Processed != 1 || c.Duplicates == nil || *c.Duplicates != 0 {
			t.Errorf("inbox consumer %+v", c)
		}
	}

	var f console.FindPage
	getJSON(t, h, "/find?format=json&id="+sentID, &f)
	if len(f.Outbox) != 1 || f.Outbox[0].Status != "sent" || f.Outbox[0].DoneAt == nil || string(f.Outbox[0].Payload) != "paid 9" ||
		len(f.Inbox) != 1 || len(f.Inbox[0].Claims) != 2 {
		t.Errorf("find %s: %+v", sentID, f)
	}
	getJSON(t, h, "/find?format=json&id="+failingID, &f)
	if len(f.Outbox) != 1 || f.Outbox[0].Status != "pending" || f.Outbox[0].NextAttemptAt == nil || f.Outbox[0].LastError == "" ||
		len(f.Inbox[0].Claims) != 0 {
		t.Errorf("find %s: %+v", failingID, f)
	}
}

func TestSecretNeverRendered(t *testing.T) {
	t.Parallel()
	b := setup(t, true)
	for _, p := range []string{"/", "/dead", "/blocked", "/relays", "/inbox", "/find?id=dead-1"} {
		for _, accept := range []string{"", "application/json"} {
			code, body, hdr := get(t, b.console, p, accept)
			if code != http.StatusOK {
				t.Errorf("GET %s: %d", p, code)
			}
			if strings.Contains(body, "Zq7ConsoleS3cret") || strings.Contains(hdr.Get("X-CSRF-Token"), "Zq7ConsoleS3cret") {
				t.Errorf("GET %s (%s): the DSN's password shows", p, accept)
			}
			if accept == "" && !strings.Contains(body, "postgres://postgres:***@127.0.0.1:5432/test") {
				t.Errorf("GET %s: the database is not shown with its password hidden", p)
			}
		}
	}
}

func TestReadOnlyShowsNoActionAndRefusesPosts(t *testing.T) {
	t.Parallel()
	b := setup(t, false)
	for _, p := range []string{"/dead", "/find?id=dead-1"} {
		_, body, _ := get(t, b.console, p, "")
		for _, w := range []string{"Retry", "Purge", `name="csrf"`, `type="checkbox"`} {
			if strings.Contains(body, w) {
				t.Errorf("read-only %s shows %q", p, w)
			}
		}
	}
	_, _, hdr := get(t, b.console, "/dead", "application/json")
	if hdr.Get("X-CSRF-Token") != "" {
		t.Errorf("a read-only console hands out a CSRF token")
	}
	for _, path := range []string{"/retry", "/purge"} {
		code, body := post(t, b.console, path, url.Values{"id": {"dead-1"}, "confirm": {"yes"}, "csrf": {"guess"}}, nil)
		if code != http.StatusForbidden || !strings.Contains(body, "read-only") {
			t.Errorf("POST %s on a read-only console: %d %s", path, code, body)
		}
	}
	if s := b.status(t, "dead-1"); s != outboxstore.StatusDead {
		t.Errorf("dead-1 is %d after refused POSTs, want dead", s)
	}
	if !strings.Contains(b.logs.String(), "read-only") {
		t.Errorf("the refusals are not logged:\n%s", b.logs)
	}
}

func TestActionsNeedTheCSRFToken(t *testing.T) {
	t.Parallel()
	b := setup(t, true)
	_, _, hdr := get(t, b.console, "/dead", "application/json")
	token := hdr.Get("X-CSRF-Token")
	if len(token) != 64 {
		t.Fatalf("CSRF token %q", token)
	}
	form := func(tok string) url.Values {
		v := url.Values{"id": {"dead-1"}, "confirm": {"yes"}}
		if tok != "" {
			v.Set("csrf", tok)
		}
		return v
	}
	cases := []struct {
		name string
		form url.Values
		hdr  map[string]string
	}{
		{"no token", form(""), nil},
		{"wrong token", form(strings.Repeat("0", 64)), nil},
		{"from another site", form(token), map[string]string{"Sec-Fetch-Site": "cross-site"}},
	}
	for _, c := range cases {
		for _, path := range []string{"/retry", "/purge"} {
			if code, body := post(t, b.console, path, c.form, c.hdr); code != http.StatusForbidden || !strings.Contains(body, "refused") {
				t.Errorf("%s: POST %s: %d %s", c.name, path, code, body)
			}
		}
	}
	if s := b.status(t, "dead-1"); s != outboxstore.StatusDead {
		t.Fatalf("dead-1 is %d after refused POSTs, want dead", s)
	}
	// The header works for scripts.
	code, body := post(t, b.console, "/retry?format=json", url.Values{"id": {"dead-1"}, "confirm": {"yes"}}, map[string]string{"X-CSRF-Token": token})
	var done console.DonePage
	if code != http.StatusOK || json.Unmarshal([]byte(body), &done) != nil || done.Changed != 1 {
		t.Fatalf("POST /retry with X-CSRF-Token: %d %s", code, body)
	}
	if s := b.status(t, "dead-1"); s != outboxstore.StatusPending {
		t.Errorf("dead-1 is %d after the retry, want pending", s)
	}
}

func TestRetryAndPurgeAreConfirmedAndLogged(t *testing.T) {
	t.Parallel()
	b := setup(t, true)
	_, _, hdr := get(t, b.console, "/dead", "application/json")
	token := hdr.Get("X-CSRF-Token")

	// The first POST asks for the confirmation and changes nothing.
	code, body := post(t, b.console, "/retry", url.Values{"id": {"dead-1", "ord-1"}, "csrf": {token}}, nil)
	if code != http.StatusOK || !strings.Contains(body, "Retry 1 dead message") || !strings.Contains(body, `name="confirm" value="yes"`) ||
		!strings.Contains(body, "the others are no longer dead") {
		t.Fatalf("confirmation: %d\n%s", code, body)
	}
	if s := b.status(t, "dead-1"); s != outboxstore.StatusDead {
		t.Fatalf("dead-1 changed before the confirmation: %d", s)
	}
	code, body = post(t, b.console, "/retry", url.Values{"id": {"dead-1"}, "csrf": {token}, "confirm": {"yes"}}, nil)
	if code != http.StatusOK || !strings.Contains(body, "retried 1 of 1") {
		t.Fatalf("retry: %d\n%s", code, body)
	}
	rows, err := outboxstore.For(b.ob).FindByID(context.Background(), b.db, "dead-1")
	if err != nil || len(rows) != 1 || rows[0].Status != outboxstore.StatusPending || rows[0].Attempts != 0 {
		t.Fatalf("dead-1 after the retry: %+v %v", rows, err)
	}

	code, body = post(t, b.console, "/purge", url.Values{"id": {"dead-2"}, "csrf": {token}}, nil)
	if code != http.StatusOK || !strings.Contains(body, "deleted for good") {
		t.Fatalf("purge confirmation: %d\n%s", code, body)
	}
	code, body = post(t, b.console, "/purge", url.Values{"id": {"dead-2"}, "csrf": {token}, "confirm": {"yes"}}, nil)
	if code != http.StatusOK || !strings.Contains(body, "purged 1 of 1") {
		t.Fatalf("purge: %d\n%s", code, body)
	}
	if s := b.status(t, "dead-2"); s != -1 {
		t.Errorf("dead-2 after the purge: status %d, want gone", s)
	}
	if s := b.status(t, "dead-3"); s != outboxstore.StatusDead {
		t.Errorf("dead-3 was not selected and is %d, want dead", s)
	}
	// Purging a pending message changes nothing: only dead ones are purged.
	code, body = post(t, b.console, "/purge?format=json", url.Values{"id": {"ord-1"}, "csrf": {token}, "confirm": {"yes"}}, nil)
	var done console.DonePage
	if code != http.StatusOK || json.Unmarshal([]byte(body), &done) != nil || done.Changed != 0 || b.status(t, "ord-1") != outboxstore.StatusPending {
		t.Errorf("purging a pending message: %d %s", code, body)
	}
	if code, _ := post(t, b.console, "/retry", url.Values{"csrf": {token}, "confirm": {"yes"}}, nil); code != http.StatusBadRequest {
		t.Errorf("an action without ids: %d, want 400", code)
	}

	logs := b.logs.String()
	for _, w := range []string{`msg="console: retried dead messages" action=retry`, "ids=[dead-1]", "changed=1", `msg="console: purged dead messages" action=purge`, "ids=[dead-2]"} {
		if !strings.Contains(logs, w) {
			t.Errorf("no %q in the log:\n%s", w, logs)
		}
	}
}

func TestSamplesFeedTheChart(t *testing.T) {
	t.Parallel()
	b := setup(t, false)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = b.console.Run(ctx) }()
	wait := func(n int) []console.Sample {
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			if s, _ := b.console.Samples(); len(s) >= n {
				return s
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("fewer than %d samples after 10s", n)
		return nil
	}
	first := wait(1)
	if first[0].Pending != 5 || first[0].Dead != 3 || first[0].PublishedPerSecond != nil {
		t.Fatalf("first sample: %+v", first[0])
	}
	// A relay without retention publishes two rows: it deletes them.
	st := outboxstore.For(b.ob)
	var seqs []int64
	for _, id := range pendingIDs[:2] {
		rows, err := st.FindByID(ctx, b.db, id)
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, rows[0].Seq)
	}
	if err := st.MarkSent(ctx, b.db, seqs, false, time.Now().UnixMilli()); err != nil {
		t.Fatal(err)
	}
	s := wait(2)
	last := s[len(s)-1]
	if last.Pending != 3 || last.PublishedPerSecond == nil || *last.PublishedPerSecond <= 0 {
		t.Fatalf("second sample: %+v", last)
	}
	_, body, _ := get(t, b.console, "/", "")
	if !strings.Contains(body, "<polyline class=\"pending\"") || !strings.Contains(body, "samples)") {
		t.Errorf("the chart has no line after two samples")
	}
	if _, err := io.WriteString(io.Discard, body); err != nil {
		t.Fatal(err)
	}
}

func TestNewRefusesBadConfig(t *testing.T) {
	t.Parallel()
	if _, err := console.New(console.Config{}); err == nil || !strings.Contains(err.Error(), "Outbox") {
		t.Errorf("no outbox: %v", err)
	}
}

func TestJSONLinkKeepsTheQuery(t *testing.T) {
	t.Parallel()
	b := setup(t, false)
	for path, want := range map[string]string{
		"/find?id=dead-2":      `href="find?format=json&amp;id=dead-2"`,
		"/":                    `href="./?format=json"`,
		"/dead?topic=payments": `href="dead?format=json&amp;topic=payments"`,
	} {
		if _, body, _ := get(t, b.console, path, ""); !strings.Contains(body, want) {
			t.Errorf("GET %s: no %s", path, want)
		}
	}
}

func TestRelaysPageReadsASlot(t *testing.T) {
	t.Parallel()
	slot := "console_test_slot_" + strings.ReplaceAll(time.Now().Format("150405.000000"), ".", "")
	b := setup(t, false, func(c *console.Config) { c.Slots = []string{slot} })
	// A physical slot: the shared server has wal_level replica, and the
	// view reads any slot the same way.
	if _, err := b.db.Exec("SELECT pg_create_physical_replication_slot($1, true)", slot); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := b.db.Exec("SELECT pg_drop_replication_slot($1)", slot); err != nil {
			t.Errorf("drop slot: %v", err)
		}
	})
	var rl console.RelaysPage
	getJSON(t, b.console, "/relays?format=json", &rl)
	if len(rl.Slots) != 1 || rl.Slots[0].Name != slot || !rl.Slots[0].Exists || rl.Slots[0].Active || rl.Slots[0].WALStatus == "" ||
		rl.Slots[0].LagSeconds != nil {
		t.Errorf("slots: %+v", rl.Slots)
	}
	if _, body, _ := get(t, b.console, "/relays", ""); !strings.Contains(body, "idle (no relay connected)") {
		t.Errorf("the relays page does not show the slot idle")
	}
}
