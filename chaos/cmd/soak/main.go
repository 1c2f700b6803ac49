// Command soak runs the chaos suite for several rounds, each with its own
// seed, and prints one table: per round and pipeline what was written,
// applied, lost, applied twice and out of order, and the faults injected.
// It exits 1 if any round lost a message, applied one twice (beyond the
// documented limits of the Redis inbox) or broke a promised order.
//
//	go -C chaos run ./cmd/soak -rounds 20
//	go -C chaos run ./cmd/soak -rounds 1 -seed 4242   # replay one round
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/exactlyonce/exactly/chaos"
)

func main() {
	rounds := flag.Int("rounds", 20, "rounds, each with its own seed")
	seed := flag.Uint64("seed", 0, "seed of the first round (the next ones add 1); 0 picks one")
	pipelines := flag.String("pipelines", strings.Join(chaos.DefaultPipelines, ","), "pipelines to run (comma-separated): "+strings.Join(names(), ", "))
	perKind := flag.Int("per-kind", 3, "least faults of each kind per round")
	extra := flag.Int("extra", 8, "extra faults of random kinds per round")
	rate := flag.Float64("rate", 40, "orders per second")
	verbose := flag.Bool("v", false, "print each round's progress")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *seed == 0 {
		*seed = uint64(time.Now().UnixNano()%1_000_000 + 1)
	}
	var reps []*chaos.Report
	failed := false
	for i := range *rounds {
		o := chaos.Options{Seed: *seed + uint64(i), Pipelines: strings.Split(*pipelines, ","), PerKind: *perKind, Extra: *extra, Rate: *rate}
		if *verbose {
			o.Log = os.Stderr
		} else {
			o.Log = io.Discard
		}
		fmt.Fprintf(os.Stderr, "round %d/%d: seed %d\n", i+1, *rounds, o.Seed)
		rep, err := chaos.Run(ctx, o)
		if err != nil {
			fmt.Fprintf(os.Stderr, "round %d (seed %d) could not run: %v\n", i+1, o.Seed, err)
			os.Exit(2)
		}
		rep.Print(os.Stderr)
		if !rep.OK() {
			failed = true
		}
		reps = append(reps, rep)
	}
	table(os.Stdout, reps)
	if failed {
		fmt.Println("FAIL: see the rounds above")
		os.Exit(1)
	}
	fmt.Println("PASS: lost=0, applied twice=0 (beyond documented limits), order violations=0 in every round")
}

func names() []string {
	var out []string
	for n := range chaos.Pipelines {
		out = append(out, n)
	}
	return out
}

// table prints one row per round and pipeline, then the totals.
func table(w io.Writer, reps []*chaos.Report) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "round\tseed\tpipeline\twritten\tcopies\tdup delivered\tapplied\tlost\tapplied twice\texplained\tbroker order\teffect order\tfaults\t")
	type total struct{ written, copies, dup, applied, lost, twice, explained, bo, eo int }
	totals := map[string]*total{}
	var order []string
	faults := map[string]int{}
	for i, r := range reps {
		for _, p := range r.Pipelines {
			f := ""
			if p.Name == r.Pipelines[0].Name {
				f = chaos.FormatFaults(r.Faults)
			}
			fmt.Fprintf(tw, "%d\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t\n", i+1, r.Seed, p.Name, p.Written, p.Copies,
				p.DupDelivered, p.Applied, p.Lost, p.Twice, p.Explained, p.BrokerOrder, p.EffectOrder, f)
			t := totals[p.Name]
			if t == nil {
				t = &total{}
				totals[p.Name] = t
				order = append(order, p.Name)
			}
			t.written += p.Written
			t.copies += p.Copies
			t.dup += p.DupDelivered
			t.applied += p.Applied
			t.lost += p.Lost
			t.twice += p.Twice
			t.explained += p.Explained
			t.bo += p.BrokerOrder
			t.eo += p.EffectOrder
		}
		for k, n := range r.Faults {
			faults[k] += n
		}
	}
	for _, n := range order {
		t := totals[n]
		fmt.Fprintf(tw, "all\t\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t\t\n", n, t.written, t.copies, t.dup, t.applied, t.lost, t.twice, t.explained, t.bo, t.eo)
	}
	tw.Flush()
	fmt.Fprintf(w, "faults over %d rounds: %s\n", len(reps), chaos.FormatFaults(faults))
}
