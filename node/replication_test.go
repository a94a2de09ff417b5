package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"keel/ctl/coordapi"
	"keel/ctl/coordsvc"
)

// TestReplicatedWritesIdentical: concurrent overlapping writes (aligned
// and not, with FUA), trims, zeroings and flushes from several NBD
// connections to a volume with three replicas land identically on every
// replica, and read back as the last acknowledged write of each byte.
func TestReplicatedWritesIdentical(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("KEEL_TEST_SEED"); s != "" {
		fmt.Sscan(s, &seed)
	}
	t.Logf("seed %d (KEEL_TEST_SEED reproduces)", seed)
	c := newCluster(t, 3)
	const size = 8 << 20
	v := c.createVolume("rep", size, 3)
	primary := c.nodes[v.Primary]

	const conns, workers, opsPer = 4, 4, 100
	const span = 256 << 10 // the ops crowd into 256 KiB so that they overlap
	var clients []*TestNBDClient
	for range conns {
		clients = append(clients, mustDialNBD(t, primary.PrimaryAddr(), "rep"))
	}
	var wg sync.WaitGroup
	errs := make(chan error, conns*workers)
	for ci, cl := range clients {
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(seed, uint64(ci*workers+w)))
				buf := make([]byte, 128<<10)
				for i := range opsPer {
					off := r.Int64N(span)
					n := 1 + r.IntN(32<<10)
					if r.IntN(2) == 0 { // aligned half the time
						off &^= 4095
						n = (n + 4095) &^ 4095
					}
					var err error
					switch k := r.IntN(20); {
					case k < 15:
						p := buf[:n]
						for j := range p {
							p[j] = byte(ci*workers + w + i + j)
						}
						err = cl.Write(p, off, k == 0)
					case k < 17:
						err = cl.Trim(off, uint32(n))
					case k < 19:
						err = cl.Zero(off, uint32(n), k == 17)
					default:
						err = cl.Flush()
					}
					if err != nil {
						errs <- fmt.Errorf("conn %d worker %d op %d: %w", ci, w, i, err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := clients[0].Flush(); err != nil {
		t.Fatal(err)
	}
	// What the primary serves now is what every replica must hold.
	want := make([]byte, size)
	if err := clients[0].Read(want, 0); err != nil {
		t.Fatal(err)
	}
	for _, cl := range clients {
		cl.Close()
	}
	paths := map[string]string{}
	for id, nd := range c.nodes {
		paths[string(id)] = c.replica(id, v.ID).path
		if err := nd.Close(); err != nil {
			t.Fatalf("closing %s: %v", id, err)
		}
	}
	for id, path := range paths {
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		got = got[1<<20 : 1<<20+size]
		if !bytes.Equal(got, want) {
			i := 0
			for got[i] == want[i] {
				i++
			}
			t.Errorf("replica on %s differs from what the primary served, first at byte %d", id, i)
		}
	}
}

// TestFencedPrimaryCannotAck: once the coordinator has moved a volume's
// primary to a newer epoch, the old primary cannot get a write
// acknowledged: its own node refuses (no authority), and even a primary
// that believes it still has authority (a stand-in with a lying agent,
// over real sockets) is refused by the replicas with a stale-epoch NACK and
// answers ESHUTDOWN.
func TestFencedPrimaryCannotAck(t *testing.T) {
	c := newCluster(t, 3)
	v := c.createVolume("fence", 4<<20, 3)
	old := v.Primary
	var secondaries []*Node
	for id, nd := range c.nodes {
		if id != old {
			secondaries = append(secondaries, nd)
		}
	}
	rogue := newRogue(t, v, secondaries)
	buf := bytes.Repeat([]byte{0xab}, 4096)
	if err := rogue.WriteAt(buf, 0, false); err != nil {
		t.Fatalf("stand-in primary at the current epoch %d: %v (the test cannot tell fencing from breakage)", v.Epoch, err)
	}
	// Move the primary: drain the old one (hand-over at epoch+1, promotion
	// at epoch+2).
	if _, err := c.client.Drain(ctxT(t, 10*time.Second), old, false); err != nil {
		t.Fatal(err)
	}
	nv := c.waitReady(string(v.ID), v.Epoch+1)
	if nv.Primary == old {
		t.Fatalf("drain left %s primary", old)
	}
	err := rogue.WriteAt(buf, 0, false)
	if !errors.Is(err, unix.ESHUTDOWN) {
		t.Fatalf("stand-in old primary at epoch %d after epoch %d exists: write returned %v, want ESHUTDOWN", v.Epoch, nv.Epoch, err)
	}
	if !rogue.r.x.fence.Fenced(rogue.r.num, uint64(v.Epoch)) {
		t.Fatalf("no replica fenced epoch %d", v.Epoch)
	}
	// The old primary's own backend refuses too.
	or := c.replica(old, v.ID)
	if err := (&Backend{r: or}).WriteAt(buf, 0, false); !errors.Is(err, unix.ESHUTDOWN) {
		t.Fatalf("old primary's backend after the move: %v, want ESHUTDOWN", err)
	}
	// Invariant 4: it serves no reads either, since the new primary may
	// acknowledge writes it never sees.
	if err := (&Backend{r: or}).ReadAt(buf, 0); !errors.Is(err, unix.ESHUTDOWN) {
		t.Fatalf("old primary's backend read after the move: %v, want ESHUTDOWN (a stale read)", err)
	}
	// And the new primary acknowledges.
	cl := mustDialNBD(t, c.nodes[nv.Primary].PrimaryAddr(), "fence")
	if err := cl.Write(buf, 0, true); err != nil {
		t.Fatalf("new primary: %v", err)
	}
}

// TestSecondaryLossWaitsForCoordinator: when a secondary stops taking
// writes, a write waits (the volume reports impaired) while the
// coordinator has not dropped the secondary, and is acknowledged only once
// the coordinator has moved the volume to a new epoch without it
// (invariant 5); later writes go to the remaining replicas.
func TestSecondaryLossWaitsForCoordinator(t *testing.T) {
	gate := make(chan struct{})
	var held atomic.Int32
	c := newClusterWith(t, 3, func(cfg *coordsvc.Config) {
		cfg.Inject = func(ctx context.Context, _ coordapi.Class, op string) {
			if op != "replica_loss" {
				return
			}
			held.Add(1)
			select {
			case <-gate:
			case <-ctx.Done():
			}
		}
	})
	v := c.createVolume("loss", 4<<20, 3)
	cl := mustDialNBD(t, c.nodes[v.Primary].PrimaryAddr(), "loss")
	buf := bytes.Repeat([]byte{0x5a}, 64<<10)
	if err := cl.Write(buf, 0, false); err != nil {
		t.Fatal(err)
	}
	var lost coordapi.NodeID
	for _, m := range v.Members {
		if m.Node != v.Primary {
			lost = m.Node
			break
		}
	}
	if err := c.nodes[lost].Close(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cl.Write(buf, 1<<20, true) }()
	c.eventually("volume impaired while the write waits", 30*time.Second, func() error {
		select {
		case err := <-done:
			t.Fatalf("write returned (%v) while the coordinator had not answered the loss report", err)
		default:
		}
		got, err := c.client.Volume(ctxT(t, 5*time.Second), "loss")
		if err != nil {
			return err
		}
		if got.State != coordapi.StateImpaired {
			return fmt.Errorf("state %s (%s), loss reports held %d", got.State, got.Reason, held.Load())
		}
		t.Logf("while held: %s: %s", got.State, got.Reason)
		return nil
	})
	close(gate)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("write after the loss was settled: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("write not acknowledged within 60s of the coordinator answering")
	}
	got, err := c.client.Volume(ctxT(t, 5*time.Second), "loss")
	if err != nil {
		t.Fatal(err)
	}
	if got.Epoch <= v.Epoch || slices.Contains(got.InSync(), lost) {
		t.Fatalf("write acknowledged but the coordinator has epoch %d (was %d) and in-sync %v: %s lost", got.Epoch, v.Epoch, got.InSync(), lost)
	}
	// Later writes and reads go on with the remaining replicas.
	if err := cl.Write(buf, 2<<20, false); err != nil {
		t.Fatal(err)
	}
	rb := make([]byte, len(buf))
	if err := cl.Read(rb, 1<<20); err != nil || !bytes.Equal(rb, buf) {
		t.Fatalf("read back after the loss: %v", err)
	}
	c.eventually("volume degraded, not impaired", 30*time.Second, func() error {
		got, err := c.client.Volume(ctxT(t, 5*time.Second), "loss")
		if err != nil {
			return err
		}
		if got.State != coordapi.StateDegraded {
			return fmt.Errorf("state %s: %s", got.State, got.Reason)
		}
		return nil
	})
}

// TestSecondaryRestartsElsewhere: a secondary that restarts on another
// replication address before any write missed it stays in sync: the
// primary's next assignment carries the new address, the primary replaces
// its stream, and writes reach the secondary there.
func TestSecondaryRestartsElsewhere(t *testing.T) {
	c := newCluster(t, 2)
	v := c.createVolume("mv", 4<<20, 2)
	var sec coordapi.NodeID
	for _, m := range v.Members {
		if m.Node != v.Primary {
			sec = m.Node
		}
	}
	oldAddr := c.nodes[sec].ReplAddr()
	if err := c.nodes[sec].Close(); err != nil {
		t.Fatal(err)
	}
	n := c.startNode(sec)
	if n.ReplAddr() == oldAddr {
		t.Skipf("the restarted node got the same port %s: nothing moved", oldAddr)
	}
	pr := c.replica(v.Primary, v.ID)
	c.eventually("primary streams to the new address", 30*time.Second, func() error {
		for _, p := range pr.view().peers {
			if p.id == sec && p.addr == n.ReplAddr() && p.rp.Up() {
				return nil
			}
		}
		return fmt.Errorf("peers %v", pr.view().peerIDs())
	})
	cl := mustDialNBD(t, c.nodes[v.Primary].PrimaryAddr(), "mv")
	buf := bytes.Repeat([]byte{0x77}, 8192)
	if err := cl.Write(buf, 4096, true); err != nil {
		t.Fatal(err)
	}
	got, err := c.client.Volume(ctxT(t, 5*time.Second), "mv")
	if err != nil {
		t.Fatal(err)
	}
	if got.Epoch != v.Epoch || !slices.Contains(got.InSync(), sec) {
		t.Fatalf("after the move: epoch %d (was %d), in sync %v", got.Epoch, v.Epoch, got.InSync())
	}
	c.eventually("secondary has the write", 10*time.Second, func() error {
		r := c.replica(sec, v.ID)
		if r == nil {
			return fmt.Errorf("replica not open on %s", sec)
		}
		p := make([]byte, len(buf))
		if err := r.vol.ReadAt(p, 4096); err != nil {
			return err
		}
		if !bytes.Equal(p, buf) {
			return fmt.Errorf("not there")
		}
		return nil
	})
}
