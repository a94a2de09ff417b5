// Package layout owns the on-disk format of a keel replica: where the
// metadata and the data live in the volume file (or raw device), and the
// superblock's encoding. It does no I/O: callers read and write the bytes.
//
// # Volume file
//
//	offset      size            contents
//	0           4 KiB           superblock slot A (generations with bit 0 clear)
//	4 KiB       4 KiB           superblock slot B (generations with bit 0 set)
//	8 KiB       56 KiB          reserved, zero
//	64 KiB      960 KiB         write-intent bitmap: a header block and
//	                            BitmapBlocks (239) bitmap blocks, below
//	1 MiB       DataSize        data: what NBD clients see, at data offset 0
//
// The file is DataOffset+DataSize bytes, preallocated. Every metadata
// structure is 4 KiB-aligned, so it can be read and written with O_DIRECT
// on 512- and 4096-byte-sector devices alike.
//
// # Superblock (4096 bytes, little-endian)
//
//	0     8  magic "KEELVOL\x00"
//	8     4  format version (1)
//	12    4  flags: bit 0 clean shutdown; the other bits must be zero
//	16   16  volume id (random at creation)
//	32    8  generation: +1 on every superblock write, never 0
//	40    8  data size (bytes; a multiple of 4096 and of the block size)
//	48    8  data offset (bytes; 4096-aligned, after the bitmap)
//	56    8  bitmap offset (bytes; 4096-aligned, after slot B)
//	64    8  bitmap length (bytes; 4096-aligned, ends at or before the data)
//	72    4  block size advertised to clients (power of two, 512..65536)
//	76    4  region size: data bytes per bitmap bit (power of two >= 4096;
//	         the bitmap header repeats it)
//	80    8  epoch: highest coordinator epoch this replica has seen
//	88    8  last applied replication sequence
//	96 3996  reserved, must be zero
//	4092  4  CRC-32C (Castagnoli) of bytes 0..4091
//
// # Two slots
//
// A superblock with generation g lives in slot g&1, so consecutive writes
// alternate between the slots: a write torn by a crash damages only the
// slot being written, and the other still holds the previous generation.
// Load decodes both and uses the valid one with the higher generation; it
// reports a damaged slot next to the one it used (the caller logs it; the
// next superblock write overwrites the damaged slot) and fails, naming both
// reasons, when neither is valid. It never returns a superblock that failed
// its checks.
//
// # Write-intent bitmap
//
// Bit r of the bitmap says region r, data bytes [r*RegionSize,
// (r+1)*RegionSize), may differ from the other replicas. The area holds a
// header block and bitmap blocks, each 4096 bytes, little-endian, each
// with its own CRC-32C so that a block torn by a crash or corrupt on disk
// is detected and read as "every region of this block dirty" (never as
// clean); a bad header makes every region dirty.
//
//	64 KiB + 0: header
//	0     8  magic "KEELBMP\x00"
//	8     4  format version (1)
//	12    4  region size (power of two, 4096..2^31)
//	16   16  volume id (the superblock's)
//	32    8  data size (the superblock's)
//	40    8  generation (never 0): blocks of another generation are stale
//	48 4044  reserved, zero
//	4092  4  CRC-32C of bytes 0..4091
//
//	64 KiB + 4 KiB*(1+i): bitmap block i, i in [0, 239)
//	0     4  magic "KBMB"
//	4     4  block index i
//	8     8  generation (must equal the header's)
//	16   16  volume id (must equal the header's)
//	32 4056  bits: bit j (byte j/8, bit j%8, least significant first) is
//	         region i*32448+j; bits past the last region are ignored
//	4088  4  reserved, zero
//	4092  4  CRC-32C of bytes 0..4091
//
// So the area tracks at most RegionCapacity = 239*32448 = 7,755,072
// regions: 7.39 TiB at the default 1 MiB regions; a larger volume needs
// larger regions (RegionSizeFor). The header's region size, volume id and
// data size must equal the superblock's, else the header counts as bad.
//
// Update rules (datapath/volume implements them): a block is written whole
// with FUA, and bits only ever get set by a block write while the volume
// is degraded, or cleared all at once when every replica is in sync. The
// header is rewritten only together with a new generation, chosen above
// every generation found in any block on disk, so no block left over from
// an earlier generation can become valid again; that is how a region size
// change or a bad header is repaired: new header and every block of the
// new generation, in one write; a crash part way leaves blocks stale or
// torn (dirty) or the old header (still consistent).
package layout

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"math/bits"
)

