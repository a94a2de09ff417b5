package volume_test

import (
	"testing"

	"keel/datapath/dio"
	"keel/datapath/iobuf"
	"keel/datapath/volume"
)

// BenchmarkVolume measures single requests through the volume on dio.Mem
// (the volume's own overhead) and on an O_DIRECT file on the work disk:
// aligned 4 KiB reads and writes (the zero-allocation path), FUA writes,
// and unaligned ones (read-modify-write through a bounce buffer).
func BenchmarkVolume(b *testing.B) {
	const size = 64 << 20
	devs := []struct {
		name string
		open func(b *testing.B) *volume.Volume
	}{
		{"mem", func(b *testing.B) *volume.Volume {
			v, _ := createMem(b, size, dio.MemOptions{})
			return v
		}},
		{"file", func(b *testing.B) *volume.Volume {
			v, _ := createFile(b, b.TempDir(), size)
			return v
		}},
	}
	for _, d := range devs {
		v := d.open(b)
		buf := iobuf.Get(4096 + 512)
		aligned, unaligned := buf.Bytes()[:4096], buf.Bytes()[100:4196]
		// Write everything once so reads hit allocated blocks.
		fillBuf := iobuf.Get(1 << 20)
		for off := int64(0); off < size; off += 1 << 20 {
			if err := v.WriteAt(fillBuf.Bytes(), off, false); err != nil {
				b.Fatal(err)
			}
		}
		fillBuf.Release()
		for _, c := range []struct {
			name string
			fn   func(off int64) error
		}{
			{"ReadAt4K", func(off int64) error { return v.ReadAt(aligned, off) }},
			{"WriteAt4K", func(off int64) error { return v.WriteAt(aligned, off, false) }},
			{"WriteAt4KFUA", func(off int64) error { return v.WriteAt(aligned, off, true) }},
			{"ReadAt4KUnaligned", func(off int64) error { return v.ReadAt(unaligned, off+100) }},
			{"WriteAt4KUnaligned", func(off int64) error { return v.WriteAt(unaligned, off+100, false) }},
		} {
			b.Run(d.name+"/"+c.name, func(b *testing.B) {
				b.ReportAllocs()
				b.SetBytes(4096)
				off := int64(0)
				for b.Loop() {
					if err := c.fn(off); err != nil {
						b.Fatal(err)
					}
					off = (off + 4096) % (size - 8192)
				}
			})
		}
		b.Run(d.name+"/WriteAt4KParallel", func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(4096)
			b.RunParallel(func(pb *testing.PB) {
				p := iobuf.Get(4096)
				defer p.Release()
				off := int64(0)
				for pb.Next() {
					if err := v.WriteAt(p.Bytes(), off, false); err != nil {
						b.Error(err)
						return
					}
					off = (off + 4096) % size
				}
			})
		})
		buf.Release()
		v.Close()
	}
}
