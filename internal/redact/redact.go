// Package redact is the one place secrets are taken out of what the command
// prints: errors, log lines, HTTP answers and panic messages all go through
// String. It hides, wherever they appear, the secrets registered with Add
// (and their escaped forms) and anything that looks like one: the password
// of a URL's user:password@, the token of a nats://TOKEN@host URL, the value of a
// password, passwd, pwd, token or secret parameter (URL query or
// key=value), and the password of a MySQL user:password@tcp(...) DSN.
// A URL's user alone is kept for the schemes where it is a user name
// (postgres, mysql, amqp), hidden for the others (nats://TOKEN@host).
package redact

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// Mask replaces every secret.
const Mask = "***"

// minSecret is the length below which a registered secret is not hidden
// everywhere it appears (it would hide unrelated text); the patterns still
// hide it where it sits in a URL or a parameter.
const minSecret = 3

var (
	mu    sync.RWMutex
	known []string // longest first
)

// userSchemes are the URL schemes whose user part alone is a user name;
// in any other URL (nats://TOKEN@host, https://TOKEN@host) it is taken for
// a token and hidden.
var userSchemes = map[string]bool{"postgres": true, "postgresql": true, "mysql": true, "amqp": true, "amqps": true}

// secretKey is a parameter name holding a secret.
const secretKey = `[a-z0-9_.\-]*(?:password|passwd|pwd|secret|token|apikey|api_key|api-key)[a-z0-9_.\-]*`

type pattern struct {
	re *regexp.Regexp
	// secret is the index of the group holding the secret; repl keeps the
	// rest. keep, when set, tells a match to leave alone.
	secret int
	repl   string
	keep   func(groups []string) bool
}

var patterns = []pattern{
	// scheme://user:password@host: the password runs to the last @ before
	// the path.
	{re: regexp.MustCompile(`(?i)\b([a-z][a-z0-9+.\-]*://)([^:/?#\s@"'<>]*):([^/?#\s"'<>]*)@`), secret: 3, repl: "${1}${2}:" + Mask + "@"},
	// nats://TOKEN@host
	{re: regexp.MustCompile(`(?i)\b([a-z][a-z0-9+.\-]*)(://)([^:/?#\s@"'<>]+)@`), secret: 3, repl: "${1}${2}" + Mask + "@",
		keep: func(g []string) bool { return userSchemes[strings.ToLower(g[1])] || g[3] == Mask }},
	// MySQL: user:password@tcp(host) or @unix(path), without a scheme.
	{re: regexp.MustCompile(`(?i)(^|[\s"'=(])([^\s:/@"'()]+):([^\s/"']*)@((?:tcp|unix)\()`), secret: 3, repl: "${1}${2}:" + Mask + "@${4}"},
	// password=... in a query string or a key=value DSN, quoted or not;
	// also "name = value" as in a config file. A value does not end in ":"
	// or ".", taken for the sentence's.
	{re: regexp.MustCompile(`(?i)\b(` + secretKey + `)(\s*=\s*)('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\*\*\*|[^\s&;,"'<>]*[^\s&;,"'<>:.])`), secret: 3, repl: "${1}${2}" + Mask},
}

// apply replaces the matches of p in s.
func (p *pattern) apply(s string) string {
	if p.keep == nil {
		return p.re.ReplaceAllString(s, p.repl)
	}
	return p.re.ReplaceAllStringFunc(s, func(m string) string {
		g := p.re.FindStringSubmatch(m)
		if p.keep(g) {
			return m
		}
		return p.re.ReplaceAllString(m, p.repl)
	})
}

// Add registers secrets to be hidden wherever they appear, in their plain,
// URL-escaped and quoted forms.
func Add(secrets ...string) {
	var forms []string
	for _, s := range secrets {
		if len(s) < minSecret || s == Mask {
			continue
		}
		forms = append(forms, s, url.QueryEscape(s), url.PathEscape(s))
		if q := strconv.Quote(s); len(q) > 2 {
			forms = append(forms, q[1:len(q)-1])
		}
		if b, err := json.Marshal(s); err == nil && len(b) > 2 {
			forms = append(forms, string(b[1:len(b)-1]))
		}
	}
	if len(forms) == 0 {
		return
	}
	mu.Lock()
	defer mu.Unlock()
	for _, f := range forms {
		if len(f) >= minSecret && !slices.Contains(known, f) {
			known = append(known, f)
		}
	}
	slices.SortFunc(known, func(a, b string) int { return len(b) - len(a) })
}

// AddFrom registers the secrets each value holds (see Find).
func AddFrom(values ...string) {
	for _, v := range values {
		Add(Find(v)...)
	}
}

// Find returns the secrets s holds: a URL's password (or a token URL's
// user), password-like query and key=value parameters, a MySQL DSN's
// password.
func Find(s string) []string {
	var out []string
	if u, err := url.Parse(strings.TrimSpace(s)); err == nil {
		if u.User != nil {
			if pw, ok := u.User.Password(); ok {
				out = append(out, pw)
			} else if !userSchemes[strings.ToLower(u.Scheme)] {
				out = append(out, u.User.Username())
			}
		}
		for k, vs := range u.Query() {
			if secretKeyRE.MatchString(k) {
				out = append(out, vs...)
			}
		}
	}
	for _, p := range patterns {
		for _, m := range p.re.FindAllStringSubmatch(s, -1) {
			if p.keep != nil && p.keep(m) {
				continue
			}
			v := m[p.secret]
			if uq, err := strconv.Unquote(v); err == nil {
				v = uq
			} else {
				v = strings.Trim(v, `'"`)
			}
			out = append(out, v)
			if dec, err := url.QueryUnescape(v); err == nil && dec != v {
				out = append(out, dec)
			}
		}
	}
	return out
}

var secretKeyRE = regexp.MustCompile(`(?i)^` + secretKey + `$`)

// String returns s with every secret replaced by Mask.
func String(s string) string {
	mu.RLock()
	for _, k := range known {
		s = strings.ReplaceAll(s, k, Mask)
	}
	mu.RUnlock()
	for i := range patterns {
		s = patterns[i].apply(s)
	}
	return s
}

// Error returns err with a redacted message; errors.Is and errors.As still
// see the original.
func Error(err error) error {
	if err == nil {
		return nil
	}
	return &redacted{err}
}

type redacted struct{ err error }

func (r *redacted) Error() string { return String(r.err.Error()) }
func (r *redacted) Unwrap() error { return r.err }

// Writer returns a writer that redacts each Write before passing it to w.
// Loggers write one record per Write, so a secret is never split.
func Writer(w io.Writer) io.Writer { return &writer{w: w} }

type writer struct {
	mu sync.Mutex
	w  io.Writer
}

func (w *writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, err := io.WriteString(w.w, String(string(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Handler redacts the answers of h: the whole body is held, redacted, then
// sent (uncompressed, so that it can be read).
func Handler(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r = r.Clone(r.Context())
		r.Header.Del("Accept-Encoding")
		rec := &recorder{header: http.Header{}, code: http.StatusOK}
		h.ServeHTTP(rec, r)
		body := String(rec.body.String())
		for k, vs := range rec.header {
			for _, v := range vs {
				w.Header().Add(k, String(v))
			}
		}
		w.Header().Del("Content-Encoding")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(rec.code)
		_, _ = io.WriteString(w, body)
	})
}

type recorder struct {
	header http.Header
	code   int
	wrote  bool
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) WriteHeader(code int) {
	if !r.wrote {
		r.code, r.wrote = code, true
	}
}
func (r *recorder) Write(p []byte) (int, error) {
	r.wrote = true
	return r.body.Write(p)
}
