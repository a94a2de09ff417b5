package layout

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/bits"
)

// Geometry of the write-intent bitmap area (see the package doc).
const (
	// BitmapBlockSize is the size of the header and of every bitmap block.
	BitmapBlockSize = 4096
	// BitmapHeaderOffset is the device offset of the bitmap header.
	BitmapHeaderOffset = BitmapOffset
	// BitmapBlocksOffset is the device offset of bitmap block 0.
	BitmapBlocksOffset = BitmapOffset + BitmapBlockSize
	// BitmapBlocks is how many bitmap blocks the area holds.
	BitmapBlocks = (BitmapLength - BitmapBlockSize) / BitmapBlockSize
	// RegionsPerBlock is how many region bits one bitmap block carries.
	RegionsPerBlock = BitmapBlockWords * 64
	// BitmapBlockWords is RegionsPerBlock in 64-bit words.
	BitmapBlockWords = (bbBitsEnd - bbBits) / 8
	// RegionCapacity is the most regions the area can track.
	RegionCapacity = BitmapBlocks * RegionsPerBlock
	// DefaultRegionSize is the region size of a new volume unless asked
	// otherwise (raised when the volume is too large for it).
	DefaultRegionSize = 1 << 20
	// MaxRegionSize is the largest region size the format stores.
	MaxRegionSize = 1 << 31
)

// BitmapMagic opens the bitmap header; BlockMagic opens every bitmap block.
var (
	BitmapMagic = [8]byte{'K', 'E', 'E', 'L', 'B', 'M', 'P', 0}
	BlockMagic  = [4]byte{'K', 'B', 'M', 'B'}
)

const (
	bhMagic      = 0
	bhVersion    = 8
	bhRegionSize = 12
	bhVolumeID   = 16
	bhDataSize   = 32
	bhGeneration = 40
	bhReserved   = 48
	bhCRC        = BitmapBlockSize - 4

	bbMagic      = 0
	bbIndex      = 4
	bbGeneration = 8
	bbVolumeID   = 16
	bbBits       = 32
	bbBitsEnd    = 4088
	bbCRC        = BitmapBlockSize - 4
)

// BitmapHeader is the decoded bitmap header.
type BitmapHeader struct {
	VolumeID   [16]byte
	DataSize   int64
	RegionSize uint32
	// Generation is the bitmap generation: a block is valid only if it
	// carries the same one. Never 0.
	Generation uint64
}

// Regions is how many region bits cover the data.
func (h *BitmapHeader) Regions() int64 {
	return (h.DataSize + int64(h.RegionSize) - 1) / int64(h.RegionSize)
}

// Blocks is how many bitmap blocks Regions needs.
func (h *BitmapHeader) Blocks() int {
	return int((h.Regions() + RegionsPerBlock - 1) / RegionsPerBlock)
}

// Validate checks the header's fields.
func (h *BitmapHeader) Validate() error {
	switch {
	case h.Generation == 0:
		return fmt.Errorf("%w: bitmap generation 0", ErrInvalid)
	case h.RegionSize < SizeAlign || bits.OnesCount32(h.RegionSize) != 1 || h.RegionSize > MaxRegionSize:
		return fmt.Errorf("%w: bitmap region size %d is not a power of two in [%d, %d]", ErrInvalid, h.RegionSize, SizeAlign, MaxRegionSize)
	case h.DataSize <= 0 || h.DataSize%SizeAlign != 0:
		return fmt.Errorf("%w: bitmap data size %d", ErrInvalid, h.DataSize)
	case h.Regions() > RegionCapacity:
		return fmt.Errorf("%w: %d regions of %d bytes exceed the bitmap's capacity of %d", ErrInvalid, h.Regions(), h.RegionSize, RegionCapacity)
	}
	return nil
}

// EncodeBitmapHeader writes h into dst[:BitmapBlockSize], checksum included.
func EncodeBitmapHeader(dst []byte, h BitmapHeader) error {
	if len(dst) < BitmapBlockSize {
		return ErrShort
	}
	if err := h.Validate(); err != nil {
		return err
	}
	b := dst[:BitmapBlockSize]
	clear(b)
	le := binary.LittleEndian
	copy(b[bhMagic:], BitmapMagic[:])
	le.PutUint32(b[bhVersion:], Version)
	le.PutUint32(b[bhRegionSize:], h.RegionSize)
	copy(b[bhVolumeID:], h.VolumeID[:])
	le.PutUint64(b[bhDataSize:], uint64(h.DataSize))
	le.PutUint64(b[bhGeneration:], h.Generation)
	le.PutUint32(b[bhCRC:], crc32.Checksum(b[:bhCRC], castagnoli))
	return nil
}

