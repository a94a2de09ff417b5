package repl

import "sync"

// Fence records, per volume, the highest epoch a replica has answered with
// in a stale-epoch NACK. A node whose epoch for a volume is below that is
// no longer its primary: it must stop acknowledging writes for the volume
// at once, whatever its coordinator lease says. One Fence is shared by all
// the Peers of a node, so a refusal on any stream fences the volume on all.
//
// It is safe for concurrent use.
type Fence struct {
	onFenced func(vol, epoch uint64)

	mu   sync.RWMutex      // guards seen
	seen map[uint64]uint64 // volume -> highest epoch reported by a replica
}

// NewFence returns an empty Fence. onFenced (may be nil) is called each time
// a replica reports a higher epoch for a volume than any before; it runs on
// a stream's receive goroutine and must not block.
func NewFence(onFenced func(vol, epoch uint64)) *Fence {
	return &Fence{onFenced: onFenced, seen: make(map[uint64]uint64)}
}

// Observe records that a replica of vol is at epoch. It reports whether
// that raised the highest epoch known for vol.
func (f *Fence) Observe(vol, epoch uint64) bool {
	f.mu.Lock()
	raised := epoch > f.seen[vol]
	if raised {
		f.seen[vol] = epoch
	}
	f.mu.Unlock()
	if raised && f.onFenced != nil {
		f.onFenced(vol, epoch)
	}
	return raised
}

// Fenced reports whether a primary at epoch for vol is fenced: a replica has
// seen a newer epoch. The node checks it before acknowledging any write.
func (f *Fence) Fenced(vol, epoch uint64) bool {
	f.mu.RLock()
	seen := f.seen[vol]
	f.mu.RUnlock()
	return epoch < seen
}

// Epoch returns the highest epoch a replica has reported for vol (0: none).
func (f *Fence) Epoch(vol uint64) uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.seen[vol]
}
