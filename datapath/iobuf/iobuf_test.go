package iobuf

import (
	"strconv"
	"testing"
)

func TestClasses(t *testing.T) {
	for _, c := range []struct{ n, want int }{
		{0, 4096}, {1, 4096}, {4096, 4096}, {4097, 8192}, {65536, 65536},
		{65537, 131072}, {MaxSize, MaxSize},
	} {
		if got := ClassSize(c.n); got != c.want {
			t.Errorf("ClassSize(%d) = %d, want %d", c.n, got, c.want)
		}
	}
}

func TestAlignedAndSized(t *testing.T) {
	for _, n := range []int{0, 1, 511, 4096, 5000, 1 << 20, MaxSize} {
		b := Get(n)
		if b.Len() != n || len(b.Bytes()) != n {
			t.Fatalf("Get(%d): len %d", n, b.Len())
		}
		if !IsAligned(b.mem, Align) {
			t.Fatalf("Get(%d): not aligned", n)
		}
		if b.Cap() < n {
			t.Fatalf("Get(%d): cap %d", n, b.Cap())
		}
		b.Release()
	}
}

func TestDoubleReleasePanics(t *testing.T) {
	b := Get(10)
	b.Release()
	defer func() {
		if recover() == nil {
			t.Fatal("second Release did not panic")
		}
	}()
	b.Release()
}

func TestOutOfRangePanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("Get(MaxSize+1) did not panic")
		}
	}()
	Get(MaxSize + 1)
}

func TestGetReleaseNoAllocs(t *testing.T) {
	Get(4096).Release() // warm the class
	allocs := testing.AllocsPerRun(1000, func() {
		b := Get(4096)
		b.Bytes()[0] = 1
		b.Release()
	})
	if allocs != 0 {
		t.Fatalf("Get/Release allocates %.1f times per run", allocs)
	}
}

func BenchmarkGetRelease(b *testing.B) {
	for _, n := range []int{4096, 65536, 1 << 20} {
		b.Run(sizeName(n), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(n))
			for b.Loop() {
				Get(n).Release()
			}
		})
	}
}

func BenchmarkGetReleaseParallel(b *testing.B) {
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			Get(4096).Release()
		}
	})
}

func sizeName(n int) string {
	switch {
	case n >= 1<<20:
		return strconv.Itoa(n>>20) + "MiB"
	case n >= 1<<10:
		return strconv.Itoa(n>>10) + "KiB"
	}
	return strconv.Itoa(n) + "B"
}
