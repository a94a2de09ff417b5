package node

import (
	"math/bits"
	"sync"
	"sync/atomic"
)

// unflushed tracks, on the primary, which write-intent regions were
// written since the last FLUSH that every in-sync secondary acknowledged:
// a secondary has acknowledged those writes but may not hold them durably
// (no FUA), so if it is lost (a power failure takes its device's cache) it
// may lack them, and its catch-up must copy them. When a secondary is
// lost, those regions are marked in the write-intent bitmap before the
// loss is reported, next to the lost request's own range.
//
// Each region has a slot holding 1 + the generation it was last written
// under (0: never). A write notes its regions under mu shared, once every
// in-sync secondary acknowledged it; a FLUSH, before its frames are sent,
// takes mu exclusively and advances the generation: the writes noted
// before were acknowledged before the FLUSH frames left, so the FLUSH,
// which every secondary runs after all earlier frames, covers them. Once
// the FLUSH is acknowledged everywhere, flushed rises to cover them.
type unflushed struct {
	shift uint
	size  int64
	slots []atomic.Uint64

	mu  sync.RWMutex // notes (shared) against generation changes (exclusive)
	gen uint64       // guarded by mu

	flushed atomic.Uint64 // slots at or below it are durable everywhere
}

func newUnflushed(size, region int64) *unflushed {
	if size <= 0 || region <= 0 || region&(region-1) != 0 {
		return nil
	}
	shift := uint(bits.TrailingZeros64(uint64(region)))
	return &unflushed{shift: shift, size: size, slots: make([]atomic.Uint64, (size+region-1)>>shift)}
}

// note records an acknowledged write to [off, off+n) not yet flushed.
func (u *unflushed) note(off, n int64) {
	if u == nil || n <= 0 || off < 0 || off+n > u.size {
		return
	}
	u.mu.RLock()
	g := u.gen + 1
	for i := off >> u.shift; i <= (off+n-1)>>u.shift; i++ {
		u.slots[i].Store(g)
	}
	u.mu.RUnlock()
}

// beginFlush starts a generation; the returned cover is what flushDone
// takes once the FLUSH is acknowledged everywhere.
func (u *unflushed) beginFlush() uint64 {
	if u == nil {
		return 0
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.gen++
	return u.gen
}

// flushDone: a FLUSH begun with cover was acknowledged by every in-sync
// replica.
func (u *unflushed) flushDone(cover uint64) {
	if u == nil {
		return
	}
	for {
		f := u.flushed.Load()
		if cover <= f || u.flushed.CompareAndSwap(f, cover) {
			return
		}
	}
}

// pending calls fn for each run of regions written and not yet flushed
// everywhere, as byte ranges, until fn returns an error, which it returns.
func (u *unflushed) pending(fn func(off, n int64) error) error {
	if u == nil {
		return nil
	}
	f := u.flushed.Load()
	n := int64(len(u.slots))
	for i := int64(0); i < n; {
		if u.slots[i].Load() <= f {
			i++
			continue
		}
		s := i
		for i < n && u.slots[i].Load() > f {
			i++
		}
		off := s << u.shift
		if err := fn(off, min(i<<u.shift, u.size)-off); err != nil {
			return err
		}
	}
	return nil
}
