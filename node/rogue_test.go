package node

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"keel/ctl/coordapi"
	"keel/datapath/volume"
	"keel/netpath/repl"
)

// liar is an agent that always grants authority: a stand-in for a primary
// that has not heard it was deposed (partitioned from the coordinator
// within its lease, or a clock gone wrong).
type liar struct {
	vol   coordapi.VolumeID
	epoch coordapi.Epoch
}

func (l liar) Authority(coordapi.VolumeID, coordapi.Epoch, time.Time) bool { return true }
func (l liar) Assignment(vol coordapi.VolumeID) (coordapi.Assignment, bool) {
	return coordapi.Assignment{Volume: l.vol, Epoch: l.epoch, Role: coordapi.RolePrimary, InSync: true}, vol == l.vol
}
func (l liar) LeaseValid(time.Time) bool { return true }
func (l liar) ReportReplicaLoss(context.Context, coordapi.VolumeID, coordapi.Epoch, coordapi.NodeID, string) (coordapi.Assignment, error) {
	return coordapi.Assignment{}, errors.New("liar: no coordinator here")
}
func (l liar) RequestSync(context.Context, coordapi.VolumeID, coordapi.Epoch, coordapi.NodeID) (coordapi.SyncGrant, error) {
	return coordapi.SyncGrant{}, errors.New("liar: no coordinator here")
}
func (l liar) SyncRetryWait(int, coordapi.SyncGrant) time.Duration { return time.Second }
func (l liar) Rejoin(context.Context, coordapi.VolumeID, coordapi.Epoch, coordapi.NodeID, coordapi.SyncKind, int64) (coordapi.Assignment, error) {
	return coordapi.Assignment{}, errors.New("liar: no coordinator here")
}
func (l liar) Kick() {}

// newRogue builds a Backend that acts as v's primary at v's current epoch,
// replicating over real sockets to the given nodes, with its own local
// volume and an agent that never withdraws authority.
func newRogue(t *testing.T, v coordapi.Volume, to []*Node) *Backend {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	x := &replicator{
		self: "rogue", auth: liar{vol: v.ID, epoch: v.Epoch}, fence: repl.NewFence(nil),
		timing: testTiming.withDefaults(), m: newMetrics(nil), log: testLogger(t), ctx: ctx,
		peers: map[coordapi.NodeID]*peer{},
	}
	x.newPeer = func(id coordapi.NodeID, addr string) *repl.Peer {
		return repl.NewPeer(repl.PeerConfig{Self: NodeNum("rogue"), Node: NodeNum(id), Addr: addr,
			FrameTimeout: testTiming.FrameTimeout, Fence: x.fence, Logger: testLogger(t)})
	}
	x.raise = func(r *replica, e uint64) error { return r.vol.SetEpoch(e) }
	vol, err := volume.Create(filepath.Join(testDir(t), "rogue.vol"), v.Size, volume.Options{})
	if err != nil {
		t.Fatal(err)
	}
	num, _ := volumeNum(v.ID)
	r := newReplica(x, v.ID, num, v.Name, vol.Name(), vol)
	as := coordapi.Assignment{Volume: v.ID, Name: v.Name, Size: v.Size, Epoch: v.Epoch, Role: coordapi.RolePrimary, InSync: true}
	for _, n := range to {
		as.Peers = append(as.Peers, coordapi.Peer{Node: n.ID(), ReplAddr: n.ReplAddr(), Role: coordapi.RoleSecondary, InSync: true})
	}
	if err := r.apply(as); err != nil {
		t.Fatal(err)
	}
	for _, p := range r.view().peers {
		wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
		if err := p.rp.WaitUp(wctx); err != nil {
			t.Fatalf("stand-in primary cannot reach %s: %v", p.id, err)
		}
		wcancel()
	}
	t.Cleanup(func() {
		cancel()
		x.closePeers()
		vol.Close()
	})
	return &Backend{r: r}
}
