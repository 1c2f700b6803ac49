package redact

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

const canary = "Cn4ry-s3cr3t"

func TestString(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"postgres://u:" + canary + "@h:5432/db", "postgres://u:***@h:5432/db"},
		{"postgres://u@h/db?sslmode=disable&password=" + canary, "postgres://u@h/db?sslmode=disable&password=***"},
		{"postgres://u@h/db?password=" + canary + "&sslmode=disable", "postgres://u@h/db?password=***&sslmode=disable"},
		{"host=h user=u password=" + canary + " dbname=db", "host=h user=u password=*** dbname=db"},
		{"host=h password='" + canary + " x' dbname=db", "host=h password=*** dbname=db"},
		{"nats://" + canary + "@127.0.0.1:4222", "nats://***@127.0.0.1:4222"},
		{"nats://u:" + canary + "@127.0.0.1:4222", "nats://u:***@127.0.0.1:4222"},
		{"amqp://guest:" + canary + "@h:5672/", "amqp://guest:***@h:5672/"},
		{"mysql://root:" + canary + "@tcp(127.0.0.1:3306)/test", "mysql://root:***@tcp(127.0.0.1:3306)/test"},
		{"dsn root:" + canary + "@tcp(127.0.0.1:3306)/test", "dsn root:***@tcp(127.0.0.1:3306)/test"},
		{"kafka-password = " + canary, "kafka-password = ***"},
		{"db ?password=" + canary + ": refused", "db ?password=***: refused"},
		{"token=x.", "token=***."},
		{"EXACTLY_NATS_PASSWORD=" + canary, "EXACTLY_NATS_PASSWORD=***"},
		{"https://h/x?api_token=" + canary, "https://h/x?api_token=***"},
		{"postgres://u@h/db is fine", "postgres://u@h/db is fine"},
		{"amqp://u@h/ has no password", "amqp://u@h/ has no password"},
		{"https://" + canary + "@github.com/x", "https://***@github.com/x"},
		{"redis://" + canary + "@h:6379", "redis://***@h:6379"},
		{"p:" + canary + "@x", "p:" + canary + "@x"}, // not a URL: only registered secrets go
	} {
		if got := String(tc.in); got != tc.want {
			t.Errorf("String(%q)\n got %q\nwant %q", tc.in, got, tc.want)
		}
	}
}

func TestAddFindEscapedForms(t *testing.T) {
	secret := canary + `"/@ x`
	u := url.URL{Scheme: "postgres", User: url.UserPassword("u", secret), Host: "h", Path: "/db"}
	AddFrom(u.String())
	for _, s := range []string{
		"failed: " + secret,
		`{"err":"failed: ` + strings.ReplaceAll(secret, `"`, `\"`) + `"}`,
		"failed: Cn4ry-s3cr3t%22%2F%40+x",
	} {
		if got := String(s); strings.Contains(got, canary) {
			t.Errorf("String(%q) = %q keeps the secret", s, got)
		}
	}
	Add("xy") // too short to hide everywhere
	if got := String("xyz"); got != "xyz" {
		t.Errorf("a short secret hid %q", got)
	}
	found := Find("host=h password=" + canary + " user=u")
	if len(found) == 0 || found[0] != canary {
		t.Errorf("Find: %q", found)
	}
}

func TestWriterAndHandler(t *testing.T) {
	Add("another-" + canary)
	var b strings.Builder
	w := Writer(&b)
	if n, err := io.WriteString(w, "x another-"+canary+" y\n"); err != nil || n != len("x another-"+canary+" y\n") {
		t.Fatal(n, err)
	}
	if b.String() != "x *** y\n" {
		t.Errorf("writer: %q", b.String())
	}
	h := Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Accept-Encoding") != "" {
			t.Error("Accept-Encoding passed on")
		}
		w.Header().Set("X-Db", "postgres://u:"+canary+"@h/db")
		w.WriteHeader(503)
		io.WriteString(w, `m{db="postgres://u:`+canary+`@h/db"} 1`)
	}))
	req := httptest.NewRequest("GET", "/metrics", nil)
	req.Header.Set("Accept-Encoding", "gzip")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != 503 || strings.Contains(rec.Body.String(), canary) || strings.Contains(rec.Header().Get("X-Db"), canary) {
		t.Errorf("handler: %d %q %q", rec.Code, rec.Body.String(), rec.Header())
	}
}
