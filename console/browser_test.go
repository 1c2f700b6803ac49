package console_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/console"
	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// chromium finds Debian's chromium (scripts/install-chromium installs it).
// Outside CI a missing browser skips the test; under CI it fails it.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if testenv.InCI() {
		t.Fatal("chromium is not installed; install it with scripts/install-chromium")
	}
	t.Skip("chromium is not installed; install it with scripts/install-chromium")
	return ""
}

var (
	shotsOnce sync.Once
	shotsDir  string
)

// screenshots is the folder the browser tests leave their screenshots in,
// kept after the run and named in the test log.
func screenshots(t *testing.T) string {
	t.Helper()
	shotsOnce.Do(func() {
		d, err := os.MkdirTemp("", "exactly-console-screenshots-")
		if err != nil {
			t.Fatal(err)
		}
		shotsDir = d
	})
	t.Logf("screenshots in %s", shotsDir)
	return shotsDir
}

// browse starts a headless Chromium on the console, mounted under
// /console/ as the relay's admin server mounts it, and returns the
// browser's context and the console's base URL.
func browse(t *testing.T, c *console.Console) (context.Context, string) {
	t.Helper()
	exe := chromium(t)
	mux := http.NewServeMux()
	mux.Handle("/console/", http.StripPrefix("/console", c))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(exe), chromedp.NoSandbox,
		chromedp.WindowSize(1280, 1000), chromedp.Flag("disable-gpu", true), chromedp.Flag("disable-dev-shm-usage", true))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelAlloc)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(cancel)
	ctx, cancelTimeout := context.WithTimeout(ctx, 90*time.Second)
	t.Cleanup(cancelTimeout)
	if err := chromedp.Do(ctx); err != nil { // starts the browser
		t.Fatalf("starting chromium: %v", err)
	}
	return ctx, srv.URL + "/console/"
}

func shoot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	var png []byte
	var err error
	for range 20 { // a page still being laid out has no size yet
		if png, err = chromedp.Run(ctx, chromedp.FullScreenshot(100)); err == nil || !strings.Contains(err.Error(), "0 width") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	path := filepath.Join(screenshots(t), name+".png")
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
}

