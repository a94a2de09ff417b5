package volume

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"keel/datapath/iobuf"
	"keel/datapath/layout"
)

// intentMap is the write-intent bitmap of an open volume: the in-memory
// copy of the bitmap blocks (layout's "Write-intent bitmap") and the
// machinery that writes them.
//
// Two bit arrays, one word per 64 regions, block b owning words
// [b*layout.BitmapBlockWords, (b+1)*layout.BitmapBlockWords):
//
//   - durable: bits known to be on stable storage (a subset of what the
//     disk would read back). MarkDirty's fast path reads it lock-free; a
//     region set here may have its data written.
//   - want: what the next write of the block will carry. Guarded by the
//     block's mu. want ⊇ durable, except in the window of a ClearDirty.
//
// A block write is issued by one caller at a time (blk.writing); callers
// arriving meanwhile add their bits to want and wait on blk.cond, and the
// next writer carries all of them in one write (group commit). Blocks are
// independent: callers for different blocks never wait for each other.
type intentMap struct {
	shift   uint  // log2(region size)
	regions int64 // regions covering the data
	size    int64 // data bytes
	hdr     layout.BitmapHeader

	durable []atomic.Uint64
	want    []uint64 // word w guarded by blocks[w/BitmapBlockWords].mu
	blocks  []intentBlock
}

type intentBlock struct {
	mu      sync.Mutex
	cond    sync.Cond // L is &mu; broadcast when a write of the block ends
	writing bool      // guarded by mu: a write of this block is in flight
	// unknown (guarded by mu): the last write of the block failed, so the
	// disk may hold something other than durable; ClearDirty rewrites it.
	unknown bool
}

// intentLoad is what reading the bitmap area found.
type intentLoad struct {
	m       *intentMap
	rewrite bool   // the area must be rewritten (bad header, new region size)
	maxGen  uint64 // the highest generation anywhere in the area
	bad     int    // blocks read as all dirty (torn, corrupt, stale)
	why     error  // why the header was not used, or nil
	convert uint32 // the old region size when converting, else 0
}

func newIntentMap(size int64, regionSize uint32, id [16]byte, gen uint64) *intentMap {
	h := layout.BitmapHeader{VolumeID: id, DataSize: size, RegionSize: regionSize, Generation: gen}
	m := &intentMap{shift: uint(bits.TrailingZeros32(regionSize)), regions: h.Regions(), size: size, hdr: h}
	nb := h.Blocks()
	m.durable = make([]atomic.Uint64, nb*layout.BitmapBlockWords)
	m.want = make([]uint64, nb*layout.BitmapBlockWords)
	m.blocks = make([]intentBlock, nb)
	for i := range m.blocks {
		m.blocks[i].cond.L = &m.blocks[i].mu
	}
	return m
}

// setAll marks regions [s, e] (inclusive) in both arrays; for loading only.
func (m *intentMap) setAll(s, e int64) {
	for r := s; r <= e; r++ {
		w, bit := r/64, uint64(1)<<(r%64)
		m.want[w] |= bit
		m.durable[w].Store(m.durable[w].Load() | bit)
	}
}

func (m *intentMap) get(r int64) bool { return m.durable[r/64].Load()&(1<<(r%64)) != 0 }

// covered reports whether regions [s, e] (inclusive) are all durable.
func (m *intentMap) covered(s, e int64) bool {
	for w := s / 64; w <= e/64; w++ {
		mask := ^uint64(0)
		if w == s/64 {
			mask &= ^uint64(0) << (s % 64)
		}
		if w == e/64 {
			mask &= ^uint64(0) >> (63 - e%64)
		}
		if m.durable[w].Load()&mask != mask {
			return false
		}
	}
	return true
}

// wantRange sets regions [s, e] (inclusive) in want.
// REQUIRES: the mu of the block holding them.
func (m *intentMap) wantRange(s, e int64) {
	for w := s / 64; w <= e/64; w++ {
		mask := ^uint64(0)
		if w == s/64 {
			mask &= ^uint64(0) << (s % 64)
		}
		if w == e/64 {
			mask &= ^uint64(0) >> (63 - e%64)
		}
		m.want[w] |= mask
	}
}

