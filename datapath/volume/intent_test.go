package volume_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"testing"

	"keel/datapath/dio"
	"keel/datapath/layout"
	"keel/datapath/volume"
)

type run struct{ off, n int64 }

func dirtyRuns(v *volume.Volume) []run {
	var rs []run
	v.DirtyRegions(func(off, n int64) bool {
		rs = append(rs, run{off, n})
		return true
	})
	return rs
}

func TestIntentBasics(t *testing.T) {
	const size = 10<<20 + 4096 // the last region is partial
	v, m := createMem(t, size, dio.MemOptions{})
	if v.RegionSize() != 1<<20 {
		t.Fatalf("region size %d, want 1 MiB", v.RegionSize())
	}
	if v.DirtyBytes() != 0 || len(dirtyRuns(v)) != 0 {
		t.Fatalf("new volume dirty: %d bytes, %v", v.DirtyBytes(), dirtyRuns(v))
	}
	for _, r := range []run{{1<<20 + 5, 1}, {2 << 20, 1 << 20}, {10 << 20, 4096}, {5<<20 - 1, 2}} {
		if err := v.MarkDirty(r.off, r.n); err != nil {
			t.Fatal(err)
		}
	}
	want := []run{{1 << 20, 2 << 20}, {4 << 20, 2 << 20}, {10 << 20, 4096}}
	if got := dirtyRuns(v); !equalRuns(got, want) {
		t.Fatalf("dirty runs %v, want %v", got, want)
	}
	if got := v.DirtyBytes(); got != 4<<20+4096 {
		t.Fatalf("dirty bytes %d", got)
	}
	// Stops when fn says so.
	n := 0
	v.DirtyRegions(func(off, l int64) bool { n++; return false })
	if n != 1 {
		t.Fatalf("DirtyRegions visited %d runs after false", n)
	}
	// Durable without Close: a crash keeps it.
	c := m.Crash()
	v2, err := volume.OpenDevice(c, volume.Options{Logger: logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if got := dirtyRuns(v2); !equalRuns(got, want) {
		t.Fatalf("after crash: dirty runs %v, want %v", got, want)
	}
	if err := v2.ClearDirty(); err != nil {
		t.Fatal(err)
	}
	if v2.DirtyBytes() != 0 {
		t.Fatalf("after ClearDirty: %d dirty bytes", v2.DirtyBytes())
	}
	v3, err := volume.OpenDevice(c.Crash(), volume.Options{Logger: logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v3.Close()
	if v3.DirtyBytes() != 0 {
		t.Fatalf("ClearDirty not durable: %v", dirtyRuns(v3))
	}
	if err := v3.MarkDirty(0, size+1); err == nil {
		t.Fatal("MarkDirty beyond the end succeeded")
	}
}

func equalRuns(a, b []run) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// regionsModel is the set of dirty regions a volume should report.
type regionsModel struct {
	size, region int64
	dirty        map[int64]bool
}

func (m *regionsModel) mark(off, n int64) {
	for r := off / m.region; r <= (off+n-1)/m.region; r++ {
		m.dirty[r] = true
	}
}

// convert: a new region is dirty if any old one it overlaps was.
func (m *regionsModel) convert(region int64) {
	next := map[int64]bool{}
	for r := range m.dirty {
		a, b := r*m.region, min((r+1)*m.region, m.size)
		for q := a / region; q <= (b-1)/region; q++ {
			next[q] = true
		}
	}
	m.region, m.dirty = region, next
}

func (m *regionsModel) runs() []run {
	var rs []run
	nr := (m.size + m.region - 1) / m.region
	for r := int64(0); r < nr; r++ {
		if !m.dirty[r] {
			continue
		}
		s := r
		for r < nr && m.dirty[r] {
			r++
		}
		rs = append(rs, run{s * m.region, min(r*m.region, m.size) - s*m.region})
	}
	return rs
}

func (m *regionsModel) bytes() int64 {
	var n int64
	for _, r := range m.runs() {
		n += r.n
	}
	return n
}

// TestIntentProperty: random marks, clears, reopens (clean, crashed, with
// a new region size) against a model of the dirty regions.
func TestIntentProperty(t *testing.T) {
	seed := testSeed(t)
	rng := rand.New(rand.NewPCG(seed, 6))
	regions := []int64{4096, 8192, 64 << 10, 1 << 20}
	for round := range 3 {
		size := 4096 * (16 + rng.Int64N(1024))
		region := regions[rng.IntN(len(regions))]
		// Only the metadata is ever touched: a small Mem will do.
		mem := newBigDev(size).Mem
		open := func(dev *dio.Mem, region int64) *volume.Volume {
			v, err := volume.OpenDevice(&bigDev{Mem: dev, size: layout.DataOffset + size}, volume.Options{Create: true, Size: size, RegionSize: region, Logger: discard})
			if err != nil {
				t.Fatalf("seed %d round %d: open: %v", seed, round, err)
			}
			return v
		}
		v := open(mem, region)
		model := &regionsModel{size: size, region: region, dirty: map[int64]bool{}}
		for op := range *opsFlag / 5 {
			switch k := rng.IntN(60); {
			case k < 45:
				off, n := randRange(rng, size)
				if err := v.MarkDirty(off, n); err != nil {
					t.Fatal(err)
				}
				model.mark(off, n)
			case k < 48:
				if err := v.ClearDirty(); err != nil {
					t.Fatal(err)
				}
				clear(model.dirty)
			case k < 51: // clean close and reopen, sometimes with a new region size
				if err := v.Close(); err != nil {
					t.Fatal(err)
				}
				mem = mem.Crash() // a closed Mem: keep its (all durable) contents
				var r int64
				if rng.IntN(2) == 0 {
					r = regions[rng.IntN(len(regions))]
					model.convert(r)
				}
				v = open(mem, r)
			case k < 54: // power failure: everything MarkDirty returned is there
				crashed := mem.Crash()
				v.Close()
				mem = crashed
				v = open(mem, 0)
			default: // a range already marked, or partly
				if runs := model.runs(); len(runs) > 0 {
					r := runs[rng.IntN(len(runs))]
					off := r.off + rng.Int64N(r.n)
					n := 1 + rng.Int64N(min(r.off+r.n-off+4096, size-off))
					if err := v.MarkDirty(off, n); err != nil {
						t.Fatal(err)
					}
					model.mark(off, n)
				}
			}
			if got, want := dirtyRuns(v), model.runs(); !equalRuns(got, want) {
				t.Fatalf("seed %d round %d op %d: dirty %v, model %v", seed, round, op, got, want)
			}
			if got, want := v.DirtyBytes(), model.bytes(); got != want {
				t.Fatalf("seed %d round %d op %d: DirtyBytes %d, model %d", seed, round, op, got, want)
			}
			if v.RegionSize() != model.region {
				t.Fatalf("region size %d, model %d", v.RegionSize(), model.region)
			}
		}
		v.Close()
	}
}

var discard = slog.New(slog.DiscardHandler)

// crashDev is a Mem that loses power during chosen writes (counted from
// 1): the write lands as an unsynced one, the device is crashed (with
// Torn, any subset of the unsynced sectors, the write's included, survive)
// and the snapshot kept with the replica it must be compared against;
// then the write completes as asked.
type crashDev struct {
	*dio.Mem
	mu    sync.Mutex
	ops   int
	at    func(op int) bool
	other []byte // what the other replica holds now
	snaps []crashSnap
}

type crashSnap struct {
	mem   *dio.Mem
	other []byte
	op    int
}

func (d *crashDev) WriteAt(p []byte, off int64, fua bool) error {
	d.mu.Lock()
	d.ops++
	op, crash := d.ops, d.at(d.ops)
	other := d.other
	d.mu.Unlock()
	if !crash {
		return d.Mem.WriteAt(p, off, fua)
	}
	if err := d.Mem.WriteAt(p, off, false); err != nil {
		return err
	}
	snap := d.Mem.Crash()
	d.mu.Lock()
	d.snaps = append(d.snaps, crashSnap{snap, other, op})
	d.mu.Unlock()
	if fua {
		return d.Mem.Sync()
	}
	return nil
}

func (d *crashDev) setOther(b []byte) {
	d.mu.Lock()
	d.other = b
	d.mu.Unlock()
}

// TestIntentCrash: a degraded volume takes concurrent writes, each
// MarkDirty then WriteAt, with power failing at random device writes
// (bitmap blocks and data alike, torn at 512-byte sectors); now and then
// the replicas are resynchronised and the bitmap cleared. After each crash
// every region whose data differs from the other replica's must be marked
// dirty, whether the volume reopens read-only or read-write (which
// repairs). Crashes while an open converts the bitmap to another region
// size are checked too (shown as negative write numbers).
func TestIntentCrash(t *testing.T) {
	seed := testSeed(t)
	rng := rand.New(rand.NewPCG(seed, 7))
	rounds := 4
	if testing.Short() {
		rounds = 2
	}
	checked := 0
	for round := range rounds {
		size := int64(1<<20 + 4096*rng.Int64N(128))
		region := []int64{4096, 16 << 10, 64 << 10}[rng.IntN(3)]
		mopts := dio.MemOptions{Torn: rng.IntN(4) != 0, Seed: seed + uint64(round)}
		if rng.IntN(2) == 0 {
			mopts.MemAlign, mopts.OffsetAlign = 4096, 4096
		}
		dev := &crashDev{Mem: newMem(size, mopts), at: func(int) bool { return false }}
		v, err := volume.OpenDevice(dev, volume.Options{Create: true, Size: size, RegionSize: region, Logger: discard})
		if err != nil {
			t.Fatal(err)
		}
		// In sync: both replicas hold this.
		base := make([]byte, size)
		fill(rng, base)
		if err := v.WriteAt(base, 0, true); err != nil {
			t.Fatal(err)
		}
		dev.setOther(base)
		crashRng := rand.New(rand.NewPCG(seed+uint64(round), 8))
		dev.mu.Lock()
		dev.at = func(int) bool { return crashRng.IntN(40) == 0 }
		dev.mu.Unlock()

		for phase := range 3 {
			var wg sync.WaitGroup
			for g := range 3 {
				wrng := rand.New(rand.NewPCG(seed+uint64(round), uint64(phase*10+g)))
				wg.Go(func() {
					for range 20 {
						off, n := randRange(wrng, size)
						p := make([]byte, n)
						fill(wrng, p)
						if err := v.MarkDirty(off, n); err != nil {
							t.Error(err)
							return
						}
						if err := v.WriteAt(p, off, wrng.IntN(3) == 0); err != nil {
							t.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			if t.Failed() {
				t.FailNow()
			}
			if phase == 2 {
				break
			}
			// Resync: the other replica catches up; then clear.
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			now := make([]byte, size)
			if err := v.ReadAt(now, 0); err != nil {
				t.Fatal(err)
			}
			dev.setOther(now)
			if err := v.ClearDirty(); err != nil {
				t.Fatal(err)
			}
		}
		// And a power failure at the very end.
		dev.mu.Lock()
		final := crashSnap{dev.Mem.Crash(), dev.other, dev.ops + 1}
		dev.snaps = append(dev.snaps, final)
		snaps := dev.snaps
		dev.mu.Unlock()
		v.Close()

		// Power fails while reopening converts the bitmap to another
		// region size: during the superblock write (1), the bitmap area
		// write (2), or after (3).
		for _, conv := range []int64{region * 4, region / 4} {
			for at := 1; at <= 3 && conv >= 4096; at++ {
				cd := &crashDev{Mem: final.mem.Crash(), at: func(op int) bool { return op == at }, other: final.other}
				cv, err := volume.OpenDevice(cd, volume.Options{RegionSize: conv, Logger: discard})
				if err != nil {
					t.Fatal(err)
				}
				cv.Close()
				for _, s := range cd.snaps {
					snaps = append(snaps, crashSnap{s.mem, s.other, -at})
				}
			}
		}

		for i, s := range snaps {
			for _, ro := range []bool{true, false} {
				if !ro && i%3 != 0 {
					continue
				}
				m := s.mem
				if !ro {
					m = m.Crash() // a copy: the read-only check may come first
				}
				cv, err := volume.OpenDevice(m, volume.Options{ReadOnly: ro, Logger: discard})
				if err != nil {
					t.Fatalf("seed %d round %d: reopen after crash at write %d: %v", seed, round, s.op, err)
				}
				checkCovered(t, cv, s.other, fmt.Sprintf("seed %d round %d crash at write %d read-only %v", seed, round, s.op, ro))
				cv.Close()
				checked++
			}
		}
	}
	t.Logf("%d crash images checked", checked)
}

// checkCovered fails unless every region where v's data differs from other
// is dirty in v's bitmap.
func checkCovered(t *testing.T, v *volume.Volume, other []byte, what string) {
	t.Helper()
	got := make([]byte, v.Size())
	if err := v.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	dirty := make([]bool, (v.Size()+v.RegionSize()-1)/v.RegionSize())
	v.DirtyRegions(func(off, n int64) bool {
		for r := off / v.RegionSize(); r*v.RegionSize() < off+n; r++ {
			dirty[r] = true
		}
		return true
	})
	for r := range dirty {
		a := int64(r) * v.RegionSize()
		b := min(a+v.RegionSize(), v.Size())
		if !dirty[r] && !bytes.Equal(got[a:b], other[a:b]) {
			t.Fatalf("%s: region %d [%d, %d) differs from the other replica but is not marked dirty (%s)",
				what, r, a, b, firstDiff(got[a:b], other[a:b], a))
		}
	}
}
