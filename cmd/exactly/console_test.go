package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/exactlyonce/exactly/internal/outboxstore"
	"github.com/exactlyonce/exactly/internal/testenv"
)

// startConsole starts `exactly console` on a free address with env added
// to a clean environment, and waits until it serves.
func startConsole(t *testing.T, bin string, env []string, args ...string) *relayProc {
	t.Helper()
	return startConsoleOn(t, bin, freeAddr(t), env, args...)
}

func startConsoleOn(t *testing.T, bin, addr string, env []string, args ...string) *relayProc {
	t.Helper()
	p := &relayProc{out: &syncBuffer{}, admin: addr, done: make(chan struct{})}
	p.cmd = exec.Command(bin, append([]string{"console", "--addr", addr}, args...)...)
	p.cmd.Env = append(relayEnvCleared(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	waitFor(t, p, "console serving", 20*time.Second, func() (bool, string) {
		return strings.Contains(p.out.String(), "console on http://"+addr+"/"), p.out.String()
	})
	return p
}

// postForm sends a form to the console with the headers given.
func postForm(t *testing.T, base, path string, form url.Values, hdr map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, base+path, strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestConsoleCommand(t *testing.T) {
	bin := buildExactly(t)
	t.Run("BadFlags", func(t *testing.T) { testConsoleBadFlags(t, bin) })
	t.Run("ReadOnly", func(t *testing.T) { testConsoleReadOnly(t, bin) })
	t.Run("Actions", func(t *testing.T) { testConsoleActions(t, bin) })
	t.Run("OnTheRelay", func(t *testing.T) { testConsoleOnTheRelay(t, bin) })
	t.Run("BeyondLoopbackWarns", func(t *testing.T) { testConsoleBeyondLoopback(t, bin) })
}

func testConsoleBeyondLoopback(t *testing.T, bin string) {
	_, table, _, _ := outboxFixture(t)
	_, port, _ := strings.Cut(freeAddr(t), ":")
	p := startConsoleOn(t, bin, "0.0.0.0:"+port, nil, "--db", testenv.PostgresDSN(), "--table", table)
	p.admin = "127.0.0.1:" + port // the test itself talks over loopback only
	if code, _, err := p.get("/"); err != nil || code != http.StatusOK {
		t.Errorf("GET /: %d %v", code, err)
	}
	p.stop(t)
	if !strings.Contains(p.out.String(), "level=WARN msg=\"the console has no authentication and listens beyond this machine") {
		t.Errorf("no warning for --addr 0.0.0.0:\n%s", p.out)
	}
}

func testConsoleBadFlags(t *testing.T, bin string) {
	testenv.Need(t, testenv.Postgres)
	pg := testenv.PostgresDSN()
	sqlite := "sqlite:" + filepath.Join(t.TempDir(), "c.db")
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"console", "--db", pg, "--addr", "nowhere"}, `--addr "nowhere"`},
		{[]string{"console", "--db", pg, "--sample-interval", "10ms"}, "--sample-interval 10ms: want at least 1s"},
		{[]string{"console", "--db", sqlite, "--slot", "s"}, "--slot: CDC slots are PostgreSQL's, the database is sqlite"},
		{[]string{"console", "--db", pg, "--table", "console_no_such_table"}, "console_no_such_table"},
		{[]string{"console", "--db", pg, "--inbox-table", "bad name"}, "bad name"},
		{[]string{"console", "--db", "postgres://u@127.0.0.1:1/db", "--addr", "127.0.0.1:0"}, "cannot reach the database"},
		{[]string{"relay", "--db", pg, "--broker", "nats", "--nats-url", "nats://127.0.0.1:1", "--console-actions"}, "--console-actions is for the console's pages: add --console"},
	}
	for _, c := range cases {
		out, code := runExactly(t, bin, nil, c.args...)
		if code == 0 || !strings.Contains(out, c.want) {
			t.Errorf("%v: exit %d, want an error with %q:\n%s", c.args, code, c.want, out)
		}
	}
}

func testConsoleReadOnly(t *testing.T, bin string) {
	db, table, dead, _ := outboxFixture(t)
	p := startConsole(t, bin, nil, "--db", testenv.PostgresDSN(), "--table", table)
	base := "http://" + p.admin
	code, body, err := p.get("/")
	if err != nil || code != http.StatusOK || !strings.Contains(body, table) || !strings.Contains(body, "read-only") {
		t.Fatalf("GET /: %d %v\n%s", code, err, body)
	}
	code, body, err = p.get("/dead?format=json")
	var page struct {
		Messages []struct{ ID string } `json:"messages"`
	}
	if err != nil || code != http.StatusOK || json.Unmarshal([]byte(body), &page) != nil || len(page.Messages) != 3 {
		t.Fatalf("GET /dead as JSON: %d %v\n%s", code, err, body)
	}
	if code, body := postForm(t, base, "/retry", url.Values{"id": {dead[0].ID}, "confirm": {"yes"}}, nil); code != http.StatusForbidden {
		t.Errorf("POST /retry on a read-only console: %d %s", code, body)
	}
	if n := countStatus(t, db, table, outboxstore.StatusDead); n != 3 {
		t.Errorf("%d dead after a refused retry, want 3", n)
	}
	p.stop(t)
}