// Geometry of a version 1 volume file.
const (
	SuperblockSize = 4096
	SlotAOffset    = 0
	SlotBOffset    = SuperblockSize
	BitmapOffset   = 64 << 10
	DataOffset     = 1 << 20
	BitmapLength   = DataOffset - BitmapOffset

	// Version is the format version this package writes and reads.
	Version = 1
	// DefaultBlockSize is the block size advertised unless asked otherwise.
	DefaultBlockSize = 4096
	// SizeAlign is what every data size must be a multiple of.
	SizeAlign = 4096
)

// Magic opens every superblock.
var Magic = [8]byte{'K', 'E', 'E', 'L', 'V', 'O', 'L', 0}

// Errors Decode and Load return, wrapped with detail.
var (
	ErrShort     = errors.New("superblock buffer shorter than 4096 bytes")
	ErrBadMagic  = errors.New("no keel superblock (bad magic)")
	ErrChecksum  = errors.New("superblock checksum mismatch (torn or corrupt)")
	ErrVersion   = errors.New("unsupported superblock format version")
	ErrInvalid   = errors.New("invalid superblock field")
	ErrWrongSlot = errors.New("superblock generation does not belong to this slot")
	ErrDisagree  = errors.New("superblock slots describe different volumes")
	ErrNoValid   = errors.New("no valid superblock")
)

const (
	offMagic       = 0
	offVersion     = 8
	offFlags       = 12
	offVolumeID    = 16
	offGeneration  = 32
	offDataSize    = 40
	offDataOffset  = 48
	offBitmapOff   = 56
	offBitmapLen   = 64
	offBlockSize   = 72
	offRegionSize  = 76
	offEpoch       = 80
	offLastApplied = 88
	offReserved    = 96
	offCRC         = SuperblockSize - 4

	flagClean = 1 << 0
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Superblock is the decoded per-replica metadata. Every field round-trips:
// Decode(Encode(s)) == s for every s that passes Validate.
type Superblock struct {
	VolumeID     [16]byte
	Generation   uint64
	DataSize     int64
	DataOffset   int64
	BitmapOffset int64
	BitmapLength int64
	BlockSize    uint32
	RegionSize   uint32
	Epoch        uint64
	LastApplied  uint64
	Clean        bool
}

// New returns the generation-1 superblock of a new volume of dataSize bytes
// with the standard geometry. blockSize 0 means DefaultBlockSize.
func New(id [16]byte, dataSize int64, blockSize int) (Superblock, error) {
	if blockSize == 0 {
		blockSize = DefaultBlockSize
	}
	if blockSize < 0 || int64(blockSize) > math.MaxUint32 {
		return Superblock{}, fmt.Errorf("%w: block size %d", ErrInvalid, blockSize)
	}
	sb := Superblock{
		VolumeID:     id,
		Generation:   1,
		DataSize:     dataSize,
		DataOffset:   DataOffset,
		BitmapOffset: BitmapOffset,
		BitmapLength: BitmapLength,
		BlockSize:    uint32(blockSize),
		RegionSize:   RegionSizeFor(dataSize, DefaultRegionSize),
	}
	if sb.RegionSize == 0 {
		return Superblock{}, fmt.Errorf("%w: data size %d is too large for the write-intent bitmap", ErrInvalid, dataSize)
	}
	return sb, sb.Validate()
}

// Regions is how many bitmap bits the data area needs.
func (s *Superblock) Regions() int64 {
	return (s.DataSize + int64(s.RegionSize) - 1) / int64(s.RegionSize)
}

// Slot is the slot (0 = A, 1 = B) a superblock of this generation goes to.
func (s *Superblock) Slot() int { return int(s.Generation & 1) }

// SlotOffset is the byte offset of slot i (0 or 1).
func SlotOffset(i int) int64 { return int64(i) * SuperblockSize }

// SlotName is "A" or "B".
func SlotName(i int) string { return string(rune('A' + i)) }

// Validate checks every field against the format's rules.
func (s *Superblock) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, args...)...)
	}
	switch {
	case s.Generation == 0:
		return bad("generation 0")
	case s.BlockSize < 512 || s.BlockSize > 65536 || bits.OnesCount32(s.BlockSize) != 1:
		return bad("block size %d is not a power of two in [512, 65536]", s.BlockSize)
	case s.DataSize <= 0 || s.DataSize%SizeAlign != 0 || s.DataSize%int64(s.BlockSize) != 0:
		return bad("data size %d is not a positive multiple of %d and of the block size %d", s.DataSize, SizeAlign, s.BlockSize)
	case s.BitmapOffset < 2*SuperblockSize || s.BitmapOffset%SizeAlign != 0:
		return bad("bitmap offset %d", s.BitmapOffset)
	case s.BitmapLength < 0 || s.BitmapLength%SizeAlign != 0 || s.BitmapLength > math.MaxInt64-s.BitmapOffset:
		return bad("bitmap length %d", s.BitmapLength)
	case s.DataOffset%SizeAlign != 0 || s.DataOffset < s.BitmapOffset+s.BitmapLength:
		return bad("data offset %d (bitmap ends at %d)", s.DataOffset, s.BitmapOffset+s.BitmapLength)
	case s.DataSize > math.MaxInt64-s.DataOffset:
		return bad("data offset %d + data size %d overflows", s.DataOffset, s.DataSize)
	case s.RegionSize < 4096 || bits.OnesCount32(s.RegionSize) != 1:
		return bad("region size %d is not a power of two >= 4096", s.RegionSize)
	case s.Regions() > s.BitmapLength*8:
		return bad("%d regions of %d bytes do not fit a %d-byte bitmap", s.Regions(), s.RegionSize, s.BitmapLength)
	}
	return nil
}

