package node

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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
	var clients []*nbdClient
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
						err = cl.write(p, off, k == 0)
					case k < 17:
						err = cl.trim(off, uint32(n))
					case k < 19:
						err = cl.zero(off, uint32(n), k == 17)
					default:
						err = cl.flush()
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
	if err := clients[0].flush(); err != nil {
		t.Fatal(err)
	}
	// What the primary serves now is what every replica must hold.
	want := make([]byte, size)
	if err := clients[0].read(want, 0); err != nil {
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
	// And the new primary acknowledges.
	cl := mustDialNBD(t, c.nodes[nv.Primary].PrimaryAddr(), "fence")
	if err := cl.write(buf, 0, true); err != nil {
		t.Fatalf("new primary: %v", err)
	}
}
