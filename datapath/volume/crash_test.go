package volume_test

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"keel/datapath/dio"
	"keel/datapath/iobuf"
	"keel/datapath/volume"
)

// crashModel tracks, for every byte, which contents a crash may leave:
// the value it had when it was last made durable (by a Flush, or a FUA
// request covering it) or any value written to it since.
//
// It keeps, per 512-byte sector, the snapshots of that sector after each
// change since the last Flush; floor[b] is the index of the oldest snapshot
// byte b may come from.
type crashModel struct {
	cur   []byte
	hist  [][][]byte // [sector][k] = sector contents after its k-th change
	floor []int32    // per byte
}

const sector = dio.SectorSize

func newCrashModel(size int64) *crashModel {
	m := &crashModel{cur: make([]byte, size), hist: make([][][]byte, size/sector), floor: make([]int32, size)}
	for s := range m.hist {
		m.hist[s] = [][]byte{make([]byte, sector)}
	}
	return m
}

// apply records that [off, off+len(data)) now holds data (nil: zeroes),
// acknowledged; with durable (FUA) those bytes can no longer go back.
func (m *crashModel) apply(off int64, n int64, data []byte, durable bool) {
	if data == nil {
		clear(m.cur[off : off+n])
	} else {
		copy(m.cur[off:], data)
	}
	for s := off / sector; s*sector < off+n; s++ {
		m.hist[s] = append(m.hist[s], bytes.Clone(m.cur[s*sector:(s+1)*sector]))
		if durable {
			k := int32(len(m.hist[s]) - 1)
			for b := max(off, s*sector); b < min(off+n, (s+1)*sector); b++ {
				m.floor[b] = k
			}
		}
	}
}

// flush: everything acknowledged so far is durable.
func (m *crashModel) flush() {
	for s := range m.hist {
		if len(m.hist[s]) > 1 {
			m.hist[s] = m.hist[s][len(m.hist[s])-1:]
		}
	}
	clear(m.floor)
}

// check reports the first byte of got that no crash could leave there.
func (m *crashModel) check(got []byte) (bad int64, ok bool) {
	for s := range m.hist {
		for b := int64(s) * sector; b < int64(s+1)*sector; b++ {
			found := false
			for _, snap := range m.hist[s][m.floor[b]:] {
				if snap[b%sector] == got[b] {
					found = true
					break
				}
			}
			if !found {
				return b, false
			}
		}
	}
	return 0, true
}

// TestCrash: random writes (some FUA), trims, zeroes and flushes on a
// crashable Mem, then a simulated power failure. Everything acknowledged
// with FUA, and everything acknowledged before a Flush returned, must read
// back; later writes may or may not be there, sector by sector (Torn), or
// not at all. The volume reopens from the crashed device: superblock valid,
// marked not clean.
func TestCrash(t *testing.T) {
	seed := testSeed(t)
	rng := rand.New(rand.NewPCG(seed, 4))
	const size = 1 << 20
	rounds := 24
	if testing.Short() {
		rounds = 6
	}
	for round := range rounds {
		opts := dio.MemOptions{Torn: round%2 == 0, Seed: seed + uint64(round)}
		if round%3 == 0 {
			opts.MemAlign, opts.OffsetAlign = 4096, 4096
		}
		v, mem := createMem(t, size, opts)
		model := newCrashModel(size)
		if err := v.SetEpoch(uint64(round + 1)); err != nil {
			t.Fatal(err)
		}
		align := int64(v.IOAlign())
		for range 40 + rng.IntN(160) {
			off, n := randRange(rng, size)
			fua := rng.IntN(4) == 0
			switch k := rng.IntN(10); {
			case k < 6:
				p := buffer(rng, int(n))
				fill(rng, p)
				if err := v.WriteAt(p, off, fua); err != nil {
					t.Fatalf("seed %d round %d: WriteAt: %v", seed, round, err)
				}
				model.apply(off, n, p, fua)
			case k < 7:
				if err := v.Trim(off, n, fua); err != nil {
					t.Fatalf("seed %d round %d: Trim: %v", seed, round, err)
				}
				if a, b := (off+align-1)&^(align-1), (off+n)&^(align-1); a < b {
					model.apply(a, b-a, nil, fua) // Mem punches: the inside reads zero
				}
			case k < 8:
				if err := v.WriteZeroes(off, n, rng.IntN(2) == 0, false, fua); err != nil {
					t.Fatalf("seed %d round %d: WriteZeroes: %v", seed, round, err)
				}
				model.apply(off, n, nil, fua)
			default:
				if err := v.Flush(); err != nil {
					t.Fatalf("seed %d round %d: Flush: %v", seed, round, err)
				}
				model.flush()
			}
		}

		// Power fails with the volume still open.
		crashed := mem.Crash()
		v2, err := volume.OpenDevice(crashed, volume.Options{Logger: logger(t)})
		if err != nil {
			t.Fatalf("seed %d round %d: reopen after crash: %v", seed, round, err)
		}
		if v2.WasClean() {
			t.Errorf("seed %d round %d: crashed volume reopened as clean", seed, round)
		}
		if v2.Epoch() != uint64(round+1) {
			t.Errorf("seed %d round %d: epoch %d after crash, want %d", seed, round, v2.Epoch(), round+1)
		}
		got := iobuf.Get(size)
		if err := v2.ReadAt(got.Bytes(), 0); err != nil {
			t.Fatal(err)
		}
		if b, ok := model.check(got.Bytes()); !ok {
			t.Fatalf("seed %d round %d (torn %v): byte %d after crash is %#02x: not a value acknowledged since its last flush",
				seed, round, opts.Torn, b, got.Bytes()[b])
		}
		got.Release()
		v2.Close()
		v.Close()
	}
}
