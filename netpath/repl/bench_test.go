package repl_test

import (
	"context"
	"net"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"keel/datapath/iobuf"
	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// nopApplier accepts everything and writes nowhere: it isolates the cost
// of replication from the cost of a disk.
type nopApplier struct{}

func (nopApplier) Epoch(uint64) (uint64, error)                         { return 1, nil }
func (nopApplier) ApplyEpoch(uint64, uint64) error                      { return nil }
func (nopApplier) WriteAt(uint64, []byte, int64, replproto.Flags) error { return nil }
func (nopApplier) Trim(uint64, int64, int64, replproto.Flags) error     { return nil }
func (nopApplier) WriteZeroes(uint64, int64, int64, replproto.Flags) error {
	return nil
}
func (nopApplier) Flush(uint64) error { return nil }

func startNop(tb testing.TB, m *repl.Metrics) (*repl.Server, string) {
	tb.Helper()
	srv := repl.NewServer(repl.ServerConfig{Node: 2, Applier: nopApplier{}, Metrics: m})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	go srv.Serve(l)
	tb.Cleanup(func() { srv.Close() })
	return srv, l.Addr().String()
}

func connect(tb testing.TB, addr string, cfg repl.PeerConfig) *repl.Peer {
	tb.Helper()
	cfg.Self, cfg.Node, cfg.Addr = 1, 2, addr
	p := repl.NewPeer(cfg)
	tb.Cleanup(func() { p.Close() })
	if err := p.WaitUp(context.Background()); err != nil {
		tb.Fatal(err)
	}
	return p
}

// TestSteadyStateSendNoAllocs: a replicated 4 KiB write, end to end in
// this process (Fanout, the sender's writev, the replica's read into a
// pooled buffer, its apply and reply, the ACK), allocates nothing in
// steady state.
func TestSteadyStateSendNoAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector (sync.Pool drops items)")
	}
	_, addr := startNop(t, nil)
	p := connect(t, addr, repl.PeerConfig{})
	peers := []*repl.Peer{p}
	results := make([]error, 1)
	buf := iobuf.Get(4096)
	defer buf.Release()
	req := repl.Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Payload: buf.Bytes()}
	ctx := context.Background()
	for range 200 { // warm pools, buffers and lazily created metric children
		if err := repl.Fanout(ctx, peers, &req, results); err != nil {
			t.Fatal(err)
		}
	}
	allocs := testing.AllocsPerRun(500, func() {
		if err := repl.Fanout(ctx, peers, &req, results); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("replicated 4 KiB write: %v allocations per op, want 0", allocs)
	}
}

// BenchmarkReplicatedWrite4K: the round trip of one replicated 4 KiB write
// to one secondary over loopback, one at a time (queue depth 1).
func BenchmarkReplicatedWrite4K(b *testing.B) {
	_, addr := startNop(b, nil)
	p := connect(b, addr, repl.PeerConfig{})
	peers := []*repl.Peer{p}
	results := make([]error, 1)
	buf := iobuf.Get(4096)
	defer buf.Release()
	req := repl.Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Payload: buf.Bytes()}
	ctx := context.Background()
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		if err := repl.Fanout(ctx, peers, &req, results); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReplicatedWrite4KQD32: the same with 32 writers at once
// (queue depth 32), sharing the stream.
func BenchmarkReplicatedWrite4KQD32(b *testing.B) {
	_, addr := startNop(b, nil)
	p := connect(b, addr, repl.PeerConfig{})
	b.SetBytes(4096)
	b.ReportAllocs()
	b.SetParallelism(16) // 16 x GOMAXPROCS(2) = 32 writers
	b.RunParallel(func(pb *testing.PB) {
		peers := []*repl.Peer{p}
		results := make([]error, 1)
		buf := iobuf.Get(4096)
		defer buf.Release()
		req := repl.Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Payload: buf.Bytes()}
		for pb.Next() {
			if err := repl.Fanout(context.Background(), peers, &req, results); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkThroughput1MiB streams 1 MiB frames to one secondary with 8 in
// flight, with MSG_ZEROCOPY and with plain writev, and reports what the
// kernel did with the zero-copy sends.
func BenchmarkThroughput1MiB(b *testing.B) {
	for _, c := range []struct {
		name  string
		zcMin int
	}{{"zerocopy", 64 << 10}, {"writev", -1}} {
		b.Run(c.name, func(b *testing.B) {
			reg := prometheus.NewRegistry()
			m := repl.NewMetrics(reg)
			_, addr := startNop(b, nil)
			p := connect(b, addr, repl.PeerConfig{ZeroCopyMin: c.zcMin, Metrics: m})
			const depth = 8
			bufs := make([]*iobuf.Buf, depth)
			ops := make([]repl.Op, depth)
			free := make(chan *repl.Op, depth)
			var wg sync.WaitGroup
			for i := range ops {
				bufs[i] = iobuf.Get(1 << 20)
				fill(bufs[i].Bytes(), uint64(i))
				ops[i].Req = repl.Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Offset: uint64(i) << 20, Payload: bufs[i].Bytes()}
				ops[i].Done = func(op *repl.Op) {
					if op.Err() != nil {
						b.Error(op.Err())
					}
					wg.Done()
					free <- op
				}
				free <- &ops[i]
			}
			b.SetBytes(1 << 20)
			b.ReportAllocs()
			for b.Loop() {
				op := <-free
				wg.Add(1)
				p.Submit(context.Background(), op)
			}
			wg.Wait()
			for _, buf := range bufs {
				buf.Release()
			}
			payload := metricSum(b, reg, "keel_repl_payload_bytes_total")
			if payload > 0 {
				b.ReportMetric(metricSum(b, reg, "keel_repl_zerocopy_sends_total")/float64(b.N), "zc-sends/op")
				b.ReportMetric(metricSum(b, reg, "keel_repl_zerocopy_copied_total")/float64(b.N), "zc-copied/op")
				b.ReportMetric(metricSum(b, reg, "keel_repl_kernel_copy_bytes_total")/payload, "kernel-copies/B")
				b.ReportMetric(metricSum(b, reg, "keel_repl_user_copy_bytes_total")/payload, "user-copies/B")
			}
		})
	}
}
