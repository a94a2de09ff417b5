package repl

// window is a stream's in-flight window (in the manner of etcd-io/raft's
// tracker/inflights.go): the frames sent, or queued to send, and not yet
// finished, indexed by sequence number in a ring. It bounds both the number
// of frames and their payload bytes. Unlike raft's cumulative acks, keel's
// acks arrive out of order (disjoint writes complete in any order), so a
// frame is freed by its own sequence number; the window's span runs from
// the oldest unfinished sequence, so one stuck frame holds the window until
// the frame deadline fails the stream.
//
// It is not safe for concurrent use: the stream's mu guards it.
type window struct {
	ring     []*Op  // ring[seq % len(ring)]: the op with that seq, or nil
	next     uint64 // sequence the next frame gets (starts at 1)
	oldest   uint64 // lowest unfinished sequence; == next when empty
	count    int
	bytes    int64
	maxBytes int64
}

func newWindow(frames int, maxBytes int64) window {
	return window{ring: make([]*Op, frames), next: 1, oldest: 1, maxBytes: maxBytes}
}

// Full reports whether no frame may be added now.
func (w *window) Full() bool {
	return w.next-w.oldest >= uint64(len(w.ring)) || w.bytes >= w.maxBytes
}

// fits reports whether a frame of n payload bytes may be added now. A frame
// larger than the byte limit fits an empty window, so it cannot wait forever.
func (w *window) fits(n int) bool {
	if w.next-w.oldest >= uint64(len(w.ring)) {
		return false
	}
	return w.count == 0 || w.bytes+int64(n) <= w.maxBytes
}

// Add places op in the window and returns its sequence number.
// REQUIRES: w.fits(n).
func (w *window) Add(op *Op, n int) uint64 {
	seq := w.next
	w.next++
	w.ring[seq%uint64(len(w.ring))] = op
	w.count++
	w.bytes += int64(n)
	op.seq = seq
	op.bytes = n
	return seq
}

// Get returns the unfinished op with sequence seq, or nil.
func (w *window) Get(seq uint64) *Op {
	if seq < w.oldest || seq >= w.next {
		return nil
	}
	op := w.ring[seq%uint64(len(w.ring))]
	if op == nil || op.seq != seq {
		return nil
	}
	return op
}

// Free removes the op with sequence seq. REQUIRES: Get(seq) != nil.
func (w *window) Free(seq uint64) {
	i := seq % uint64(len(w.ring))
	op := w.ring[i]
	w.ring[i] = nil
	w.count--
	w.bytes -= int64(op.bytes)
	for w.oldest < w.next && w.ring[w.oldest%uint64(len(w.ring))] == nil {
		w.oldest++
	}
}

// Oldest returns the unfinished op with the lowest sequence, or nil.
func (w *window) Oldest() *Op {
	if w.count == 0 {
		return nil
	}
	return w.ring[w.oldest%uint64(len(w.ring))]
}

// Drain removes every op, appending them to ops in sequence order.
func (w *window) Drain(ops []*Op) []*Op {
	for s := w.oldest; s < w.next; s++ {
		i := s % uint64(len(w.ring))
		if op := w.ring[i]; op != nil {
			ops = append(ops, op)
			w.ring[i] = nil
		}
	}
	w.oldest, w.count, w.bytes = w.next, 0, 0
	return ops
}
