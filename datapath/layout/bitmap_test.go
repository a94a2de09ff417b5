package layout

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"testing"
)

var testID = [16]byte{9, 8, 7, 6, 5, 4, 3, 2, 1}

func sampleHeader() BitmapHeader {
	return BitmapHeader{VolumeID: testID, DataSize: 64 << 30, RegionSize: 1 << 20, Generation: 5}
}

func encodeHeader(t testing.TB, h BitmapHeader) []byte {
	t.Helper()
	b := make([]byte, BitmapBlockSize)
	if err := EncodeBitmapHeader(b, h); err != nil {
		t.Fatal(err)
	}
	return b
}

func sealedBlock(index int, gen uint64, id [16]byte, set ...int) []byte {
	b := make([]byte, BitmapBlockSize)
	for _, j := range set {
		BitmapBlockBits(b)[j/8] |= 1 << (j % 8)
	}
	SealBitmapBlock(b, index, gen, id)
	return b
}

func TestBitmapGeometry(t *testing.T) {
	if BitmapBlocks != 239 || RegionsPerBlock != 32448 || RegionCapacity != 239*32448 {
		t.Fatalf("geometry: %d blocks of %d regions, capacity %d", BitmapBlocks, RegionsPerBlock, RegionCapacity)
	}
	if BitmapBlocksOffset+BitmapBlocks*BitmapBlockSize != DataOffset {
		t.Fatal("bitmap blocks do not end at the data")
	}
	if len(BitmapBlockBits(make([]byte, BitmapBlockSize)))*8 != RegionsPerBlock {
		t.Fatal("bits view size")
	}
	for _, c := range []struct {
		size int64
		want uint32
		got  uint32
	}{
		{4 << 30, DefaultRegionSize, 1 << 20},
		{RegionCapacity << 20, DefaultRegionSize, 1 << 20},
		{RegionCapacity<<20 + 4096, DefaultRegionSize, 2 << 20},
		{1 << 30, 3000, 4096},
		{1 << 30, 5000, 8192},
		{1 << 62, 4096, 0},
	} {
		if got := RegionSizeFor(c.size, c.want); got != c.got {
			t.Errorf("RegionSizeFor(%d, %d) = %d, want %d", c.size, c.want, got, c.got)
		}
	}
}

