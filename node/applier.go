package node

import (
	"fmt"
	"sync"

	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// applier is the secondary side: repl.Server applies the frames it has
// ordered and fenced to the local replicas through it, addressed by the
// coordinator's volume number, with the frames' flags (FUA, no-hole, and
// the write-intent bitmap's degraded and sync: see applyFlags). A volume not open here is refused with
// repl.ErrUnknownVolume (the primary waits for a replica still being
// opened, then reports it lost).
type applier struct {
	mu   sync.RWMutex // guards vols
	vols map[uint64]*replica
}

var (
	_ repl.Applier     = (*applier)(nil)
	_ repl.SyncApplier = (*applier)(nil)
)

func (a *applier) add(r *replica) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.vols[r.num] = r
}

func (a *applier) remove(r *replica) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.vols[r.num] == r {
		delete(a.vols, r.num)
	}
}

func (a *applier) get(vol uint64) (*replica, error) {
	a.mu.RLock()
	r := a.vols[vol]
	a.mu.RUnlock()
	if r == nil {
		return nil, fmt.Errorf("volume vol-%d is not open on this node: %w", vol, repl.ErrUnknownVolume)
	}
	return r, nil
}

func (a *applier) Epoch(vol uint64) (uint64, error) {
	r, err := a.get(vol)
	if err != nil {
		return 0, err
	}
	return r.vol.Epoch(), nil
}

func (a *applier) ApplyEpoch(vol, e uint64) error {
	r, err := a.get(vol)
	if err != nil {
		return err
	}
	if e <= r.vol.Epoch() {
		return nil
	}
	return r.vol.SetEpoch(e)
}

func (a *applier) WriteAt(vol uint64, p []byte, off int64, flags replproto.Flags) error {
	return a.write(vol, p, off, flags, false)
}

// WriteAtSync is WriteAt with the local write done synchronously on the
// calling goroutine (the Server calls it for a frame alone on its stream).
func (a *applier) WriteAtSync(vol uint64, p []byte, off int64, flags replproto.Flags) error {
	return a.write(vol, p, off, flags, true)
}

func (a *applier) write(vol uint64, p []byte, off int64, flags replproto.Flags, sync bool) error {
	r, err := a.get(vol)
	if err != nil {
		return err
	}
	if err := r.applyFlags(off, int64(len(p)), flags); err != nil {
		return err
	}
	fua := flags&replproto.FlagFUA != 0
	if sync {
		return r.vol.WriteAtSync(p, off, fua)
	}
	return r.vol.WriteAt(p, off, fua)
}

func (a *applier) Trim(vol uint64, off, length int64, flags replproto.Flags) error {
	r, err := a.get(vol)
	if err != nil {
		return err
	}
	if err := r.applyFlags(off, length, flags); err != nil {
		return err
	}
	return r.vol.Trim(off, length, flags&replproto.FlagFUA != 0)
}

func (a *applier) WriteZeroes(vol uint64, off, length int64, flags replproto.Flags) error {
	r, err := a.get(vol)
	if err != nil {
		return err
	}
	if err := r.applyFlags(off, length, flags); err != nil {
		return err
	}
	return r.vol.WriteZeroes(off, length, flags&replproto.FlagNoHole != 0, false, flags&replproto.FlagFUA != 0)
}

// applyFlags is the secondary's part of invariant 6, before a frame is
// applied: a live write sent while a member is out of sync (FlagDegraded)
// is recorded in this replica's write-intent bitmap first, so that if this
// replica is promoted it knows what the out-of-sync member may lack; a live
// write without it means every member is in sync again, and the bitmap is
// cleared. A copy frame (FlagSync) changes neither.
func (r *replica) applyFlags(off, n int64, flags replproto.Flags) error {
	switch {
	case flags&replproto.FlagDegraded != 0:
		return r.mark(off, n)
	case flags&replproto.FlagSync == 0 && r.marked.Load():
		r.clearMarks("the primary writes with every member in sync")
	}
	return nil
}

func (a *applier) Flush(vol uint64) error {
	r, err := a.get(vol)
	if err != nil {
		return err
	}
	return r.vol.Flush()
}
