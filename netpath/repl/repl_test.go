package repl_test

import (
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"keel/datapath/iobuf"
	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// fill writes a pattern derived from id into p (cheaply: doubling copies).
func fill(p []byte, id uint64) {
	var seed [8]byte
	binary.LittleEndian.PutUint64(seed[:], id*0x9e3779b97f4a7c15+1)
	n := copy(p, seed[:])
	for n < len(p) {
		n += copy(p[n:], p[:n])
	}
}

// TestReplicatedWritesIdentical: a primary with two secondaries under
// concurrent overlapping writes, trims, zeroes and flushes from several
// goroutines, each holding the primary's range lock while it writes locally
// and fans out (as the volume does). Afterwards both replicas are
// byte-identical to the primary, and FUA, FLUSH and the degraded and sync
// flags reached the appliers.
func TestReplicatedWritesIdentical(t *testing.T) {
	const vol, size, block = 7, 1 << 20, 4096
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	reg := prometheus.NewRegistry()
	m := repl.NewMetrics(reg)
	var reps []*replica
	var peers []*repl.Peer
	for node := uint64(2); node <= 3; node++ {
		app := newMemApplier()
		app.addVolume(vol, size, 1)
		r := startReplica(t, node, app, repl.ServerConfig{Workers: 8, Metrics: m})
		reps = append(reps, r)
		// Large writes go MSG_ZEROCOPY (from 16 KiB), small ones writev.
		peers = append(peers, newPeer(t, 1, r, repl.PeerConfig{Metrics: m, ZeroCopyMin: 16 << 10}))
	}

	primary := make([]byte, size)
	locks := make([]sync.Mutex, size/block) // the primary's range lock, by block, taken in ascending order
	const writers, opsEach = 6, 150
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			results := make([]error, len(peers))
			for i := range opsEach {
				off := rng.IntN(size - 1)
				n := 1 + rng.IntN(min(32<<10, size-off))
				if rng.IntN(3) == 0 { // many small overlapping writes in one hot area
					off, n = rng.IntN(16<<10), 1+rng.IntN(8<<10)
				}
				req := repl.Request{Volume: vol, Epoch: 1, Offset: uint64(off)}
				switch rng.IntN(8) {
				case 0, 1:
					req.Flags |= replproto.FlagFUA
				case 2:
					req.Flags |= replproto.FlagDegraded
				case 3:
					req.Flags |= replproto.FlagSync
				}
				var buf *iobuf.Buf
				kind := rng.IntN(20)
				lo, hi := off/block, (off+n-1)/block
				if kind == 0 { // FLUSH takes no range lock
					req.Type, req.Flags, req.Offset = replproto.TypeFlush, 0, 0
					lo, hi = 0, -1
				}
				for b := lo; b <= hi; b++ {
					locks[b].Lock()
				}
				switch {
				case kind == 0:
				case kind == 1:
					req.Type, req.Length = replproto.TypeTrim, uint32(n)
					clear(primary[off : off+n])
				case kind == 2:
					req.Type, req.Length = replproto.TypeZeroes, uint32(n)
					req.Flags |= replproto.FlagNoHole
					clear(primary[off : off+n])
				default:
					buf = iobuf.Get(n)
					fill(buf.Bytes(), uint64(w)<<32|uint64(i))
					copy(primary[off:], buf.Bytes())
					req.Type, req.Payload = replproto.TypeWrite, buf.Bytes()
				}
				err := repl.Fanout(context.Background(), peers, &req, results)
				for b := lo; b <= hi; b++ {
					locks[b].Unlock()
				}
				if buf != nil {
					buf.Release()
				}
				if err != nil {
					t.Errorf("writer %d op %d (%s): %v", w, i, req.Type, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	results := make([]error, len(peers))
	if err := repl.Fanout(context.Background(), peers, &repl.Request{Type: replproto.TypeFlush, Volume: vol, Epoch: 1}, results); err != nil {
		t.Fatalf("final flush: %v", err)
	}
	want := sum(primary)
	for _, r := range reps {
		data, durable, st := r.app.snapshot(vol)
		if got := sum(data); got != want {
			t.Errorf("replica %d: checksum %s, primary %s", r.node, got, want)
		}
		if got := sum(durable); got != want {
			t.Errorf("replica %d: durable checksum %s after FLUSH, want %s", r.node, got, want)
		}
		if st.fua == 0 || st.flushes == 0 || st.trims == 0 || st.zeroes == 0 || st.noHole != st.zeroes || st.degraded == 0 || st.synced == 0 {
			t.Errorf("replica %d: writes %d fua %d flushes %d trims %d zeroes %d (nohole %d) degraded %d sync %d: a flag or type did not arrive",
				r.node, st.writes, st.fua, st.flushes, st.trims, st.zeroes, st.noHole, st.degraded, st.synced)
		}
		t.Logf("replica %d: %d writes (%d FUA), %d flushes, %d trims, %d zeroes: checksum %s", r.node, st.writes, st.fua, st.flushes, st.trims, st.zeroes, want)
	}
	if v := metricSum(t, reg, "keel_repl_inflight_frames"); v != 0 {
		t.Errorf("in-flight frames gauge %v after all answers, want 0", v)
	}
	if v := metricSum(t, reg, "keel_repl_user_copy_bytes_total"); v != 0 {
		t.Errorf("user-space copies %v bytes", v)
	}
	zcSends := metricSum(t, reg, "keel_repl_zerocopy_sends_total")
	unsupported := metricSum(t, reg, "keel_repl_zerocopy_fallback_total")
	if zcSends == 0 && unsupported == 0 {
		t.Error("no MSG_ZEROCOPY send and no fallback counted for the large writes")
	}
	t.Logf("MSG_ZEROCOPY sends %v, copied by the kernel %v, zero-copy bytes %v, kernel-copied bytes %v of %v payload bytes",
		zcSends, metricSum(t, reg, "keel_repl_zerocopy_copied_total"), metricSum(t, reg, "keel_repl_zerocopy_bytes_total"),
		metricSum(t, reg, "keel_repl_kernel_copy_bytes_total"), metricSum(t, reg, "keel_repl_payload_bytes_total"))
}

// TestOverlappingFramesApplyInStreamOrder pipelines overlapping writes on
// one stream without waiting (as catch-up interleaved with live writes
// will): the replica, applying with many workers, ends equal to applying
// them in order.
func TestOverlappingFramesApplyInStreamOrder(t *testing.T) {
	const vol, size = 1, 64 << 10
	app := newMemApplier()
	app.addVolume(vol, size, 1)
	r := startReplica(t, 2, app, repl.ServerConfig{Workers: 16})
	// ZeroCopyMin -1: one connection for frames and replies (no split).
	p := newPeer(t, 1, r, repl.PeerConfig{WindowFrames: 64, ZeroCopyMin: -1})
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	const n = 1500
	model := make([]byte, size)
	ops := make([]repl.Op, n)
	bufs := make([]*iobuf.Buf, n)
	var wg sync.WaitGroup
	wg.Add(n)
	done := func(*repl.Op) { wg.Done() }
	for i := range ops {
		off := rng.IntN(size - 1)
		l := 1 + rng.IntN(min(8<<10, size-off))
		bufs[i] = iobuf.Get(l)
		fill(bufs[i].Bytes(), uint64(i))
		copy(model[off:], bufs[i].Bytes())
		ops[i] = repl.Op{Req: repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Offset: uint64(off), Payload: bufs[i].Bytes()}, Done: done}
		p.Submit(context.Background(), &ops[i])
	}
	wg.Wait()
	for i := range ops {
		if err := ops[i].Err(); err != nil {
			t.Fatalf("op %d: %v", i, err)
		}
		bufs[i].Release()
	}
	data, _, _ := app.snapshot(vol)
	if sum(data) != sum(model) {
		t.Fatalf("replica %s differs from the in-order result %s", sum(data), sum(model))
	}
}

// TestDisjointConcurrentOverlappingWaits holds one write inside the
// replica's disk: a disjoint write completes meanwhile, an overlapping one
// waits for it and lands after it.
func TestDisjointConcurrentOverlappingWaits(t *testing.T) {
	const vol = 1
	app := newMemApplier()
	app.addVolume(vol, 64<<10, 1)
	app.holdAt[0] = true
	r := startReplica(t, 2, app, repl.ServerConfig{Workers: 4})
	p := newPeer(t, 1, r, repl.PeerConfig{})
	write := func(off int, b byte, n int) repl.Request {
		buf := make([]byte, n)
		for i := range buf {
			buf[i] = b
		}
		return repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Offset: uint64(off), Payload: buf}
	}
	aDone := make(chan error, 1)
	a := repl.Op{Req: write(0, 'A', 4096), Done: func(op *repl.Op) { aDone <- op.Err() }}
	p.Submit(context.Background(), &a)
	within(t, app.entered, 10*time.Second, "write A to reach the disk")

	b := write(8192, 'B', 4096) // disjoint: runs while A is held
	if err := p.Send(context.Background(), &b); err != nil {
		t.Fatalf("disjoint write: %v", err)
	}
	cDone := make(chan error, 1)
	c := repl.Op{Req: write(2048, 'C', 4096), Done: func(op *repl.Op) { cDone <- op.Err() }}
	p.Submit(context.Background(), &c) // overlaps A: must wait
	d := write(16384, 'D', 512)
	if err := p.Send(context.Background(), &d); err != nil { // registered after C
		t.Fatalf("write D: %v", err)
	}
	select {
	case err := <-cDone:
		t.Fatalf("overlapping write C finished (%v) while A was still held", err)
	case err := <-aDone:
		t.Fatalf("A finished (%v) while held", err)
	default:
	}
	app.release <- struct{}{}
	if err := within(t, aDone, 10*time.Second, "A"); err != nil {
		t.Fatal(err)
	}
	if err := within(t, cDone, 10*time.Second, "C"); err != nil {
		t.Fatal(err)
	}
	data, _, _ := app.snapshot(vol)
	if data[0] != 'A' || data[2047] != 'A' || data[2048] != 'C' || data[6143] != 'C' || data[8192] != 'B' {
		t.Fatalf("overlap applied out of order: %q %q %q %q", data[0], data[2048], data[4095], data[8192])
	}
}

// TestFlushAndFUASemantics: a write without FUA is in the replica's cache
// only; FUA writes and everything acknowledged before a FLUSH are durable.
func TestFlushAndFUASemantics(t *testing.T) {
	const vol = 3
	app := newMemApplier()
	app.addVolume(vol, 1<<20, 1)
	r := startReplica(t, 2, app, repl.ServerConfig{})
	p := newPeer(t, 1, r, repl.PeerConfig{ZeroCopyMin: -1})
	ctx := context.Background()
	w := repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Offset: 0, Payload: []byte("cached")}
	if err := p.Send(ctx, &w); err != nil {
		t.Fatal(err)
	}
	f := repl.Request{Type: replproto.TypeWrite, Flags: replproto.FlagFUA, Volume: vol, Epoch: 1, Offset: 4096, Payload: []byte("forced")}
	if err := p.Send(ctx, &f); err != nil {
		t.Fatal(err)
	}
	_, durable, _ := app.snapshot(vol)
	if string(durable[4096:4102]) != "forced" {
		t.Fatal("acknowledged FUA write is not durable")
	}
	if string(durable[0:6]) == "cached" {
		t.Fatal("the double made a non-FUA write durable: the test cannot tell FLUSH apart")
	}
	if err := p.Send(ctx, &repl.Request{Type: replproto.TypeFlush, Volume: vol, Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	_, durable, _ = app.snapshot(vol)
	if string(durable[0:6]) != "cached" {
		t.Fatal("write acknowledged before FLUSH is not durable after the FLUSH reply")
	}
}

// TestStaleEpochFencesOldPrimary over real sockets: a new primary's frame
// raises the replica's epoch (persisted before it is acknowledged); the
// old primary's next write is refused with the replica's epoch, and its
// Fence flips at once, so that later writes are refused without being sent.
// With a SyncApplier every write here is alone on its stream and applied
// on the stream's reader: the epoch must still be persisted first.
func TestStaleEpochFencesOldPrimary(t *testing.T) {
	t.Run("workers", func(t *testing.T) { testStaleEpochFences(t, false) })
	t.Run("inline", func(t *testing.T) { testStaleEpochFences(t, true) })
}

func testStaleEpochFences(t *testing.T, inline bool) {
	const vol = 5
	app := newMemApplier()
	app.addVolume(vol, 1<<20, 1)
	app.record = true
	var cfg repl.ServerConfig
	if inline {
		cfg.Applier = &syncApplier{memApplier: app}
	}
	r := startReplica(t, 2, app, cfg)
	fenced := make(chan [2]uint64, 4)
	oldFence := repl.NewFence(func(v, e uint64) { fenced <- [2]uint64{v, e} })
	old := newPeer(t, 1, r, repl.PeerConfig{Fence: oldFence})
	newer := newPeer(t, 3, r, repl.PeerConfig{})
	ctx := context.Background()
	w := func(epoch uint64, off uint64) *repl.Request {
		return &repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: epoch, Offset: off, Payload: []byte("data")}
	}
	if err := old.Send(ctx, w(1, 0)); err != nil {
		t.Fatalf("old primary at epoch 1: %v", err)
	}
	if err := newer.Send(ctx, w(2, 4096)); err != nil {
		t.Fatalf("new primary at epoch 2: %v", err)
	}
	if e, _ := app.Epoch(vol); e != 2 {
		t.Fatalf("replica epoch %d after a frame of epoch 2", e)
	}
	err := old.Send(ctx, w(1, 8192))
	var ne *repl.NackError
	if !errors.Is(err, repl.ErrFenced) || !errors.As(err, &ne) || ne.Epoch != 2 || ne.Seq == 0 {
		t.Fatalf("stale write: %v, want a stale-epoch NACK carrying epoch 2", err)
	}
	if !oldFence.Fenced(vol, 1) || oldFence.Fenced(vol, 2) {
		t.Fatal("old primary's Fence did not flip to epoch 2")
	}
	if got := within(t, fenced, time.Second, "OnFenced"); got != [2]uint64{vol, 2} {
		t.Fatalf("OnFenced(%v)", got)
	}
	_, _, before := app.snapshot(vol)
	err = old.Send(ctx, w(1, 12288))
	if !errors.As(err, &ne) || ne.Seq != 0 || !errors.Is(err, repl.ErrFenced) {
		t.Fatalf("write of a fenced volume: %v, want a refusal before sending", err)
	}
	data, _, after := app.snapshot(vol)
	if after.writes != before.writes || string(data[8192:8196]) == "data" || string(data[12288:12292]) == "data" {
		t.Fatal("a stale primary's write reached the replica's disk")
	}
	// The node raises the epoch (e.g. the coordinator moved on again).
	if err := r.srv.RaiseEpoch(vol, 3); err != nil {
		t.Fatal(err)
	}
	if err := newer.Send(ctx, w(2, 4096)); !errors.Is(err, repl.ErrFenced) {
		t.Fatalf("epoch-2 write after RaiseEpoch(3): %v", err)
	}
	app.mu.Lock()
	log := append([]string(nil), app.log...)
	app.mu.Unlock()
	want := []string{"write 0+4", "epoch 2", "write 4096+4", "epoch 3"}
	if len(log) != len(want) {
		t.Fatalf("applier log %q, want %q", log, want)
	}
	for i := range want {
		if log[i] != want[i] {
			t.Fatalf("applier log %q, want %q (epoch persisted before the write at it)", log, want)
		}
	}
}

// TestReplicaErrorsReportPeerLost: a replica's disk error and an unknown
// volume fail only that frame, carry the errno, and report the peer lost
// for that volume; the stream stays up.
func TestReplicaErrorsReportPeerLost(t *testing.T) {
	app := newMemApplier()
	app.addVolume(1, 1<<20, 1)
	app.vols[1].failWrite = syscall.ENOSPC
	app.addVolume(2, 1<<20, 1)
	r := startReplica(t, 2, app, repl.ServerConfig{})
	lost := make(chan repl.Loss, 4)
	p := newPeer(t, 1, r, repl.PeerConfig{OnPeerLost: func(l repl.Loss) { lost <- l }})
	ctx := context.Background()
	err := p.Send(ctx, &repl.Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Payload: []byte("x")})
	if !errors.Is(err, syscall.ENOSPC) || !errors.Is(err, repl.ErrRefused) {
		t.Fatalf("disk error: %v, want ENOSPC", err)
	}
	if l := within(t, lost, time.Second, "OnPeerLost"); l.Volume != 1 || l.Peer != 2 || !errors.Is(l.Err, syscall.ENOSPC) {
		t.Fatalf("loss %+v", l)
	}
	err = p.Send(ctx, &repl.Request{Type: replproto.TypeTrim, Volume: 99, Epoch: 1, Length: 10})
	if !errors.Is(err, repl.ErrUnknownVolume) {
		t.Fatalf("unknown volume: %v", err)
	}
	if l := within(t, lost, time.Second, "OnPeerLost"); l.Volume != 99 {
		t.Fatalf("loss %+v", l)
	}
	err = p.Send(ctx, &repl.Request{Type: replproto.TypeWrite, Volume: 2, Epoch: 1, Offset: 1 << 20, Payload: []byte("x")})
	if !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("write past the end: %v", err)
	}
	<-lost
	if err := p.Send(ctx, &repl.Request{Type: replproto.TypeWrite, Volume: 2, Epoch: 1, Payload: []byte("ok")}); err != nil {
		t.Fatalf("stream unusable after refusals: %v", err)
	}
}