func testConsoleActions(t *testing.T, bin string) {
	db, table, dead, _ := outboxFixture(t)
	p := startConsole(t, bin, []string{"EXACTLY_DB=" + testenv.PostgresDSN()}, "--table", table, "--console-actions")
	base := "http://" + p.admin
	resp, err := http.Get(base + "/dead?format=json")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	token := resp.Header.Get("X-CSRF-Token")
	if token == "" {
		t.Fatal("no CSRF token with actions enabled")
	}
	if code, body := postForm(t, base, "/retry", url.Values{"id": {dead[0].ID}, "confirm": {"yes"}}, nil); code != http.StatusForbidden {
		t.Errorf("POST /retry without the token: %d %s", code, body)
	}
	code, body := postForm(t, base, "/retry?format=json", url.Values{"id": {dead[0].ID}, "confirm": {"yes"}}, map[string]string{"X-CSRF-Token": token})
	if code != http.StatusOK || !strings.Contains(body, `"changed": 1`) {
		t.Fatalf("POST /retry: %d %s", code, body)
	}
	if n := countStatus(t, db, table, outboxstore.StatusDead); n != 2 {
		t.Errorf("%d dead after the retry, want 2", n)
	}
	if n := countStatus(t, db, table, outboxstore.StatusPending); n != 3 {
		t.Errorf("%d pending after the retry, want 3", n)
	}
	p.stop(t)
	if out := p.out.String(); !strings.Contains(out, `msg="console: retried dead messages"`) || !strings.Contains(out, "ids=["+dead[0].ID+"]") {
		t.Errorf("the retry is not logged with its id:\n%s", out)
	}
}

func testConsoleOnTheRelay(t *testing.T, bin string) {
	testenv.Need(t, testenv.NATS)
	_, table, _, _ := outboxFixture(t)
	p := startRelay(t, bin, freeAddr(t), "--db", testenv.PostgresDSN(), "--table", table, "--broker", "nats",
		"--nats-url", testenv.NATSURL(), "--console")
	waitFor(t, p, "console on the admin server", 20*time.Second, func() (bool, string) {
		code, body, err := p.get("/console/")
		return err == nil && code == http.StatusOK && strings.Contains(body, table), body
	})
	code, body, err := p.get("/console/relays?format=json")
	var rl struct {
		InProcess *struct {
			Published float64 `json:"published_total"`
		} `json:"in_process"`
	}
	if err != nil || code != http.StatusOK || json.Unmarshal([]byte(body), &rl) != nil || rl.InProcess == nil {
		t.Errorf("GET /console/relays: %d %v\n%s", code, err, body)
	}
	code, body, err = p.get("/console/?format=json")
	if err != nil || code != http.StatusOK || !strings.Contains(body, `"rate_source": "relay"`) {
		t.Errorf("GET /console/ as JSON: %d %v\n%s", code, err, body)
	}
	if code, body := postForm(t, "http://"+p.admin, "/console/retry", url.Values{"id": {"x"}, "confirm": {"yes"}}, nil); code != http.StatusForbidden {
		t.Errorf("POST /console/retry without --console-actions: %d %s", code, body)
	}
	p.stop(t)
}

// TestConsoleSecretsNeverPrinted: a password in the console's DSN (flag or
// EXACTLY_DB) never shows in its output, its errors or its pages.
func TestConsoleSecretsNeverPrinted(t *testing.T) {
	bin := buildExactly(t)
	testenv.Need(t, testenv.Postgres)
	for _, dsn := range []string{
		"postgres://u:" + canary + "@127.0.0.1:1/db",
		"postgres://u@127.0.0.1:1/db?password=" + canary,
		"host=127.0.0.1 port=1 user=u password=" + canary + " dbname=db",
		"mysql://root:" + canary + "@tcp(127.0.0.1:1)/test",
	} {
		for _, run := range [][]string{{"console", "--db", dsn, "--addr", "127.0.0.1:0"}, {"console", "--addr", "127.0.0.1:0"}} {
			var env []string
			if len(run) == 3 {
				env = []string{"EXACTLY_DB=" + dsn}
			}
			out, code := runExactly(t, bin, env, run...)
			if code == 0 {
				t.Errorf("%v: exit 0 on an unreachable database", run)
			}
			if strings.Contains(out, canary) {
				t.Errorf("%v (env %v) prints the password:\n%s", run, env, out)
			}
		}
	}
	_, table, _, _ := outboxFixture(t)
	pg := testenv.PostgresDSN()
	withPassword := strings.Replace(pg, "://postgres@", "://postgres:"+canary+"@", 1)
	p := startConsole(t, bin, nil, "--db", withPassword, "--table", table, "--console-actions")
	for _, path := range []string{"/", "/dead", "/blocked", "/relays", "/inbox", "/find?id=x", "/?format=json", "/nope"} {
		code, body, err := p.get(path)
		if err != nil || strings.Contains(body, canary) {
			t.Errorf("GET %s: %d %v: the password shows", path, code, err)
		}
		if path == "/" && !strings.Contains(body, "postgres:***@") {
			t.Errorf("GET /: the database is not shown with its password hidden")
		}
	}
	p.stop(t)
	if strings.Contains(p.out.String(), canary) {
		t.Errorf("the console's log prints the password:\n%s", p.out)
	}
}
