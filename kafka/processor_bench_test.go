package kafka_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/kafka"
)

// BenchmarkProcessorCopy copies b.N seeded records from one topic to
// another on kfake, in the shapes of bench/cmd/eosbench's rows 1 and 3:
// "copy" is the at-least-once loop (poll, process the partitions
// concurrently, produce, flush and commit the offsets every 100 ms) and
// "processor" is kafka.Processor with transactions every 100 ms;
// "fanout" is the Processor writing four outputs per input. Run one
// mode at a time with -cpuprofile to see what the Processor adds per
// record, e.g.
//
//	go test -run '^$' -bench 'ProcessorCopy/processor' -benchtime 300000x -cpuprofile p.out ./kafka/
//
// It reports records/s and the process's CPU µs per record (the client
// and kfake together, as eosbench does).
func BenchmarkProcessorCopy(b *testing.B) {
	for _, mode := range []string{"copy", "processor", "fanout"} {
		b.Run(mode, func(b *testing.B) {
			const partitions = 6
			cluster, err := kfake.NewCluster(kfake.NumBrokers(3), kfake.SeedTopics(partitions, "in", "out"))
			if err != nil {
				b.Fatal(err)
			}
			defer cluster.Close()
			seeds := cluster.ListenAddrs()
			benchSeed(b, seeds, b.N)
			b.ResetTimer()
			cpu0 := benchCPU()
			start := time.Now()
			switch mode {
			case "copy":
				benchCopy(b, seeds, b.N)
			case "processor":
				benchProcessor(b, seeds, b.N, benchTransform)
			case "fanout":
				benchProcessor(b, seeds, b.N, benchFanOut)
			}
			elapsed := time.Since(start)
			cpu := benchCPU() - cpu0
			b.StopTimer()
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "records/s")
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/record")
		})
	}
}

// benchSeed writes n records of 100 bytes with 1,000 keys, as eosbench does.
func benchSeed(b *testing.B, seeds []string, n int) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ProducerLinger(5*time.Millisecond))
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	pad := strings.Repeat("x", 92)
	const chunk = 10_000
	for lo := 0; lo < n; lo += chunk {
		recs := make([]*kgo.Record, 0, chunk)
		for i := lo; i < min(lo+chunk, n); i++ {
			recs = append(recs, &kgo.Record{Topic: "in", Key: []byte("k" + strconv.Itoa(i%1000)), Value: []byte(fmt.Sprintf("%08d", i) + pad)})
		}
		if err := cl.ProduceSync(context.Background(), recs...).FirstErr(); err != nil {
			b.Fatal(err)
		}
	}
}

func benchTransform(_ context.Context, rec *kgo.Record) ([]exactly.Message, error) {
	return []exactly.Message{{Topic: "out", Key: string(rec.Key), Payload: rec.Value}}, nil
}

// benchFanOut writes four copies of each input.
func benchFanOut(_ context.Context, rec *kgo.Record) ([]exactly.Message, error) {
	m := exactly.Message{Topic: "out", Key: string(rec.Key), Payload: rec.Value}
	return []exactly.Message{m, m, m, m}, nil
}

func benchProcessor(b *testing.B, seeds []string, n int, fn kafka.ProcessFunc) {
	p, err := kafka.NewProcessor(kafka.ProcessorConfig{
		Seeds: seeds, ClientOpts: []kgo.Opt{kgo.FetchMaxWait(100 * time.Millisecond)},
		Group: "g", Topics: []string{"in"}, InstanceID: "bench",
		CommitInterval: 100 * time.Millisecond, MaxBatchRecords: 1 << 30,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}, fn)
	if err != nil {
		b.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() { stop(); <-done }()
	deadline := time.After(5 * time.Minute)
	for p.Stats().Processed < int64(n) {
		select {
		case err := <-done:
			done <- err
			b.Fatalf("Run returned early: %v", err)
		case <-deadline:
			b.Fatalf("timed out with %d of %d records committed", p.Stats().Processed, n)
		case <-time.After(time.Millisecond):
		}
	}
}

// benchCopy is eosbench's at-least-once baseline.
func benchCopy(b *testing.B, seeds []string, n int) {
	ctx := context.Background()
	cl, err := kgo.NewClient(kgo.FetchMaxWait(100*time.Millisecond), kgo.SeedBrokers(seeds...), kgo.ConsumerGroup("g"), kgo.ConsumeTopics("in"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.DisableAutoCommit(),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	var (
		deadline  time.Time
		done      int64
		pending   int64
		produceMu sync.Mutex
		produceE  error
	)
	for done < int64(n) {
		pollCtx, cancel := ctx, context.CancelFunc(func() {})
		if !deadline.IsZero() {
			pollCtx, cancel = context.WithDeadline(ctx, deadline)
		}
		fs := cl.PollRecords(pollCtx, 500)
		cancel()
		if k := fs.NumRecords(); k > 0 {
			if deadline.IsZero() {
				deadline = time.Now().Add(100 * time.Millisecond)
			}
			var wg sync.WaitGroup
			fs.EachPartition(func(ftp kgo.FetchTopicPartition) {
				if len(ftp.Records) == 0 {
					return
				}
				wg.Go(func() {
					for _, rec := range ftp.Records {
						msgs, _ := benchTransform(ctx, rec)
						for i := range msgs {
							cl.Produce(context.Background(), benchRecord(&msgs[i], rec, i), func(_ *kgo.Record, err error) {
								if err != nil {
									produceMu.Lock()
									produceE = errors.Join(produceE, err)
									produceMu.Unlock()
								}
							})
						}
					}
				})
			})
			wg.Wait()
			pending += int64(k)
		}
		if deadline.IsZero() || time.Now().Before(deadline) {
			continue
		}
		if err := cl.Flush(ctx); err != nil {
			b.Fatal(err)
		}
		produceMu.Lock()
		perr := produceE
		produceMu.Unlock()
		if perr != nil {
			b.Fatal(perr)
		}
		if err := cl.CommitUncommittedOffsets(ctx); err != nil {
			b.Fatal(err)
		}
		done += pending
		pending = 0
		deadline = time.Time{}
	}
}

// benchRecord is eosbench's record: the input decoded, a UUIDv5 output id,
// the exactly-id header.
func benchRecord(m *exactly.Message, rec *kgo.Record, i int) *kgo.Record {
	in := kafka.DecodeRecord(rec)
	id := uuid.NewSHA1(uuid.NameSpaceOID, []byte(in.ID+"\x00"+strconv.Itoa(i))).String()
	return &kgo.Record{Topic: m.Topic, Key: []byte(m.Key), Value: m.Payload,
		Headers: []kgo.RecordHeader{{Key: exactly.HeaderID, Value: []byte(id)}}}
}

func benchCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