func TestBitmapHeaderRoundTrip(t *testing.T) {
	h := sampleHeader()
	got, err := DecodeBitmapHeader(encodeHeader(t, h))
	if err != nil || got != h {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	for _, bad := range []BitmapHeader{
		{VolumeID: testID, DataSize: 1 << 30, RegionSize: 1 << 20},                               // generation 0
		{VolumeID: testID, DataSize: 1 << 30, RegionSize: 3 << 20, Generation: 1},                // not a power of two
		{VolumeID: testID, DataSize: 1 << 30, RegionSize: 2048, Generation: 1},                   // too small
		{VolumeID: testID, DataSize: 1000, RegionSize: 4096, Generation: 1},                      // unaligned size
		{VolumeID: testID, DataSize: 1 << 40, RegionSize: 4096, Generation: 1},                   // too many regions
		{VolumeID: testID, DataSize: RegionCapacity<<12 + 4096, RegionSize: 4096, Generation: 1}, // one too many
	} {
		if err := EncodeBitmapHeader(make([]byte, BitmapBlockSize), bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("Encode(%+v): %v, want ErrInvalid", bad, err)
		}
	}
}

func TestBitmapHeaderDamage(t *testing.T) {
	good := encodeHeader(t, sampleHeader())
	// Every single flipped byte is caught.
	for i := range BitmapBlockSize {
		b := bytes.Clone(good)
		b[i] ^= 0x10
		if _, err := DecodeBitmapHeader(b); err == nil {
			t.Fatalf("flipped byte %d accepted", i)
		}
	}
	// A header torn at a 512-byte sector: new first sector, old rest.
	h2 := sampleHeader()
	h2.Generation++
	torn := bytes.Clone(good)
	copy(torn[:512], encodeHeader(t, h2))
	if _, err := DecodeBitmapHeader(torn); !errors.Is(err, ErrChecksum) {
		t.Fatalf("torn header: %v", err)
	}
	// Resealed garbage in the reserved area is refused too.
	b := bytes.Clone(good)
	b[1000] = 1
	binary.LittleEndian.PutUint32(b[bhCRC:], crc32.Checksum(b[:bhCRC], castagnoli))
	if _, err := DecodeBitmapHeader(b); !errors.Is(err, ErrInvalid) {
		t.Fatalf("reserved byte: %v", err)
	}
	if _, err := DecodeBitmapHeader(make([]byte, BitmapBlockSize)); !errors.Is(err, ErrBadMagic) {
		t.Fatalf("zero header: %v", err)
	}
	if _, err := DecodeBitmapHeader(good[:100]); !errors.Is(err, ErrShort) {
		t.Fatalf("short header: %v", err)
	}
}

func TestBitmapBlockChecks(t *testing.T) {
	h := sampleHeader()
	b := sealedBlock(3, h.Generation, testID, 0, 7, RegionsPerBlock-1)
	if err := CheckBitmapBlock(b, 3, h); err != nil {
		t.Fatal(err)
	}
	bits := BitmapBlockBits(b)
	if bits[0] != 0x81 || bits[len(bits)-1] != 0x80 {
		t.Fatalf("bit order: %#x .. %#x", bits[0], bits[len(bits)-1])
	}
	if g, ok := BitmapBlockGeneration(b); !ok || g != h.Generation {
		t.Fatalf("generation %d %v", g, ok)
	}
	other := h
	other.Generation++
	foreign := h
	foreign.VolumeID[0]++
	for _, c := range []struct {
		name  string
		b     []byte
		index int
		h     BitmapHeader
	}{
		{"wrong index", b, 4, h},
		{"stale generation", b, 3, other},
		{"other volume", b, 3, foreign},
		{"zero block", make([]byte, BitmapBlockSize), 3, h},
		{"short", b[:4000], 3, h},
	} {
		if err := CheckBitmapBlock(c.b, c.index, c.h); err == nil {
			t.Errorf("%s: accepted", c.name)
		}
	}
	for i := range BitmapBlockSize {
		d := bytes.Clone(b)
		d[i] ^= 0x01
		if CheckBitmapBlock(d, 3, h) == nil {
			t.Fatalf("flipped byte %d accepted", i)
		}
	}
	// Torn at a sector: the old version's first sector (bit 0 clear).
	old := sealedBlock(3, h.Generation, testID)
	torn := bytes.Clone(b)
	copy(torn[:512], old[:512])
	if CheckBitmapBlock(torn, 3, h) == nil {
		t.Fatal("torn block accepted")
	}
}

func FuzzBitmapHeader(f *testing.F) {
	good := encodeHeader(f, sampleHeader())
	f.Add(good)
	f.Add(make([]byte, BitmapBlockSize))
	f.Add(good[:50])
	for _, off := range []int{bhVersion, bhRegionSize, bhDataSize, bhGeneration, bhReserved, bhCRC} {
		b := bytes.Clone(good)
		b[off] ^= 0x41
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := DecodeBitmapHeader(b)
		if err != nil {
			return
		}
		out := make([]byte, BitmapBlockSize)
		if err := EncodeBitmapHeader(out, h); err != nil {
			t.Fatalf("decoded header does not encode: %v", err)
		}
		if !bytes.Equal(out, b[:BitmapBlockSize]) {
			t.Fatal("Encode(Decode(b)) != b")
		}
	})
}

func FuzzBitmapBlock(f *testing.F) {
	h := sampleHeader()
	good := sealedBlock(2, h.Generation, testID, 1, 100, 5000)
	f.Add(good, 2)
	f.Add(make([]byte, BitmapBlockSize), 0)
	f.Add(good[:64], 2)
	f.Add(sealedBlock(2, h.Generation+1, testID), 2)
	for _, off := range []int{bbIndex, bbGeneration, bbVolumeID, bbBits, bbBitsEnd, bbCRC} {
		b := bytes.Clone(good)
		b[off] ^= 0x41
		f.Add(b, 2)
	}
	f.Fuzz(func(t *testing.T, b []byte, index int) {
		_, genOK := BitmapBlockGeneration(b)
		if CheckBitmapBlock(b, index, h) != nil {
			return
		}
		if !genOK {
			t.Fatal("a block that checks has no generation")
		}
		// A block that checks is exactly what sealing its bits gives.
		out := make([]byte, BitmapBlockSize)
		copy(BitmapBlockBits(out), BitmapBlockBits(b))
		SealBitmapBlock(out, index, h.Generation, h.VolumeID)
		if !bytes.Equal(out, b[:BitmapBlockSize]) {
			t.Fatal("Seal(Check(b)) != b")
		}
	})
}
