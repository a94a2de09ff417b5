package volume

import (
	"testing"
	"testing/synctest"
)

// TestRangeLockArrivalOrder: overlapping ranges are granted strictly in
// arrival order, a range that overlaps nothing earlier proceeds at once, and
// a later range never overtakes an earlier overlapping one even when the
// range it overlaps directly is free.
func TestRangeLockArrivalOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var l RangeLock
		order := make(chan string, 10)
		a := l.Lock(0, 10)

		start := func(name string, lo, hi int64, release chan struct{}) {
			go func() {
				n := l.Lock(lo, hi)
				order <- name
				<-release
				l.Unlock(n)
			}()
			synctest.Wait() // name has arrived (and holds or waits)
		}
		relB, relC, relD, relE := make(chan struct{}), make(chan struct{}), make(chan struct{}), make(chan struct{})
		start("B", 5, 15, relB)  // overlaps A: waits
		start("C", 12, 20, relC) // overlaps only B (waiting): waits behind it
		start("D", 30, 40, relD) // overlaps nothing: runs now
		start("E", 0, 40, relE)  // overlaps all: last
		if got := <-order; got != "D" {
			t.Fatalf("first granted %s, want D (disjoint)", got)
		}
		select {
		case got := <-order:
			t.Fatalf("%s granted while A holds an overlapping range", got)
		default:
		}

		l.Unlock(a)
		synctest.Wait()
		if got := <-order; got != "B" {
			t.Fatalf("after A, granted %s, want B", got)
		}
		close(relB)
		synctest.Wait()
		if got := <-order; got != "C" {
			t.Fatalf("after B, granted %s, want C", got)
		}
		close(relD)
		synctest.Wait()
		select {
		case got := <-order:
			t.Fatalf("%s granted while C holds an overlapping range", got)
		default:
		}
		close(relC)
		synctest.Wait()
		if got := <-order; got != "E" {
			t.Fatalf("last granted %s, want E", got)
		}
		close(relE)
		synctest.Wait()
		if l.head != nil || l.tail != nil {
			t.Fatal("list not empty after every Unlock")
		}
	})
}

// TestRangeLockSameRangeFIFO: many waiters on one range go in arrival order.
func TestRangeLockSameRangeFIFO(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var l RangeLock
		first := l.Lock(100, 200)
		got := make(chan int, 8)
		for i := range 8 {
			go func() {
				n := l.Lock(150, 160)
				got <- i
				l.Unlock(n)
			}()
			synctest.Wait()
		}
		l.Unlock(first)
		for i := range 8 {
			if g := <-got; g != i {
				t.Fatalf("waiter %d granted in position %d", g, i)
			}
		}
	})
}

func TestRangeLockNoAllocs(t *testing.T) {
	var l RangeLock
	held := l.Lock(0, 4096) // a disjoint holder, so the list is not empty
	l.Unlock(l.Lock(8192, 12288))
	if a := testing.AllocsPerRun(1000, func() { l.Unlock(l.Lock(8192, 12288)) }); a != 0 {
		t.Fatalf("Lock/Unlock allocates %.1f per call", a)
	}
	l.Unlock(held)
}