// TestSecondaryLossFailsPending cuts the replica's side of the stream with
// frames in flight (one held in the replica's disk, one waiting behind it):
// OnPeerLost fires, both fail with ErrPeerLost (never a silent success),
// and the Peer reconnects.
func TestSecondaryLossFailsPending(t *testing.T) {
	const vol = 1
	app := newMemApplier()
	app.addVolume(vol, 1<<20, 1)
	app.holdAt[0] = true
	r := startReplica(t, 2, app, repl.ServerConfig{})
	lost := make(chan repl.Loss, 4)
	p := newPeer(t, 1, r, repl.PeerConfig{OnPeerLost: func(l repl.Loss) { lost <- l },
		BackoffMin: time.Millisecond, BackoffMax: 10 * time.Millisecond})
	results := make(chan error, 2)
	ops := []repl.Op{
		{Req: repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Offset: 0, Payload: make([]byte, 4096)}},
		{Req: repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Offset: 1024, Payload: make([]byte, 4096)}},
	}
	for i := range ops {
		ops[i].Done = func(op *repl.Op) { results <- op.Err() }
		p.Submit(context.Background(), &ops[i])
	}
	within(t, app.entered, 10*time.Second, "the first write to reach the disk")
	if r.l.cut(0) == 0 {
		t.Fatal("no connection to cut")
	}
	l := within(t, lost, 10*time.Second, "OnPeerLost")
	if l.Volume != 0 || l.Peer != 2 || !errors.Is(l.Err, repl.ErrPeerLost) {
		t.Fatalf("loss %+v", l)
	}
	for range ops {
		if err := within(t, results, 10*time.Second, "a pending op"); !errors.Is(err, repl.ErrPeerLost) {
			t.Fatalf("pending op ended with %v, want ErrPeerLost", err)
		}
	}
	app.release <- struct{}{} // let the replica finish the orphaned write
	app.mu.Lock()
	app.holdAt[0] = false
	app.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.WaitUp(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.Send(ctx, &repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Payload: []byte("again")}); err != nil {
		t.Fatalf("after reconnect: %v", err)
	}
}

