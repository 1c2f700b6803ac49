package main

import (
	"encoding/json"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/exactlyonce/exactly/outbox"
)

// The demo with --keep leaves its tables and prints the console command
// that shows them; that command, run as printed, serves the run's state:
// every order's event sent, one inbox record per order.
func TestDemoKeepThenConsole(t *testing.T) {
	const orders = 300
	out := runDemoT(t, demoOptions{orders: orders, seed: 11, keep: true})
	checkDemoTable(t, out, orders)
	m := regexp.MustCompile(`(?m)^  exactly console (.+)$`).FindStringSubmatch(out)
	rm := regexp.MustCompile(`(?m)^  rm -r (\S+)$`).FindStringSubmatch(out)
	if m == nil || rm == nil {
		t.Fatalf("no console command or removal printed:\n%s", out)
	}
	t.Cleanup(func() { os.RemoveAll(rm[1]) })
	if _, err := os.Stat(rm[1]); err != nil {
		t.Fatalf("the kept SQLite file's folder: %v", err)
	}
	bin := buildExactly(t)
	p := startConsole(t, bin, nil, strings.Fields(m[1])...)
	code, body, err := p.get("/inbox?format=json")
	var in InboxJSON
	if err != nil || code != http.StatusOK || json.Unmarshal([]byte(body), &in) != nil {
		t.Fatalf("GET /inbox: %d %v\n%s", code, err, body)
	}
	if len(in.Tables) != 1 || len(in.Tables[0].Consumers) != 1 || in.Tables[0].Consumers[0].Records != orders {
		t.Errorf("the inbox page shows %+v, want one consumer with %d records", in.Tables, orders)
	}
	code, body, err = p.get("/?format=json")
	if err != nil || code != http.StatusOK || !strings.Contains(body, `"pending": 0,`) || !strings.Contains(body, `"dead": 0,`) {
		t.Errorf("GET / as JSON: %d %v\n%s", code, err, body)
	}
	// An order's event, found by its id: sent (the relay kept the sent
	// rows), and claimed by the promotions consumer's inbox.
	db, _, err := openDB("sqlite:" + rm[1] + "/demo.db")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var id string
	if err := db.QueryRow("SELECT event_id FROM orders ORDER BY id LIMIT 1").Scan(&id); err != nil {
		t.Fatal(err)
	}
	code, body, err = p.get("/find?format=json&id=" + id)
	var found struct {
		Outbox []struct{ Status string } `json:"outbox"`
		Inbox  []struct {
			Claims []struct{ Consumer string } `json:"claims"`
		} `json:"inbox"`
	}
	if err != nil || code != http.StatusOK || json.Unmarshal([]byte(body), &found) != nil {
		t.Fatalf("GET /find: %d %v\n%s", code, err, body)
	}
	if len(found.Outbox) != 1 || found.Outbox[0].Status != "sent" || len(found.Inbox) != 1 || len(found.Inbox[0].Claims) != 1 || found.Inbox[0].Claims[0].Consumer != "promotions" {
		t.Errorf("GET /find?id=%s shows %+v, want the row sent and claimed once by promotions", id, found)
	}
	p.stop(t)
}

// InboxJSON is the part of the console's inbox page the test reads.
type InboxJSON struct {
	Tables []struct {
		Consumers []struct {
			Records int64 `json:"records"`
		} `json:"consumers"`
	} `json:"tables"`
}

// What --keep prints on PostgreSQL and MySQL: the qualified tables, the DSN
// with its password hidden and quoted for the shell where it must be, and
// the statement that removes the run's namespace.
func TestDemoKeptCommand(t *testing.T) {
	for _, c := range []struct {
		dialect, dsn string
		want         []string
	}{
		{outbox.Postgres, "postgres://u:s3cret@127.0.0.1/test", []string{
			"kept the run's tables in schema exactly_demo_r1",
			"  exactly console --db 'postgres://u:***@127.0.0.1/test' --table exactly_demo_r1.outbox --inbox-table exactly_demo_r1.inbox\n",
			"  DROP SCHEMA exactly_demo_r1 CASCADE\n"}},
		{outbox.MySQL, "mysql://root@tcp(127.0.0.1:3306)/test", []string{
			"kept the run's tables in database exactly_demo_r1",
			"  exactly console --db 'mysql://root@tcp(127.0.0.1:3306)/test' --table exactly_demo_r1.outbox --inbox-table exactly_demo_r1.inbox\n",
			"  DROP DATABASE exactly_demo_r1\n"}},
	} {
		var b strings.Builder
		r := &demoRun{o: demoOptions{inbox: inboxSQL}, out: &b, db: &demoDB{dialect: c.dialect, dsn: c.dsn, ns: "exactly_demo_r1"}}
		r.printKept()
		for _, w := range c.want {
			if !strings.Contains(b.String(), w) {
				t.Errorf("%s: --keep printed\n%s\nwant %q", c.dialect, b.String(), w)
			}
		}
		if strings.Contains(b.String(), "s3cret") {
			t.Errorf("%s: --keep printed the password:\n%s", c.dialect, b.String())
		}
	}
}
