package dio

import (
	"bytes"
	"errors"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"keel/datapath/iobuf"
)

var _ device = (*File)(nil)

const testSize = 4 << 20

// devices returns a fresh File (in a temp dir on the work disk, which checks
// O_DIRECT alignment) and a fresh Mem, by name.
func devices(t *testing.T) map[string]func(t *testing.T) device {
	return map[string]func(t *testing.T) device{
		"file": func(t *testing.T) device {
			f, err := Create(filepath.Join(t.TempDir(), "dev"), testSize)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			return f
		},
		"file-aio": func(t *testing.T) device { return createAIO(t, AIOAlways, 8) },
		"mem":      func(t *testing.T) device { return NewMem(MemOptions{Size: testSize}) },
	}
}

// createAIO returns a fresh File with native AIO in mode, depth slots.
func createAIO(t *testing.T, mode AIOMode, depth int) *File {
	t.Helper()
	f, err := Create(filepath.Join(t.TempDir(), "dev"), testSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.EnableAIO(mode, depth); err != nil {
		t.Fatal(err)
	}
	if f.AIO() != mode {
		t.Fatalf("AIO() = %v after EnableAIO(%v)", f.AIO(), mode)
	}
	return f
}

func TestDeviceConformance(t *testing.T) {
	for name, mk := range devices(t) {
		t.Run(name, func(t *testing.T) {
			d := mk(t)
			if d.Size() != testSize {
				t.Fatalf("Size %d", d.Size())
			}
			ma, oa := d.MemAlign(), d.OffsetAlign()
			if ma <= 0 || oa < 512 || oa&(oa-1) != 0 || ma&(ma-1) != 0 || ma > iobuf.Align {
				t.Fatalf("alignment mem %d off %d", ma, oa)
			}

			// A fresh device is one hole that reads zeroes.
			if ext := extents(t, d, 0, testSize); len(ext) != 1 || !ext[0].hole {
				t.Fatalf("fresh device extents %v", ext)
			}
			if got := readBack(t, d, 8192, 8192); !bytes.Equal(got, make([]byte, 8192)) {
				t.Fatal("fresh device does not read zeroes")
			}

			// Writes read back, plain and FUA.
			w := pattern(65536, 1)
			if err := d.WriteAt(w, 65536, false); err != nil {
				t.Fatal(err)
			}
			w2 := pattern(8192, 9)
			if err := d.WriteAt(w2, 1<<20, true); err != nil {
				t.Fatal(err)
			}
			if err := d.Sync(); err != nil {
				t.Fatal(err)
			}
			if got := readBack(t, d, 65536, 65536); !bytes.Equal(got, w) {
				t.Fatal("write did not read back")
			}
			if got := readBack(t, d, 1<<20, 8192); !bytes.Equal(got, w2) {
				t.Fatal("FUA write did not read back")
			}
			if ext := extents(t, d, 65536, 65536); len(ext) != 1 || ext[0].hole || ext[0].zero {
				t.Fatalf("written range extents %v", ext)
			}

			// Punch a hole in the middle of the written range.
			fast, err := d.PunchHole(65536+16384, 16384, true)
			if err != nil || !fast {
				t.Fatalf("PunchHole: fast %v err %v", fast, err)
			}
			got := readBack(t, d, 65536, 65536)
			want := append([]byte(nil), w...)
			clear(want[16384:32768])
			if !bytes.Equal(got, want) {
				t.Fatal("punched range does not read zeroes, or neighbours changed")
			}
			sawHole := false
			for _, e := range extents(t, d, 65536, 65536) {
				sawHole = sawHole || e.hole
			}
			if !sawHole {
				t.Fatal("punched range not reported as a hole")
			}

			// Zero a range keeping it allocated.
			if fast, err := d.ZeroRange(65536+40960, 8192, true); err != nil || !fast {
				t.Fatalf("ZeroRange: fast %v err %v", fast, err)
			}
			clear(want[40960:49152])
			if got := readBack(t, d, 65536, 65536); !bytes.Equal(got, want) {
				t.Fatal("zeroed range does not read zeroes, or neighbours changed")
			}

			// Misaligned offset, length and buffer are EINVAL, as O_DIRECT says.
			// (Test on written data: the kernel does not check alignment
			// for reads of never-written blocks.)
			buf := iobuf.Get(2 * oa).Bytes()
			for _, c := range []struct {
				name string
				err  error
			}{
				{"offset", d.WriteAt(buf[:oa], 65536+1, false)},
				{"length", d.WriteAt(buf[:oa-1], 65536, false)},
				{"read offset", d.ReadAt(buf[:oa], 65536+1)},
			} {
				var de *Error
				if !errors.Is(c.err, unix.EINVAL) || !errors.As(c.err, &de) {
					t.Errorf("misaligned %s: %v, want *Error wrapping EINVAL", c.name, c.err)
				}
			}
			if _, err := d.PunchHole(1, int64(oa), true); !errors.Is(err, unix.EINVAL) {
				t.Errorf("misaligned punch: %v", err)
			}

			// Reading past the end is EIO.
			if err := d.ReadAt(buf[:oa], testSize); !errors.Is(err, unix.EIO) {
				t.Errorf("read past end: %v", err)
			}

			// Extents stops when fn says so.
			calls := 0
			if err := d.Extents(0, testSize, func(int64, bool, bool) bool { calls++; return false }); err != nil || calls != 1 {
				t.Errorf("Extents after false: %d calls, err %v", calls, err)
			}

			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			if err := d.Close(); !errors.Is(err, unix.EBADF) {
				t.Errorf("second Close: %v", err)
			}
		})
	}
}

func TestFileFallbacks(t *testing.T) {
	f, err := Create(filepath.Join(t.TempDir(), "dev"), testSize)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := pattern(16384, 3)
	if err := f.WriteAt(w, 0, false); err != nil {
		t.Fatal(err)
	}

	// FUA without RWF_DSYNC: write + fdatasync, counted.
	f.noDSync.Store(true)
	if err := f.WriteAt(w, 16384, true); err != nil {
		t.Fatal(err)
	}
	if got := readBack(t, f, 16384, 16384); !bytes.Equal(got, w) {
		t.Fatal("fallback FUA write did not read back")
	}
	if s := f.Stats(); s.FUAFallbacks != 1 {
		t.Fatalf("FUAFallbacks %d", s.FUAFallbacks)
	}

	// No fallocate: fallback=false refuses with EOPNOTSUPP and writes nothing.
	f.noPunch.Store(true)
	f.noZeroRange.Store(true)
	fast, err := f.PunchHole(0, 4096, false)
	if fast || !errors.Is(err, unix.EOPNOTSUPP) || !errors.Is(err, unix.ENOTSUP) {
		t.Fatalf("PunchHole without fallback: fast %v err %v", fast, err)
	}
	if got := readBack(t, f, 0, 16384); !bytes.Equal(got, w) {
		t.Fatal("refused PunchHole changed data")
	}
	// fallback=true writes zeroes, counted; more than one chunk.
	big := int64(zeroChunk + 8192)
	if err := f.WriteAt(pattern(int(big), 5), 1<<20, false); err != nil {
		t.Fatal(err)
	}
	for _, z := range []func(off, n int64, fb bool) (bool, error){f.PunchHole, f.ZeroRange} {
		if fast, err := z(1<<20, big, true); fast || err != nil {
			t.Fatalf("fallback zero: fast %v err %v", fast, err)
		}
		if got := readBack(t, f, 1<<20, int(big)); !bytes.Equal(got, make([]byte, big)) {
			t.Fatal("fallback zero does not read zeroes")
		}
	}
	if s := f.Stats(); s.ZeroFallbacks != 2 || s.ZeroBytesWritten != 2*big {
		t.Fatalf("zero fallback stats %+v", s)
	}
}

func TestFileOpenErrors(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "dev")
	if _, err := Open(p, false); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("Open missing: %v", err)
	}
	f, err := Create(p, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Create(p, 1<<20); !errors.Is(err, unix.EEXIST) {
		t.Fatalf("Create existing: %v", err)
	}
	// The replica is locked while open.
	if _, err := Open(p, false); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("second Open: %v", err)
	}
	f.Close()
	g, err := Open(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if g.Size() != 1<<20 {
		t.Fatalf("size %d", g.Size())
	}
	if err := g.WriteAt(iobuf.Get(4096).Bytes(), 0, false); !errors.Is(err, unix.EBADF) {
		t.Fatalf("write to read-only: %v", err)
	}
	if _, err := Open(dir, false); err == nil {
		t.Fatal("opened a directory")
	}
	if _, err := Create(filepath.Join(dir, "zero"), 0); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Create size 0: %v", err)
	}
}

