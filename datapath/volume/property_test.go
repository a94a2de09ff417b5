package volume_test

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"

	"golang.org/x/sys/unix"

	"keel/datapath/dio"
	"keel/datapath/iobuf"
	"keel/datapath/volume"
)

// caps says what the device under a property run can do, which decides
// what the model expects of trims and fast zeroes.
type caps struct {
	punch    bool // Trim deallocates (and so zeroes) the aligned inside
	fastZero bool // WriteZeroes with fastZero succeeds
	calls    ioCalls
}

// ioCalls says which calls runModel reads and writes with.
type ioCalls int

const (
	mixedCalls ioCalls = iota // ReadAt/WriteAt or ReadAtSync/WriteAtSync, at random
	asyncCalls                // ReadAt and WriteAt only
	syncCalls                 // ReadAtSync and WriteAtSync only
)

func (c ioCalls) sync(rng *rand.Rand) bool {
	switch c {
	case asyncCalls:
		return false
	case syncCalls:
		return true
	}
	return rng.IntN(2) == 0
}

func (c ioCalls) String() string { return [...]string{"mixed", "async", "sync"}[c] }

func readAt(v *volume.Volume, p []byte, off int64, sync bool) error {
	if sync {
		return v.ReadAtSync(p, off)
	}
	return v.ReadAt(p, off)
}

func writeAt(v *volume.Volume, p []byte, off int64, fua, sync bool) error {
	if sync {
		return v.WriteAtSync(p, off, fua)
	}
	return v.WriteAt(p, off, fua)
}

// runModel applies ops random operations to v and to a plain byte-slice
// model, checking every read, every block status and finally the whole
// volume. It returns the model.
func runModel(t *testing.T, v *volume.Volume, rng *rand.Rand, ops int, c caps, seed uint64) []byte {
	t.Helper()
	size := v.Size()
	model := make([]byte, size)
	align := int64(v.IOAlign())
	fail := func(i int, format string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d op %d: "+format, append([]any{seed, i}, args...)...)
	}
	for i := range ops {
		off, n := randRange(rng, size)
		switch k := rng.IntN(20); {
		case k < 7: // write
			p := buffer(rng, int(n))
			fill(rng, p)
			if err := writeAt(v, p, off, rng.IntN(8) == 0, c.calls.sync(rng)); err != nil {
				fail(i, "WriteAt(%d, %d): %v", off, n, err)
			}
			copy(model[off:], p)
		case k < 13: // read
			p := buffer(rng, int(n))
			if err := readAt(v, p, off, c.calls.sync(rng)); err != nil {
				fail(i, "ReadAt(%d, %d): %v", off, n, err)
			}
			if !bytes.Equal(p, model[off:off+n]) {
				fail(i, "ReadAt(%d, %d): %s", off, n, firstDiff(p, model[off:off+n], off))
			}
		case k < 15: // trim
			if err := v.Trim(off, n, rng.IntN(4) == 0); err != nil {
				fail(i, "Trim(%d, %d): %v", off, n, err)
			}
			if a, b := (off+align-1)&^(align-1), (off+n)&^(align-1); c.punch && a < b {
				clear(model[a:b])
			}
		case k < 17: // write zeroes
			noHole, fast := rng.IntN(2) == 0, rng.IntN(2) == 0
			err := v.WriteZeroes(off, n, noHole, fast, rng.IntN(4) == 0)
			inside := (off+align-1)&^(align-1) < (off+n)&^(align-1)
			if fast && !c.fastZero && inside {
				if !errors.Is(err, unix.ENOTSUP) {
					fail(i, "WriteZeroes(%d, %d, fast) without a fast way: %v, want ENOTSUP", off, n, err)
				}
				break // nothing written
			}
			if err != nil {
				fail(i, "WriteZeroes(%d, %d, noHole %v, fast %v): %v", off, n, noHole, fast, err)
			}
			clear(model[off : off+n])
		case k < 18:
			if err := v.Flush(); err != nil {
				fail(i, "Flush: %v", err)
			}
		default: // block status: holes and zero extents must read as zeroes
			var total int64
			pos := off
			err := v.BlockStatus(off, n, func(l int64, hole, zero bool) bool {
				if l <= 0 || pos+l > off+n {
					fail(i, "BlockStatus(%d, %d): extent [%d, +%d) outside the range", off, n, pos, l)
				}
				if hole && !zero {
					fail(i, "BlockStatus: hole not zero")
				}
				if zero && !bytes.Equal(model[pos:pos+l], make([]byte, l)) {
					fail(i, "BlockStatus(%d, %d): [%d, +%d) reported zero but model has data", off, n, pos, l)
				}
				pos += l
				total += l
				return true
			})
			if err != nil {
				fail(i, "BlockStatus(%d, %d): %v", off, n, err)
			}
			if total != n {
				fail(i, "BlockStatus(%d, %d) covered %d bytes", off, n, total)
			}
		}
	}
	checkAll(t, v, model, seed)
	return model
}

