package volume_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"keel/datapath/dio"
	"keel/datapath/iobuf"
	"keel/datapath/layout"
	"keel/datapath/volume"
)

func TestCreateOpenFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "vol")

	// Missing without Create: ENOENT. With Create but no size: refused.
	if _, err := volume.Open(path, volume.Options{}); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("Open missing: %v", err)
	}
	if _, err := volume.Open(path, volume.Options{Create: true}); err == nil || !strings.Contains(err.Error(), "give a size") {
		t.Fatalf("Open missing, Create, no size: %v", err)
	}

	// Missing with Create and a size: created, preallocated, clean.
	v, err := volume.Open(path, volume.Options{Create: true, Size: 8 << 20, Logger: logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if v.Size() != 8<<20 || v.BlockSize() != 4096 || v.MinBlockSize() != 1 || v.ReadOnly() || !v.WasClean() {
		t.Fatalf("new volume: size %d block %d min %d ro %v clean %v", v.Size(), v.BlockSize(), v.MinBlockSize(), v.ReadOnly(), v.WasClean())
	}
	st, err := os.Stat(path)
	if err != nil || st.Size() != layout.DataOffset+8<<20 {
		t.Fatalf("file size %v, %v", st.Size(), err)
	}
	var stat unix.Stat_t
	if err := unix.Stat(path, &stat); err != nil || stat.Blocks*512 < st.Size() {
		t.Fatalf("file not preallocated: %d blocks for %d bytes", stat.Blocks, st.Size())
	}

	// The file is locked while open.
	if _, err := volume.Open(path, volume.Options{}); !errors.Is(err, volume.ErrInUse) {
		t.Fatalf("second Open: %v", err)
	}
	w := iobuf.Get(4096)
	copy(w.Bytes(), "hello")
	if err := v.WriteAt(w.Bytes(), 4096, false); err != nil {
		t.Fatal(err)
	}
	id := v.ID()
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); !errors.Is(err, volume.ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}

	// Existing volume, same size or no size: opens with its data.
	for _, size := range []int64{0, 8 << 20} {
		v, err := volume.Open(path, volume.Options{Create: true, Size: size, Logger: logger(t)})
		if err != nil {
			t.Fatal(err)
		}
		r := iobuf.Get(4096)
		if err := v.ReadAt(r.Bytes(), 4096); err != nil || !bytes.Equal(r.Bytes(), w.Bytes()) {
			t.Fatalf("data after reopen: %v", err)
		}
		if v.ID() != id || !v.WasClean() {
			t.Fatalf("reopen: id changed or not clean")
		}
		v.Close()
	}

	// Create on an existing path refuses.
	if _, err := volume.Create(path, 8<<20, volume.Options{}); !errors.Is(err, unix.EEXIST) {
		t.Fatalf("Create existing: %v", err)
	}
}

func TestSizeMismatch(t *testing.T) {
	dir := t.TempDir()
	v, path := createFile(t, dir, 8<<20)
	v.Close()
	_, err := volume.Open(path, volume.Options{Create: true, Size: 4 << 20})
	var sm *volume.SizeMismatchError
	if !errors.As(err, &sm) || !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Open with another size: %v", err)
	}
	want := fmt.Sprintf("volume %s has size 8 MiB (8388608 bytes), not the requested 4 MiB: pass --size 8M or use another --file", path)
	if err.Error() != want {
		t.Fatalf("message:\n got %q\nwant %q", err, want)
	}
	// The big units, and sizes that are not a whole unit.
	for _, c := range []struct {
		have, want int64
		msg        string
	}{
		{4 << 30, 2 << 30, "has size 4 GiB (4294967296 bytes), not the requested 2 GiB: pass --size 4G"},
		{3 << 29, 1 << 40, "has size 1.5 GiB (1610612736 bytes), not the requested 1 TiB: pass --size 1536M"},
		{12288, 4096, "has size 12 KiB (12288 bytes), not the requested 4 KiB: pass --size 12K"},
	} {
		e := &volume.SizeMismatchError{Path: "/x/y", Have: c.have, Want: c.want}
		if !strings.Contains(e.Error(), c.msg) {
			t.Errorf("got %q, want it to contain %q", e.Error(), c.msg)
		}
	}
}

