//go:build linux

package repl

import (
	"bytes"
	"context"
	"net"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"keel/netpath/replproto"
)

// sliceApplier is a minimal Applier over one byte slice per volume.
type sliceApplier struct {
	mu   sync.Mutex
	data []byte
}

func (a *sliceApplier) Epoch(uint64) (uint64, error)    { return 1, nil }
func (a *sliceApplier) ApplyEpoch(uint64, uint64) error { return nil }
func (a *sliceApplier) WriteAt(_ uint64, p []byte, off int64, _ replproto.Flags) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	copy(a.data[off:], p)
	return nil
}
func (a *sliceApplier) Trim(uint64, int64, int64, replproto.Flags) error        { return nil }
func (a *sliceApplier) WriteZeroes(uint64, int64, int64, replproto.Flags) error { return nil }
func (a *sliceApplier) Flush(uint64) error                                      { return nil }

// TestZeroCopyENOBUFSFallback makes sendmsg(MSG_ZEROCOPY) fail with ENOBUFS
// (the locked-memory limit) on every other frame's first call, and on the
// second call of the rest (after a partial send, when there is one): the
// frame's remaining bytes go with writev, the data arrives intact, and
// every fallback is counted.
func TestZeroCopyENOBUFSFallback(t *testing.T) {
	const frame, frames = 1 << 20, 24
	app := &sliceApplier{data: make([]byte, frame*frames)}
	srv := NewServer(ServerConfig{Node: 2, Applier: app})
	defer srv.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)

	var mu sync.Mutex
	calls := map[int]int{} // sendmsg call index -> count of injected failures
	first := true
	reg := prometheus.NewRegistry()
	p := NewPeer(PeerConfig{Self: 1, Node: 2, Addr: l.Addr().String(), ZeroCopyMin: 64 << 10,
		Metrics: NewMetrics(reg),
		zcFailpoint: func(call int) error {
			mu.Lock()
			defer mu.Unlock()
			if call == 0 {
				first = !first
				if first {
					calls[0]++
					return unix.ENOBUFS
				}
				return nil
			}
			if call == 1 {
				calls[1]++
				return unix.ENOBUFS
			}
			return nil
		}})
	defer p.Close()
	if err := p.WaitUp(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, frame*frames)
	for i := range want {
		want[i] = byte(i*7 + i/frame)
	}
	var wg sync.WaitGroup
	ops := make([]Op, frames)
	for i := range ops {
		ops[i] = Op{Req: Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Offset: uint64(i * frame),
			Payload: want[i*frame : (i+1)*frame]}, Done: func(*Op) { wg.Done() }}
		wg.Add(1)
		p.Submit(context.Background(), &ops[i])
	}
	wg.Wait()
	for i := range ops {
		if err := ops[i].Err(); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
	}
	app.mu.Lock()
	ok := bytes.Equal(app.data, want)
	app.mu.Unlock()
	if !ok {
		t.Fatal("replica data differs after ENOBUFS fallbacks")
	}
	mu.Lock()
	injected := calls[0] + calls[1]
	mu.Unlock()
	mfs, _ := reg.Gather()
	var fallbacks, sends float64
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "keel_repl_zerocopy_fallback_total":
				fallbacks += m.GetCounter().GetValue()
			case "keel_repl_zerocopy_sends_total":
				sends += m.GetCounter().GetValue()
			}
		}
	}
	t.Logf("%d injected ENOBUFS (%d at the first call, %d after a partial send), %v fallbacks counted, %v zero-copy sends", injected, calls[0], calls[1], fallbacks, sends)
	if calls[0] == 0 || float64(injected) != fallbacks || sends == 0 {
		t.Fatalf("fallbacks counted %v for %d injected, %v zero-copy sends", fallbacks, injected, sends)
	}
}
