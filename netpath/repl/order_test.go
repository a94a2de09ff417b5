package repl

import (
	"errors"
	"flag"
	"math/rand/v2"
	"testing"
	"time"

	"keel/netpath/replproto"
)

var modelSeed = flag.Uint64("repl.seed", 0, "base seed of TestOrderingAndFencingModel (0: from the clock)")

// TestOrderingAndFencingModel drives one volume's ordering and fencing
// state (volState, the replica's core) through random interleavings:
// primaries of rising epochs keep sending writes and flushes (old ones do
// not stop), the node sometimes raises the durable epoch behind the
// server's back, epoch writes sometimes fail, and a scheduler runs the
// ready frames in random order, as the worker pool may. It checks, at every
// step:
//
//   - fencing: a frame is acknowledged at epoch e only while the durable
//     epoch is exactly e: never after a newer epoch became durable, never
//     before e itself did;
//   - ordering: a write runs only after every earlier write it overlaps and
//     every earlier epoch raise; a flush or raise only after every earlier
//     frame;
//   - progress: once sending stops, every frame runs and nothing is left.
func TestOrderingAndFencingModel(t *testing.T) {
	base := *modelSeed
	if base == 0 {
		base = uint64(time.Now().UnixNano())
	}
	runs := 300
	if testing.Short() {
		runs = 50
	}
	t.Logf("base seed %d (replay with -repl.seed=%d)", base, base)
	var acks, stale, staleAtRun, broken int
	for i := range runs {
		seed := base + uint64(i)
		a, s, sr, b := runModel(t, seed)
		acks, stale, staleAtRun, broken = acks+a, stale+s, staleAtRun+sr, broken+b
		if t.Failed() {
			return
		}
	}
	t.Logf("%d runs: %d acks, %d refused stale at receipt, %d stale at apply, %d refused on a broken epoch", runs, acks, stale, staleAtRun, broken)
	if acks == 0 || stale == 0 {
		t.Fatal("the model exercised no acknowledgements or no stale refusals")
	}
}

type modelRec struct {
	f    *sframe
	idx  int
	done bool
}

func runModel(t *testing.T, seed uint64) (acks, stale, staleAtRun, broken int) {
	rng := rand.New(rand.NewPCG(seed, seed^0x5eed))
	fail := func(format string, args ...any) {
		t.Helper()
		t.Errorf("seed %d: "+format, append([]any{seed}, args...)...)
	}
	vs := &volState{id: 1, epoch: 1, persisted: 1}
	durable := uint64(1) // the Applier's durable epoch
	epochs := []uint64{1}
	var recs []*modelRec
	byFrame := map[*sframe]*modelRec{}
	var ready []*sframe
	add := func(f *sframe) {
		r := &modelRec{f: f, idx: len(recs)}
		recs = append(recs, r)
		byFrame[f] = r
	}
	const blocks = 16
	steps := 300
	for step := 0; step < steps || len(ready) > 0; step++ {
		c := rng.IntN(100)
		switch {
		case step < steps && c < 45: // a primary sends
			e := epochs[rng.IntN(len(epochs))]
			f := &sframe{kind: kindData, h: replproto.Header{Type: replproto.TypeWrite, Volume: 1, Epoch: e}}
			if rng.IntN(8) == 0 {
				f.kind, f.h.Type = kindFlush, replproto.TypeFlush
			} else {
				lo := uint64(rng.IntN(blocks))
				f.lo, f.hi = lo, lo+1+uint64(rng.IntN(4))
			}
			raise := new(sframe)
			var v verdict
			var cur uint64
			var used bool
			before := len(ready)
			ready, v, cur, used = vs.register(f, raise, durable, ready)
			switch v {
			case refusedStale:
				stale++
				if cur <= e {
					fail("stale refusal of epoch %d reports epoch %d", e, cur)
				}
				if len(ready) != before {
					fail("a refused frame became ready")
				}
				continue
			case refusedBroken:
				broken++
				continue
			}
			if used {
				add(raise)
			}
			add(f)
		case step < steps && c < 50: // a new primary with the next epoch
			epochs = append(epochs, epochs[len(epochs)-1]+1)
		case step < steps && c < 51: // the node raises the epoch behind the server
			if rng.IntN(2) == 0 {
				durable = max(durable, epochs[len(epochs)-1])
			}
		default: // a worker runs a ready frame
			if len(ready) == 0 {
				continue
			}
			i := rng.IntN(len(ready))
			f := ready[i]
			ready[i] = ready[len(ready)-1]
			ready = ready[:len(ready)-1]
			r := byFrame[f]
			if r == nil || r.done {
				fail("frame run twice or unknown")
				return
			}
			for _, p := range recs[:r.idx] {
				if p.done {
					continue
				}
				switch {
				case f.kind != kindData || p.f.kind == kindRaise:
					fail("%v (#%d) ran before earlier %v (#%d) finished", f.h.Type, r.idx, p.f.h.Type, p.idx)
				case p.f.kind == kindData && p.f.lo < f.hi && f.lo < p.f.hi:
					fail("write #%d [%d,%d) ran before overlapping earlier write #%d [%d,%d)", r.idx, f.lo, f.hi, p.idx, p.f.lo, p.f.hi)
				}
			}
			if f.kind == kindRaise {
				var err error
				if rng.IntN(50) == 0 {
					err = errors.New("superblock write failed")
				} else {
					durable = max(durable, f.h.Epoch)
				}
				vs.raised(f.h.Epoch, err)
			} else {
				switch v, _ := vs.admit(f.h.Epoch, durable); v {
				case admitted:
					if durable != f.h.Epoch {
						fail("frame of epoch %d acknowledged while the durable epoch is %d", f.h.Epoch, durable)
					}
					acks++
				case refusedStale:
					staleAtRun++
				default:
					broken++
				}
			}
			ready = vs.complete(f, ready)
			r.done = true
		}
	}
	if len(vs.active) != 0 {
		fail("%d frames left active with nothing ready: a lost wake-up", len(vs.active))
	}
	for _, r := range recs {
		if !r.done {
			fail("frame #%d never ran", r.idx)
		}
	}
	return acks, stale, staleAtRun, broken
}