func TestBadSizes(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []int64{0, -4096, 1000, 4096 + 512} {
		_, err := volume.Create(filepath.Join(dir, "v"), size, volume.Options{})
		if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "multiple of 4096") {
			t.Errorf("Create(size %d): %v", size, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "v")); !os.IsNotExist(err) {
		t.Error("a refused Create left a file")
	}
	if _, err := volume.Create(filepath.Join(dir, "v"), 4096, volume.Options{BlockSize: 8192}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("size not a multiple of block size: %v", err)
	}
	// A device too small for the volume asked for.
	m := dio.NewMem(dio.MemOptions{Size: layout.DataOffset + 4096})
	if _, err := volume.OpenDevice(m, volume.Options{Create: true, Size: 8192}); !errors.Is(err, unix.ENOSPC) {
		t.Errorf("volume larger than device: %v", err)
	}
	// A block size that disagrees with the stored one.
	v, path := createFile(t, dir, 1<<20)
	v.Close()
	if _, err := volume.Open(path, volume.Options{BlockSize: 512}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("block size mismatch: %v", err)
	}
}

func TestNotAVolume(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name    string
		content []byte
		want    error
		msg     string
	}{
		{"zeroes", make([]byte, 2<<20), volume.ErrNotVolume, "all zeroes"},
		{"text", bytes.Repeat([]byte("not a volume\n"), 100000), volume.ErrNotVolume, "no keel superblock"},
		{"tiny", []byte("hi"), volume.ErrNotVolume, "too small"},
	} {
		path := filepath.Join(dir, c.name)
		if err := os.WriteFile(path, c.content, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := volume.Open(path, volume.Options{Create: true, Size: 1 << 20})
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: %v; want %v naming %s and saying %q", c.name, err, c.want, path, c.msg)
		}
		// And it is left alone.
		if got, _ := os.ReadFile(path); !bytes.Equal(got, c.content) {
			t.Errorf("%s: refused file was modified", c.name)
		}
	}
	// A blank device without Create is not a volume either.
	if _, err := volume.OpenDevice(newMem(1<<20, dio.MemOptions{}), volume.Options{}); !errors.Is(err, volume.ErrNotVolume) {
		t.Errorf("blank Mem without Create: %v", err)
	}
}

// logBuffer captures a volume's log.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// damage flips bytes of the superblock slot at off on the raw device.
func damage(t *testing.T, m *dio.Mem, slotOff int64, at int) {
	t.Helper()
	b := iobuf.Get(layout.SuperblockSize)
	defer b.Release()
	if err := m.ReadAt(b.Bytes(), slotOff); err != nil {
		t.Fatal(err)
	}
	b.Bytes()[at] ^= 0x5a
	if err := m.WriteAt(b.Bytes(), slotOff, true); err != nil {
		t.Fatal(err)
	}
}

