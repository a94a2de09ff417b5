package dio

import (
	"math/bits"
	"math/rand/v2"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SectorSize is the granularity at which Mem tracks holes, durability and
// torn writes: the smallest sector a disk can have.
const SectorSize = 512

// MemOptions configure a Mem.
type MemOptions struct {
	Name string // for messages; "mem" when empty
	Size int64  // bytes; rounded up to a multiple of SectorSize

	// MemAlign and OffsetAlign are enforced like O_DIRECT does (EINVAL);
	// 0 means 512. Set 4096 to model a 4 KiB-sector disk.
	MemAlign, OffsetAlign int

	// Torn makes Crash keep each unsynced sector's newest contents with
	// probability 1/2 (a write torn at sector boundaries) instead of
	// dropping every unsynced write. Seed seeds that choice.
	Torn bool
	Seed uint64

	// NoPunch and NoZeroRange make PunchHole and ZeroRange answer like a
	// file system without that fallocate mode, to test the fallbacks.
	NoPunch, NoZeroRange bool
}

// Op names a kind of Mem operation, for fault injection. Ops combine as a
// bit mask.
type Op uint8

const (
	OpRead Op = 1 << iota
	OpWrite
	OpSync
	OpPunch
	OpZero
	OpExtents

	OpAll = OpRead | OpWrite | OpSync | OpPunch | OpZero | OpExtents
)

// Fault decides whether an operation fails: it returns the errno to fail
// with, or 0 to let it run. It is called with Mem's lock held and must not
// call the Mem's methods.
type Fault func(op Op, off, n int64) unix.Errno

// Mem is an in-memory device with the File method set, for tests. It keeps
// two states, like pebble's crashable MemFS: the current contents, which
// reads see, and the durable contents, which survive Crash. Sync makes all
// of the current state durable; a FUA write makes its own sectors durable.
// Punched and zeroed ranges are tracked per sector, so Extents reports them.
//
// A failed operation (injected with Fail or FailNext) changes nothing.
//
// Mem holds the whole device in memory twice: keep it small.
type Mem struct {
	opts  MemOptions
	name  string
	size  int64
	nsect int64

	mu sync.Mutex // guards everything below
	// cur and durable hold the bytes; the bitsets are indexed by sector.
	cur, durable         []byte
	curHole, durableHole bitset // punched: reads zero, reported as hole
	curZero, durableZero bitset // zeroed but allocated: reported as zero, not hole
	dirty                bitset // sectors whose current state is not durable
	fault                Fault
	failOps              Op
	failCount            int
	failErrno            unix.Errno
	closed               bool
	stats                Stats
}

// NewMem returns a Mem of opts.Size bytes that reads as zeroes, all of it a
// hole, all of it durable (like a freshly preallocated file).
func NewMem(opts MemOptions) *Mem {
	if opts.Name == "" {
		opts.Name = "mem"
	}
	if opts.MemAlign == 0 {
		opts.MemAlign = SectorSize
	}
	if opts.OffsetAlign == 0 {
		opts.OffsetAlign = SectorSize
	}
	size := (max(opts.Size, 0) + SectorSize - 1) / SectorSize * SectorSize
	opts.Size = size
	ns := size / SectorSize
	m := &Mem{
		opts: opts, name: opts.Name, size: size, nsect: ns,
		cur: make([]byte, size), durable: make([]byte, size),
		curHole: newBitset(ns), durableHole: newBitset(ns),
		curZero: newBitset(ns), durableZero: newBitset(ns),
		dirty: newBitset(ns),
	}
	m.curHole.setRange(0, ns)
	m.durableHole.setRange(0, ns)
	return m
}

// Name is MemOptions.Name.
func (m *Mem) Name() string { return m.name }

// Size is the device size.
func (m *Mem) Size() int64 { return m.size }

// MemAlign is the buffer alignment Mem enforces.
func (m *Mem) MemAlign() int { return m.opts.MemAlign }

// OffsetAlign is the offset and length alignment Mem enforces.
func (m *Mem) OffsetAlign() int { return m.opts.OffsetAlign }

// Stats returns the fallback counters (zeroing fallbacks under NoPunch /
// NoZeroRange).
func (m *Mem) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stats
}

// Fail installs f to decide the fate of every later operation (nil removes
// it).
func (m *Mem) Fail(f Fault) {
	m.mu.Lock()
	m.fault = f
	m.mu.Unlock()
}

// FailNext makes the next count operations whose kind is in ops fail with
// errno.
func (m *Mem) FailNext(ops Op, count int, errno unix.Errno) {
	m.mu.Lock()
	m.failOps, m.failCount, m.failErrno = ops, count, errno
	m.mu.Unlock()
}

