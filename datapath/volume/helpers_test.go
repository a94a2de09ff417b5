package volume_test

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"keel/datapath/dio"
	"keel/datapath/iobuf"
	"keel/datapath/layout"
	"keel/datapath/volume"
)

var (
	seedFlag = flag.Uint64("seed", 0, "seed of the property and crash tests (0: from the clock)")
	opsFlag  = flag.Int("ops", 2500, "operations per property test run")
)

// testSeed returns the seed to use and logs it so a failure can be rerun.
func testSeed(t testing.TB) uint64 {
	s := *seedFlag
	if s == 0 {
		s = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (rerun with -seed %d)", s, s)
	return s
}

func logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// newMem returns a Mem large enough for a volume of size data bytes.
func newMem(size int64, opts dio.MemOptions) *dio.Mem {
	opts.Size = layout.DataOffset + size
	return dio.NewMem(opts)
}

func createMem(t testing.TB, size int64, opts dio.MemOptions) (*volume.Volume, *dio.Mem) {
	t.Helper()
	m := newMem(size, opts)
	v, err := volume.OpenDevice(m, volume.Options{Create: true, Size: size, Logger: logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, v)
	return v, m
}

func createFile(t testing.TB, dir string, size int64) (*volume.Volume, string) {
	t.Helper()
	return createFileAIO(t, dir, size, dio.AIODefault)
}

// aioModes are the ways a File can issue reads and writes; tests on files
// run on each.
var aioModes = []dio.AIOMode{dio.AIOOff, dio.AIOAlways, dio.AIOConcurrent}

func createFileAIO(t testing.TB, dir string, size int64, mode dio.AIOMode) (*volume.Volume, string) {
	t.Helper()
	p := filepath.Join(dir, "vol")
	v, err := volume.Create(p, size, volume.Options{Logger: logger(t), AIO: mode})
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, v)
	return v, p
}

// closeAtEnd closes v when the test ends, if the test did not (a failed
// test must not leave a file open on a file system it wants to unmount).
func closeAtEnd(t testing.TB, v *volume.Volume) {
	t.Cleanup(func() {
		if err := v.Close(); err != nil && !errors.Is(err, volume.ErrClosed) {
			t.Logf("closing %s at the end of the test: %v", v.Name(), err)
		}
	})
}

// buffer returns n bytes in one of the shapes callers hand the volume: an
// aligned pooled buffer, one misaligned by a few bytes, or a plain slice.
func buffer(rng *rand.Rand, n int) []byte {
	switch rng.IntN(3) {
	case 0:
		return iobuf.Get(n).Bytes()
	case 1:
		k := 1 + rng.IntN(511)
		return iobuf.Get(n + k).Bytes()[k:]
	default:
		return make([]byte, n)
	}
}

func fill(rng *rand.Rand, b []byte) {
	for i := 0; i < len(b); i += 8 {
		x := rng.Uint64()
		for j := 0; j < 8 && i+j < len(b); j++ {
			b[i+j] = byte(x >> (8 * j))
		}
	}
}

// randRange returns a range within size: a third of the time 4 KiB-aligned
// in offset (and often length), a sixth of the time 512-aligned in both,
// otherwise arbitrary; lengths up to about 300 KiB.
func randRange(rng *rand.Rand, size int64) (off, n int64) {
	switch rng.IntN(4) {
	case 0:
		n = 1 + rng.Int64N(8192)
	case 1:
		n = 1 + rng.Int64N(300<<10)
	case 2:
		n = 4096 * (1 + rng.Int64N(16))
	default:
		n = 4096 * (1 + rng.Int64N(75))
	}
	n = min(n, size)
	off = rng.Int64N(size - n + 1)
	switch rng.IntN(6) {
	case 0, 1: // 4 KiB-aligned offset, and often length
		off &^= 4095
		if rng.IntN(2) == 0 {
			n = max(n&^4095, 4096)
		}
	case 2: // 512-aligned, which a 4 KiB-sector device must not see directly
		off &^= 511
		n = max(n&^511, 512)
	}
	return off, min(n, size-off)
}

// firstDiff describes where got and want first differ.
func firstDiff(got, want []byte, base int64) string {
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at volume offset %d: got %#02x, want %#02x", base+int64(i), got[i], want[i])
		}
	}
	return "equal"
}
