package console

import (
	"context"
	"crypto/rand"
	"database/sql"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/exactlyonce/exactly/inbox"
	"github.com/exactlyonce/exactly/internal/inboxstore"
	hide "github.com/exactlyonce/exactly/internal/redact"
	"github.com/exactlyonce/exactly/internal/sqldb"
	"github.com/exactlyonce/exactly/outbox"
)

// Config is what a Console shows and what it may change.
type Config struct {
	// DB is the database of the outbox (and of the inbox tables): a
	// *sql.DB or a *pgxpool.Pool. Required. The console never closes it.
	DB any
	// Outbox names the outbox table and its dialect. Required.
	Outbox *outbox.Outbox
	// Inboxes are the inbox tables to show and to search by id, in the
	// outbox's database (inbox.DefaultTable is the usual one). None: the
	// inbox page is empty and a message is looked up in the outbox only.
	Inboxes []string
	// InboxStats, when set, returns the running totals of the inbox
	// consumers in this process by consumer name (inbox.SQL.Stats): the
	// inbox page then shows the duplicates each has seen. The table keeps
	// no such count, so without it duplicates are not shown.
	InboxStats func() map[string]inbox.Stats
	// Slots are the CDC replication slots to show (PostgreSQL only), e.g.
	// pgcdc.DefaultSlot. A slot that does not exist is shown as missing.
	Slots []string
	// Metrics, when set, gathers the metrics of a relay in this process
	// (exactlyprom.Relay): the published rate is then the relay's own
	// count instead of an estimate, and the slot lag in seconds is shown.
	Metrics prometheus.Gatherer
	// DSN, when set, is shown as the database, its password hidden.
	DSN string
	// Actions enables retrying and purging dead messages. Default false:
	// the console only reads, shows no action and refuses every POST.
	Actions bool
	// Logger receives a record of every action, with the ids and the
	// number of messages it changed. Default slog.Default().
	Logger *slog.Logger
	// SampleInterval is how often Run samples the backlog and throughput
	// for the overview's chart, which covers the last hour. Default 10s.
	SampleInterval time.Duration
}

// DefaultSampleInterval is the SampleInterval used when none is set.
const DefaultSampleInterval = 10 * time.Second

// chartWindow is the span of the overview's chart.
const chartWindow = time.Hour

// Console serves the pages. It is safe for concurrent use.
type Console struct {
	cfg     Config
	db      *sql.DB
	done    func()
	inboxes []*inboxstore.Store
	log     *slog.Logger
	csrf    string
	pages   map[string]*template.Template
	handler http.Handler

	mu      sync.Mutex
	samples []Sample
	since   time.Time // first sample
	last    rawSample
}

//go:embed web
var web embed.FS

// New validates cfg and returns a console. Call Run to take the samples of
// the overview's chart, and Close when done.
func New(cfg Config) (*Console, error) {
	if cfg.Outbox == nil {
		return nil, errors.New("console: Config.Outbox is required")
	}
	db, done, err := sqldb.Open(cfg.DB)
	if err != nil {
		return nil, fmt.Errorf("console: Config.DB: %w", err)
	}
	if cfg.SampleInterval < 0 {
		done()
		return nil, fmt.Errorf("console: Config.SampleInterval must not be negative, got %s", cfg.SampleInterval)
	}
	if cfg.SampleInterval == 0 {
		cfg.SampleInterval = DefaultSampleInterval
	}
	if len(cfg.Slots) > 0 && cfg.Outbox.Dialect() != outbox.Postgres {
		done()
		return nil, fmt.Errorf("console: Config.Slots: CDC slots are PostgreSQL's, the outbox is %s", cfg.Outbox.Dialect())
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	hide.AddFrom(cfg.DSN)
	c := &Console{cfg: cfg, db: db, done: done, log: cfg.Logger}
	seen := map[string]bool{}
	for _, t := range cfg.Inboxes {
		s, err := inboxstore.New(cfg.Outbox.Dialect(), t)
		if err != nil {
			done()
			return nil, fmt.Errorf("console: Config.Inboxes: %w", err)
		}
		if seen[s.Table.String()] {
			done()
			return nil, fmt.Errorf("console: Config.Inboxes: %s is listed twice", s.Table)
		}
		seen[s.Table.String()] = true
		c.inboxes = append(c.inboxes, s)
	}
	var tok [32]byte
	if _, err := rand.Read(tok[:]); err != nil {
		done()
		return nil, fmt.Errorf("console: CSRF token: %w", err)
	}
	c.csrf = hex.EncodeToString(tok[:])
	if c.pages, err = parsePages(); err != nil {
		done()
		return nil, err
	}
	c.handler = hide.Handler(c.routes())
	return c, nil
}

// Close releases what New opened (never the caller's database).
func (c *Console) Close() { c.done() }

// ServeHTTP serves the pages, relative to the path the console is mounted at.
func (c *Console) ServeHTTP(w http.ResponseWriter, r *http.Request) { c.handler.ServeHTTP(w, r) }

var pageNames = []string{"overview", "dead", "blocked", "relays", "inbox", "find", "confirm", "done", "error"}

func parsePages() (map[string]*template.Template, error) {
	funcs := template.FuncMap{
		"ago":      ago,
		"duration": duration,
		"bytes":    byteSize,
		"stamp":    stamp,
		"cut":      cut,
		"rate":     rate,
		"join":     strings.Join,
		"neg":      func(v float64) float64 { return -v },
	}
	out := map[string]*template.Template{}
	for _, p := range pageNames {
		t, err := template.New("layout.html").Funcs(funcs).ParseFS(web, "web/layout.html", "web/"+p+".html")
		if err != nil {
			return nil, fmt.Errorf("console: template %s: %w", p, err)
		}
		out[p] = t
	}
	return out, nil
}

func (c *Console) routes() http.Handler {
	mux := http.NewServeMux()
	static, _ := fs.Sub(web, "web/static")
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	mux.HandleFunc("GET /{$}", c.page("overview", c.overview))
	mux.HandleFunc("GET /dead", c.page("dead", c.dead))
	mux.HandleFunc("GET /blocked", c.page("blocked", c.blocked))
	mux.HandleFunc("GET /relays", c.page("relays", c.relays))
	mux.HandleFunc("GET /inbox", c.page("inbox", c.inbox))
	mux.HandleFunc("GET /find", c.page("find", c.find))
	mux.HandleFunc("POST /retry", c.action(actionRetry))
	mux.HandleFunc("POST /purge", c.action(actionPurge))
	return secureHeaders(mux)
}

// secureHeaders keeps the pages from being framed or running anything but
// their own script.
func secureHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
		w.Header().Set("X-Frame-Options", "DENY")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Referrer-Policy", "no-referrer")
		w.Header().Set("Cache-Control", "no-store")
		h.ServeHTTP(w, r)
	})
}