func blockWords(b int) (int, int) {
	return b * layout.BitmapBlockWords, (b + 1) * layout.BitmapBlockWords
}

// encodeBlock writes block b (its want bits) into dst.
// REQUIRES: blocks[b].mu.
func (m *intentMap) encodeBlock(dst []byte, b int) {
	lo, hi := blockWords(b)
	bitsDst := layout.BitmapBlockBits(dst)
	for i, w := range m.want[lo:hi] {
		binary.LittleEndian.PutUint64(bitsDst[8*i:], w)
	}
	layout.SealBitmapBlock(dst, b, m.hdr.Generation, m.hdr.VolumeID)
}

// loadIntent reads the bitmap area and builds the map for region size
// regionSize. Blocks that fail their checks read as all dirty; a header
// that is bad or names another volume or data size than sb makes
// everything dirty; a header of another region size is converted (a new
// region is dirty if any old region it overlaps was). The header alone
// says how its blocks are read: the superblock's region size is what the
// volume is configured with, which a crash part way through a conversion
// can leave ahead of the header. Nothing is written here.
func loadIntent(dev Device, sb *layout.Superblock, regionSize uint32) (*intentLoad, error) {
	area := iobuf.Get(layout.BitmapLength)
	defer area.Release()
	if err := dev.ReadAt(area.Bytes(), layout.BitmapOffset); err != nil {
		return nil, fmt.Errorf("reading the write-intent bitmap: %w", err)
	}
	ab := area.Bytes()
	block := func(i int) []byte {
		o := layout.BitmapBlocksOffset - layout.BitmapOffset + i*layout.BitmapBlockSize
		return ab[o : o+layout.BitmapBlockSize]
	}
	ld := &intentLoad{}
	for i := range layout.BitmapBlocks {
		if g, ok := layout.BitmapBlockGeneration(block(i)); ok {
			ld.maxGen = max(ld.maxGen, g)
		}
	}
	hdr, err := layout.DecodeBitmapHeader(ab)
	if err == nil {
		ld.maxGen = max(ld.maxGen, hdr.Generation)
		switch {
		case hdr.VolumeID != sb.VolumeID:
			err = fmt.Errorf("bitmap header belongs to volume %x", hdr.VolumeID)
		case hdr.DataSize != sb.DataSize:
			err = fmt.Errorf("bitmap header says %d data bytes, the superblock %d", hdr.DataSize, sb.DataSize)
		}
	}
	if err != nil {
		ld.why = err
		ld.rewrite = true
		ld.m = newIntentMap(sb.DataSize, regionSize, sb.VolumeID, 1)
		ld.m.setAll(0, ld.m.regions-1)
		return ld, nil
	}
	old := newIntentMap(sb.DataSize, hdr.RegionSize, sb.VolumeID, hdr.Generation)
	for i := range old.blocks {
		s := int64(i) * layout.RegionsPerBlock
		e := min(s+layout.RegionsPerBlock, old.regions) - 1
		b := block(i)
		if layout.CheckBitmapBlock(b, i, hdr) != nil {
			ld.bad++
			old.setAll(s, e)
			continue
		}
		lo, _ := blockWords(i)
		bb := layout.BitmapBlockBits(b)
		for r := s; r <= e; r++ {
			j := r - s
			if bb[j/8]&(1<<(j%8)) != 0 {
				w := lo + int(j/64)
				old.want[w] |= 1 << (j % 64)
			}
		}
		for w := lo; w < lo+layout.BitmapBlockWords; w++ {
			old.durable[w].Store(old.want[w])
		}
	}
	if hdr.RegionSize == regionSize {
		ld.m = old
		return ld, nil
	}
	ld.rewrite, ld.convert = true, hdr.RegionSize
	m := newIntentMap(sb.DataSize, regionSize, sb.VolumeID, 1)
	for r := range old.regions {
		if old.get(r) {
			a, b := r<<old.shift, min((r+1)<<old.shift, sb.DataSize)
			m.setAll(a>>m.shift, (b-1)>>m.shift)
		}
	}
	ld.m = m
	return ld, nil
}

