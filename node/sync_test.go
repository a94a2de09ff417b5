package node

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"keel/ctl/coordapi"
	"keel/datapath/dio"
	"keel/datapath/layout"
	"keel/datapath/volume"
	"keel/netpath/repl"
)

// fakeCoord is a coordinator agent for the sync engine's tests, without a
// coordinator: it holds one primary assignment and changes it the way the
// coordinator does (a loss takes the member out of the in-sync set at the
// next epoch, a rejoin puts it back at the next epoch), grants every slot,
// and records what it was asked.
type fakeCoord struct {
	mu       sync.Mutex
	as       coordapi.Assignment
	kind     coordapi.SyncKind
	losses   []coordapi.NodeID
	granted  int
	rejoined chan int64 // the copied bytes of each rejoin
}

func newFakeCoord(as coordapi.Assignment, kind coordapi.SyncKind) *fakeCoord {
	return &fakeCoord{as: as, kind: kind, rejoined: make(chan int64, 8)}
}

func (f *fakeCoord) assignment() coordapi.Assignment {
	f.mu.Lock()
	defer f.mu.Unlock()
	as := f.as
	as.Peers = slices.Clone(f.as.Peers)
	return as
}

// set changes a member and moves to the next epoch; it returns the new
// assignment.
func (f *fakeCoord) set(id coordapi.NodeID, inSync, live bool) coordapi.Assignment {
	f.mu.Lock()
	for i := range f.as.Peers {
		if f.as.Peers[i].Node == id {
			f.as.Peers[i].InSync, f.as.Peers[i].Live = inSync, live
		}
	}
	f.as.Epoch++
	f.mu.Unlock()
	return f.assignment()
}

func (f *fakeCoord) Authority(vol coordapi.VolumeID, e coordapi.Epoch, _ time.Time) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return vol == f.as.Volume && e == f.as.Epoch
}

func (f *fakeCoord) Assignment(vol coordapi.VolumeID) (coordapi.Assignment, bool) {
	return f.assignment(), vol == f.as.Volume
}

func (f *fakeCoord) LeaseValid(time.Time) bool { return true }

func (f *fakeCoord) ReportReplicaLoss(_ context.Context, _ coordapi.VolumeID, e coordapi.Epoch, lost coordapi.NodeID, _ string) (coordapi.Assignment, error) {
	f.mu.Lock()
	f.losses = append(f.losses, lost)
	stale := e != f.as.Epoch
	f.mu.Unlock()
	if stale {
		return coordapi.Assignment{}, &coordapi.Error{Code: coordapi.CodeStaleEpoch, Message: "stale"}
	}
	return f.set(lost, false, false), nil
}

func (f *fakeCoord) RequestSync(_ context.Context, _ coordapi.VolumeID, e coordapi.Epoch, _ coordapi.NodeID) (coordapi.SyncGrant, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if e != f.as.Epoch {
		return coordapi.SyncGrant{}, &coordapi.Error{Code: coordapi.CodeStaleEpoch, Message: "stale"}
	}
	f.granted++
	return coordapi.SyncGrant{Granted: true, Kind: f.kind}, nil
}

func (f *fakeCoord) SyncRetryWait(int, coordapi.SyncGrant) time.Duration {
	return 10 * time.Millisecond
}

func (f *fakeCoord) Rejoin(_ context.Context, _ coordapi.VolumeID, e coordapi.Epoch, target coordapi.NodeID, _ coordapi.SyncKind, copied int64) (coordapi.Assignment, error) {
	f.mu.Lock()
	stale := e != f.as.Epoch
	f.mu.Unlock()
	if stale {
		return coordapi.Assignment{}, &coordapi.Error{Code: coordapi.CodeStaleEpoch, Message: "stale"}
	}
	as := f.set(target, true, true)
	f.rejoined <- copied
	return as, nil
}

func (f *fakeCoord) Kick() {}

