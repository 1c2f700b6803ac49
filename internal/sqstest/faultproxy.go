package sqstest

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sort"
	"strings"
	"sync"
	"testing"
)

// Fault is what a FaultProxy does to one call.
type Fault int

const (
	Pass        Fault = iota
	Throttled         // HTTP 400 Throttling(Exception), the call not forwarded
	Unavailable       // HTTP 503 ServiceUnavailable, the call not forwarded
	AnswerLost        // forwarded, applied by the emulator, its answer dropped with the connection
)

func (f Fault) String() string {
	return [...]string{"passed", "throttled", "unavailable", "answer lost"}[f]
}

// Schedule is the faults of each operation's calls, in turn: 4 of every 10
// calls of each operation fail, each kind at least once in 10.
var Schedule = []Fault{Pass, Throttled, Pass, AnswerLost, Pass, Unavailable, Pass, Pass, Throttled, AnswerLost}

// FaultProxy is an HTTP reverse proxy in front of the emulator that injects
// Schedule's faults into the calls of SQS (AWS JSON protocol, the operation
// in X-Amz-Target) and SNS (AWS query protocol, the operation in the form's
// Action), answering each with its protocol's error shape, and counts
// them per operation and per fault. Point a client's BaseEndpoint at URL.
type FaultProxy struct {
	*httptest.Server
	rp *httputil.ReverseProxy

	mu     sync.Mutex
	on     bool
	calls  map[string]int           // operation -> calls seen while on
	counts map[string]map[Fault]int // operation -> fault -> calls
}

// NewFaultProxy starts a proxy to target, closed when the test ends, with
// its faults off.
func NewFaultProxy(t testing.TB, target string) *FaultProxy {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &FaultProxy{
		rp:     &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(u) }},
		calls:  map[string]int{},
		counts: map[string]map[Fault]int{},
	}
	p.rp.ErrorLog = log.New(io.Discard, "", 0) // the cut connections of lost answers
	p.Server = httptest.NewServer(http.HandlerFunc(p.serve))
	t.Cleanup(p.Close)
	return p
}

// Set turns the faults on or off.
func (p *FaultProxy) Set(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.on = on
}

func (p *FaultProxy) next(op string) Fault {
	p.mu.Lock()
	defer p.mu.Unlock()
	f := Pass
	if p.on {
		f = Schedule[p.calls[op]%len(Schedule)]
		p.calls[op]++
	}
	if p.counts[op] == nil {
		p.counts[op] = map[Fault]int{}
	}
	p.counts[op][f]++
	return f
}

// Count is how many calls of the operation op (SendMessageBatch,
// PublishBatch, ...) met f.
func (p *FaultProxy) Count(op string, f Fault) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.counts[op][f]
}

// String lists the calls of each operation by fault.
func (p *FaultProxy) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var ops []string
	for op := range p.counts {
		ops = append(ops, op)
	}
	sort.Strings(ops)
	var b strings.Builder
	for _, op := range ops {
		fmt.Fprintf(&b, "%s:", op)
		for f := Pass; f <= AnswerLost; f++ {
			fmt.Fprintf(&b, " %d %s", p.counts[op][f], f)
		}
		b.WriteString("; ")
	}
	return b.String()
}

func (p *FaultProxy) serve(w http.ResponseWriter, r *http.Request) {
	op, query := r.Header.Get("X-Amz-Target"), false
	if op != "" {
		op = op[strings.LastIndexByte(op, '.')+1:] // AmazonSQS.SendMessageBatch
	} else {
		// The query protocol: the operation is the form's Action.
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		form, _ := url.ParseQuery(string(body))
		op, query = form.Get("Action"), true
	}
	f := p.next(op)
	switch f {
	case Throttled, Unavailable:
		_, _ = io.Copy(io.Discard, r.Body)
		status, code, msg := http.StatusBadRequest, "ThrottlingException", "Rate exceeded (injected by the test)"
		if f == Unavailable {
			status, code, msg = http.StatusServiceUnavailable, "ServiceUnavailable", "Service unavailable (injected by the test)"
		}
		if query {
			if f == Throttled {
				code = "Throttling"
			}
			w.Header().Set("Content-Type", "text/xml")
			w.WriteHeader(status)
			fmt.Fprintf(w, `<ErrorResponse xmlns="http://sns.amazonaws.com/doc/2010-03-31/"><Error><Type>Sender</Type><Code>%s</Code><Message>%s</Message></Error><RequestId>injected</RequestId></ErrorResponse>`, code, msg)
			return
		}
		w.Header().Set("Content-Type", "application/x-amz-json-1.0")
		w.Header().Set("x-amzn-query-error", code+";Sender")
		w.WriteHeader(status)
		fmt.Fprintf(w, `{"__type":"com.amazonaws.sqs#%s","message":"%s"}`, code, msg)
	case AnswerLost:
		// The emulator applies the call; its answer is read and dropped,
		// and the client's connection cut, as a timeout on the way back
		// would.
		p.rp.ServeHTTP(&discard{h: http.Header{}}, r)
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		_ = conn.Close()
	default:
		p.rp.ServeHTTP(w, r)
	}
}

// discard is a ResponseWriter that keeps nothing.
type discard struct{ h http.Header }

func (d *discard) Header() http.Header         { return d.h }
func (d *discard) Write(b []byte) (int, error) { return len(b), nil }
func (d *discard) WriteHeader(int)             {}
