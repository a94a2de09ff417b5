package repl_test

import (
	"bytes"
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

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
// through WriteAtSync; one that arrives while another frame of the stream
// is being applied goes through WriteAt. Both land.
func TestSyncApplierAtDepthOne(t *testing.T) {
	const vol = 1
	app := &syncApplier{memApplier: newMemApplier()}
	app.addVolume(vol, 64<<10, 1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := repl.NewServer(repl.ServerConfig{Node: 2, Applier: app, Workers: 4})
	t.Cleanup(func() { srv.Close() })
	go srv.Serve(ln)
	p := newPeer(t, 1, &replica{node: 2, addr: ln.Addr().String()}, repl.PeerConfig{})
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

	app.mu.Lock()
	app.holdAt[32768] = true
	app.mu.Unlock()
	held := make(chan error, 1)
	a := repl.Op{Req: write(32768, 'H'), Done: func(op *repl.Op) { held <- op.Err() }}
	p.Submit(context.Background(), &a)
	within(t, app.entered, 10*time.Second, "the held write to reach the applier")
	b := write(16384, 'B') // the stream has the held frame in flight
	if err := p.Send(context.Background(), &b); err != nil {
		t.Fatalf("write at depth 2: %v", err)
	}
	if n := app.syncs.Load(); n != 4 {
		t.Fatalf("WriteAtSync calls %d, want 4 (the held write alone; not the one behind it)", n)
	}
	app.release <- struct{}{}
	if err := within(t, held, 10*time.Second, "the held write"); err != nil {
		t.Fatalf("held write: %v", err)
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
