package node

// An in-process cluster for the replication tests: one coordinator member
// (ctl/coordsvc, real raft on loopback) and nodes started with Start, all on
// loopback ports chosen by the kernel, data directories on the work disk.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
	"keel/ctl/coordsvc"
	"keel/datapath/layout"
)

// testLease: short enough that a failover takes a couple of seconds, long
// enough for two contended cores under -race (a node gets about four
// heartbeats per lease).
var testLease = coordapi.Lease{
	Duration: coordapi.Duration(2 * time.Second),
	MaxDrift: 0.01,
	Margin:   coordapi.Duration(200 * time.Millisecond),
	Interval: coordapi.Duration(400 * time.Millisecond),
}

var testRaft = coordsvc.RaftTiming{
	HeartbeatTimeout:   400 * time.Millisecond,
	ElectionTimeout:    400 * time.Millisecond,
	LeaderLeaseTimeout: 200 * time.Millisecond,
	CommitTimeout:      10 * time.Millisecond,
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("KEEL_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// testDir is a directory on the work disk (ext4 with real O_DIRECT
// alignment checks), never tmpfs.
func testDir(t testing.TB) string {
	base := os.Getenv("KEEL_TEST_DIR")
	if base == "" {
		base = os.TempDir()
	}
	dir, err := os.MkdirTemp(base, "keel-node-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func startCoord(t testing.TB, mod func(*coordsvc.Config)) (*coordsvc.Server, *coordclient.Client) {
	t.Helper()
	cfg := coordsvc.Config{
		ID: "c1", DataDir: filepath.Join(testDir(t), "coord"), Listen: "127.0.0.1:0", RaftAddr: "127.0.0.1:0",
		Coord: coordapi.Config{Lease: testLease, ReserveFraction: 0}, Raft: testRaft,
		TickInterval: 50 * time.Millisecond, Logger: testLogger(t).With("coord", "c1"),
	}
	if mod != nil {
		mod(&cfg)
	}
	s, err := coordsvc.New(cfg)
	if err != nil {
		t.Fatalf("starting the coordinator: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	c, err := coordclient.New(coordclient.Config{URLs: []string{s.APIURL()}, AttemptTimeout: 5 * time.Second, Attempts: 20,
		Backoff: coordclient.Backoff{Base: 50 * time.Millisecond, Max: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	return s, c
}

type testCluster struct {
	t      testing.TB
	coord  *coordsvc.Server
	client *coordclient.Client
	nodes  map[coordapi.NodeID]*Node
	dirs   map[coordapi.NodeID]string
}

var testTiming = Timing{LossWait: 20 * time.Second, PeerWait: 3 * time.Second, ImpairedAfter: time.Second, FrameTimeout: 3 * time.Second}

func newCluster(t testing.TB, n int) *testCluster {
	t.Helper()
	return newClusterWith(t, n, nil)
}

// newClusterWith starts a cluster whose coordinator configuration mod may
// change (e.g. its fault-injection hook).
func newClusterWith(t testing.TB, n int, mod func(*coordsvc.Config)) *testCluster {
	t.Helper()
	coord, client := startCoord(t, mod)
	c := &testCluster{t: t, coord: coord, client: client, nodes: map[coordapi.NodeID]*Node{}, dirs: map[coordapi.NodeID]string{}}
	for i := 1; i <= n; i++ {
		c.startNode(coordapi.NodeID(fmt.Sprintf("n%d", i)))
	}
	c.eventually("every node registered and up", 30*time.Second, func() error {
		nodes, err := client.Nodes(ctxT(t, 5*time.Second))
		if err != nil {
			return err
		}
		up := 0
		for _, nd := range nodes {
			if nd.State == coordapi.NodeUp {
				up++
			}
		}
		if up != n {
			return fmt.Errorf("%d of %d nodes up", up, n)
		}
		return nil
	})
	return c
}

func (c *testCluster) startNode(id coordapi.NodeID) *Node {
	c.t.Helper()
	dir := c.dirs[id]
	if dir == "" {
		dir = testDir(c.t)
		c.dirs[id] = dir
	}
	nd, err := Start(Config{
		ID: id, Zone: "z-" + string(id), DataDir: dir, Coord: []string{c.coord.APIURL()},
		PrimaryListen: "127.0.0.1:0", ReplListen: "127.0.0.1:0", Capacity: 8 << 30,
		Timing: testTiming, ShutdownTimeout: 10 * time.Second,
		Logger: testLogger(c.t), Registry: prometheus.NewRegistry(),
	})
	if err != nil {
		c.t.Fatalf("starting node %s: %v", id, err)
	}
	c.nodes[id] = nd
	c.t.Cleanup(func() { nd.Close() })
	return nd
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it holds: the cluster runs on real timers,
// raft and sockets, so polling with a deadline is how to wait for it.
func (c *testCluster) eventually(what string, within time.Duration, cond func() error) {
	c.t.Helper()
	eventually(c.t, what, within, cond)
}

func eventually(t testing.TB, what string, within time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, within, err)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// createVolume creates a volume and waits until its primary serves it and
// every member has opened its replica at the volume's epoch.
func (c *testCluster) createVolume(name string, size int64, replicas int) coordapi.Volume {
	c.t.Helper()
	v, err := c.client.CreateVolume(ctxT(c.t, 10*time.Second), coordapi.CreateVolumeRequest{Name: name, Size: size, Replicas: replicas})
	if err != nil {
		c.t.Fatalf("creating volume %s: %v", name, err)
	}
	return c.waitReady(string(v.ID), 0)
}

// waitReady waits until the volume has a primary at an epoch above after,
// every in-sync member has reported that epoch, and the primary serves it.
func (c *testCluster) waitReady(ref string, after coordapi.Epoch) coordapi.Volume {
	c.t.Helper()
	var v *coordapi.Volume
	c.eventually("volume "+ref+" ready", 30*time.Second, func() error {
		var err error
		v, err = c.client.Volume(ctxT(c.t, 5*time.Second), ref)
		if err != nil {
			return err
		}
		if v.Primary == "" || v.Epoch <= after {
			return fmt.Errorf("epoch %d primary %q state %s: %s", v.Epoch, v.Primary, v.State, v.Reason)
		}
		for _, m := range v.Members {
			if m.InSync && m.ReportedEpoch != v.Epoch {
				return fmt.Errorf("member %s reported epoch %d of %d", m.Node, m.ReportedEpoch, v.Epoch)
			}
		}
		return nil
	})
	p := c.nodes[v.Primary]
	if p == nil {
		c.t.Fatalf("primary %s is not a node of this cluster", v.Primary)
	}
	mustDialNBD(c.t, p.PrimaryAddr(), v.Name).Close()
	return *v
}

// replica returns node id's open replica of vol.
func (c *testCluster) replica(id coordapi.NodeID, vol coordapi.VolumeID) *replica {
	n := c.nodes[id]
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.vols[vol]
}

// dataSum hashes the data area of a replica file.
func dataSum(t testing.TB, path string, size int64) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, layout.DataOffset, size)); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func members(v coordapi.Volume) []coordapi.NodeID {
	var out []coordapi.NodeID
	for _, m := range v.Members {
		out = append(out, m.Node)
	}
	slices.Sort(out)
	return out
}

func inSync(v coordapi.Volume) string {
	var out []string
	for _, id := range v.InSync() {
		out = append(out, string(id))
	}
	slices.Sort(out)
	return strings.Join(out, ",")
}
