package node

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"testing"
	"time"

	"keel/ctl/coordapi"
	"keel/datapath/dio"
	"keel/datapath/iobuf"
	"keel/datapath/layout"
	"keel/datapath/volume"
	"keel/netpath/repl"
)

// secondary is a replica side without a coordinator: a repl.Server on
// loopback applying to one volume file.
type secondary struct {
	id   coordapi.NodeID
	addr string
	vol  *volume.Volume
	mem  *dio.Mem // the device, for an in-memory secondary
	app  *applier
	r    *replica
	srv  *repl.Server
}

func startSecondary(tb testing.TB, id coordapi.NodeID, vol coordapi.VolumeID, size int64, mem bool) *secondary {
	tb.Helper()
	v, dev := benchVolume(tb, string(id), size, mem)
	return serveSecondary(tb, id, vol, v, dev)
}

// serveSecondary serves v as node id's replica of vol (and closes it at
// the end of the test).
func serveSecondary(tb testing.TB, id coordapi.NodeID, vol coordapi.VolumeID, v *volume.Volume, dev *dio.Mem) *secondary {
	tb.Helper()
	num, _ := volumeNum(vol)
	x := &replicator{self: id, m: newMetrics(nil), log: testLogger(tb), ctx: context.Background()}
	r := newReplica(x, vol, num, "", v.Name(), v)
	app := &applier{vols: map[uint64]*replica{num: r}}
	srv := repl.NewServer(repl.ServerConfig{Node: NodeNum(id), Applier: app, Logger: testLogger(tb)})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	go srv.Serve(l)
	tb.Cleanup(func() {
		srv.Close()
		v.Close()
	})
	return &secondary{id: id, addr: l.Addr().String(), vol: v, mem: dev, app: app, r: r, srv: srv}
}

// benchVolume is a volume file on the work disk, written once, or with
// mem a volume on an in-memory device (no disk: what is left is the
// replication path itself).
func benchVolume(tb testing.TB, name string, size int64, mem bool) (*volume.Volume, *dio.Mem) {
	tb.Helper()
	if mem {
		dev := dio.NewMem(dio.MemOptions{Name: name, Size: layout.DataOffset + size})
		v, err := volume.OpenDevice(dev, volume.Options{Create: true, Size: size})
		if err != nil {
			tb.Fatal(err)
		}
		return v, dev
	}
	v, err := volume.Create(filepath.Join(testDir(tb), name+".vol"), size, volume.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	prefill(tb, v)
	return v, nil
}

// prefill writes the whole volume once, so that benchmarks measure writes
// to allocated blocks, not ext4 converting preallocated (unwritten) extents.
func prefill(tb testing.TB, v *volume.Volume) {
	tb.Helper()
	buf := iobuf.Get(1 << 20)
	defer buf.Release()
	for off := int64(0); off < v.Size(); off += 1 << 20 {
		if err := v.WriteAt(buf.Bytes()[:min(1<<20, v.Size()-off)], off, false); err != nil {
			tb.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		tb.Fatal(err)
	}
}

// standalonePrimary is a Backend for vol at epoch 1 replicating to the
// given secondaries, with an agent that always grants authority.
func standalonePrimary(tb testing.TB, vol coordapi.VolumeID, size int64, to []*secondary, mem bool) *Backend {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	x := &replicator{
		self: "p", auth: liar{vol: vol, epoch: 1}, fence: repl.NewFence(nil),
		timing: testTiming.withDefaults(), m: newMetrics(nil), log: testLogger(tb), ctx: ctx,
		peers: map[coordapi.NodeID]*peer{},
	}
	x.newPeer = func(id coordapi.NodeID, addr string) *repl.Peer {
		return repl.NewPeer(repl.PeerConfig{Self: NodeNum("p"), Node: NodeNum(id), Addr: addr, Fence: x.fence, Logger: testLogger(tb)})
	}
	x.raise = func(r *replica, e uint64) error { return r.vol.SetEpoch(e) }
	v, _ := benchVolume(tb, "p", size, mem)
	num, _ := volumeNum(vol)
	r := newReplica(x, vol, num, "bench", v.Name(), v)
	as := coordapi.Assignment{Volume: vol, Epoch: 1, Role: coordapi.RolePrimary, InSync: true}
	for _, s := range to {
		as.Peers = append(as.Peers, coordapi.Peer{Node: s.id, ReplAddr: s.addr, Role: coordapi.RoleSecondary, InSync: true})
	}
	if err := r.apply(as); err != nil {
		tb.Fatal(err)
	}
	for _, p := range r.view().peers {
		wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
		if err := p.rp.WaitUp(wctx); err != nil {
			tb.Fatal(err)
		}
		wcancel()
	}
	tb.Cleanup(func() {
		cancel()
		x.closePeers()
		v.Close()
	})
	return &Backend{r: r}
}

// BenchmarkWrite4KQD1: 4 KiB random writes at queue depth 1 through the
// Backend, unreplicated and replicated over loopback TCP to one and two
// secondaries in this process; to volume files on the work disk, and to
// in-memory devices (which leaves the cost of the replication path).
func BenchmarkWrite4KQD1(b *testing.B) {
	for _, disk := range []string{"file", "mem"} {
		for _, replicas := range []int{1, 2, 3} {
			b.Run(fmt.Sprintf("%s/replicas=%d", disk, replicas), func(b *testing.B) {
				benchWrite(b, replicas, disk == "mem")
			})
		}
	}
}

func benchWrite(b *testing.B, replicas int, mem bool) {
	size := int64(64 << 20)
	if mem {
		size = 16 << 20
	}
	var to []*secondary
	for i := 1; i < replicas; i++ {
		to = append(to, startSecondary(b, coordapi.NodeID(fmt.Sprintf("s%d", i)), "vol-1", size, mem))
	}
	be := standalonePrimary(b, "vol-1", size, to, mem)
	buf := iobuf.Get(4096)
	defer buf.Release()
	p := buf.Bytes()
	for i := range p {
		p[i] = byte(i)
	}
	r := rand.New(rand.NewPCG(1, 2))
	// Warm up: streams, pools.
	for range 200 {
		if err := be.WriteAt(p, r.Int64N(size/4096)*4096, false); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if err := be.WriteAt(p, r.Int64N(size/4096)*4096, false); err != nil {
			b.Fatal(err)
		}
	}
}

// TestReplicatedWriteAllocs: a replicated 4 KiB write allocates nothing in
// steady state on the primary's path through the Backend (the replica
// server's side is netpath/repl's to keep at zero).
func TestReplicatedWriteAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	s := startSecondary(t, "s1", "vol-1", 8<<20, true)
	be := standalonePrimary(t, "vol-1", 8<<20, []*secondary{s}, true)
	buf := iobuf.Get(4096)
	defer buf.Release()
	for range 100 {
		if err := be.WriteAt(buf.Bytes(), 0, false); err != nil {
			t.Fatal(err)
		}
	}
	allocs := testing.AllocsPerRun(500, func() {
		if err := be.WriteAt(buf.Bytes(), 4096, false); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 0.5 {
		t.Fatalf("replicated write allocates %.1f times per call", allocs)
	}
}