// TestDownPeerRefusesAtOnce: with no stream up, a write fails with
// ErrPeerDown instead of waiting or succeeding.
func TestDownPeerRefusesAtOnce(t *testing.T) {
	p := repl.NewPeer(repl.PeerConfig{Self: 1, Node: 2, Addr: "127.0.0.1:1", BackoffMin: time.Hour})
	defer p.Close()
	err := p.Send(context.Background(), &repl.Request{Type: replproto.TypeFlush, Volume: 1, Epoch: 1})
	if !errors.Is(err, repl.ErrPeerDown) {
		t.Fatalf("write to a down peer: %v", err)
	}
	p.Close()
	if err := p.Send(context.Background(), &repl.Request{Type: replproto.TypeFlush, Volume: 1, Epoch: 1}); !errors.Is(err, repl.ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}

// metricSum adds up every sample of the counter or gauge name in reg.
func metricSum(tb testing.TB, reg *prometheus.Registry, name string) float64 {
	tb.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	var s float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			switch {
			case m.GetCounter() != nil:
				s += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				s += m.GetGauge().GetValue()
			}
		}
	}
	return s
}

// metricLabel returns the counter name{label=value}.
func metricLabel(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label && lp.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// TestEpochWriteFailureRefusesUntilForget: when the replica cannot persist
// a new epoch, neither that frame nor any later one is applied or
// acknowledged (they get EIO) until the node drops the server's state for
// the volume.
func TestEpochWriteFailureRefusesUntilForget(t *testing.T) {
	const vol = 4
	app := newMemApplier()
	app.addVolume(vol, 1<<20, 1)
	app.vols[vol].failEpoch = syscall.EIO
	r := startReplica(t, 2, app, repl.ServerConfig{})
	p := newPeer(t, 1, r, repl.PeerConfig{})
	ctx := context.Background()
	w := func(epoch uint64) error {
		return p.Send(ctx, &repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: epoch, Payload: []byte("e")})
	}
	if err := w(2); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write whose epoch cannot be persisted: %v, want EIO", err)
	}
	if err := w(2); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write after a failed epoch write: %v, want EIO", err)
	}
	if _, _, st := app.snapshot(vol); st.writes != 0 {
		t.Fatalf("%d writes applied on a replica whose epoch write failed", st.writes)
	}
	app.mu.Lock()
	app.vols[vol].failEpoch = nil
	app.mu.Unlock()
	if err := r.srv.Forget(vol); err != nil {
		t.Fatal(err)
	}
	if err := w(2); err != nil {
		t.Fatalf("after Forget: %v", err)
	}
	if e, _ := app.Epoch(vol); e != 2 {
		t.Fatalf("epoch %d after Forget and a write at 2", e)
	}
}