func TestFileNoAllocs(t *testing.T) {
	for _, mode := range []AIOMode{AIOOff, AIOAlways} {
		t.Run(mode.String(), func(t *testing.T) { testNoAllocs(t, mode) })
	}
}

func testNoAllocs(t *testing.T, mode AIOMode) {
	f := createAIO(t, mode, 4)
	b := iobuf.Get(4096).Bytes()
	for _, c := range []struct {
		name string
		fn   func()
	}{
		{"ReadAt", func() { _ = f.ReadAt(b, 8192) }},
		{"WriteAt", func() { _ = f.WriteAt(b, 8192, false) }},
		{"WriteAt FUA", func() { _ = f.WriteAt(b, 8192, true) }},
	} {
		c.fn()
		if a := testing.AllocsPerRun(100, c.fn); a != 0 {
			t.Errorf("%s allocates %.1f per call", c.name, a)
		}
	}
	if s := f.Stats(); (mode == AIOAlways) != (s.AIORequests >= 3*101) || s.AIOFallbacks != 0 {
		t.Errorf("mode %v: stats %+v", mode, s)
	}
}

func BenchmarkFile(b *testing.B) {
	for _, mode := range []AIOMode{AIOOff, AIOAlways} {
		b.Run("aio="+mode.String(), func(b *testing.B) { benchFile(b, mode) })
	}
}

func benchFile(b *testing.B, mode AIOMode) {
	f, err := Create(filepath.Join(b.TempDir(), "dev"), 64<<20)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.EnableAIO(mode, 64); err != nil {
		b.Fatal(err)
	}
	buf := iobuf.Get(4096).Bytes()
	for _, c := range []struct {
		name string
		fn   func(off int64) error
	}{
		{"ReadAt4K", func(off int64) error { return f.ReadAt(buf, off) }},
		{"WriteAt4K", func(off int64) error { return f.WriteAt(buf, off, false) }},
		{"WriteAt4KFUA", func(off int64) error { return f.WriteAt(buf, off, true) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(4096)
			off := int64(0)
			for b.Loop() {
				if err := c.fn(off); err != nil {
					b.Fatal(err)
				}
				off = (off + 4096) % (64 << 20)
			}
		})
	}
	b.Run("ReadAt4KParallel", func(b *testing.B) {
		b.SetParallelism(16)
		b.SetBytes(4096)
		b.RunParallel(func(pb *testing.PB) {
			p := iobuf.Get(4096)
			defer p.Release()
			off := int64(0)
			for pb.Next() {
				if err := f.ReadAt(p.Bytes(), off); err != nil {
					b.Error(err)
					return
				}
				off = (off + 1<<20 + 4096) % (64 << 20)
			}
		})
	})
}
