package repl

// MSG_ZEROCOPY completion tracking.
//
// The kernel numbers every successful sendmsg(MSG_ZEROCOPY) on a socket
// with a 32-bit id, 0, 1, 2, ... (a call that sends nothing takes no id),
// and later queues on the socket's error queue a notification that the
// ids lo..hi have completed: the kernel holds no more references to the
// pages those calls sent, and their buffers may be reused. A notification
// may cover many calls (ranges are coalesced); the code says whether the
// kernel ended up copying the data after all (SO_EE_CODE_ZEROCOPY_COPIED,
// which it always does on loopback and veth).
//
// A frame sent with MSG_ZEROCOPY finishes only when both its ACK has
// arrived and every id of its sends has completed: until then the
// caller's buffer stays borrowed.

// zcEntry is one frame's zero-copy sends awaiting completion.
type zcEntry struct {
	op          *Op
	first, last uint32 // ids of its first and last sendmsg
	bytes       int    // payload bytes sent with MSG_ZEROCOPY
	copied      bool   // a COPIED notification covered one of its ids
	open        bool   // still being sent: last is not known yet
}

type zcRange struct{ lo, hi uint32 }

// zcTracker is a stream's zero-copy ledger. The stream's mu guards it,
// except next, which only the sender goroutine touches.
type zcTracker struct {
	next  uint32    // id the next MSG_ZEROCOPY send will get
	done  uint32    // every id before done has completed
	extra []zcRange // completed ranges beyond a gap (rare: TCP completes in order)
	queue []zcEntry // frames awaiting completion, in id order, from head
	head  int
}

// before reports a < b in the kernel's wrapping 32-bit id space.
func before(a, b uint32) bool { return int32(a-b) < 0 }

// isDone reports whether id has completed.
func (t *zcTracker) isDone(id uint32) bool { return before(id, t.done) }

// complete records the notification lo..hi and marks the queued frames it
// covers as copied when the kernel says so. It returns the number of sends
// the notification covered.
func (t *zcTracker) complete(lo, hi uint32, copied bool) int {
	if copied {
		for i := t.head; i < len(t.queue); i++ {
			e := &t.queue[i]
			if !before(hi, e.first) && (e.open || !before(e.last, lo)) {
				e.copied = true
			}
		}
	}
	if !before(t.done, lo) && !before(hi, t.done) { // lo <= done <= hi
		t.done = hi + 1
	} else if before(t.done, lo) {
		t.extra = append(t.extra, zcRange{lo, hi})
	} // else: entirely before done, a repeat: nothing to do
	for merged := true; merged; {
		merged = false
		for i := 0; i < len(t.extra); i++ {
			r := t.extra[i]
			if before(t.done, r.lo) {
				continue
			}
			if !before(r.hi, t.done) {
				t.done = r.hi + 1
			}
			t.extra = append(t.extra[:i], t.extra[i+1:]...)
			merged = true
			i--
		}
	}
	return int(hi-lo) + 1
}

// popDone removes and returns the oldest queued frame if all its ids have
// completed.
func (t *zcTracker) popDone() (zcEntry, bool) {
	if t.head == len(t.queue) || t.queue[t.head].open || !t.isDone(t.queue[t.head].last) {
		return zcEntry{}, false
	}
	e := t.queue[t.head]
	t.queue[t.head] = zcEntry{}
	t.head++
	if t.head == len(t.queue) { // empty: reuse the backing array from the start
		t.queue, t.head = t.queue[:0], 0
	}
	return e, true
}

// open queues an entry for a frame about to be sent, its first id being
// next, and returns its index for close. Only the sender opens entries, one
// at a time, so entries stay in id order.
func (t *zcTracker) open(op *Op) int {
	t.queue = append(t.queue, zcEntry{op: op, first: t.next, last: t.next, open: true})
	return len(t.queue) - 1
}

// close completes the entry at i (from open) once the frame is sent: ids
// is how many sendmsg calls took an id, bytes the payload they carried. An
// entry without ids is dropped (it is the newest). It reports whether the
// entry stays queued awaiting completion.
func (t *zcTracker) close(i, ids, bytes int) bool {
	if ids == 0 {
		t.queue[i] = zcEntry{}
		t.queue = t.queue[:i]
		if t.head >= len(t.queue) {
			t.queue, t.head = t.queue[:0], 0
		}
		return false
	}
	e := &t.queue[i]
	e.open, e.last, e.bytes = false, e.first+uint32(ids)-1, bytes
	return true
}

// push queues a closed entry (tests).
func (t *zcTracker) push(e zcEntry) { t.queue = append(t.queue, e) }

// pending is the number of frames awaiting completion.
func (t *zcTracker) pending() int { return len(t.queue) - t.head }
