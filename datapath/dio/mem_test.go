package dio

import (
	"bytes"
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"keel/datapath/iobuf"
)

// device is the method set File and Mem share (volume.Device, seen from here).
type device interface {
	Name() string
	Size() int64
	MemAlign() int
	OffsetAlign() int
	ReadAt(p []byte, off int64) error
	WriteAt(p []byte, off int64, fua bool) error
	Sync() error
	PunchHole(off, n int64, fallback bool) (bool, error)
	ZeroRange(off, n int64, fallback bool) (bool, error)
	Extents(off, n int64, fn func(length int64, hole, zero bool) bool) error
	Close() error
}

var _ device = (*Mem)(nil)

func pattern(n int, seed byte) []byte {
	b := iobuf.Get(n).Bytes()
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>9)
	}
	return b
}

func readBack(t *testing.T, d device, off int64, n int) []byte {
	t.Helper()
	b := iobuf.Get(n).Bytes()
	if err := d.ReadAt(b, off); err != nil {
		t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
	}
	return b
}

type extent struct {
	n          int64
	hole, zero bool
}

func extents(t *testing.T, d device, off, n int64) []extent {
	t.Helper()
	var out []extent
	var total int64
	if err := d.Extents(off, n, func(l int64, hole, zero bool) bool {
		if l <= 0 {
			t.Fatalf("extent of length %d", l)
		}
		if hole && !zero {
			t.Fatalf("hole not reported as zero")
		}
		out = append(out, extent{l, hole, zero})
		total += l
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if total != n {
		t.Fatalf("extents cover %d bytes, want %d: %v", total, n, out)
	}
	return out
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestMemAlignment4K(t *testing.T) {
	m := NewMem(MemOptions{Size: 1 << 20, MemAlign: 4096, OffsetAlign: 4096})
	b := iobuf.Get(8192).Bytes()
	if err := m.WriteAt(b[:4096], 512, false); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("512-aligned write on a 4K Mem: %v", err)
	}
	if err := m.WriteAt(b[512:4608], 4096, false); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("512-aligned buffer on a 4K Mem: %v", err)
	}
	if err := m.WriteAt(b[:4096], 4096, false); err != nil {
		t.Fatal(err)
	}
}

func TestMemCrash(t *testing.T) {
	m := NewMem(MemOptions{Size: 1 << 20})
	a, b, c := pattern(4096, 1), pattern(4096, 2), pattern(4096, 3)
	must(t, m.WriteAt(a, 0, false))
	must(t, m.Sync())
	must(t, m.WriteAt(b, 4096, true))  // FUA: durable
	must(t, m.WriteAt(c, 8192, false)) // never synced
	must(t, m.WriteAt(c, 0, false))    // overwrites synced a, unsynced
	_, err := m.PunchHole(12288, 4096, true)
	must(t, err)

	// The crashed copy has only durable data; m keeps its current state.
	cr := m.Crash()
	for _, x := range []struct {
		off  int64
		want []byte
	}{{0, a}, {4096, b}, {8192, make([]byte, 4096)}} {
		if got := readBack(t, cr, x.off, 4096); !bytes.Equal(got, x.want) {
			t.Errorf("after crash, block at %d is not the durable one", x.off)
		}
	}
	if got := readBack(t, m, 0, 4096); !bytes.Equal(got, c) {
		t.Error("Crash changed the original")
	}
	// Synced data is data, not a hole, after the crash.
	if ext := extents(t, cr, 0, 8192); len(ext) != 1 || ext[0].hole {
		t.Errorf("crashed extents %v", ext)
	}

	// After Sync everything survives.
	must(t, m.Sync())
	cr = m.Crash()
	if got := readBack(t, cr, 0, 12288); !bytes.Equal(got, append(append(append([]byte(nil), c...), b...), c...)) {
		t.Error("synced data lost in crash")
	}
	if ext := extents(t, cr, 12288, 4096); len(ext) != 1 || !ext[0].hole {
		t.Errorf("synced punch lost in crash: %v", ext)
	}
}

func TestMemTornCrash(t *testing.T) {
	// With Torn, each unsynced sector is either its durable or its current
	// contents, and over a few crashes both outcomes occur.
	m := NewMem(MemOptions{Size: 1 << 20, Torn: true, Seed: 42})
	old, nw := pattern(65536, 1), pattern(65536, 2)
	must(t, m.WriteAt(old, 0, true))
	must(t, m.WriteAt(nw, 0, false))
	var sawOld, sawNew bool
	for range 4 {
		got := readBack(t, m.Crash(), 0, 65536)
		for s := 0; s < 65536; s += SectorSize {
			g := got[s : s+SectorSize]
			switch {
			case bytes.Equal(g, old[s:s+SectorSize]):
				sawOld = true
			case bytes.Equal(g, nw[s:s+SectorSize]):
				sawNew = true
			default:
				t.Fatalf("sector %d is neither old nor new", s/SectorSize)
			}
		}
	}
	if !sawOld || !sawNew {
		t.Fatalf("torn crashes kept old %v new %v: want both", sawOld, sawNew)
	}
}

func TestMemFaults(t *testing.T) {
	m := NewMem(MemOptions{Size: 1 << 20})
	w := pattern(4096, 1)
	m.FailNext(OpWrite, 1, unix.EIO)
	// A read is not a write: it is not failed.
	must(t, m.ReadAt(iobuf.Get(4096).Bytes(), 0))
	err := m.WriteAt(w, 0, false)
	var de *Error
	if !errors.Is(err, unix.EIO) || !errors.As(err, &de) || de.Off != 0 || de.Len != 4096 {
		t.Fatalf("injected write error: %v", err)
	}
	if got := readBack(t, m, 0, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("a failed write changed data")
	}
	must(t, m.WriteAt(w, 0, false)) // only one failure was asked for

	m.Fail(func(op Op, off, n int64) unix.Errno {
		if op == OpWrite && off >= 65536 {
			return unix.ENOSPC
		}
		return 0
	})
	if err := m.WriteAt(w, 65536, false); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("predicate fault: %v", err)
	}
	must(t, m.WriteAt(w, 4096, false))
	m.Fail(nil)
	must(t, m.WriteAt(w, 65536, false))

	m.FailNext(OpSync, 1, unix.EIO)
	if err := m.Sync(); !errors.Is(err, unix.EIO) {
		t.Fatalf("injected sync error: %v", err)
	}
	if got := readBack(t, m.Crash(), 65536, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("a failed sync made data durable")
	}
}