// writeArea durably writes a new header and every block of the area with
// generation gen, from m's bits, in one write: a crash part way leaves the
// old header (with its consistent blocks, or stale ones that read dirty),
// or the new header with new blocks and stale or torn ones that read
// dirty. gen must exceed every generation in the area.
func (m *intentMap) writeArea(dev Device, gen uint64) error {
	m.hdr.Generation = gen
	area := iobuf.Get(layout.BitmapLength)
	defer area.Release()
	ab := area.Bytes()
	clear(ab)
	if err := layout.EncodeBitmapHeader(ab, m.hdr); err != nil {
		return err
	}
	for i := range layout.BitmapBlocks {
		o := layout.BitmapBlocksOffset - layout.BitmapOffset + i*layout.BitmapBlockSize
		b := ab[o : o+layout.BitmapBlockSize]
		if i < len(m.blocks) {
			m.encodeBlock(b, i)
		} else {
			layout.SealBitmapBlock(b, i, gen, m.hdr.VolumeID)
		}
	}
	if err := dev.WriteAt(ab, layout.BitmapOffset, true); err != nil {
		return fmt.Errorf("writing the write-intent bitmap: %w", err)
	}
	return nil
}

// checkRegionSize validates a requested region size for a volume.
func checkRegionSize(name string, r int64, size int64, blockSize uint32) error {
	switch {
	case r < layout.SizeAlign || r < int64(blockSize) || r > layout.MaxRegionSize || r&(r-1) != 0:
		return fmt.Errorf("volume %s: region size %d is not a power of two in [%d, %d] (and at least the block size %d): %w",
			name, r, layout.SizeAlign, int64(layout.MaxRegionSize), blockSize, unix.EINVAL)
	case (size+r-1)/r > layout.RegionCapacity:
		return fmt.Errorf("volume %s: region size %d is too small for %d data bytes: the write-intent bitmap tracks at most %d regions, so use at least %d: %w",
			name, r, size, layout.RegionCapacity, layout.RegionSizeFor(size, uint32(r)), unix.EINVAL)
	}
	return nil
}

// RegionSize is the write-intent bitmap's granularity in data bytes.
func (v *Volume) RegionSize() int64 { return 1 << v.intent.shift }

