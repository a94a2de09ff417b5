package layout

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"strings"
	"testing"
)

func sample(gen uint64) Superblock {
	sb, err := New([16]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, 4<<30, 0)
	if err != nil {
		panic(err)
	}
	sb.Generation = gen
	sb.Epoch = 7
	sb.LastApplied = 12345
	return sb
}

func encode(t testing.TB, sb Superblock) []byte {
	t.Helper()
	b := make([]byte, SuperblockSize)
	if err := sb.Encode(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// reseal recomputes the checksum after a test edits a field.
func reseal(b []byte) {
	binary.LittleEndian.PutUint32(b[offCRC:], crc32.Checksum(b[:offCRC], castagnoli))
}

func TestNewGeometry(t *testing.T) {
	sb := sample(1)
	if sb.DataOffset != 1<<20 || sb.BitmapOffset != 64<<10 || sb.BitmapLength != 960<<10 || sb.BlockSize != 4096 {
		t.Fatalf("geometry %+v", sb)
	}
	if sb.RegionSize != DefaultRegionSize {
		t.Fatalf("4 GiB volume region size %d, want %d", sb.RegionSize, DefaultRegionSize)
	}
	// A volume too large for 1 MiB regions gets larger ones, and fits.
	big, err := New([16]byte{}, 16<<40, 0)
	if err != nil {
		t.Fatal(err)
	}
	if big.RegionSize != 4<<20 || big.Regions() > RegionCapacity {
		t.Fatalf("1 TiB volume: region %d, %d regions", big.RegionSize, big.Regions())
	}
	for _, c := range []struct {
		size  int64
		block int
	}{{0, 0}, {1000, 0}, {4096, 8192}, {4096, 1000}, {-4096, 0}} {
		if _, err := New([16]byte{}, c.size, c.block); !errors.Is(err, ErrInvalid) {
			t.Errorf("New(size %d, block %d): %v, want ErrInvalid", c.size, c.block, err)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 1000 {
		var sb Superblock
		for i := range sb.VolumeID {
			sb.VolumeID[i] = byte(rng.Uint32())
		}
		sb.BlockSize = 512 << rng.IntN(8)
		sb.DataSize = int64(rng.IntN(1<<20)+1) * 65536
		sb.DataOffset, sb.BitmapOffset, sb.BitmapLength = DataOffset, BitmapOffset, BitmapLength
		sb.RegionSize = RegionSizeFor(sb.DataSize, DefaultRegionSize) << rng.IntN(3)
		sb.Generation = rng.Uint64() | 1
		sb.Epoch, sb.LastApplied = rng.Uint64(), rng.Uint64()
		sb.Clean = rng.IntN(2) == 0
		got, err := Decode(encode(t, sb))
		if err != nil {
			t.Fatalf("Decode(Encode(%+v)): %v", sb, err)
		}
		if got != sb {
			t.Fatalf("round trip:\n got %+v\nwant %+v", got, sb)
		}
	}
}

func TestEncodeRefusesInvalid(t *testing.T) {
	sb := sample(1)
	sb.Generation = 0
	b := bytes.Repeat([]byte{0xAA}, SuperblockSize)
	if err := sb.Encode(b); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Encode(generation 0): %v", err)
	}
	if b[0] != 0xAA {
		t.Fatal("a refused Encode wrote")
	}
	sb = sample(1)
	if err := sb.Encode(make([]byte, 100)); !errors.Is(err, ErrShort) {
		t.Fatalf("Encode into short buffer: %v", err)
	}
}

func TestDecodeErrors(t *testing.T) {
	good := encode(t, sample(2))
	edit := func(f func(b []byte)) []byte {
		b := bytes.Clone(good)
		f(b)
		return b
	}
	for _, c := range []struct {
		name string
		b    []byte
		want error
	}{
		{"short", good[:4000], ErrShort},
		{"zeroes", make([]byte, SuperblockSize), ErrBadMagic},
		{"magic", edit(func(b []byte) { b[3] ^= 1 }), ErrBadMagic},
		{"flipped data bit", edit(func(b []byte) { b[offDataSize] ^= 0x10 }), ErrChecksum},
		{"flipped crc", edit(func(b []byte) { b[offCRC] ^= 1 }), ErrChecksum},
		{"flipped reserved", edit(func(b []byte) { b[2000] = 1 }), ErrChecksum},
		{"newer version", edit(func(b []byte) { b[offVersion] = 2; reseal(b) }), ErrVersion},
		{"newer version, other checksum", edit(func(b []byte) { b[offVersion] = 2 }), ErrVersion},
		{"unknown flag", edit(func(b []byte) { b[offFlags] |= 4; reseal(b) }), ErrInvalid},
		{"reserved not zero", edit(func(b []byte) { b[3000] = 1; reseal(b) }), ErrInvalid},
		{"data size not 4K multiple", edit(func(b []byte) {
			binary.LittleEndian.PutUint64(b[offDataSize:], 1<<30+512)
			reseal(b)
		}), ErrInvalid},
		{"data size beyond int64", edit(func(b []byte) {
			binary.LittleEndian.PutUint64(b[offDataSize:], 1<<63)
			reseal(b)
		}), ErrInvalid},
		{"data inside bitmap", edit(func(b []byte) {
			binary.LittleEndian.PutUint64(b[offDataOffset:], 512<<10)
			reseal(b)
		}), ErrInvalid},
		{"region too small for bitmap", edit(func(b []byte) {
			binary.LittleEndian.PutUint64(b[offDataSize:], 1<<50)
			reseal(b)
		}), ErrInvalid},
		{"generation 0", edit(func(b []byte) {
			binary.LittleEndian.PutUint64(b[offGeneration:], 0)
			reseal(b)
		}), ErrInvalid},
	} {
		_, err := Decode(c.b)
		if !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
}

func TestLoad(t *testing.T) {
	a2, b3 := encode(t, sample(2)), encode(t, sample(3))
	b1 := encode(t, sample(1))
	corrupt := func(b []byte) []byte {
		c := bytes.Clone(b)
		c[100] ^= 0xff
		return c
	}
	t.Run("both valid: newer wins", func(t *testing.T) {
		for _, c := range []struct {
			a, b     []byte
			slot     int
			gen      uint64
			damaged  bool
			wantErr  error
			slotName string
		}{
			{a: a2, b: b3, slot: 1, gen: 3},
			{a: a2, b: b1, slot: 0, gen: 2},
			{a: corrupt(a2), b: b3, slot: 1, gen: 3, damaged: true},
			{a: a2, b: corrupt(b3), slot: 0, gen: 2, damaged: true},
			{a: make([]byte, SuperblockSize), b: b1, slot: 1, gen: 1, damaged: true},
		} {
			l, err := Load(c.a, c.b)
			if err != nil {
				t.Fatal(err)
			}
			if l.Slot != c.slot || l.Generation != c.gen || (l.Damaged() != nil) != c.damaged {
				t.Errorf("Load: slot %d gen %d damaged %v; want slot %d gen %d damaged %v",
					l.Slot, l.Generation, l.Damaged(), c.slot, c.gen, c.damaged)
			}
		}
	})
	t.Run("both bad", func(t *testing.T) {
		l, err := Load(corrupt(a2), make([]byte, SuperblockSize))
		if !errors.Is(err, ErrNoValid) || !errors.Is(err, ErrChecksum) || !errors.Is(err, ErrBadMagic) {
			t.Fatalf("Load(both bad): %v", err)
		}
		if !errors.Is(l.SlotErr[0], ErrChecksum) || !errors.Is(l.SlotErr[1], ErrBadMagic) || l.Generation != 0 {
			t.Fatalf("Load(both bad) result %+v", l)
		}
		if !strings.Contains(err.Error(), "slot A") || !strings.Contains(err.Error(), "slot B") {
			t.Fatalf("error does not name the slots: %v", err)
		}
	})
	t.Run("wrong slot", func(t *testing.T) {
		// Generation 3 belongs in B; found in A (a misdirected write) it
		// is not used.
		l, err := Load(b3, b1)
		if err != nil {
			t.Fatal(err)
		}
		if l.Slot != 1 || l.Generation != 1 || !errors.Is(l.Damaged(), ErrWrongSlot) {
			t.Fatalf("Load: slot %d gen %d damage %v", l.Slot, l.Generation, l.Damaged())
		}
	})
	t.Run("disagree", func(t *testing.T) {
		other := sample(3)
		other.VolumeID[0] ^= 1
		if _, err := Load(a2, encode(t, other)); !errors.Is(err, ErrDisagree) {
			t.Fatalf("Load(different volumes): %v", err)
		}
	})
}

// TestTornWrite: a superblock write torn at any 512-byte sector boundary
// leaves a slot that fails its checksum, and Load falls back to the other.
func TestTornWrite(t *testing.T) {
	a := encode(t, sample(2))
	oldB := encode(t, sample(1))
	next := sample(3)
	next.Epoch = 99
	newB := encode(t, next)
	for k := 1; k < SuperblockSize/512; k++ {
		torn := bytes.Clone(oldB)
		copy(torn[:k*512], newB)
		l, err := Load(a, torn)
		if err != nil {
			t.Fatalf("torn after %d sectors: %v", k, err)
		}
		if l.Generation != 2 || !errors.Is(l.Damaged(), ErrChecksum) {
			t.Fatalf("torn after %d sectors: gen %d damage %v", k, l.Generation, l.Damaged())
		}
	}
}

func FuzzDecodeSuperblock(f *testing.F) {
	good := encode(f, sample(2))
	f.Add(good)
	f.Add(make([]byte, SuperblockSize))
	f.Add(good[:100])
	for _, off := range []int{offVersion, offFlags, offDataSize, offRegionSize, offCRC, 500} {
		b := bytes.Clone(good)
		b[off] ^= 0x41
		f.Add(b)
		b = bytes.Clone(b)
		reseal(b)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		sb, err := Decode(b)
		if err != nil {
			return
		}
		// Whatever decodes re-encodes to the same bytes, and so
		// Decode(Encode(x)) == x.
		out := make([]byte, SuperblockSize)
		if err := sb.Encode(out); err != nil {
			t.Fatalf("decoded superblock does not encode: %v", err)
		}
		if !bytes.Equal(out, b[:SuperblockSize]) {
			t.Fatal("Encode(Decode(b)) != b")
		}
		again, err := Decode(out)
		if err != nil || again != sb {
			t.Fatalf("Decode(Encode(x)) = %+v, %v; want %+v", again, err, sb)
		}
	})
}

func FuzzLoad(f *testing.F) {
	a, b := encode(f, sample(2)), encode(f, sample(3))
	f.Add(a, b)
	f.Add(a, make([]byte, SuperblockSize))
	f.Add(b, a)
	f.Fuzz(func(t *testing.T, a, b []byte) {
		l, err := Load(a, b)
		if err != nil {
			return
		}
		// Whatever Load returns passed Decode in its slot.
		src := [2][]byte{a, b}[l.Slot]
		sb, err := Decode(src)
		if err != nil || sb != l.Superblock || sb.Slot() != l.Slot {
			t.Fatalf("Load returned %+v from slot %d that decodes to %+v, %v", l.Superblock, l.Slot, sb, err)
		}
	})
}