// checkAll reads the whole volume in pieces and compares it to model.
func checkAll(t *testing.T, v *volume.Volume, model []byte, seed uint64) {
	t.Helper()
	b := iobuf.Get(1 << 20)
	defer b.Release()
	for off := int64(0); off < int64(len(model)); off += 1 << 20 {
		p := b.Bytes()[:min(1<<20, int64(len(model))-off)]
		if err := v.ReadAt(p, off); err != nil {
			t.Fatalf("seed %d: final read at %d: %v", seed, off, err)
		}
		if !bytes.Equal(p, model[off:off+int64(len(p))]) {
			t.Fatalf("seed %d: final check: %s", seed, firstDiff(p, model[off:], off))
		}
	}
}

func TestPropertyMem(t *testing.T) {
	for _, c := range []struct {
		name string
		opts dio.MemOptions
		caps caps
	}{
		{"512", dio.MemOptions{}, caps{punch: true, fastZero: true}},
		{"4k", dio.MemOptions{MemAlign: 4096, OffsetAlign: 4096}, caps{punch: true, fastZero: true}},
		{"4k-no-fallocate", dio.MemOptions{MemAlign: 4096, OffsetAlign: 4096, NoPunch: true, NoZeroRange: true}, caps{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			seed := testSeed(t)
			rng := rand.New(rand.NewPCG(seed, 1))
			const size = 4 << 20
			v, m := createMem(t, size, c.opts)
			model := runModel(t, v, rng, *opsFlag, c.caps, seed)
			if err := v.Close(); err != nil {
				t.Fatal(err)
			}
			// Close flushed everything: a crash now loses nothing, and the
			// volume reopens clean.
			v2, err := volume.OpenDevice(m.Crash(), volume.Options{Logger: logger(t)})
			if err != nil {
				t.Fatalf("seed %d: reopen: %v", seed, err)
			}
			defer v2.Close()
			if !v2.WasClean() {
				t.Errorf("seed %d: reopened after Close: not clean", seed)
			}
			checkAll(t, v2, model, seed)
		})
	}
}

// TestPropertyFile runs the model against an O_DIRECT file on the work disk
// (ext4, 512-byte direct-I/O alignment), with each way of issuing I/O.
func TestPropertyFile(t *testing.T) {
	for _, mode := range aioModes {
		t.Run("aio="+mode.String(), func(t *testing.T) { testPropertyFile(t, mode) })
	}
}

func testPropertyFile(t *testing.T, mode dio.AIOMode) {
	seed := testSeed(t)
	rng := rand.New(rand.NewPCG(seed, 2))
	const size = 8 << 20
	v, path := createFileAIO(t, t.TempDir(), size, mode)
	model := runModel(t, v, rng, *opsFlag, caps{punch: true, fastZero: true}, seed)
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := volume.Open(path, volume.Options{Size: size, Logger: logger(t), AIO: mode})
	if err != nil {
		t.Fatalf("seed %d: reopen: %v", seed, err)
	}
	defer v2.Close()
	if !v2.WasClean() {
		t.Errorf("seed %d: reopened after Close: not clean", seed)
	}
	checkAll(t, v2, model, seed)
}

// TestSyncCallsAgree runs the same operations through ReadAt/WriteAt only
// and through ReadAtSync/WriteAtSync only, on O_DIRECT files with AIO
// always on: every read matches the model either way, the final contents
// are the same, and each run took the path it asked for (dio.Stats).
func TestSyncCallsAgree(t *testing.T) {
	seed := testSeed(t)
	const size = 8 << 20
	var models [][]byte
	for _, calls := range []ioCalls{asyncCalls, syncCalls} {
		t.Run(calls.String(), func(t *testing.T) {
			f, err := dio.Create(t.TempDir()+"/v", 16<<20)
			if err != nil {
				t.Fatal(err)
			}
			if err := f.EnableAIO(dio.AIOAlways, 16); err != nil {
				t.Skipf("no native AIO here: %v", err)
			}
			v, err := volume.OpenDevice(f, volume.Options{Create: true, Size: size, Logger: logger(t)})
			if err != nil {
				f.Close()
				t.Fatal(err)
			}
			defer v.Close()
			before := f.Stats()
			rng := rand.New(rand.NewPCG(seed, 7))
			models = append(models, runModel(t, v, rng, *opsFlag, caps{punch: true, fastZero: true, calls: calls}, seed))
			st := f.Stats()
			syncN, aioN := st.SyncRequests-before.SyncRequests, st.AIORequests-before.AIORequests
			// runModel's final check reads with ReadAt in both runs.
			switch {
			case calls == syncCalls && syncN == 0:
				t.Errorf("sync calls: dio served no request synchronously (AIO %d)", aioN)
			case calls == asyncCalls && (syncN != 0 || aioN == 0):
				t.Errorf("async calls: %d synchronous requests, %d through AIO; want 0 and some", syncN, aioN)
			}
		})
	}
	if len(models) == 2 && !bytes.Equal(models[0], models[1]) {
		t.Fatalf("seed %d: the two runs ended with different contents", seed)
	}
}