// MarkDirty records in the write-intent bitmap that [off, off+n) is about
// to be written, durably before it returns: call it before issuing the
// data write while any replica is out of sync. When every region of the
// range is already marked it returns at once (no system call, no
// allocation). Concurrent callers that need the same bitmap block written
// share one write; callers for different blocks do not wait for each
// other. Safe to call concurrently with every other method.
func (v *Volume) MarkDirty(off, n int64) error {
	if err := v.begin(); err != nil {
		return err
	}
	defer v.end()
	if v.readOnly {
		return ErrReadOnly
	}
	if err := v.checkRange("mark dirty", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	m := v.intent
	r0, r1 := off>>m.shift, (off+n-1)>>m.shift
	if m.covered(r0, r1) {
		return nil
	}
	for b := r0 / layout.RegionsPerBlock; b <= r1/layout.RegionsPerBlock; b++ {
		s := max(r0, b*layout.RegionsPerBlock)
		e := min(r1, (b+1)*layout.RegionsPerBlock-1)
		if err := v.markBlock(int(b), s, e); err != nil {
			return err
		}
	}
	return nil
}

// markBlock makes regions [s, e] (inclusive, all in block b) durable.
// REQUIRES: v.closeMu shared.
func (v *Volume) markBlock(b int, s, e int64) error {
	m := v.intent
	blk := &m.blocks[b]
	blk.mu.Lock()
	defer blk.mu.Unlock()
	for {
		if m.covered(s, e) {
			return nil
		}
		// Again on every turn: a ClearDirty in between may have dropped
		// the bits from want.
		m.wantRange(s, e)
		if blk.writing {
			blk.cond.Wait()
			continue
		}
		if err := v.writeBlockLocked(b); err != nil {
			return err
		}
	}
}

// writeBlockLocked writes block b's want bits with FUA and publishes them
// as durable. It releases blk.mu during the write; blk.writing keeps
// every other writer of the block out meanwhile.
// REQUIRES: blocks[b].mu held, blocks[b].writing false, v.closeMu shared.
func (v *Volume) writeBlockLocked(b int) error {
	m := v.intent
	blk := &m.blocks[b]
	blk.writing = true
	buf := iobuf.Get(layout.BitmapBlockSize)
	defer buf.Release()
	m.encodeBlock(buf.Bytes(), b)
	blk.mu.Unlock()
	off := int64(layout.BitmapBlocksOffset + b*layout.BitmapBlockSize)
	err := v.dev.WriteAt(buf.Bytes(), off, true)
	blk.mu.Lock()
	blk.writing = false
	blk.cond.Broadcast()
	lo, hi := blockWords(b)
	bb := layout.BitmapBlockBits(buf.Bytes())
	for w := lo; w < hi; w++ {
		snap := binary.LittleEndian.Uint64(bb[8*(w-lo):])
		if err == nil {
			m.durable[w].Store(snap)
		} else {
			// The disk now holds the old block, the new one, or a
			// torn one (which reads all dirty): only bits in both
			// the old and the new are sure to be there.
			m.durable[w].Store(m.durable[w].Load() & snap)
		}
	}
	blk.unknown = err != nil
	if err != nil {
		return fmt.Errorf("volume %s: writing write-intent bitmap block %d: %w", v.name, b, err)
	}
	return nil
}

// ClearDirty durably clears every bit of the write-intent bitmap. The
// caller guarantees that every replica holds the same data (and that no
// MarkDirty it still needs runs concurrently: those may be dropped).
func (v *Volume) ClearDirty() error {
	if err := v.begin(); err != nil {
		return err
	}
	defer v.end()
	if v.readOnly {
		return ErrReadOnly
	}
	m := v.intent
	var errs []error
	for b := range m.blocks {
		if err := v.clearBlock(b); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (v *Volume) clearBlock(b int) error {
	m := v.intent
	blk := &m.blocks[b]
	blk.mu.Lock()
	defer blk.mu.Unlock()
	for blk.writing {
		blk.cond.Wait()
	}
	lo, hi := blockWords(b)
	dirty := blk.unknown
	for w := lo; w < hi; w++ {
		dirty = dirty || m.want[w] != 0 || m.durable[w].Load() != 0
	}
	if !dirty {
		return nil
	}
	clear(m.want[lo:hi])
	return v.writeBlockLocked(b)
}

// DirtyRegions calls fn for each maximal run of dirty regions, in offset
// order, as data byte ranges (the last clipped to the volume size), until
// fn returns false. It sees a snapshot of the durable bits: regions marked
// meanwhile may or may not be visited.
func (v *Volume) DirtyRegions(fn func(off, n int64) bool) {
	m := v.intent
	for r := int64(0); r < m.regions; {
		w := m.durable[r/64].Load() >> (r % 64)
		if w == 0 {
			r = (r/64 + 1) * 64
			continue
		}
		r += int64(bits.TrailingZeros64(w))
		if r >= m.regions {
			return
		}
		s := r
		for r < m.regions && m.get(r) {
			r++
		}
		off := s << m.shift
		if !fn(off, min(r<<m.shift, m.size)-off) {
			return
		}
	}
}

// DirtyBytes is the data bytes the dirty regions cover.
func (v *Volume) DirtyBytes() int64 {
	m := v.intent
	var n int64
	for i := range m.durable {
		n += int64(bits.OnesCount64(m.durable[i].Load()))
	}
	total := n << m.shift
	if last := m.regions - 1; m.get(last) {
		total -= m.regions<<m.shift - m.size
	}
	return total
}
