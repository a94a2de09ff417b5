package node

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"keel/ctl/coordapi"
	"keel/ctl/coordsvc"
)

// writeLoad writes to a volume through its primary until stop is called,
// in a few hot areas of the volume (so that a catch-up has little to
// copy); stop returns the first error and how many writes were
// acknowledged.
func writeLoad(t *testing.T, addr, name string, seed uint64, hot []int64) (stop func() (int, error)) {
	t.Helper()
	cl := mustDialNBD(t, addr, name)
	quit := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	count := 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewPCG(seed, 1))
		buf := make([]byte, 64<<10)
		for i := 0; ; i++ {
			select {
			case <-quit:
				return
			default:
			}
			off := hot[r.IntN(len(hot))] + r.Int64N(512<<10)&^4095
			n := 4096 * (1 + r.IntN(16))
			for j := range buf[:n] {
				buf[j] = byte(i + j)
			}
			if err := cl.Write(buf[:n], off, i%4 == 0); err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("write %d at %d: %w", i, off, err)
				}
				mu.Unlock()
				return
			}
			mu.Lock()
			count++
			mu.Unlock()
		}
	}()
	return func() (int, error) {
		close(quit)
		wg.Wait()
		err := cl.Flush()
		cl.Close()
		mu.Lock()
		defer mu.Unlock()
		return count, errors.Join(firstErr, err)
	}
}

func secondaryOf(v coordapi.Volume) coordapi.NodeID {
	for _, m := range v.Members {
		if m.Node != v.Primary {
			return m.Node
		}
	}
	return ""
}

// waitInSync waits until every member of the volume is in sync, its state
// is ok and its epoch is above after.
func (c *testCluster) waitInSync(ref string, after coordapi.Epoch, within time.Duration) coordapi.Volume {
	c.t.Helper()
	var v *coordapi.Volume
	c.eventually("volume "+ref+" fully in sync", within, func() error {
		var err error
		v, err = c.client.Volume(ctxT(c.t, 5*time.Second), ref)
		if err != nil {
			return err
		}
		if v.State != coordapi.StateOK || len(v.InSync()) != len(v.Members) || v.Epoch <= after {
			return fmt.Errorf("epoch %d state %s (%s), in sync %s of %v", v.Epoch, v.State, v.Reason, inSync(*v), members(*v))
		}
		return nil
	})
	return *v
}

// TestCatchUpAfterSecondaryRestart: a secondary stops while writes flow
// and comes back within the grace period: the primary catches it up from
// its write-intent bitmap (copying only the regions written meanwhile),
// the coordinator puts it back in the in-sync set, no new member is
// placed, and the replicas end byte-identical.
func TestCatchUpAfterSecondaryRestart(t *testing.T) {
	c := newCluster(t, 3)
	const size = 64 << 20
	v := c.createVolume("cu", size, 2)
	sec := secondaryOf(v)
	before := members(v)
	stop := writeLoad(t, c.nodes[v.Primary].PrimaryAddr(), "cu", 1, []int64{0, 20 << 20, 41 << 20})
	c.eventually("writes flowing", 10*time.Second, func() error {
		if r := c.replica(v.Primary, v.ID); r == nil || r.progress.Load() == 0 {
			return errors.New("no write yet")
		}
		return nil
	})
	if err := c.nodes[sec].Close(); err != nil {
		t.Fatal(err)
	}
	c.eventually("the secondary out of sync", 30*time.Second, func() error {
		got, err := c.client.Volume(ctxT(t, 5*time.Second), "cu")
		if err != nil {
			return err
		}
		if slices.Contains(got.InSync(), sec) {
			return fmt.Errorf("in sync %s", inSync(*got))
		}
		return nil
	})
	pr := c.replica(v.Primary, v.ID)
	c.eventually("writes recorded in the bitmap", 10*time.Second, func() error {
		if pr.bm.DirtyBytes() == 0 {
			return errors.New("nothing marked")
		}
		return nil
	})
	c.startNode(sec)
	nv := c.waitInSync("cu", v.Epoch, 60*time.Second)
	n, err := stop()
	if err != nil {
		t.Fatalf("writes during the outage and the catch-up: %v", err)
	}
	if got := members(nv); !slices.Equal(got, before) {
		t.Fatalf("members %v after the catch-up, were %v: a new member was placed", got, before)
	}
	copied := pr.copied.Load()
	t.Logf("%d writes acknowledged; catch-up copied %d bytes of a %d-byte volume (%.1f%%)", n, copied, size, 100*float64(copied)/size)
	if copied == 0 || copied > size/4 {
		t.Fatalf("catch-up copied %d bytes of %d: want only the dirty regions", copied, size)
	}
	p, s := dataSum(t, pr.path, size), dataSum(t, c.replica(sec, v.ID).path, size)
	if p != s {
		t.Fatalf("replicas differ after the catch-up: primary %s, %s %s", p[:12], sec, s[:12])
	}
	if pr.marked.Load() {
		t.Fatal("the primary's bitmap is not cleared with every member in sync")
	}
}

// TestRemirrorAfterGrace: a secondary that stays away past the grace
// period is given up: the coordinator places a new member, the primary
// re-mirrors the whole volume to it while writes flow, and the volume is
// fully in sync again with byte-identical replicas.
func TestRemirrorAfterGrace(t *testing.T) {
	c := newClusterWith(t, 3, func(cfg *coordsvc.Config) {
		rc := coordapi.DefaultRecovery()
		rc.Grace = coordapi.Duration(2 * time.Second)
		rc.SlotRetry = coordapi.Duration(100 * time.Millisecond)
		cfg.Coord.Recovery = rc
	})
	const size = 32 << 20
	v := c.createVolume("rm", size, 2)
	sec := secondaryOf(v)
	stop := writeLoad(t, c.nodes[v.Primary].PrimaryAddr(), "rm", 2, []int64{0, 9 << 20, 30 << 20})
	if err := c.nodes[sec].Close(); err != nil {
		t.Fatal(err)
	}
	nv := c.waitInSync("rm", v.Epoch, 90*time.Second)
	n, err := stop()
	if err != nil {
		t.Fatalf("writes during the outage and the re-mirror: %v", err)
	}
	if slices.Contains(members(nv), sec) || len(nv.Members) != 2 {
		t.Fatalf("members %v: want %s replaced", members(nv), sec)
	}
	repl := secondaryOf(nv)
	pr := c.replica(nv.Primary, nv.ID)
	t.Logf("%d writes acknowledged; re-mirror to %s copied %d bytes of a %d-byte volume", n, repl, pr.copied.Load(), size)
	if pr.copied.Load() < size {
		t.Fatalf("re-mirror copied %d bytes, want the whole volume (%d)", pr.copied.Load(), size)
	}
	p, s := dataSum(t, pr.path, size), dataSum(t, c.replica(repl, nv.ID).path, size)
	if p != s {
		t.Fatalf("replicas differ after the re-mirror: primary %s, %s %s", p[:12], repl, s[:12])
	}
	// The given-up node comes back: its replica file is garbage now (the
	// volume is fully in sync elsewhere) and goes.
	old := filepath.Join(c.dirs[sec], string(v.ID)+".vol")
	if _, err := os.Stat(old); err != nil {
		t.Fatalf("the given-up replica's file before its node restarts: %v", err)
	}
	c.startNode(sec)
	c.eventually("the given-up replica's file removed", 30*time.Second, func() error {
		if _, err := os.Stat(old); !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("stat %s: %v", old, err)
		}
		return nil
	})
}
