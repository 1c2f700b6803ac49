package chaos

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/exactlyonce/exactly/internal/pause"
)

// faultProxy is one TCP proxy (Shopify's toxiproxy, in process) between
// the workers and a service. Every worker reaches Postgres, NATS, Redis and
// kfake through one; the harness and the checker connect directly.
type faultProxy struct {
	name string
	p    *toxiproxy.Proxy
	mu   sync.Mutex // one fault at a time per proxy
}

type proxies struct {
	server *toxiproxy.ApiServer
	byName map[string]*faultProxy
}

func newProxies() *proxies {
	return &proxies{
		server: toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop()),
		byName: map[string]*faultProxy{},
	}
}

// add starts a proxy to upstream on a free port and returns its address.
func (ps *proxies) add(name, upstream string) (string, error) {
	p := toxiproxy.NewProxy(ps.server, name, "127.0.0.1:0", upstream)
	if err := p.Start(); err != nil {
		return "", fmt.Errorf("proxy %s: %w", name, err)
	}
	ps.byName[name] = &faultProxy{name: name, p: p}
	return p.Listen, nil
}

func (ps *proxies) closeAll() {
	for _, fp := range ps.byName {
		fp.p.Stop()
	}
}

// toxic adds a toxic in both directions for d, then removes it.
func (fp *faultProxy) toxic(ctx context.Context, typ string, attrs string, d time.Duration) error {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	var names []string
	for _, stream := range []string{"upstream", "downstream"} {
		name := typ + "_" + stream
		js := fmt.Sprintf(`{"name":%q,"type":%q,"stream":%q,"toxicity":1,"attributes":%s}`, name, typ, stream, attrs)
		if _, err := fp.p.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
			for _, n := range names {
				_ = fp.p.Toxics.RemoveToxic(context.Background(), n)
			}
			return fmt.Errorf("proxy %s: add %s: %w", fp.name, typ, err)
		}
		names = append(names, name)
	}
	pause.For(ctx, d)
	for _, n := range names {
		if err := fp.p.Toxics.RemoveToxic(context.Background(), n); err != nil {
			return fmt.Errorf("proxy %s: remove %s: %w", fp.name, n, err)
		}
	}
	return nil
}

// latency delays every chunk by ms ± jitter for d.
func (fp *faultProxy) latency(ctx context.Context, ms, jitter int, d time.Duration) error {
	return fp.toxic(ctx, "latency", fmt.Sprintf(`{"latency":%d,"jitter":%d}`, ms, jitter), d)
}

// blackhole lets no byte through for d, on the open connections and on
// new ones, which then hang; at the end they are closed (the bytes dropped
// in between make them unusable anyway) and new connections work again.
func (fp *faultProxy) blackhole(ctx context.Context, d time.Duration) error {
	return fp.toxic(ctx, "timeout", fmt.Sprintf(`{"timeout":%d}`, d.Milliseconds()), d)
}

// drop closes every connection through the proxy and refuses new ones for
// d (the port is closed), then listens again on the same address.
func (fp *faultProxy) drop(ctx context.Context, d time.Duration) error {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	fp.p.Stop()
	pause.For(ctx, d)
	var err error
	for range 50 { // the port may linger briefly
		if err = fp.p.Start(); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("proxy %s: listen again: %w", fp.name, err)
}
