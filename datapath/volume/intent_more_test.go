package volume_test

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"testing/synctest"

	"golang.org/x/sys/unix"

	"keel/datapath/dio"
	"keel/datapath/iobuf"
	"keel/datapath/layout"
	"keel/datapath/volume"
)

// bigDev is a small Mem that claims to be size bytes: enough for tests
// that touch only the metadata of a large volume.
type bigDev struct {
	*dio.Mem
	size int64
}

func (d *bigDev) Size() int64 { return d.size }

func newBigDev(size int64) *bigDev {
	return &bigDev{Mem: dio.NewMem(dio.MemOptions{Size: layout.DataOffset + 4096}), size: layout.DataOffset + size}
}

// twoBlocks is a volume size whose 4 KiB regions need two bitmap blocks.
const twoBlocks = (layout.RegionsPerBlock + 1600) * 4096

func openBig(t *testing.T, dev volume.Device, ro bool) *volume.Volume {
	t.Helper()
	v, err := volume.OpenDevice(dev, volume.Options{Create: true, Size: twoBlocks, RegionSize: 4096, ReadOnly: ro, Logger: logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// flipByte corrupts one byte of the device, durably.
func flipByte(t *testing.T, m *dio.Mem, off int64) {
	t.Helper()
	b := iobuf.Get(4096)
	defer b.Release()
	base := off &^ 4095
	if err := m.ReadAt(b.Bytes(), base); err != nil {
		t.Fatal(err)
	}
	b.Bytes()[off-base] ^= 0x20
	if err := m.WriteAt(b.Bytes(), base, true); err != nil {
		t.Fatal(err)
	}
}

func reopenBig(t *testing.T, d *bigDev, ro bool) (*volume.Volume, *bigDev) {
	t.Helper()
	d = &bigDev{Mem: d.Mem.Crash(), size: d.size}
	return openBig(t, d, ro), d
}

// TestIntentCorruptBlock: a bitmap block that fails its checksum reads as
// every region of that block dirty, and only that block; ClearDirty
// rewrites it.
func TestIntentCorruptBlock(t *testing.T) {
	d := newBigDev(twoBlocks)
	v := openBig(t, d, false)
	const inBlock1 = layout.RegionsPerBlock + 5
	for _, r := range []int64{10, inBlock1} {
		if err := v.MarkDirty(r*4096, 1); err != nil {
			t.Fatal(err)
		}
	}
	v.Close()
	d = &bigDev{Mem: d.Mem.Crash(), size: d.size} // an open copy
	flipByte(t, d.Mem, layout.BitmapBlocksOffset+layout.BitmapBlockSize+2000)
	want := []run{{10 * 4096, 4096}, {layout.RegionsPerBlock * 4096, twoBlocks - layout.RegionsPerBlock*4096}}
	for _, ro := range []bool{true, false, false} {
		var v2 *volume.Volume
		v2, d = reopenBig(t, d, ro)
		if got := dirtyRuns(v2); !equalRuns(got, want) {
			t.Fatalf("read-only %v: dirty %v, want %v", ro, got, want)
		}
		v2.Close()
	}
	v3, d := reopenBig(t, d, false)
	if err := v3.ClearDirty(); err != nil {
		t.Fatal(err)
	}
	v3.Close()
	v4, _ := reopenBig(t, d, true)
	defer v4.Close()
	if got := dirtyRuns(v4); len(got) != 0 {
		t.Fatalf("after ClearDirty: dirty %v", got)
	}
}

// TestIntentCorruptHeader: a damaged or missing header means every region
// is dirty; a read-write open repairs it durably as all dirty.
func TestIntentCorruptHeader(t *testing.T) {
	for _, c := range []struct {
		name   string
		damage func(*testing.T, *dio.Mem)
	}{
		{"flipped byte", func(t *testing.T, m *dio.Mem) { flipByte(t, m, layout.BitmapHeaderOffset+13) }},
		{"zeroed area", func(t *testing.T, m *dio.Mem) {
			z := iobuf.Get(layout.BitmapLength).Bytes()[:layout.BitmapLength]
			clear(z)
			if err := m.WriteAt(z, layout.BitmapOffset, true); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := newBigDev(twoBlocks)
			v := openBig(t, d, false)
			if err := v.MarkDirty(4096, 1); err != nil {
				t.Fatal(err)
			}
			v.Close()
			d = &bigDev{Mem: d.Mem.Crash(), size: d.size}
			c.damage(t, d.Mem)
			all := []run{{0, twoBlocks}}
			for _, ro := range []bool{true, false, true} {
				var v2 *volume.Volume
				v2, d = reopenBig(t, d, ro)
				if got := dirtyRuns(v2); !equalRuns(got, all) || v2.DirtyBytes() != twoBlocks {
					t.Fatalf("read-only %v: dirty %v (%d bytes), want everything", ro, got, v2.DirtyBytes())
				}
				v2.Close()
			}
			// The read-write open wrote a valid header back.
			h := iobuf.Get(4096)
			if err := d.Mem.Crash().ReadAt(h.Bytes(), layout.BitmapHeaderOffset); err != nil {
				t.Fatal(err)
			}
			if _, err := layout.DecodeBitmapHeader(h.Bytes()); err != nil {
				t.Fatalf("header not repaired: %v", err)
			}
			v3, d := reopenBig(t, d, false)
			if err := v3.ClearDirty(); err != nil {
				t.Fatal(err)
			}
			v3.Close()
			v4, _ := reopenBig(t, d, false)
			defer v4.Close()
			if v4.DirtyBytes() != 0 {
				t.Fatalf("after ClearDirty: %v", dirtyRuns(v4))
			}
		})
	}
}

// TestIntentRegionSize: defaults, automatic growth for large volumes, and
// refusals.
func TestIntentRegionSize(t *testing.T) {
	open := func(size, region int64) (*volume.Volume, error) {
		return volume.OpenDevice(newBigDev(size), volume.Options{Create: true, Size: size, RegionSize: region, Logger: discard})
	}
	for _, c := range []struct{ size, region, want int64 }{
		{1 << 30, 0, 1 << 20},
		{1 << 30, 4096, 4096},
		{8 << 40, 0, 2 << 20},                     // 8 TiB: 1 MiB regions do not fit
		{layout.RegionCapacity << 12, 4096, 4096}, // exactly full
	} {
		v, err := open(c.size, c.region)
		if err != nil {
			t.Fatalf("size %d region %d: %v", c.size, c.region, err)
		}
		if v.RegionSize() != c.want {
			t.Errorf("size %d region %d: region size %d, want %d", c.size, c.region, v.RegionSize(), c.want)
		}
		v.Close()
	}
	for _, c := range []struct {
		size, region int64
		msg          string
	}{
		{layout.RegionCapacity<<12 + 4096, 4096, "use at least 8192"},
		{1 << 30, 3 << 20, "not a power of two"},
		{1 << 30, 2048, "not a power of two"},
		{1 << 30, 1 << 32, "not a power of two"},
	} {
		_, err := open(c.size, c.region)
		if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("size %d region %d: %v, want EINVAL saying %q", c.size, c.region, err, c.msg)
		}
	}
	// Smaller than the block size.
	_, err := volume.OpenDevice(newBigDev(1<<30), volume.Options{Create: true, Size: 1 << 30, BlockSize: 16384, RegionSize: 8192, Logger: discard})
	if !errors.Is(err, unix.EINVAL) {
		t.Errorf("region below the block size: %v", err)
	}
	// An existing volume refuses a region size too small for it.
	d := newBigDev(layout.RegionCapacity<<12 + 4096)
	v, err := volume.OpenDevice(d, volume.Options{Create: true, Size: layout.RegionCapacity<<12 + 4096, Logger: discard})
	if err != nil {
		t.Fatal(err)
	}
	v.Close()
	if _, err := volume.OpenDevice(&bigDev{Mem: d.Mem.Crash(), size: d.size}, volume.Options{RegionSize: 4096, Logger: discard}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("reopen with too small regions: %v", err)
	}
}

// TestMarkDirtyMarkedIsFree: marking regions already marked touches no
// device (every device operation fails here) and allocates nothing.
func TestMarkDirtyMarkedIsFree(t *testing.T) {
	v, m := createMem(t, 8<<20, dio.MemOptions{})
	if err := v.MarkDirty(1<<20, 3<<20); err != nil {
		t.Fatal(err)
	}
	m.FailNext(dio.OpAll, 1<<30, unix.EIO)
	allocs := testing.AllocsPerRun(200, func() {
		if err := v.MarkDirty(1<<20+12345, 2<<20); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("MarkDirty of marked regions: %v allocations, want 0", allocs)
	}
	if err := v.MarkDirty(0, 1); !errors.Is(err, unix.EIO) {
		t.Fatalf("MarkDirty of a new region with a failing device: %v, want EIO", err)
	}
	if got := dirtyRuns(v); !equalRuns(got, []run{{1 << 20, 3 << 20}}) {
		t.Fatalf("after the failure: dirty %v", got)
	}
	m.FailNext(dio.OpAll, 0, 0)
	if err := v.MarkDirty(0, 1); err != nil {
		t.Fatal(err)
	}
}

// gateDev holds the first write of bitmap block 0 until gate is closed,
// and counts bitmap block writes.
type gateDev struct {
	*bigDev
	gate chan struct{}

	mu      sync.Mutex
	armed   bool
	held    bool
	bitmapW int
}

func (d *gateDev) WriteAt(p []byte, off int64, fua bool) error {
	d.mu.Lock()
	hold := d.armed && !d.held && off == layout.BitmapBlocksOffset
	d.held = d.held || hold
	if d.armed && off >= layout.BitmapBlocksOffset && off < layout.DataOffset {
		d.bitmapW++
	}
	d.mu.Unlock()
	if hold {
		<-d.gate
	}
	return d.bigDev.WriteAt(p, off, fua)
}

// TestMarkDirtyCoalesces: while one write of a bitmap block is in flight,
// callers needing the same block wait and then share one write; a caller
// needing another block is not held up.
func TestMarkDirtyCoalesces(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := &gateDev{bigDev: newBigDev(twoBlocks), gate: make(chan struct{})}
		v := openBig(t, d, false)
		defer v.Close()
		d.mu.Lock()
		d.armed = true
		d.mu.Unlock()

		first := make(chan error, 1)
		go func() { first <- v.MarkDirty(0, 1) }()
		synctest.Wait() // its block write is held
		const waiters = 8
		same := make(chan error, waiters)
		for i := range waiters {
			go func() { same <- v.MarkDirty(int64(i+1)*4096, 4096) }()
		}
		if err := v.MarkDirty((layout.RegionsPerBlock+3)*4096, 1); err != nil {
			t.Fatal(err) // block 1 while block 0's write is held: returns
		}
		synctest.Wait()
		select {
		case err := <-same:
			t.Fatalf("a caller for block 0 returned (%v) before its block was written", err)
		default:
		}
		close(d.gate)
		if err := <-first; err != nil {
			t.Fatal(err)
		}
		for range waiters {
			if err := <-same; err != nil {
				t.Fatal(err)
			}
		}
		d.mu.Lock()
		n := d.bitmapW
		d.mu.Unlock()
		// The held write, one for all the waiters, one for block 1.
		if n != 3 {
			t.Fatalf("%d bitmap block writes, want 3", n)
		}
		if got := dirtyRuns(v); !equalRuns(got, []run{{0, (waiters + 1) * 4096}, {(layout.RegionsPerBlock + 3) * 4096, 4096}}) {
			t.Fatalf("dirty %v", got)
		}
	})
}

// BenchmarkMarkDirtyMarked: the per-write cost of MarkDirty while degraded,
// once the regions are marked (must be 0 allocs).
func BenchmarkMarkDirtyMarked(b *testing.B) {
	v, _ := createMem(b, 64<<20, dio.MemOptions{})
	if err := v.MarkDirty(0, 64<<20); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		off := int64(0)
		for pb.Next() {
			if err := v.MarkDirty(off, 128<<10); err != nil {
				b.Error(err)
				return
			}
			off = (off + 4<<20) % (60 << 20)
		}
	})
}