// history draws an hour of samples: every two minutes the producer
// enqueues some orders and the relay publishes (deletes) some.
func history(t *testing.T, b *bundle) {
	t.Helper()
	ctx := context.Background()
	st := outboxstore.For(b.ob)
	start := time.Now().Add(-58 * time.Minute)
	n := 0
	for i := 0; i < 30; i++ {
		in := 40 + 30*(i%7) + 4*i
		var msgs []*exactly.Message
		for j := 0; j < in; j++ {
			n++
			msgs = append(msgs, &exactly.Message{ID: fmt.Sprintf("hist-%d", n), Topic: []string{"orders", "shipments", "invoices"}[n%3],
				Key: fmt.Sprintf("c-%d", n%50), Payload: []byte(`{"n":` + fmt.Sprint(n) + `}`)})
		}
		tx, err := b.db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := b.ob.Enqueue(ctx, tx, msgs...); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		out := in - 25 // the relay falls behind,
		switch {
		case i >= 24:
			out = in - 3
		case i >= 15:
			out = in + 40 // catches up
		}
		rows, err := st.Fetch(ctx, b.db, outboxstore.FetchQuery{Limit: out, NowMillis: time.Now().UnixMilli()})
		if err != nil {
			t.Fatal(err)
		}
		var seqs []int64
		for _, r := range rows {
			if strings.HasPrefix(r.Msg.ID, "hist-") {
				seqs = append(seqs, r.Seq)
			}
		}
		if err := st.MarkSent(ctx, b.db, seqs, false, time.Now().UnixMilli()); err != nil {
			t.Fatal(err)
		}
		if err := console.SampleAt(ctx, b.console, start.Add(time.Duration(i)*2*time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
}

func text(t *testing.T, ctx context.Context, url, sel string) string {
	t.Helper()
	if err := chromedp.Do(ctx, chromedp.Navigate(url), chromedp.WaitVisible(sel)); err != nil {
		t.Fatalf("%s: %v", url, err)
	}
	return read(t, ctx, "main")
}

// read returns the text of the element sel on the page shown, as soon as
// it has any. It asks the page's script rather than chromedp's DOM mirror,
// whose node ids a just-finished navigation can leave stale.
func read(t *testing.T, ctx context.Context, sel string) string {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Poll[string](fmt.Sprintf("document.querySelector(%q)?.innerText", sel),
		chromedp.WithPollingTimeout(15*time.Second)))
	if err != nil {
		t.Fatalf("text of %s: %v", sel, err)
	}
	return s
}

func count(t *testing.T, ctx context.Context, sel string) int {
	t.Helper()
	n, err := chromedp.Run(ctx, chromedp.Evaluate[int](fmt.Sprintf("document.querySelectorAll(%q).length", sel)))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// postWithoutToken submits, from the page, the form a forger would: the id
// and the confirmation but no CSRF token. It returns the answer's text.
// (The pages' Content-Security-Policy forbids their scripts fetch().)
func postWithoutToken(t *testing.T, ctx context.Context, path, id string) string {
	t.Helper()
	js := fmt.Sprintf(`(() => { const f = document.createElement("form"); f.method = "POST"; f.action = %q;
  for (const [k, v] of [["id", %q], ["confirm", "yes"]]) { const i = document.createElement("input"); i.type = "hidden"; i.name = k; i.value = v; f.appendChild(i); }
  document.body.appendChild(f); f.submit(); return true; })()`, path, id)
	if _, err := chromedp.Run(ctx, chromedp.Evaluate[bool](js)); err != nil {
		t.Fatal(err)
	}
	// The answer replaces the page: poll for it rather than hold a node of
	// the page that is going away.
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		s, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.readyState === "complete" && document.getElementById("error") ? document.getElementById("error").textContent : ""`))
		if err == nil && s != "" {
			return s
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("POST %s: no error page after 20s", path)
	return ""
}

func TestBrowserReadOnlyPages(t *testing.T) {
	// Samples two minutes apart, as history draws them.
	b := setup(t, false, func(c *console.Config) { c.SampleInterval = 2 * time.Minute })
	history(t, b)
	ctx, base := browse(t, b.console)

	pages := []struct {
		name, path, ready string
		want              []string
	}{
		{"overview", "", "svg.chart", []string{"pending", "dead", "published", "orders", "payments", "shipments", "invoices"}},
		{"dead", "dead", "table#dead", []string{"dead-1", "dead-2", "dead-3", "schema v2 rejected the payload", "timeout after 30s"}},
		{"blocked", "blocked", "table#blocked", []string{failingID, "k-blocked", "broker refused: quota exceeded"}},
		{"relays", "relays", "table#leases", []string{"relay-a", "console_test_no_such_slot", "missing"}},
		{"inbox", "inbox", "table.inbox", []string{"promotions", "audit"}},
		{"find", "find?id=" + sentID, "div.found", []string{"sent", "promotions", "audit", "paid 9"}},
		{"find-dead-hex", "find?id=dead-2", "div.found", []string{"dead", "00 01 fe ff", "timeout after 30s"}},
	}
	for _, p := range pages {
		got := text(t, ctx, base+p.path, p.ready)
		for _, w := range p.want {
			if !strings.Contains(got, w) {
				t.Errorf("%s: no %q on the page:\n%s", p.name, w, got)
			}
		}
		shoot(t, ctx, "readonly-"+p.name)
	}
	if n := count(t, ctx, ".meta .mode.ro"); n != 1 {
		t.Errorf("the pages do not say read-only")
	}
	// The overview's chart has the hour's lines.
	text(t, ctx, base, "svg.chart")
	if n := count(t, ctx, "svg.chart polyline"); n != 2 {
		t.Errorf("the chart has %d lines, want 2 (pending, published/s)", n)
	}
	// No action anywhere, and the POST is refused.
	for _, path := range []string{"dead", "find?id=dead-1"} {
		text(t, ctx, base+path, "main")
		if n := count(t, ctx, "button#retry-selected, button#purge-selected, button#retry-one, button#purge-one, input[type=checkbox]"); n != 0 {
			t.Errorf("read-only %s shows %d action controls", path, n)
		}
	}
	for _, path := range []string{"retry", "purge"} {
		text(t, ctx, base+"dead", "table#dead")
		if s := postWithoutToken(t, ctx, path, "dead-1"); !strings.Contains(s, "read-only") {
			t.Errorf("POST %s on a read-only console: %q, want refused as read-only", path, s)
		}
	}
	shoot(t, ctx, "readonly-post-refused")
	if s := b.status(t, "dead-1"); s != outboxstore.StatusDead {
		t.Errorf("dead-1 is %d, want dead", s)
	}
}

func TestBrowserRetryAndPurge(t *testing.T) {
	b := setup(t, true)
	ctx, base := browse(t, b.console)

	// select-all ticks every row (the page's script).
	text(t, ctx, base+"dead", "table#dead")
	if err := chromedp.Do(ctx, chromedp.Click("#select-all")); err != nil {
		t.Fatal(err)
	}
	if n := count(t, ctx, `#dead input[name="id"]:checked`); n != 3 {
		t.Errorf("select-all ticked %d rows, want 3", n)
	}
	shoot(t, ctx, "actions-dead")

	// Retry dead-1: tick it, Retry selected…, confirm.
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"dead"), chromedp.WaitVisible("table#dead"),
		chromedp.Click(`input[value="dead-1"]`), chromedp.Click("#retry-selected"),
		chromedp.WaitVisible("#confirm")); err != nil {
		t.Fatal(err)
	}
	confirm := read(t, ctx, "main")
	if !strings.Contains(confirm, "Retry 1 dead message") || !strings.Contains(confirm, "dead-1") || strings.Contains(confirm, "dead-2") {
		t.Errorf("the retry's confirmation:\n%s", confirm)
	}
	shoot(t, ctx, "actions-retry-confirm")
	if s := b.status(t, "dead-1"); s != outboxstore.StatusDead {
		t.Fatalf("dead-1 changed before the confirmation: %d", s)
	}
	if err := chromedp.Do(ctx, chromedp.Click("#confirm"), chromedp.WaitVisible("#done")); err != nil {
		t.Fatal(err)
	}
	done := read(t, ctx, "#done")
	if !strings.Contains(done, "retried 1 of 1") {
		t.Errorf("after the retry: %q", done)
	}
	shoot(t, ctx, "actions-retry-done")
	if s := b.status(t, "dead-1"); s != outboxstore.StatusPending {
		t.Errorf("dead-1 is %d after the retry from the page, want pending", s)
	}

	// Purge dead-2 from its own page, with the confirmation.
	text(t, ctx, base+"find?id=dead-2", "div.found")
	if err := chromedp.Do(ctx, chromedp.Click("#purge-one"), chromedp.WaitVisible("#confirm")); err != nil {
		t.Fatal(err)
	}
	confirm = read(t, ctx, "main")
	if !strings.Contains(confirm, "Purge 1 dead message") || !strings.Contains(confirm, "deleted for good") {
		t.Errorf("the purge's confirmation:\n%s", confirm)
	}
	shoot(t, ctx, "actions-purge-confirm")
	if s := b.status(t, "dead-2"); s != outboxstore.StatusDead {
		t.Fatalf("dead-2 changed before the confirmation: %d", s)
	}
	if err := chromedp.Do(ctx, chromedp.Click("#confirm"), chromedp.WaitVisible("#done")); err != nil {
		t.Fatal(err)
	}
	done = read(t, ctx, "#done")
	if !strings.Contains(done, "purged 1 of 1") {
		t.Errorf("after the purge: %q", done)
	}
	if s := b.status(t, "dead-2"); s != -1 {
		t.Errorf("dead-2 is %d after the purge, want gone", s)
	}

	// A POST without the token, from the page itself, is refused.
	for _, path := range []string{"retry", "purge"} {
		text(t, ctx, base+"dead", "table#dead")
		if s := postWithoutToken(t, ctx, path, "dead-3"); !strings.Contains(s, "no CSRF token") {
			t.Errorf("POST %s without a CSRF token: %q, want refused", path, s)
		}
	}
	shoot(t, ctx, "actions-post-without-token-refused")
	if s := b.status(t, "dead-3"); s != outboxstore.StatusDead {
		t.Errorf("dead-3 is %d after the token-less POSTs, want dead", s)
	}
	text(t, ctx, base+"dead", "table#dead")
	shoot(t, ctx, "actions-dead-after")

	logs := b.logs.String()
	for _, w := range []string{"ids=[dead-1]", "ids=[dead-2]", "changed=1", "no CSRF token"} {
		if !strings.Contains(logs, w) {
			t.Errorf("no %q in the console's log:\n%s", w, logs)
		}
	}
	var js console.DeadPage
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"dead?format=json")); err != nil {
		t.Fatal(err)
	}
	raw := read(t, ctx, "body")
	if err := json.Unmarshal([]byte(raw), &js); err != nil || len(js.Messages) != 1 || js.Messages[0].ID != "dead-3" {
		t.Errorf("the dead page as JSON after the actions: %v %s", err, raw)
	}
}
