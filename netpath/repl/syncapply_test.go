package repl_test

import (
	"bytes"
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// syncApplier is a memApplier that is also a repl.SyncApplier, counting
// the writes that took the synchronous call.
type syncApplier struct {
	*memApplier
	syncs atomic.Int64
}

func (a *syncApplier) WriteAtSync(vol uint64, p []byte, off int64, flags replproto.Flags) error {
	a.syncs.Add(1)
	return a.memApplier.WriteAt(vol, p, off, flags)
}

// TestSyncApplierAtDepthOne: a WRITE alone in flight on its stream goes
// through WriteAtSync, on the stream's reader (counted as inline); a write
// the primary sends while one is being applied is read once the reader is
// free, and both land. Without a SyncApplier nothing is applied inline.
func TestSyncApplierAtDepthOne(t *testing.T) {
	const vol = 1
	app := &syncApplier{memApplier: newMemApplier()}
	app.addVolume(vol, 64<<10, 1)
	p, reg := serveOne(t, app.memApplier, app, 4)
	write := func(off int, b byte) repl.Request {
		return repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Offset: uint64(off), Payload: bytes.Repeat([]byte{b}, 4096)}
	}
	for i := range 3 {
		req := write(i*4096, 'a'+byte(i))
		if err := p.Send(context.Background(), &req); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if n := app.syncs.Load(); n != 3 {
		t.Fatalf("%d of 3 writes at depth 1 took WriteAtSync", n)
	}
	if n := gatherValue(t, reg, "keel_repl_server_inline_writes_total"); n != 3 {
		t.Fatalf("%v of 3 writes at depth 1 applied on the reader", n)
	}

	// A write held in the applier (on the reader), and one sent behind it.
	app.mu.Lock()
	app.holdAt[32768] = true
	app.mu.Unlock()
	held := make(chan error, 1)
	a := repl.Op{Req: write(32768, 'H'), Done: func(op *repl.Op) { held <- op.Err() }}
	p.Submit(context.Background(), &a)
	within(t, app.entered, 10*time.Second, "the held write to reach the applier")
	behind := make(chan error, 1)
	b := repl.Op{Req: write(16384, 'B'), Done: func(op *repl.Op) { behind <- op.Err() }}
	p.Submit(context.Background(), &b)
	app.release <- struct{}{}
	if err := within(t, held, 10*time.Second, "the held write"); err != nil {
		t.Fatalf("held write: %v", err)
	}
	if err := within(t, behind, 10*time.Second, "the write behind it"); err != nil {
		t.Fatalf("write behind the held one: %v", err)
	}
	data, _, st := app.snapshot(vol)
	if st.writes != 5 {
		t.Fatalf("%d writes applied, want 5", st.writes)
	}
	for off, c := range map[int]byte{0: 'a', 4096: 'b', 8192: 'c', 16384: 'B', 32768: 'H'} {
		if !bytes.Equal(data[off:off+4096], bytes.Repeat([]byte{c}, 4096)) {
			t.Fatalf("data at %d is not %q", off, c)
		}
	}
}

// TestNoInlineWithoutSyncApplier: an Applier without WriteAtSync has
// every frame applied by a worker.
func TestNoInlineWithoutSyncApplier(t *testing.T) {
	const vol = 1
	app := newMemApplier()
	app.addVolume(vol, 64<<10, 1)
	p, reg := serveOne(t, app, app, 2)
	for i := range 3 {
		req := repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Offset: uint64(i * 4096), Payload: bytes.Repeat([]byte{'x'}, 4096)}
		if err := p.Send(context.Background(), &req); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if n := gatherValue(t, reg, "keel_repl_server_inline_writes_total"); n != 0 {
		t.Fatalf("%v writes applied inline without a SyncApplier", n)
	}
}

// serveOne starts a replica (node 2) applying through app, which applies
// to mem, with workers workers, and a Peer (node 1) streaming to it; it
// returns the Peer and the replica's metrics registry.
func serveOne(t *testing.T, mem *memApplier, app repl.Applier, workers int) (*repl.Peer, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	r := startReplica(t, 2, mem, repl.ServerConfig{Applier: app, Workers: workers, Metrics: repl.NewMetrics(reg)})
	return newPeer(t, 1, r, repl.PeerConfig{}), reg
}

// gatherValue is the value of the unlabelled metric name in reg.
func gatherValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			m := mf.GetMetric()[0]
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("metric %s not gathered", name)
	return 0
}