func TestMemZeroFallback(t *testing.T) {
	m := NewMem(MemOptions{Size: 1 << 20, NoPunch: true, NoZeroRange: true})
	w := pattern(8192, 1)
	must(t, m.WriteAt(w, 0, false))
	if fast, err := m.PunchHole(0, 4096, false); fast || !errors.Is(err, unix.ENOTSUP) {
		t.Fatalf("refused punch: fast %v err %v", fast, err)
	}
	if got := readBack(t, m, 0, 8192); !bytes.Equal(got, w) {
		t.Fatal("refused punch changed data")
	}
	if fast, err := m.ZeroRange(0, 4096, true); fast || err != nil {
		t.Fatalf("fallback zero: fast %v err %v", fast, err)
	}
	if got := readBack(t, m, 0, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("fallback zero did not zero")
	}
	if ext := extents(t, m, 0, 4096); ext[0].zero {
		t.Fatal("written zeroes reported as a zero extent")
	}
	if s := m.Stats(); s.ZeroFallbacks != 1 || s.ZeroBytesWritten != 4096 {
		t.Fatalf("stats %+v", s)
	}
}

func TestBitsetRuns(t *testing.T) {
	b := newBitset(300)
	b.setRange(3, 70)
	b.setRange(128, 129)
	b.setRange(250, 300)
	var got [][2]int64
	b.forEachRun(func(s, e int64) { got = append(got, [2]int64{s, e}) })
	want := [][2]int64{{3, 70}, {128, 129}, {250, 300}}
	if len(got) != len(want) {
		t.Fatalf("runs %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("runs %v, want %v", got, want)
		}
	}
}