// Encode writes s into dst[:SuperblockSize], checksum included. It fails
// (writing nothing) if s does not pass Validate or dst is short.
func (s *Superblock) Encode(dst []byte) error {
	if len(dst) < SuperblockSize {
		return ErrShort
	}
	if err := s.Validate(); err != nil {
		return err
	}
	b := dst[:SuperblockSize]
	clear(b)
	le := binary.LittleEndian
	copy(b[offMagic:], Magic[:])
	le.PutUint32(b[offVersion:], Version)
	var flags uint32
	if s.Clean {
		flags |= flagClean
	}
	le.PutUint32(b[offFlags:], flags)
	copy(b[offVolumeID:], s.VolumeID[:])
	le.PutUint64(b[offGeneration:], s.Generation)
	le.PutUint64(b[offDataSize:], uint64(s.DataSize))
	le.PutUint64(b[offDataOffset:], uint64(s.DataOffset))
	le.PutUint64(b[offBitmapOff:], uint64(s.BitmapOffset))
	le.PutUint64(b[offBitmapLen:], uint64(s.BitmapLength))
	le.PutUint32(b[offBlockSize:], s.BlockSize)
	le.PutUint32(b[offRegionSize:], s.RegionSize)
	le.PutUint64(b[offEpoch:], s.Epoch)
	le.PutUint64(b[offLastApplied:], s.LastApplied)
	le.PutUint32(b[offCRC:], crc32.Checksum(b[:offCRC], castagnoli))
	return nil
}