// pageData is what every page's template gets.
type pageData struct {
	Page     string
	Title    string
	Actions  bool
	CSRF     string
	Database string
	Table    string
	Now      time.Time
	JSON     string // this page as JSON, relative
	Data     any
}

// page serves one page: load reads its data, shown as HTML or as JSON.
func (c *Console) page(name string, load func(r *http.Request) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
		defer cancel()
		data, err := load(r.WithContext(ctx))
		if err != nil {
			var bad *badRequest
			code := http.StatusInternalServerError
			if errors.As(err, &bad) {
				code = http.StatusBadRequest
			}
			c.fail(w, r, code, err)
			return
		}
		c.render(w, r, http.StatusOK, name, data)
	}
}

// badRequest is an error in what the request asked for.
type badRequest struct{ msg string }

func (e *badRequest) Error() string { return e.msg }

func wantsJSON(r *http.Request) bool {
	if f := r.URL.Query().Get("format"); f != "" {
		return f == "json"
	}
	return strings.Contains(r.Header.Get("Accept"), "application/json") && !strings.Contains(r.Header.Get("Accept"), "text/html")
}

func (c *Console) render(w http.ResponseWriter, r *http.Request, code int, name string, data any) {
	if wantsJSON(r) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		if c.cfg.Actions {
			// Scripts read the token here to send it as X-CSRF-Token.
			w.Header().Set("X-CSRF-Token", c.csrf)
		}
		w.WriteHeader(code)
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(data)
		return
	}
	pd := pageData{Page: name, Title: titles[name], Actions: c.cfg.Actions, Database: hide.String(c.cfg.DSN),
		Table: c.cfg.Outbox.Table(), Now: time.Now(), JSON: jsonLink(r), Data: data}
	if c.cfg.Actions {
		pd.CSRF = c.csrf
	}
	var b strings.Builder
	if err := c.pages[name].Execute(&b, pd); err != nil {
		c.log.Error("console: rendering a page", "page", name, "err", err)
		http.Error(w, "rendering the page failed", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(code)
	_, _ = w.Write([]byte(b.String()))
}

// jsonLink is the relative link to the page r asked for, as JSON.
func jsonLink(r *http.Request) string {
	q := r.URL.Query()
	q.Set("format", "json")
	page := path.Base(r.URL.Path)
	if page == "/" || page == "." || r.Method != http.MethodGet {
		page = "./"
	}
	return page + "?" + q.Encode()
}

var titles = map[string]string{
	"overview": "Overview", "dead": "Dead messages", "blocked": "Blocked keys", "relays": "Relays",
	"inbox": "Inbox", "find": "Find a message", "confirm": "Confirm", "done": "Done", "error": "Error",
}

// errorJSON is the answer of a request that failed.
type errorJSON struct {
	Error string `json:"error"`
}

func (c *Console) fail(w http.ResponseWriter, r *http.Request, code int, err error) {
	c.render(w, r, code, "error", errorJSON{Error: hide.String(err.Error())})
}

// ago is how long before now t was, for the pages.
func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return duration(time.Since(t).Seconds()) + " ago"
}

// duration formats seconds for the pages.
func duration(s float64) string {
	d := time.Duration(s * float64(time.Second))
	switch {
	case d <= 0:
		return "0s"
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Hour:
		return d.Round(time.Second).String()
	}
	return d.Round(time.Minute).String()
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format("2006-01-02 15:04:05Z")
}

func byteSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	f, u := float64(n), "B"
	for _, next := range []string{"KiB", "MiB", "GiB", "TiB"} {
		if f < unit {
			break
		}
		f, u = f/unit, next
	}
	return fmt.Sprintf("%.1f %s", f, u)
}

// cut shortens s to n runes for a table cell.
func cut(n int, s string) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

func rate(p *float64) string {
	if p == nil {
		return "-"
	}
	switch {
	case *p >= 100:
		return fmt.Sprintf("%.0f/s", *p)
	case *p > 0 && *p < 0.1:
		return fmt.Sprintf("%.2f/s", *p)
	}
	return fmt.Sprintf("%.1f/s", *p)
}

// Check reports whether the outbox table and the inbox tables can be read:
// they must exist with the columns the console reads. The error names the
// table and what to do (see outbox.Outbox.Check).
func (c *Console) Check(ctx context.Context) error {
	if err := c.cfg.Outbox.Check(ctx, c.db); err != nil {
		return fmt.Errorf("console: %w", err)
	}
	for _, s := range c.inboxes {
		if err := s.Verify(ctx, c.db); err != nil {
			return fmt.Errorf("console: %w", err)
		}
	}
	return nil
}