func TestSuperblockDamage(t *testing.T) {
	// A closed volume's slots: create writes generations 1 (B) and 2 (A),
	// open 3 (B, not clean), SetEpoch 4 (A, not clean, epoch 9), Close 5
	// (B, clean, epoch 9).
	fresh := func(t *testing.T) *dio.Mem {
		v, m := createMem(t, 1<<20, dio.MemOptions{})
		if err := v.SetEpoch(9); err != nil {
			t.Fatal(err)
		}
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
		return m.Crash() // everything was synced; a fresh, open Mem
	}
	open := func(m *dio.Mem) (*volume.Volume, string, error) {
		var logs logBuffer
		v, err := volume.OpenDevice(m, volume.Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
		return v, logs.String(), err
	}

	t.Run("slot B (newest) damaged", func(t *testing.T) {
		m := fresh(t)
		damage(t, m, layout.SlotBOffset, 40) // a data-size byte
		v, logs, err := open(m)
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		// Generation 4 in A: epoch 9, written while open, so not clean.
		if v.Epoch() != 9 || v.WasClean() {
			t.Errorf("fell back to epoch %d clean %v; want 9, false", v.Epoch(), v.WasClean())
		}
		if !strings.Contains(logs, "slot damaged") || !strings.Contains(logs, "slot B") || !strings.Contains(logs, "checksum") {
			t.Errorf("damage not reported; log:\n%s", logs)
		}
	})
	t.Run("slot A damaged, then repaired", func(t *testing.T) {
		m := fresh(t)
		damage(t, m, layout.SlotAOffset, 3000) // reserved area: still caught
		v, logs, err := open(m)
		if err != nil {
			t.Fatal(err)
		}
		if !v.WasClean() || v.Epoch() != 9 {
			t.Errorf("newest slot B: clean %v epoch %d", v.WasClean(), v.Epoch())
		}
		if !strings.Contains(logs, "slot A") {
			t.Errorf("damage not reported; log:\n%s", logs)
		}
		// Opening wrote the next generation over the damaged slot A.
		v.Close()
		v, logs, err = open(m.Crash()) // Close synced: the same state, reopenable
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		if strings.Contains(logs, "damaged") {
			t.Errorf("damage still reported after a superblock write:\n%s", logs)
		}
	})
	t.Run("torn write of slot B", func(t *testing.T) {
		// A write of the next superblock that reached only its first
		// sectors: the slot fails its checksum, A is used.
		m := fresh(t)
		b := iobuf.Get(layout.SuperblockSize)
		defer b.Release()
		if err := m.ReadAt(b.Bytes(), layout.SlotBOffset); err != nil {
			t.Fatal(err)
		}
		sb, err := layout.Decode(b.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		sb.Generation += 2
		sb.Epoch = 77
		next := iobuf.Get(layout.SuperblockSize)
		defer next.Release()
		if err := sb.Encode(next.Bytes()); err != nil {
			t.Fatal(err)
		}
		if err := m.WriteAt(next.Bytes()[:1024], layout.SlotBOffset, true); err != nil {
			t.Fatal(err)
		}
		v, logs, err := open(m)
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		if v.Epoch() != 9 || !strings.Contains(logs, "checksum") {
			t.Errorf("torn slot: epoch %d, log:\n%s", v.Epoch(), logs)
		}
	})
	t.Run("both damaged", func(t *testing.T) {
		m := fresh(t)
		damage(t, m, layout.SlotAOffset, 100)
		damage(t, m, layout.SlotBOffset, 100)
		_, _, err := open(m)
		if !errors.Is(err, volume.ErrCorrupt) || !errors.Is(err, layout.ErrChecksum) {
			t.Fatalf("both damaged: %v", err)
		}
		for _, s := range []string{m.Name(), "slot A", "slot B", "refusing"} {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("error %q does not say %q", err, s)
			}
		}
	})
	t.Run("both damaged, file", func(t *testing.T) {
		v, path := createFile(t, t.TempDir(), 1<<20)
		v.Close()
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte{0xff}, layout.SlotAOffset+50)
		f.WriteAt([]byte{0xff}, layout.SlotBOffset+50)
		f.Close()
		if _, err := volume.Open(path, volume.Options{}); !errors.Is(err, volume.ErrCorrupt) || !strings.Contains(err.Error(), path) {
			t.Fatalf("both damaged: %v", err)
		}
	})
}

