package volume

import "sync"

// RangeLock serialises overlapping byte ranges in arrival order and lets
// disjoint ranges proceed concurrently. Its zero value is ready to use and
// it is safe for concurrent use.
//
// A Volume holds one over every write, trim and zeroing. It is exported so
// that a caller that must keep one order across more than the local write
// (the node's replicated backend, which holds a range from the local write
// through every replica's answer: invariant 3 on the primary) uses the same
// lock rather than another copy of it.
//
// Every Lock appends a node to a list kept in arrival order and counts the
// earlier nodes it overlaps (held or still waiting); it proceeds when that
// count reaches zero. Unlock removes the node and decrements the count of
// every later node that overlaps it. So among overlapping ranges the order
// is strictly first come, first served (no overtaking, no starvation), and
// since a node only ever waits for earlier nodes there is no deadlock.
//
// The list is scanned linearly: its length is the number of writes in
// flight on the volume, which the NBD layer bounds. Nodes are recycled
// through a free list and each keeps its wake-up channel, so Lock and Unlock
// allocate nothing in steady state.
type RangeLock struct {
	mu         sync.Mutex   // guards the fields below and every node's fields
	head, tail *LockedRange // arrival order
	free       *LockedRange // recycled nodes (linked through next)
}

// LockedRange is a range held (or queued) in a RangeLock: the handle Lock
// returns and Unlock takes.
type LockedRange struct {
	lo, hi     int64 // [lo, hi)
	waits      int   // earlier overlapping nodes not yet unlocked
	prev, next *LockedRange
	wake       chan struct{} // buffered(1): the last blocker's signal
}

func (n *LockedRange) overlaps(m *LockedRange) bool { return n.lo < m.hi && m.lo < n.hi }

// Lock waits until [lo, hi) overlaps no range locked or queued before it,
// and returns the handle to pass to Unlock. hi must be greater than lo.
func (l *RangeLock) Lock(lo, hi int64) *LockedRange {
	l.mu.Lock()
	n := l.free
	if n != nil {
		l.free = n.next
	} else {
		n = &LockedRange{wake: make(chan struct{}, 1)}
	}
	n.lo, n.hi, n.waits = lo, hi, 0
	for m := l.head; m != nil; m = m.next {
		if m.overlaps(n) {
			n.waits++
		}
	}
	n.prev, n.next = l.tail, nil
	if l.tail != nil {
		l.tail.next = n
	} else {
		l.head = n
	}
	l.tail = n
	waits := n.waits
	l.mu.Unlock()
	if waits > 0 {
		<-n.wake
	}
	return n
}

// Unlock releases a range returned by Lock and wakes the later ranges that
// were waiting only for it.
func (l *RangeLock) Unlock(n *LockedRange) {
	l.mu.Lock()
	for m := n.next; m != nil; m = m.next {
		if m.overlaps(n) {
			m.waits--
			if m.waits == 0 {
				m.wake <- struct{}{}
			}
		}
	}
	if n.prev != nil {
		n.prev.next = n.next
	} else {
		l.head = n.next
	}
	if n.next != nil {
		n.next.prev = n.prev
	} else {
		l.tail = n.prev
	}
	n.prev, n.next = nil, l.free
	l.free = n
	l.mu.Unlock()
}
