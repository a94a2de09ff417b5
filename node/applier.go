package node

import (
	"fmt"
	"sync"

	"keel/netpath/repl"
)

// applier is the secondary side: repl.Server applies the frames it has
// ordered and fenced to the local replicas through it, addressed by the
// coordinator's volume number. A volume not open here is refused with
// repl.ErrUnknownVolume (the primary waits for a replica still being
// opened, then reports it lost).
type applier struct {
	mu   sync.RWMutex // guards vols
	vols map[uint64]*replica
}

var _ repl.Applier = (*applier)(nil)

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

func (a *applier) WriteAt(vol uint64, p []byte, off int64, fua bool) error {
	r, err := a.get(vol)
	if err != nil {
		return err
	}
	return r.vol.WriteAt(p, off, fua)
}

func (a *applier) Trim(vol uint64, off, length int64, fua bool) error {
	r, err := a.get(vol)
	if err != nil {
		return err
	}
	return r.vol.Trim(off, length, fua)
}

func (a *applier) WriteZeroes(vol uint64, off, length int64, noHole, fua bool) error {
	r, err := a.get(vol)
	if err != nil {
		return err
	}
	return r.vol.WriteZeroes(off, length, noHole, false, fua)
}

func (a *applier) Flush(vol uint64) error {
	r, err := a.get(vol)
	if err != nil {
		return err
	}
	return r.vol.Flush()
}