// injectedLocked returns the errno an operation fails with, or 0.
// REQUIRES: m.mu.
func (m *Mem) injectedLocked(op Op, off, n int64) unix.Errno {
	if m.closed {
		return unix.EBADF
	}
	if m.failCount > 0 && m.failOps&op != 0 {
		m.failCount--
		return m.failErrno
	}
	if m.fault != nil {
		return m.fault(op, off, n)
	}
	return 0
}

// checkLocked validates alignment and bounds the way O_DIRECT on a block
// device would, and applies fault injection.
// REQUIRES: m.mu.
func (m *Mem) checkLocked(op Op, opName string, p []byte, off, n int64) error {
	if en := m.injectedLocked(op, off, n); en != 0 {
		return &Error{Op: opName + " (injected)", Path: m.name, Off: off, Len: n, Err: en}
	}
	if err := checkAligned(m.name, opName, off, n, m.opts.OffsetAlign); err != nil {
		return err
	}
	if len(p) > 0 && uintptr(unsafe.Pointer(&p[0]))%uintptr(m.opts.MemAlign) != 0 {
		return &Error{Op: opName + " (buffer unaligned to " + itoa(m.opts.MemAlign) + ")", Path: m.name, Off: off, Len: n, Err: unix.EINVAL}
	}
	if off+n > m.size {
		en := unix.ENOSPC
		if op == OpRead {
			en = unix.EIO
		}
		return &Error{Op: opName + " (beyond end of device)", Path: m.name, Off: off, Len: n, Err: en}
	}
	return nil
}

// ReadAt copies len(p) bytes at off into p. It borrows p.
func (m *Mem) ReadAt(p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.checkLocked(OpRead, "read", p, off, int64(len(p))); err != nil {
		return err
	}
	copy(p, m.cur[off:])
	return nil
}

// ReadAtSync is ReadAt (Mem is synchronous); Stats counts it in
// SyncRequests.
func (m *Mem) ReadAtSync(p []byte, off int64) error {
	m.mu.Lock()
	m.stats.SyncRequests++
	m.mu.Unlock()
	return m.ReadAt(p, off)
}

// WriteAtSync is WriteAt (Mem is synchronous); Stats counts it in
// SyncRequests.
func (m *Mem) WriteAtSync(p []byte, off int64, fua bool) error {
	m.mu.Lock()
	m.stats.SyncRequests++
	m.mu.Unlock()
	return m.WriteAt(p, off, fua)
}

// WriteAt copies p to off; with fua its sectors are durable on return. It
// borrows p.
func (m *Mem) WriteAt(p []byte, off int64, fua bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := int64(len(p))
	if err := m.checkLocked(OpWrite, "write", p, off, n); err != nil {
		return err
	}
	copy(m.cur[off:], p)
	m.touchLocked(off, n, false, false, fua)
	return nil
}

// touchLocked records that sectors [off, off+n) changed: sets their hole
// and zero state and marks them dirty, or durable with fua.
// REQUIRES: m.mu.
func (m *Mem) touchLocked(off, n int64, hole, zero, fua bool) {
	s, e := off/SectorSize, (off+n+SectorSize-1)/SectorSize
	m.curHole.assignRange(s, e, hole)
	m.curZero.assignRange(s, e, zero)
	if fua {
		m.persistLocked(s, e)
	} else {
		m.dirty.setRange(s, e)
	}
}

// persistLocked makes sectors [s, e) durable.
// REQUIRES: m.mu.
func (m *Mem) persistLocked(s, e int64) {
	copy(m.durable[s*SectorSize:e*SectorSize], m.cur[s*SectorSize:e*SectorSize])
	for i := s; i < e; i++ {
		m.durableHole.assign(i, m.curHole.get(i))
		m.durableZero.assign(i, m.curZero.get(i))
	}
	m.dirty.assignRange(s, e, false)
}

// Sync makes the whole current state durable.
func (m *Mem) Sync() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if en := m.injectedLocked(OpSync, -1, -1); en != 0 {
		return &Error{Op: "sync (injected)", Path: m.name, Off: -1, Len: -1, Err: en}
	}
	m.dirty.forEachRun(func(s, e int64) { m.persistLocked(s, e) })
	return nil
}

// PunchHole zeroes [off, off+n) and marks it a hole. See the package doc.
func (m *Mem) PunchHole(off, n int64, fallback bool) (fast bool, err error) {
	return m.zero(OpPunch, "punch hole", m.opts.NoPunch, true, off, n, fallback)
}

// ZeroRange zeroes [off, off+n) and marks it zero but allocated. See the
// package doc.
func (m *Mem) ZeroRange(off, n int64, fallback bool) (fast bool, err error) {
	return m.zero(OpZero, "zero range", m.opts.NoZeroRange, false, off, n, fallback)
}