func TestEpoch(t *testing.T) {
	v, m := createMem(t, 1<<20, dio.MemOptions{})
	defer v.Close()
	if v.Epoch() != 0 {
		t.Fatalf("new volume epoch %d", v.Epoch())
	}
	for _, e := range []uint64{3, 3, 10} {
		if err := v.SetEpoch(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.SetEpoch(9); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("epoch backwards: %v", err)
	}
	if v.Epoch() != 10 {
		t.Fatalf("epoch %d", v.Epoch())
	}
	// Durable on return: a crash right after keeps it.
	v2, err := volume.OpenDevice(m.Crash(), volume.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	if v2.Epoch() != 10 {
		t.Fatalf("epoch after crash %d", v2.Epoch())
	}
}

func TestReadOnly(t *testing.T) {
	v, path := createFile(t, t.TempDir(), 1<<20)
	v.Close()
	before, _ := os.ReadFile(path)
	ro, err := volume.Open(path, volume.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	b := iobuf.Get(4096).Bytes()
	for name, err := range map[string]error{
		"write":    ro.WriteAt(b, 0, false),
		"trim":     ro.Trim(0, 4096, false),
		"zeroes":   ro.WriteZeroes(0, 4096, false, false, false),
		"setEpoch": ro.SetEpoch(5),
	} {
		if !errors.Is(err, unix.EPERM) {
			t.Errorf("%s on read-only: %v", name, err)
		}
	}
	if !ro.ReadOnly() {
		t.Error("ReadOnly false")
	}
	if err := ro.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if err := ro.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("a read-only open changed the file")
	}
}

func TestRangeErrors(t *testing.T) {
	v, _ := createMem(t, 1<<20, dio.MemOptions{})
	defer v.Close()
	size := v.Size()
	b := iobuf.Get(8192).Bytes()
	for _, c := range []struct {
		name string
		err  error
	}{
		{"read past end", v.ReadAt(b[:4096], size-2048)},
		{"read at end", v.ReadAt(b[:1], size)},
		{"negative", v.ReadAt(b[:1], -1)},
		{"write past end", v.WriteAt(b, size-4096, false)},
		{"trim overflow", v.Trim(4096, math.MaxInt64, false)},
		{"zeroes past end", v.WriteZeroes(size, 1, false, false, false)},
		{"cache past end", v.Cache(0, size+1)},
		{"status past end", v.BlockStatus(size-1, 2, func(int64, bool, bool) bool { return true })},
	} {
		if !errors.Is(c.err, unix.EINVAL) {
			t.Errorf("%s: %v, want EINVAL", c.name, c.err)
		}
	}
	// Zero-length requests at the end are fine.
	if err := v.ReadAt(nil, size); err != nil {
		t.Errorf("empty read at end: %v", err)
	}
	if err := v.Cache(0, size); err != nil {
		t.Errorf("cache: %v", err)
	}
}

func TestClosed(t *testing.T) {
	v, _ := createMem(t, 1<<20, dio.MemOptions{})
	v.Close()
	b := iobuf.Get(4096).Bytes()
	for name, err := range map[string]error{
		"read": v.ReadAt(b, 0), "write": v.WriteAt(b, 0, false), "flush": v.Flush(),
		"trim": v.Trim(0, 4096, false), "epoch": v.SetEpoch(1),
	} {
		if !errors.Is(err, volume.ErrClosed) || !errors.Is(err, unix.ESHUTDOWN) {
			t.Errorf("%s after Close: %v", name, err)
		}
	}
}

// TestDiskErrors: a failing device turns into an error for that request
// only, carrying the errno; later requests work.
func TestDiskErrors(t *testing.T) {
	v, m := createMem(t, 1<<20, dio.MemOptions{})
	defer v.Close()
	w := iobuf.Get(8192).Bytes()
	fill(rand.New(rand.NewPCG(1, 1)), w)
	r := iobuf.Get(8192).Bytes()

	m.FailNext(dio.OpWrite, 1, unix.EIO)
	if err := v.WriteAt(w, 0, false); !errors.Is(err, unix.EIO) {
		t.Fatalf("failed write: %v", err)
	}
	if err := v.WriteAt(w, 0, false); err != nil {
		t.Fatalf("write after a failure: %v", err)
	}
	if err := v.ReadAt(r, 0); err != nil || !bytes.Equal(r, w) {
		t.Fatalf("read after a failure: %v", err)
	}

	// A read-modify-write whose read fails writes nothing.
	m.FailNext(dio.OpRead, 1, unix.EIO)
	if err := v.WriteAt(make([]byte, 100), 10, false); !errors.Is(err, unix.EIO) {
		t.Fatalf("failed RMW read: %v", err)
	}
	if err := v.ReadAt(r, 0); err != nil || !bytes.Equal(r, w) {
		t.Fatalf("failed RMW changed data: %v", err)
	}

	m.FailNext(dio.OpWrite, 1, unix.ENOSPC)
	if err := v.WriteAt(w, 8192, true); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("ENOSPC: %v", err)
	}
	m.FailNext(dio.OpRead, 1, unix.EIO)
	if err := v.ReadAt(r, 0); !errors.Is(err, unix.EIO) {
		t.Fatalf("failed read: %v", err)
	}
	m.FailNext(dio.OpPunch, 1, unix.EIO)
	if err := v.Trim(0, 8192, false); !errors.Is(err, unix.EIO) {
		t.Fatalf("failed trim: %v", err)
	}
	m.FailNext(dio.OpExtents, 1, unix.EIO)
	if err := v.BlockStatus(0, 8192, func(int64, bool, bool) bool { return true }); !errors.Is(err, unix.EIO) {
		t.Fatalf("failed block status: %v", err)
	}
	if err := v.Flush(); err != nil {
		t.Fatalf("flush after request failures: %v", err)
	}
}

// TestFlushFailureSticky: after a failed fdatasync no later Flush claims
// durability, and Close does not mark the volume clean.
func TestFlushFailureSticky(t *testing.T) {
	v, m := createMem(t, 1<<20, dio.MemOptions{})
	m.FailNext(dio.OpSync, 1, unix.EIO)
	if err := v.Flush(); !errors.Is(err, unix.EIO) {
		t.Fatalf("failed flush: %v", err)
	}
	if err := v.Flush(); !errors.Is(err, unix.EIO) {
		t.Fatalf("flush after a failed flush: %v", err)
	}
	if err := v.WriteAt(iobuf.Get(4096).Bytes(), 0, false); err != nil {
		t.Fatalf("writes still work: %v", err)
	}
	if err := v.Close(); !errors.Is(err, unix.EIO) {
		t.Fatalf("Close after failed flush: %v", err)
	}
	v2, err := volume.OpenDevice(m.Crash(), volume.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	if v2.WasClean() {
		t.Fatal("volume marked clean after a failed flush")
	}
}

func TestWriteZeroesModes(t *testing.T) {
	v, _ := createMem(t, 1<<20, dio.MemOptions{})
	defer v.Close()
	data := iobuf.Get(65536).Bytes()
	fill(rand.New(rand.NewPCG(2, 2)), data)
	status := func(off, n int64) (holes, zeroes, dataBytes int64) {
		v.BlockStatus(off, n, func(l int64, hole, zero bool) bool {
			switch {
			case hole:
				holes += l
			case zero:
				zeroes += l
			default:
				dataBytes += l
			}
			return true
		})
		return
	}
	if err := v.WriteAt(data, 0, false); err != nil {
		t.Fatal(err)
	}
	// Punch (default), then zero in place (noHole); unaligned edges are
	// written (data).
	if err := v.WriteZeroes(100, 16384, false, false, false); err != nil {
		t.Fatal(err)
	}
	if h, _, _ := status(4096, 8192); h != 8192 {
		t.Errorf("punched inside: %d bytes of hole, want 8192", h)
	}
	if err := v.WriteZeroes(32768, 8192, true, true, true); err != nil {
		t.Fatal(err)
	}
	if h, z, _ := status(32768, 8192); h != 0 || z != 8192 {
		t.Errorf("noHole: %d hole, %d zero; want 0, 8192", h, z)
	}
	r := iobuf.Get(65536).Bytes()
	if err := v.ReadAt(r, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(data)
	clear(want[100 : 100+16384])
	clear(want[32768 : 32768+8192])
	if !bytes.Equal(r, want) {
		t.Fatal(firstDiff(r, want, 0))
	}

	// Without fallocate: fast zero is refused with nothing written; plain
	// zeroing falls back to writing.
	v2, m2 := createMem(t, 1<<20, dio.MemOptions{NoPunch: true, NoZeroRange: true})
	defer v2.Close()
	if err := v2.WriteAt(data, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := v2.WriteZeroes(100, 16384, false, true, false); !errors.Is(err, unix.ENOTSUP) {
		t.Fatalf("fast zero without a fast way: %v", err)
	}
	if err := v2.ReadAt(r, 0); err != nil || !bytes.Equal(r, data) {
		t.Fatal("refused fast zero wrote something")
	}
	// Within one block there is no inside to be fast about: it is written.
	if err := v2.WriteZeroes(100, 200, false, true, false); err != nil {
		t.Fatalf("fast zero of a block fragment: %v", err)
	}
	if err := v2.WriteZeroes(4096, 8192, false, false, false); err != nil {
		t.Fatal(err)
	}
	if s := m2.Stats(); s.ZeroFallbacks != 1 {
		t.Fatalf("zero fallbacks %d, want 1", s.ZeroFallbacks)
	}
	// Trim without punch support is a no-op, not an error.
	if err := v2.Trim(16384, 8192, false); err != nil {
		t.Fatal(err)
	}
	if err := v2.ReadAt(r[:8192], 16384); err != nil || !bytes.Equal(r[:8192], data[16384:16384+8192]) {
		t.Fatal("trim without punch changed data")
	}
}

// TestConcurrentNeighbours: writers of disjoint, unaligned ranges that share
// 4 KiB blocks run concurrently; the range lock keeps each read-modify-write
// from undoing a neighbour's write. Without it, this loses updates.
func TestConcurrentNeighbours(t *testing.T) {
	v, _ := createMem(t, 1<<20, dio.MemOptions{MemAlign: 4096, OffsetAlign: 4096})
	defer v.Close()
	const writers, span, rounds = 8, 1000, 200
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			p := make([]byte, span)
			for r := range rounds {
				for i := range p {
					p[i] = byte(w*31 + r)
				}
				if err := v.WriteAt(p, int64(w*span+7), r%16 == 0); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	// Readers run alongside (and race nothing).
	for range 2 {
		wg.Go(func() {
			p := iobuf.Get(16384).Bytes()
			for range rounds {
				if err := v.ReadAt(p, 0); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	got := make([]byte, writers*span)
	if err := v.ReadAt(got, 7); err != nil {
		t.Fatal(err)
	}
	for w := range writers {
		want := byte(w*31 + rounds - 1)
		for i, c := range got[w*span : (w+1)*span] {
			if c != want {
				t.Fatalf("writer %d byte %d: %#02x, want its last write %#02x", w, i, c, want)
			}
		}
	}
}

// TestConcurrentOverlapping: overlapping aligned and unaligned writes, trims
// and flushes from several goroutines, for the race detector and for
// deadlocks in the range lock; afterwards every byte holds a value some
// request wrote (each writer stamps its id; trims leave zeroes).
func TestConcurrentOverlapping(t *testing.T) {
	v, _ := createMem(t, 256<<10, dio.MemOptions{MemAlign: 4096, OffsetAlign: 4096})
	defer v.Close()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			for range 300 {
				off, n := randRange(rng, v.Size())
				n = min(n, 32768)
				switch rng.IntN(8) {
				case 0:
					if err := v.Flush(); err != nil {
						t.Error(err)
						return
					}
				case 1:
					if err := v.Trim(off, n, false); err != nil {
						t.Error(err)
						return
					}
				default:
					p := buffer(rng, int(n))
					for i := range p {
						p[i] = byte(g + 1)
					}
					if err := v.WriteAt(p, off, false); err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	got := make([]byte, v.Size())
	if err := v.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for i, c := range got {
		if c > 4 {
			t.Fatalf("byte %d is %#02x: no writer wrote that", i, c)
		}
	}
}

// TestNoAllocs: aligned reads and writes allocate nothing, on Mem and on an
// O_DIRECT file.
func TestNoAllocs(t *testing.T) {
	vm, _ := createMem(t, 1<<20, dio.MemOptions{})
	defer vm.Close()
	vf, _ := createFile(t, t.TempDir(), 1<<20)
	defer vf.Close()
	b := iobuf.Get(4096).Bytes()
	for name, v := range map[string]*volume.Volume{"mem": vm, "file": vf} {
		for _, c := range []struct {
			name string
			fn   func()
		}{
			{"ReadAt", func() { _ = v.ReadAt(b, 8192) }},
			{"WriteAt", func() { _ = v.WriteAt(b, 8192, false) }},
			{"WriteAt FUA", func() { _ = v.WriteAt(b, 8192, true) }},
			{"ReadAtSync", func() { _ = v.ReadAtSync(b, 8192) }},
			{"WriteAtSync", func() { _ = v.WriteAtSync(b, 8192, false) }},
			{"WriteAtSync FUA", func() { _ = v.WriteAtSync(b, 8192, true) }},
		} {
			c.fn()
			if a := testing.AllocsPerRun(200, c.fn); a != 0 {
				t.Errorf("%s %s allocates %.1f per call", name, c.name, a)
			}
		}
	}
}