// memVolume is a volume on an in-memory crashable device with 64 KiB
// write-intent regions.
func memVolume(t testing.TB, name string, size int64, seed uint64) (*volume.Volume, *dio.Mem) {
	t.Helper()
	dev := dio.NewMem(dio.MemOptions{Name: name, Size: layout.DataOffset + size, Torn: true, Seed: seed})
	v, err := volume.OpenDevice(dev, volume.Options{Create: true, Size: size, RegionSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	return v, dev
}

// testPrimary is a replica acting as primary under a fakeCoord.
func testPrimary(t testing.TB, vol *volume.Volume, fc *fakeCoord) *replica {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	x := &replicator{
		self: "p", auth: fc, fence: repl.NewFence(nil),
		timing: testTiming.withDefaults(), m: newMetrics(nil), log: testLogger(t), ctx: ctx,
		peers: map[coordapi.NodeID]*peer{},
	}
	x.newPeer = func(id coordapi.NodeID, addr string) *repl.Peer {
		return repl.NewPeer(repl.PeerConfig{Self: NodeNum("p"), Node: NodeNum(id), Addr: addr, Fence: x.fence,
			FrameTimeout: testTiming.FrameTimeout, Logger: testLogger(t)})
	}
	x.raise = func(r *replica, e uint64) error { return r.vol.SetEpoch(e) }
	num, _ := volumeNum(fc.as.Volume)
	r := newReplica(x, fc.as.Volume, num, "sync", vol.Name(), vol)
	t.Cleanup(func() {
		cancel()
		r.stopSyncs()
		x.closePeers()
	})
	return r
}

func volumeSum(t testing.TB, v *volume.Volume) [32]byte {
	t.Helper()
	p := make([]byte, v.Size())
	if err := v.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(p)
}

func waitRejoin(t testing.TB, fc *fakeCoord, within time.Duration) int64 {
	t.Helper()
	select {
	case n := <-fc.rejoined:
		return n
	case <-time.After(within):
		t.Fatalf("no rejoin within %v", within)
	}
	return 0
}

// primaryOf is this node's assignment as vol-1's primary at epoch 1 with
// peers.
func primaryOf(size int64, peers ...coordapi.Peer) coordapi.Assignment {
	return coordapi.Assignment{Volume: "vol-1", Size: size, Epoch: 1, Role: coordapi.RolePrimary, InSync: true, Peers: peers}
}

// secondaryPeer is a secondary member of vol-1 as an assignment lists it.
func secondaryPeer(id coordapi.NodeID, addr string, inSync, live bool) coordapi.Peer {
	return coordapi.Peer{Node: id, ReplAddr: addr, Role: coordapi.RoleSecondary, InSync: inSync, Live: live}
}

// TestCatchUpAfterPrimaryCrash is the write-intent bitmap's durability
// test (invariant 6): a primary whose only secondary is out of sync takes
// writes (each recorded in the bitmap before it is issued); its device is
// crashed (only what was synced survives, unsynced sectors torn at random)
// at a random point: between a write's bitmap mark and its local write, or
// after a write completed. It restarts on what the crash left and catches
// the secondary up from its bitmap alone: the replicas end byte-identical,
// every acknowledged (FUA) write is there, and what was copied is a small
// part of the volume.
func TestCatchUpAfterPrimaryCrash(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("KEEL_TEST_SEED"); s != "" {
		fmt.Sscan(s, &seed)
	}
	for i := range uint64(4) {
		s := seed + i
		t.Run(fmt.Sprintf("seed=%d", s), func(t *testing.T) {
			t.Logf("seed %d (KEEL_TEST_SEED=%d reproduces the first run)", s, s)
			crashCatchUp(t, s)
		})
	}
}

func crashCatchUp(t *testing.T, seed uint64) {
	const size = 8 << 20
	rng := rand.New(rand.NewPCG(seed, 7))
	sec := startSecondary(t, "s1", "vol-1", size, true)
	pvol, pmem := memVolume(t, "p", size, seed)
	as := primaryOf(size, secondaryPeer("s1", sec.addr, true, true))
	fc := newFakeCoord(as, coordapi.SyncCatchUp)
	r := testPrimary(t, pvol, fc)
	if err := r.apply(fc.assignment()); err != nil {
		t.Fatal(err)
	}
	be := &Backend{r: r}
	// In sync: the whole volume written on both, and flushed.
	want := make([]byte, size)
	var key [32]byte
	key[0], key[1] = byte(seed), byte(seed>>8)
	rand.NewChaCha8(key).Read(want)
	for off := 0; off < size; off += 1 << 20 {
		if err := be.WriteAt(want[off:off+1<<20], int64(off), false); err != nil {
			t.Fatal(err)
		}
	}
	if err := be.Flush(); err != nil {
		t.Fatal(err)
	}
	// The secondary drops out (its node is down: no sync starts).
	if err := r.apply(fc.set("s1", false, false)); err != nil {
		t.Fatal(err)
	}
	if v := r.view(); !v.degraded || len(v.peers) != 0 {
		t.Fatalf("view after the loss: degraded %v, peers %v", v.degraded, v.peerIDs())
	}
	// Degraded writes (FUA: each is durable once acknowledged), in a few
	// hot areas; the device crashes during op crashAt.
	const ops = 60
	crashAt := rng.IntN(ops)
	beforeLocal := rng.IntN(2) == 0
	var crashed *dio.Mem
	crashNow := false
	r.x.testAfterSend = func(int64) {
		if crashNow && crashed == nil {
			crashed = pmem.Crash()
		}
	}
	hot := []int64{0, 3 << 20, 5<<20 + 64<<10}
	var inflight [2]int64 // the range of the op the crash interrupted
	for i := range ops {
		off := hot[rng.IntN(len(hot))] + rng.Int64N(256<<10)&^4095
		n := int64(4096 * (1 + rng.IntN(16)))
		data := make([]byte, n)
		key[2] = byte(i)
		rand.NewChaCha8(key).Read(data)
		if i == crashAt && beforeLocal {
			crashNow = true // the hook crashes between this op's mark and its local write
			inflight = [2]int64{off, off + n}
		}
		var err error
		if rng.IntN(8) == 0 {
			err = be.WriteZeroes(off, n, false, false, true)
			clear(data)
		} else {
			err = be.WriteAt(data, off, true)
		}
		if err != nil {
			t.Fatalf("degraded op %d: %v", i, err)
		}
		if crashed != nil {
			break
		}
		copy(want[off:], data)
		if i == crashAt {
			crashed = pmem.Crash()
			break
		}
	}
	if crashed == nil {
		t.Fatal("the crash point was not reached")
	}
	t.Logf("crashed at op %d (%s)", crashAt, map[bool]string{true: "between a mark and its local write", false: "after a write completed"}[beforeLocal])
	// The old process is gone: its streams too.
	r.stopSyncs()
	r.x.closePeers()
	// Restart on what the crash left; the secondary's node is back.
	pvol2, err := volume.OpenDevice(crashed, volume.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pvol2.Close() })
	dirty := pvol2.DirtyBytes()
	if dirty == 0 {
		t.Fatal("the bitmap is empty after degraded writes and a crash")
	}
	r2 := testPrimary(t, pvol2, fc)
	if err := r2.apply(fc.set("s1", false, true)); err != nil {
		t.Fatal(err)
	}
	copied := waitRejoin(t, fc, 30*time.Second)
	eventually(t, "the rejoin's assignment acted on", 10*time.Second, func() error {
		if v := r2.view(); !v.has(NodeNum("s1")) || v.degraded {
			return fmt.Errorf("in sync %v, degraded %v", v.peerIDs(), v.degraded)
		}
		if r2.marked.Load() || pvol2.DirtyBytes() != 0 {
			return fmt.Errorf("bitmap not cleared once every member is in sync: %d dirty bytes", pvol2.DirtyBytes())
		}
		return nil
	})
	if got, exp := volumeSum(t, sec.vol), volumeSum(t, pvol2); got != exp {
		t.Fatal("replicas differ after the catch-up")
	}
	got := make([]byte, size)
	if err := pvol2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if inflight[1] > 0 {
		copy(want[inflight[0]:inflight[1]], got[inflight[0]:inflight[1]]) // either is right
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("an acknowledged write is missing after the crash: first difference at byte %d", i)
	}
	if copied <= 0 || copied > dirty || copied >= size/2 {
		t.Fatalf("catch-up copied %d bytes; the bitmap marked %d of %d", copied, dirty, size)
	}
	t.Logf("catch-up copied %d bytes of an %d-byte volume (%.1f%%)", copied, size, 100*float64(copied)/size)
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// primaryOfTwo starts two in-memory secondaries of vol-1 (s1 in sync, s2
// in sync as s2InSync says) and a primary of an in-memory volume (seeded
// with seed) whose fake coordinator grants kind; nothing is applied yet.
func primaryOfTwo(t *testing.T, size int64, seed uint64, s2InSync bool, kind coordapi.SyncKind) (s1, s2 *secondary, pvol *volume.Volume, fc *fakeCoord, r *replica) {
	t.Helper()
	s1 = startSecondary(t, "s1", "vol-1", size, true)
	s2 = startSecondary(t, "s2", "vol-1", size, true)
	pvol, _ = memVolume(t, "p", size, seed)
	t.Cleanup(func() { pvol.Close() })
	as := primaryOf(size, secondaryPeer("s1", s1.addr, true, true), secondaryPeer("s2", s2.addr, s2InSync, true))
	fc = newFakeCoord(as, kind)
	return s1, s2, pvol, fc, testPrimary(t, pvol, fc)
}

// TestCatchingPeerFailure: while a member is being caught up it gets every
// live write; when those fail (its replica went away), the client's writes
// still succeed on the in-sync set, nothing is reported lost, and the sync
// starts over once the member is back and brings it in sync: the replicas
// end identical.
func TestCatchingPeerFailure(t *testing.T) {
	const size = 4 << 20
	s1, s2, pvol, fc, r := primaryOfTwo(t, size, 1, false, coordapi.SyncRemirror)
	be := &Backend{r: r}
	// The copy stops at its first range until the test has broken the
	// member and written.
	entered, resume := make(chan struct{}), make(chan struct{})
	var first atomic.Bool
	r.x.testBeforeRegion = func(off, n int64) {
		if first.CompareAndSwap(false, true) {
			close(entered)
			<-resume
		}
	}
	if err := r.apply(fc.assignment()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-entered:
	case <-time.After(30 * time.Second):
		t.Fatal("the sync did not start")
	}
	if v := r.view(); len(v.catching) != 1 || !v.degraded {
		t.Fatalf("view while copying: catching %d, degraded %v", len(v.catching), v.degraded)
	}
	// The heartbeat reports the copy (which keeps its slot).
	if reps := r.syncReports(time.Now()); len(reps) != 1 || reps[0].Target != "s2" || reps[0].Kind != coordapi.SyncRemirror || reps[0].Total != size || reps[0].Done != 0 {
		t.Fatalf("sync reports while copying: %+v", reps)
	}
	// The member's replica goes away: frames to it are refused.
	s2.app.remove(s2.r)
	buf := bytes.Repeat([]byte{0x3c}, 64<<10)
	for i := range 8 {
		if err := be.WriteAt(buf, int64(i)*(256<<10), i%2 == 0); err != nil {
			t.Fatalf("write %d while the member being caught up fails: %v", i, err)
		}
	}
	if v := r.view(); len(v.catching) != 0 {
		t.Fatal("the failed member is still attached")
	}
	fc.mu.Lock()
	losses := slices.Clone(fc.losses)
	fc.mu.Unlock()
	if len(losses) != 0 {
		t.Fatalf("a catching member's failure was reported as a loss: %v", losses)
	}
	// It comes back; the sync starts over and finishes.
	s2.app.add(s2.r)
	close(resume)
	copied := waitRejoin(t, fc, 60*time.Second)
	if copied != size {
		t.Fatalf("re-mirror copied %d bytes, want %d", copied, size)
	}
	eventually(t, "the rejoin's assignment acted on", 10*time.Second, func() error {
		if v := r.view(); len(v.peers) != 2 || v.degraded {
			return fmt.Errorf("in sync %v, degraded %v", v.peerIDs(), v.degraded)
		}
		return nil
	})
	if err := be.Flush(); err != nil {
		t.Fatal(err)
	}
	p, a, b := volumeSum(t, pvol), volumeSum(t, s1.vol), volumeSum(t, s2.vol)
	if p != a || p != b {
		t.Fatalf("replicas differ: primary %x s1 %x s2 %x", p[:4], a[:4], b[:4])
	}
}

// TestRemirrorPipelined: a re-mirror keeps more than one range in flight
// (the second range is read and sent while the first is held before its
// send), and the member ends identical to the primary.
func TestRemirrorPipelined(t *testing.T) {
	const size = 4 * syncChunk
	s1, s2, pvol, fc, r := primaryOfTwo(t, size, 1, false, coordapi.SyncRemirror)
	// Data on the primary and the in-sync member that the out-of-sync one
	// lacks; no range is zero, so every range is read and sent as data.
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i/4096) ^ byte(i)
	}
	for _, v := range []*volume.Volume{pvol, s1.vol} {
		if err := v.WriteAt(data, 0, true); err != nil {
			t.Fatal(err)
		}
	}
	second := make(chan struct{})
	var entered atomic.Int32
	var overlapped atomic.Bool
	r.x.testInCopy = func(off, n int64) {
		switch entered.Add(1) {
		case 1: // hold the first range until another is being copied
			select {
			case <-second:
				overlapped.Store(true)
			case <-time.After(30 * time.Second):
			}
		case 2:
			close(second)
		}
	}
	if err := r.apply(fc.assignment()); err != nil {
		t.Fatal(err)
	}
	if copied := waitRejoin(t, fc, 90*time.Second); copied != size {
		t.Fatalf("re-mirror copied %d bytes, want %d", copied, size)
	}
	if !overlapped.Load() {
		t.Fatal("no second range was copied while the first was in flight: the copy is not pipelined")
	}
	if p, b := volumeSum(t, pvol), volumeSum(t, s2.vol); p != b {
		t.Fatalf("replicas differ after the re-mirror: primary %x s2 %x", p[:4], b[:4])
	}
}