func (m *Mem) zero(op Op, name string, refused, hole bool, off, n int64, fallback bool) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.checkLocked(op, name, nil, off, n); err != nil {
		return false, err
	}
	if refused && !fallback {
		return false, &Error{Op: name + " (no fast way; fallback not allowed)", Path: m.name, Off: off, Len: n, Err: unix.EOPNOTSUPP}
	}
	clear(m.cur[off : off+n])
	if !refused {
		m.touchLocked(off, n, hole, !hole, false)
		return true, nil
	}
	m.stats.ZeroFallbacks++
	m.stats.ZeroBytesWritten += n
	m.touchLocked(off, n, false, false, false) // written zeroes are data
	return false, nil
}

// Extents reports [off, off+n) as consecutive extents of sectors: punched
// sectors as (hole, zero), zeroed ones as zero, the rest as data. fn runs
// without Mem's lock held, so it may call Mem.
func (m *Mem) Extents(off, n int64, fn func(length int64, hole, zero bool) bool) error {
	m.mu.Lock()
	if en := m.injectedLocked(OpExtents, off, n); en != 0 {
		m.mu.Unlock()
		return &Error{Op: "extents (injected)", Path: m.name, Off: off, Len: n, Err: en}
	}
	m.mu.Unlock()
	if off < 0 || n < 0 || off+n > m.size {
		return &Error{Op: "extents", Path: m.name, Off: off, Len: n, Err: unix.EINVAL}
	}
	for pos, end := off, off+n; pos < end; {
		next, hole, zero := m.extentAt(pos, end)
		if !fn(next-pos, hole, hole || zero) {
			return nil
		}
		pos = next
	}
	return nil
}

// extentAt returns the end (at most end) of the run of sectors in the same
// state as the one holding pos, and that state.
func (m *Mem) extentAt(pos, end int64) (next int64, hole, zero bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := pos / SectorSize
	hole, zero = m.curHole.get(s), m.curZero.get(s)
	e := s + 1
	for e*SectorSize < end && m.curHole.get(e) == hole && m.curZero.get(e) == zero {
		e++
	}
	return min(e*SectorSize, end), hole, zero
}

// Close makes later operations fail with EBADF. Crash still works.
func (m *Mem) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return &Error{Op: "close (already closed)", Path: m.name, Off: -1, Len: -1, Err: unix.EBADF}
	}
	m.closed = true
	return nil
}

// Crash returns a new Mem holding what a power failure now would leave on
// disk: the durable state, plus — with MemOptions.Torn — the current
// contents of a random half of the unsynced sectors. The new Mem has the
// same options, no faults installed, and everything in it is durable. m is
// unchanged and stays usable.
func (m *Mem) Crash() *Mem {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := NewMem(m.opts)
	copy(c.cur, m.durable)
	copy(c.curHole, m.durableHole)
	copy(c.curZero, m.durableZero)
	if m.opts.Torn {
		rng := rand.New(rand.NewPCG(m.opts.Seed, m.opts.Seed^0x9e3779b97f4a7c15))
		m.opts.Seed++ // the next crash of m tears differently
		m.dirty.forEachRun(func(s, e int64) {
			for i := s; i < e; i++ {
				if rng.IntN(2) == 0 {
					continue
				}
				copy(c.cur[i*SectorSize:(i+1)*SectorSize], m.cur[i*SectorSize:])
				c.curHole.assign(i, m.curHole.get(i))
				c.curZero.assign(i, m.curZero.get(i))
			}
		})
	}
	copy(c.durable, c.cur)
	copy(c.durableHole, c.curHole)
	copy(c.durableZero, c.curZero)
	return c
}

// bitset is a fixed-size set of sector indexes.
type bitset []uint64

func newBitset(n int64) bitset { return make(bitset, (n+63)/64) }

func (b bitset) get(i int64) bool { return b[i/64]&(1<<(uint64(i)%64)) != 0 }

func (b bitset) assign(i int64, v bool) {
	if v {
		b[i/64] |= 1 << (uint64(i) % 64)
	} else {
		b[i/64] &^= 1 << (uint64(i) % 64)
	}
}

func (b bitset) setRange(s, e int64) { b.assignRange(s, e, true) }

func (b bitset) assignRange(s, e int64, v bool) {
	for i := s; i < e; {
		if i%64 == 0 && e-i >= 64 {
			if v {
				b[i/64] = ^uint64(0)
			} else {
				b[i/64] = 0
			}
			i += 64
			continue
		}
		b.assign(i, v)
		i++
	}
}

// forEachRun calls fn for each maximal run [s, e) of set bits, in order. fn
// may clear bits of the run it is given.
func (b bitset) forEachRun(fn func(s, e int64)) {
	n := int64(len(b)) * 64
	for i := int64(0); i < n; {
		word := b[i/64] >> (uint64(i) % 64)
		if word == 0 {
			i = (i/64 + 1) * 64
			continue
		}
		s := i + int64(bits.TrailingZeros64(word))
		e := s + 1
		for e < n && b.get(e) {
			e++
		}
		fn(s, e)
		i = e
	}
}