// Decode parses and checks one superblock from b[:SuperblockSize]. The
// error wraps ErrShort, ErrBadMagic, ErrChecksum, ErrVersion or ErrInvalid.
func Decode(b []byte) (Superblock, error) {
	if len(b) < SuperblockSize {
		return Superblock{}, ErrShort
	}
	b = b[:SuperblockSize]
	le := binary.LittleEndian
	if [8]byte(b[offMagic:offMagic+8]) != Magic {
		return Superblock{}, ErrBadMagic
	}
	version := le.Uint32(b[offVersion:])
	if want, got := le.Uint32(b[offCRC:]), crc32.Checksum(b[:offCRC], castagnoli); want != got {
		if version != Version {
			// A newer format may keep its checksum elsewhere.
			return Superblock{}, fmt.Errorf("%w %d (this keel reads %d), or a corrupt superblock", ErrVersion, version, Version)
		}
		return Superblock{}, fmt.Errorf("%w: stored %#08x, computed %#08x", ErrChecksum, want, got)
	}
	if version != Version {
		return Superblock{}, fmt.Errorf("%w %d (this keel reads %d)", ErrVersion, version, Version)
	}
	flags := le.Uint32(b[offFlags:])
	if flags&^flagClean != 0 {
		return Superblock{}, fmt.Errorf("%w: unknown flags %#x", ErrInvalid, flags&^flagClean)
	}
	for i, c := range b[offReserved:offCRC] {
		if c != 0 {
			return Superblock{}, fmt.Errorf("%w: reserved byte %d is %#02x, not zero", ErrInvalid, offReserved+i, c)
		}
	}
	s := Superblock{
		Generation:  le.Uint64(b[offGeneration:]),
		BlockSize:   le.Uint32(b[offBlockSize:]),
		RegionSize:  le.Uint32(b[offRegionSize:]),
		Epoch:       le.Uint64(b[offEpoch:]),
		LastApplied: le.Uint64(b[offLastApplied:]),
		Clean:       flags&flagClean != 0,
	}
	copy(s.VolumeID[:], b[offVolumeID:])
	for _, f := range []struct {
		dst  *int64
		off  int
		name string
	}{
		{&s.DataSize, offDataSize, "data size"},
		{&s.DataOffset, offDataOffset, "data offset"},
		{&s.BitmapOffset, offBitmapOff, "bitmap offset"},
		{&s.BitmapLength, offBitmapLen, "bitmap length"},
	} {
		v := le.Uint64(b[f.off:])
		if v > math.MaxInt64 {
			return Superblock{}, fmt.Errorf("%w: %s %d out of range", ErrInvalid, f.name, v)
		}
		*f.dst = int64(v)
	}
	if err := s.Validate(); err != nil {
		return Superblock{}, err
	}
	return s, nil
}

// Loaded is the result of Load.
type Loaded struct {
	Superblock
	// Slot is where Superblock came from (0 = A, 1 = B).
	Slot int
	// SlotErr[i] says why slot i could not be used; nil for a valid slot
	// (the one used, or a valid older generation). A non-nil entry next to
	// a successful Load is damage the caller must report.
	SlotErr [2]error
}

// Damaged reports the damage to the slot not used, or nil.
func (l *Loaded) Damaged() error {
	if err := l.SlotErr[1-l.Slot]; err != nil {
		return fmt.Errorf("superblock slot %s: %w", SlotName(1-l.Slot), err)
	}
	return nil
}

// Load picks the superblock from the two slots' bytes (each at least
// SuperblockSize long): the valid one with the higher generation. The error
// wraps ErrNoValid when neither slot is valid (and each slot's reason), or
// ErrDisagree when both are valid but describe different volumes. With
// ErrNoValid the returned Loaded still has SlotErr filled in, and nothing
// else.
func Load(slotA, slotB []byte) (Loaded, error) {
	var l Loaded
	var sbs [2]Superblock
	for i, b := range [2][]byte{slotA, slotB} {
		sb, err := Decode(b)
		if err == nil && sb.Slot() != i {
			err = fmt.Errorf("%w: generation %d found in slot %s", ErrWrongSlot, sb.Generation, SlotName(i))
		}
		sbs[i], l.SlotErr[i] = sb, err
	}
	switch {
	case l.SlotErr[0] != nil && l.SlotErr[1] != nil:
		return l, fmt.Errorf("%w (slot A: %w; slot B: %w)", ErrNoValid, l.SlotErr[0], l.SlotErr[1])
	case l.SlotErr[0] != nil:
		l.Slot = 1
	case l.SlotErr[1] != nil:
		l.Slot = 0
	default:
		a, b := &sbs[0], &sbs[1]
		if a.VolumeID != b.VolumeID || a.DataSize != b.DataSize || a.DataOffset != b.DataOffset {
			return Loaded{}, fmt.Errorf("%w: slot A has volume %x of %d bytes, slot B volume %x of %d bytes",
				ErrDisagree, a.VolumeID, a.DataSize, b.VolumeID, b.DataSize)
		}
		if b.Generation > a.Generation {
			l.Slot = 1
		}
	}
	l.Superblock = sbs[l.Slot]
	return l, nil
}
