package volume_test

import (
	"testing"

	"keel/datapath/dio"
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