// TestSecondaryMarksDegradedFrames: a secondary records the ranges of
// frames sent while a member is out of sync in its own bitmap (so that it
// can catch that member up if it is promoted), and clears the bitmap when
// a frame says every member is in sync again.
func TestSecondaryMarksDegradedFrames(t *testing.T) {
	const size = 4 << 20
	s1 := startSecondary(t, "s1", "vol-1", size, true)
	pvol, _ := memVolume(t, "p", size, 2)
	t.Cleanup(func() { pvol.Close() })
	as := primaryOf(size, secondaryPeer("s1", s1.addr, true, true), secondaryPeer("s2", "127.0.0.1:1", false, false))
	fc := newFakeCoord(as, coordapi.SyncCatchUp)
	r := testPrimary(t, pvol, fc)
	if err := r.apply(fc.assignment()); err != nil {
		t.Fatal(err)
	}
	be := &Backend{r: r}
	if err := be.WriteAt(fill(8192, 9), 1<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := be.Trim(3<<20, 4096, false); err != nil {
		t.Fatal(err)
	}
	var marked []int64
	s1.vol.DirtyRegions(func(off, n int64) bool { marked = append(marked, off); return true })
	if !slices.Equal(marked, []int64{1 << 20, 3 << 20}) {
		t.Fatalf("secondary's dirty regions %v, want the write's and the trim's", marked)
	}
	marked = marked[:0]
	pvol.DirtyRegions(func(off, n int64) bool { marked = append(marked, off); return true })
	if !slices.Equal(marked, []int64{1 << 20, 3 << 20}) {
		t.Fatalf("primary's dirty regions %v, want the write's and the trim's", marked)
	}
	// s2 is gone for good: every member left is in sync.
	as = fc.assignment()
	as.Peers = as.Peers[:1]
	as.Epoch++
	fc.mu.Lock()
	fc.as = as
	fc.mu.Unlock()
	if err := r.apply(as); err != nil {
		t.Fatal(err)
	}
	if pvol.DirtyBytes() != 0 {
		t.Fatal("primary's bitmap not cleared with every member in sync")
	}
	if err := be.WriteAt(fill(4096, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	if n := s1.vol.DirtyBytes(); n != 0 {
		t.Fatalf("secondary's bitmap holds %d bytes after an in-sync write", n)
	}
}

// TestLossMarksBeforeAck: a write that fails on an in-sync secondary is
// recorded in the bitmap before it is acknowledged, and the secondaries
// that took it are sent it again marked degraded.
func TestLossMarksBeforeAck(t *testing.T) {
	const size = 4 << 20
	s1, s2, pvol, fc, r := primaryOfTwo(t, size, 3, true, coordapi.SyncCatchUp)
	if err := r.apply(fc.assignment()); err != nil {
		t.Fatal(err)
	}
	be := &Backend{r: r}
	if err := be.WriteAt(fill(4096, 1), 0, true); err != nil { // FUA: durable on s2, not to copy
		t.Fatal(err)
	}
	s2.app.remove(s2.r) // s2 refuses: lost
	// The coordinator's answer is applied by the loss reporter; the fake
	// keeps s2 not live, so no sync starts.
	if err := be.WriteAt(fill(4096, 2), 2<<20, false); err != nil {
		t.Fatal(err)
	}
	fc.mu.Lock()
	losses := slices.Clone(fc.losses)
	fc.mu.Unlock()
	if !slices.Equal(losses, []coordapi.NodeID{"s2"}) {
		t.Fatalf("losses reported %v, want s2", losses)
	}
	var marked []int64
	pvol.DirtyRegions(func(off, n int64) bool { marked = append(marked, off); return true })
	if !slices.Equal(marked, []int64{2 << 20}) {
		t.Fatalf("primary's dirty regions %v, want the write that lost s2", marked)
	}
	marked = marked[:0]
	s1.vol.DirtyRegions(func(off, n int64) bool { marked = append(marked, off); return true })
	if !slices.Equal(marked, []int64{2 << 20}) {
		t.Fatalf("s1's dirty regions %v, want the write that lost s2 (sent again, degraded)", marked)
	}
}

// TestLostSecondaryUnflushedWrites: a secondary loses power: the writes it
// acknowledged since the last FLUSH (no FUA) are gone from its device. The
// primary records those regions in its bitmap when it loses the
// secondary, so the catch-up copies them and the replicas end identical.
func TestLostSecondaryUnflushedWrites(t *testing.T) {
	const size = 4 << 20
	sec := startSecondary(t, "s1", "vol-1", size, true)
	pvol, _ := memVolume(t, "p", size, 4)
	t.Cleanup(func() { pvol.Close() })
	as := primaryOf(size, secondaryPeer("s1", sec.addr, true, true))
	fc := newFakeCoord(as, coordapi.SyncCatchUp)
	r := testPrimary(t, pvol, fc)
	if err := r.apply(fc.assignment()); err != nil {
		t.Fatal(err)
	}
	be := &Backend{r: r}
	if err := be.WriteAt(fill(64<<10, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := be.Flush(); err != nil { // region 0 is durable everywhere
		t.Fatal(err)
	}
	if err := be.WriteAt(fill(64<<10, 2), 1<<20, false); err != nil { // acknowledged, not flushed
		t.Fatal(err)
	}
	// Power failure of the secondary: its device keeps what was synced.
	crashed := sec.mem.Crash()
	sec.srv.Close()
	if err := be.WriteAt(fill(4096, 3), 2<<20, false); err != nil { // finds it lost
		t.Fatalf("write after the secondary's loss: %v", err)
	}
	var marked []int64
	pvol.DirtyRegions(func(off, n int64) bool { marked = append(marked, off); return true })
	if !slices.Equal(marked, []int64{1 << 20, 2 << 20}) {
		t.Fatalf("dirty regions %v: want the unflushed write's and the lost request's", marked)
	}
	// It restarts on what the power failure left and is caught up.
	v2, err := volume.OpenDevice(crashed, volume.Options{})
	if err != nil {
		t.Fatal(err)
	}
	sec2 := serveSecondary(t, "s1", "vol-1", v2, crashed)
	fc.mu.Lock()
	fc.as.Peers[0].ReplAddr, fc.as.Peers[0].Live = sec2.addr, true
	fc.as.Epoch++
	fc.mu.Unlock()
	if err := r.apply(fc.assignment()); err != nil {
		t.Fatal(err)
	}
	if copied := waitRejoin(t, fc, 30*time.Second); copied != 2*(64<<10) {
		t.Fatalf("catch-up copied %d bytes, want two 64 KiB regions", copied)
	}
	if p, s := volumeSum(t, pvol), volumeSum(t, v2); p != s {
		t.Fatal("replicas differ after the catch-up: the unflushed write was not copied")
	}
}
