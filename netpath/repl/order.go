package repl

import (
	"sync"
	"time"

	"keel/datapath/iobuf"
	"keel/netpath/replproto"
)

// Frame kinds on the replica, by how they order against other frames of
// the same volume.
const (
	// kindData: WRITE, TRIM, ZEROES. Waits for every earlier frame whose
	// range overlaps it, and for earlier epoch raises.
	kindData uint8 = iota
	// kindFlush: waits for every earlier frame of the volume, so that the
	// flush covers every write acknowledged before it was received.
	kindFlush
	// kindRaise: persists a higher epoch. Waits for every earlier frame
	// (they were admitted at the old epoch and are acknowledged before the
	// new one is durable); every later frame waits for it.
	kindRaise
)

// sframe is one frame on the replica from registration to completion.
// Pooled; the fields are reset by putFrame.
type sframe struct {
	kind   uint8
	h      replproto.Header
	lo, hi uint64     // byte range [lo, hi) of a data frame
	buf    *iobuf.Buf // payload, owned by the frame until completion (nil: none)
	credit int        // stream credit (payload bytes) held until completion
	sc     *sconn     // stream to answer on; nil for a raise
	vs     *volState
	recv   time.Time

	// Guarded by vs.mu.
	deps       int       // earlier frames it still waits for
	dependents []*sframe // later frames waiting for it

	raiseDone chan error // a RaiseEpoch caller waiting for this raise, or nil
}

var framePool = sync.Pool{New: func() any { return new(sframe) }}

func getFrame() *sframe { return framePool.Get().(*sframe) }

func putFrame(f *sframe) {
	deps := f.dependents[:0]
	*f = sframe{dependents: deps}
	framePool.Put(f)
}

func overlaps(a, b *sframe) bool { return a.lo < b.hi && b.lo < a.hi }

// needs reports whether f, registered after a, must wait for a.
func needs(f, a *sframe) bool {
	switch {
	case a.kind == kindRaise, f.kind == kindRaise, f.kind == kindFlush:
		return true
	case a.kind == kindFlush:
		return false
	}
	return overlaps(a, f)
}

// volState orders the frames of one volume on this replica and holds its
// epoch fence.
//
// Ordering argument (invariant 3). The primary's volume serialises
// overlapping writes with its range lock before it sends, so two frames
// for overlapping ranges reach the peer's stream in the primary's order;
// one stream is one TCP connection read by one goroutine, which registers
// frames here in stream order. A frame waits for every earlier registered
// frame it overlaps (and a flush or raise for every earlier frame), so
// overlapping frames are applied in registration order, which is the
// primary's order, on every replica; frames that overlap nothing earlier
// start at once and run concurrently on the worker pool. Frames from an
// older stream to the same node (a reconnect) were registered before the
// new stream's, so they precede it too. Catch-up and re-mirror frames of
// issue 6 register here like writes, which keeps a copied region from
// overwriting a newer live write that overlaps it.
//
// Fencing argument (invariant 2). A frame whose epoch is below the highest
// epoch admitted is refused (NACK stale epoch) at registration. A frame with
// a higher epoch first registers a raise, which runs only after every
// earlier frame has been answered and persists the epoch (Applier.ApplyEpoch)
// before any frame at the new epoch may run. So no frame of an older epoch is
// acknowledged after the replica has durably seen a newer one, and none at
// the newer epoch is acknowledged before that epoch is durable.
type volState struct {
	id uint64

	mu        sync.Mutex // guards following
	epoch     uint64     // highest epoch admitted: persisted, or pending in a raise in active
	persisted uint64     // highest epoch known durable
	broken    error      // a failed ApplyEpoch: every frame is refused with EIO
	active    []*sframe  // registered, not completed, in registration order
}

type verdict uint8

const (
	admitted verdict = iota
	refusedStale
	refusedBroken
	noop // a raise to an epoch already admitted
)

// register admits f (kind data, flush or raise) in stream order. durable is
// the epoch the Applier reports now (the node may raise a replica's epoch
// behind the server's back, e.g. when it promotes it). For a data or flush
// frame with a higher epoch than any admitted, raise is registered first as
// the barrier that persists it (raise is then owned by volState; otherwise
// the caller still owns it). The frames that can run at once are appended to
// ready. On a stale refusal, cur is the epoch to report.
func (vs *volState) register(f, raise *sframe, durable uint64, ready []*sframe) (_ []*sframe, v verdict, cur uint64, usedRaise bool) {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	if durable > vs.persisted {
		vs.persisted = durable
	}
	if vs.persisted > vs.epoch {
		vs.epoch = vs.persisted
	}
	if vs.broken != nil {
		return ready, refusedBroken, vs.epoch, false
	}
	e := f.h.Epoch
	if f.kind == kindRaise {
		if e <= vs.epoch {
			return ready, noop, vs.epoch, false
		}
	} else {
		if e < vs.epoch {
			return ready, refusedStale, vs.epoch, false
		}
		if e > vs.epoch {
			raise.kind, raise.h.Epoch, raise.h.Volume, raise.vs = kindRaise, e, f.h.Volume, vs
			ready = vs.addLocked(raise, ready)
			usedRaise = true
		}
	}
	f.vs = vs
	return vs.addLocked(f, ready), admitted, vs.epoch, usedRaise
}

// addLocked appends f to active with its dependencies. REQUIRES: vs.mu.
func (vs *volState) addLocked(f *sframe, ready []*sframe) []*sframe {
	if f.kind == kindRaise {
		vs.epoch = f.h.Epoch
	}
	f.deps = 0
	for _, a := range vs.active {
		if needs(f, a) {
			a.dependents = append(a.dependents, f)
			f.deps++
		}
	}
	vs.active = append(vs.active, f)
	if f.deps == 0 {
		ready = append(ready, f)
	}
	return ready
}

// complete removes f from active and appends the frames it released to
// ready.
func (vs *volState) complete(f *sframe, ready []*sframe) []*sframe {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	for i, a := range vs.active {
		if a == f {
			copy(vs.active[i:], vs.active[i+1:])
			vs.active[len(vs.active)-1] = nil
			vs.active = vs.active[:len(vs.active)-1]
			break
		}
	}
	for i, d := range f.dependents {
		if d.deps--; d.deps == 0 {
			ready = append(ready, d)
		}
		f.dependents[i] = nil
	}
	f.dependents = f.dependents[:0]
	return ready
}

// admit is the check a data or flush frame passes just before it is
// applied: its epoch must be exactly the durable one. durable is the epoch
// the Applier reports now. Below it: a newer epoch became durable behind the
// server (the node raised it directly), so the frame is stale. Above it: its
// raise failed (the volume is broken).
func (vs *volState) admit(epoch, durable uint64) (verdict, uint64) {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	if durable > vs.persisted {
		vs.persisted = durable
		vs.epoch = max(vs.epoch, durable)
	}
	switch {
	case vs.broken != nil || epoch > vs.persisted:
		return refusedBroken, vs.persisted
	case epoch < vs.persisted:
		return refusedStale, vs.persisted
	}
	return admitted, vs.persisted
}

// raised records the outcome of a raise's ApplyEpoch.
func (vs *volState) raised(epoch uint64, err error) {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	if err != nil {
		if vs.broken == nil {
			vs.broken = err
		}
		return
	}
	if epoch > vs.persisted {
		vs.persisted = epoch
	}
}