// DecodeBitmapHeader parses and checks a bitmap header. Any error means the
// header is unusable, and with it the whole bitmap: the caller must treat
// every region as dirty.
func DecodeBitmapHeader(b []byte) (BitmapHeader, error) {
	if len(b) < BitmapBlockSize {
		return BitmapHeader{}, ErrShort
	}
	b = b[:BitmapBlockSize]
	le := binary.LittleEndian
	if [8]byte(b[bhMagic:bhMagic+8]) != BitmapMagic {
		return BitmapHeader{}, fmt.Errorf("bitmap header: %w", ErrBadMagic)
	}
	if want, got := le.Uint32(b[bhCRC:]), crc32.Checksum(b[:bhCRC], castagnoli); want != got {
		return BitmapHeader{}, fmt.Errorf("bitmap header: %w: stored %#08x, computed %#08x", ErrChecksum, want, got)
	}
	if v := le.Uint32(b[bhVersion:]); v != Version {
		return BitmapHeader{}, fmt.Errorf("bitmap header: %w %d (this keel reads %d)", ErrVersion, v, Version)
	}
	for i, c := range b[bhReserved:bhCRC] {
		if c != 0 {
			return BitmapHeader{}, fmt.Errorf("bitmap header: %w: reserved byte %d is %#02x, not zero", ErrInvalid, bhReserved+i, c)
		}
	}
	h := BitmapHeader{
		RegionSize: le.Uint32(b[bhRegionSize:]),
		Generation: le.Uint64(b[bhGeneration:]),
	}
	copy(h.VolumeID[:], b[bhVolumeID:])
	ds := le.Uint64(b[bhDataSize:])
	if ds > 1<<62 {
		return BitmapHeader{}, fmt.Errorf("bitmap header: %w: data size %d out of range", ErrInvalid, ds)
	}
	h.DataSize = int64(ds)
	if err := h.Validate(); err != nil {
		return BitmapHeader{}, fmt.Errorf("bitmap header: %w", err)
	}
	return h, nil
}

// BitmapBlockBits returns the region bits of an encoded block b (a view of
// b, RegionsPerBlock/8 bytes, a multiple of 8): bit j, byte j/8, bit j%8 least significant
// first, is region index*RegionsPerBlock+j.
func BitmapBlockBits(b []byte) []byte { return b[bbBits:bbBitsEnd] }

// SealBitmapBlock fills in block b's fields (index, generation, volume id)
// around the bits already in BitmapBlockBits(b), and its checksum.
func SealBitmapBlock(b []byte, index int, gen uint64, id [16]byte) {
	b = b[:BitmapBlockSize]
	le := binary.LittleEndian
	copy(b[bbMagic:], BlockMagic[:])
	le.PutUint32(b[bbIndex:], uint32(index))
	le.PutUint64(b[bbGeneration:], gen)
	copy(b[bbVolumeID:], id[:])
	clear(b[bbBitsEnd:bbCRC])
	le.PutUint32(b[bbCRC:], crc32.Checksum(b[:bbCRC], castagnoli))
}

// BitmapBlockGeneration returns the generation of a block whose magic and
// checksum are intact, and false otherwise. Opening uses it to choose a
// generation no block on disk carries.
func BitmapBlockGeneration(b []byte) (uint64, bool) {
	if len(b) < BitmapBlockSize || [4]byte(b[bbMagic:bbMagic+4]) != BlockMagic {
		return 0, false
	}
	le := binary.LittleEndian
	if le.Uint32(b[bbCRC:]) != crc32.Checksum(b[:bbCRC], castagnoli) {
		return 0, false
	}
	return le.Uint64(b[bbGeneration:]), true
}

// CheckBitmapBlock checks block b as block index of the bitmap h describes.
// An error (torn, corrupt, stale or foreign block) means every region of
// the block must be treated as dirty; on success BitmapBlockBits(b) holds
// its bits.
func CheckBitmapBlock(b []byte, index int, h BitmapHeader) error {
	if len(b) < BitmapBlockSize {
		return ErrShort
	}
	le := binary.LittleEndian
	if [4]byte(b[bbMagic:bbMagic+4]) != BlockMagic {
		return fmt.Errorf("bitmap block %d: %w", index, ErrBadMagic)
	}
	if want, got := le.Uint32(b[bbCRC:]), crc32.Checksum(b[:bbCRC], castagnoli); want != got {
		return fmt.Errorf("bitmap block %d: %w: stored %#08x, computed %#08x", index, ErrChecksum, want, got)
	}
	for i, c := range b[bbBitsEnd:bbCRC] {
		if c != 0 {
			return fmt.Errorf("bitmap block %d: %w: reserved byte %d is %#02x, not zero", index, ErrInvalid, bbBitsEnd+i, c)
		}
	}
	if i := le.Uint32(b[bbIndex:]); int64(i) != int64(index) {
		return fmt.Errorf("bitmap block %d: %w: it says it is block %d", index, ErrInvalid, i)
	}
	if g := le.Uint64(b[bbGeneration:]); g != h.Generation {
		return fmt.Errorf("bitmap block %d: %w: generation %d, the header's is %d (stale)", index, ErrInvalid, g, h.Generation)
	}
	if [16]byte(b[bbVolumeID:bbVolumeID+16]) != h.VolumeID {
		return fmt.Errorf("bitmap block %d: %w: belongs to volume %x", index, ErrInvalid, b[bbVolumeID:bbVolumeID+16])
	}
	return nil
}

// RegionSizeFor returns the smallest power of two, at least want (rounded
// up to a power of two of at least SizeAlign), whose regions of dataSize
// bytes fit RegionCapacity; 0 when none up to MaxRegionSize does.
func RegionSizeFor(dataSize int64, want uint32) uint32 {
	r := int64(SizeAlign)
	for r < int64(want) {
		r <<= 1
	}
	for r <= MaxRegionSize {
		if (dataSize+r-1)/r <= RegionCapacity {
			return uint32(r)
		}
		r <<= 1
	}
	return 0
}
