package node

import (
	"slices"
	"testing"
)

func pendingOf(u *unflushed) [][2]int64 {
	var out [][2]int64
	u.pending(func(off, n int64) error {
		out = append(out, [2]int64{off, n})
		return nil
	})
	return out
}

// TestUnflushed: a write noted before a FLUSH began is covered once that
// FLUSH is acknowledged; one noted after is not; an older FLUSH finishing
// late does not uncover anything; the last region is clipped to the size.
func TestUnflushed(t *testing.T) {
	u := newUnflushed(10<<10, 4<<10) // regions [0,4K) [4K,8K) [8K,10K)
	u.note(0, 100)
	u.note(9<<10, 10)
	if got := pendingOf(u); !slices.Equal(got, [][2]int64{{0, 4 << 10}, {8 << 10, 2 << 10}}) {
		t.Fatalf("pending %v", got)
	}
	c1 := u.beginFlush()
	u.note(4<<10, 6<<10) // during the flush: regions 1 and 2
	u.flushDone(c1)
	if got := pendingOf(u); !slices.Equal(got, [][2]int64{{4 << 10, 6 << 10}}) {
		t.Fatalf("pending after the first flush %v", got)
	}
	c2 := u.beginFlush()
	c3 := u.beginFlush()
	u.flushDone(c3)
	u.flushDone(c2) // late: changes nothing
	if got := pendingOf(u); len(got) != 0 {
		t.Fatalf("pending after every flush %v", got)
	}
	u.note(-1, 5) // out of range: ignored
	u.note(10<<10, 1)
	if got := pendingOf(u); len(got) != 0 {
		t.Fatalf("out-of-range notes recorded: %v", got)
	}
	if newUnflushed(1<<20, 3000) != nil {
		t.Fatal("a region size that is not a power of two accepted")
	}
}
