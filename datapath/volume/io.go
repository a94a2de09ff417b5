package volume

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"keel/datapath/iobuf"
)

// begin admits a request unless the volume is closed; end releases it.
func (v *Volume) begin() error {
	v.closeMu.RLock()
	if v.closed {
		v.closeMu.RUnlock()
		return ErrClosed
	}
	return nil
}

func (v *Volume) end() { v.closeMu.RUnlock() }

// checkRange: [off, off+n) must lie within the data.
func (v *Volume) checkRange(op string, off, n int64) error {
	if off < 0 || n < 0 || off > v.size || n > v.size-off {
		return fmt.Errorf("volume %s: %s [%d, +%d) outside its %d bytes: %w", v.name, op, off, n, v.size, unix.EINVAL)
	}
	return nil
}

func (v *Volume) alignDown(x int64) int64 { return x &^ (v.align - 1) }
func (v *Volume) alignUp(x int64) int64   { return (x + v.align - 1) &^ (v.align - 1) }

// direct reports whether [off, off+len(p)) and p can go to the device as is.
func (v *Volume) direct(p []byte, off int64) bool {
	return (off|int64(len(p)))&(v.align-1) == 0 && iobuf.IsAligned(p, v.memAlign)
}

func (v *Volume) ioErr(op string, off, n int64, err error) error {
	return fmt.Errorf("volume %s: %s [%d, +%d): %w", v.name, op, off, n, err)
}

// ReadAt fills p with the data at off. It borrows p.
func (v *Volume) ReadAt(p []byte, off int64) error { return v.readAt(p, off, false) }

// ReadAtSync is ReadAt with the device's reads done synchronously on the
// calling goroutine (pread, never native AIO), for a caller that knows the
// request is the only one in flight: netpath/nbd at queue depth 1. The
// result is ReadAt's. It borrows p.
func (v *Volume) ReadAtSync(p []byte, off int64) error { return v.readAt(p, off, true) }

func (v *Volume) readAt(p []byte, off int64, sync bool) error {
	if err := v.begin(); err != nil {
		return err
	}
	defer v.end()
	n := int64(len(p))
	if err := v.checkRange("read", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if v.direct(p, off) {
		if err := v.devRead(p, v.dataOff+off, sync); err != nil {
			return v.ioErr("read", off, n, err)
		}
		return nil
	}
	return v.readBounce(p, off, sync)
}

// devRead is the device's ReadAt, or its ReadAtSync when sync is asked and
// the device has one.
func (v *Volume) devRead(p []byte, off int64, sync bool) error {
	if sync && v.sdev != nil {
		return v.sdev.ReadAtSync(p, off)
	}
	return v.dev.ReadAt(p, off)
}

// devWrite is the device's WriteAt, or its WriteAtSync when sync is asked
// and the device has one.
func (v *Volume) devWrite(p []byte, off int64, fua, sync bool) error {
	if sync && v.sdev != nil {
		return v.sdev.WriteAtSync(p, off, fua)
	}
	return v.dev.WriteAt(p, off, fua)
}

// readBounce reads the aligned blocks covering [off, off+len(p)) through a
// pooled buffer, a chunk at a time, and copies out the bytes asked for.
func (v *Volume) readBounce(p []byte, off int64, sync bool) error {
	end := off + int64(len(p))
	lo, hi := v.alignDown(off), v.alignUp(end)
	b := iobuf.Get(int(min(hi-lo, bounceChunk)))
	defer b.Release()
	for pos := lo; pos < hi; {
		c := min(hi-pos, bounceChunk)
		buf := b.Bytes()[:c]
		if err := v.devRead(buf, v.dataOff+pos, sync); err != nil {
			return v.ioErr("read", off, int64(len(p)), err)
		}
		s, e := max(pos, off), min(pos+c, end)
		copy(p[s-off:e-off], buf[s-pos:e-pos])
		pos += c
	}
	return nil
}

// WriteAt writes p at off; with fua it is durable on return. It borrows p
// and does not retain it.
func (v *Volume) WriteAt(p []byte, off int64, fua bool) error { return v.writeAt(p, off, fua, false) }

// WriteAtSync is WriteAt with the device's reads and writes done
// synchronously on the calling goroutine (pwrite, pwritev2(RWF_DSYNC) for
// fua; never native AIO), under the same range lock, for a caller that
// knows the request is the only one in flight. The result is WriteAt's.
func (v *Volume) WriteAtSync(p []byte, off int64, fua bool) error {
	return v.writeAt(p, off, fua, true)
}

func (v *Volume) writeAt(p []byte, off int64, fua, sync bool) error {
	if err := v.begin(); err != nil {
		return err
	}
	defer v.end()
	if v.readOnly {
		return ErrReadOnly
	}
	n := int64(len(p))
	if err := v.checkRange("write", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	lk := v.locks.Lock(v.alignDown(off), v.alignUp(off+n))
	defer v.locks.Unlock(lk)
	if v.direct(p, off) {
		if err := v.devWrite(p, v.dataOff+off, fua, sync); err != nil {
			return v.ioErr("write", off, n, err)
		}
		return nil
	}
	return v.writeRMW(p, off, n, fua, sync)
}

// writeRMW writes [off, off+n) — from p, or zeroes when p is nil — by
// reading the partially covered aligned blocks at its ends, merging, and
// writing whole aligned blocks, a chunk at a time; with sync, through the
// device's synchronous calls.
// REQUIRES: the range lock over the aligned range covering [off, off+n).
func (v *Volume) writeRMW(p []byte, off, n int64, fua, sync bool) error {
	end := off + n
	lo, hi := v.alignDown(off), v.alignUp(end)
	b := iobuf.Get(int(min(hi-lo, bounceChunk)))
	defer b.Release()
	for pos := lo; pos < hi; {
		c := min(hi-pos, bounceChunk)
		buf := b.Bytes()[:c]
		s, e := max(pos, off), min(pos+c, end)
		headPartial := s > pos
		if headPartial {
			if err := v.devRead(buf[:v.align], v.dataOff+pos, sync); err != nil {
				return v.ioErr("write (reading for read-modify-write)", off, n, err)
			}
		}
		if e < pos+c && !(headPartial && c == v.align) {
			if err := v.devRead(buf[c-v.align:], v.dataOff+pos+c-v.align, sync); err != nil {
				return v.ioErr("write (reading for read-modify-write)", off, n, err)
			}
		}
		if p == nil {
			clear(buf[s-pos : e-pos])
		} else {
			copy(buf[s-pos:e-pos], p[s-off:e-off])
		}
		if err := v.devWrite(buf, v.dataOff+pos, fua, sync); err != nil {
			return v.ioErr("write", off, n, err)
		}
		pos += c
	}
	return nil
}

// Flush makes every write completed before the call durable (fdatasync),
// whichever connection it came from. After one failure every later Flush
// fails too (see the package doc).
func (v *Volume) Flush() error {
	if err := v.begin(); err != nil {
		return err
	}
	defer v.end()
	if v.readOnly {
		return nil
	}
	return v.syncLocked()
}

// syncLocked is fdatasync with the sticky failure.
// REQUIRES: v.closeMu (shared or exclusive).
func (v *Volume) syncLocked() error {
	if p := v.syncErr.Load(); p != nil {
		return *p
	}
	if err := v.dev.Sync(); err != nil {
		err = fmt.Errorf("volume %s: flush: %w (earlier writes may not be durable; every later flush fails until the volume is reopened)", v.name, err)
		if v.syncErr.CompareAndSwap(nil, &err) {
			v.log.Error("volume flush failed; flushes fail from now on", "path", v.name, "err", err)
		}
		return *v.syncErr.Load()
	}
	return nil
}

// Trim deallocates the aligned blocks inside [off, off+length): the
// unaligned edges are left alone, since TRIM is advisory. Trimmed blocks
// read as zeroes. Where the file system cannot punch holes Trim does
// nothing. With fua the result is durable on return.
func (v *Volume) Trim(off, length int64, fua bool) error {
	if err := v.begin(); err != nil {
		return err
	}
	defer v.end()
	if v.readOnly {
		return ErrReadOnly
	}
	if err := v.checkRange("trim", off, length); err != nil {
		return err
	}
	a, b := v.alignUp(off), v.alignDown(off+length)
	if a >= b {
		return nil
	}
	lk := v.locks.Lock(a, b)
	_, err := v.dev.PunchHole(v.dataOff+a, b-a, false)
	v.locks.Unlock(lk)
	if err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
		return v.ioErr("trim", off, length, err)
	}
	if fua && err == nil {
		return v.syncLocked()
	}
	return nil
}

// WriteZeroes makes [off, off+length) read as zeroes. The aligned inside
// is punched out (or, with noHole or where punching is refused, zeroed in
// place with fallocate ZERO_RANGE; where that is refused too, zeroes are
// written). The unaligned edges are written as zeroes by read-modify-write.
//
// With fastZero, if the inside has no fast way (fallocate), it fails
// before writing anything with an error wrapping ENOTSUP. The edges are at
// most two blocks and are written either way: that is as fast as zeroing
// gets.
func (v *Volume) WriteZeroes(off, length int64, noHole, fastZero, fua bool) error {
	if err := v.begin(); err != nil {
		return err
	}
	defer v.end()
	if v.readOnly {
		return ErrReadOnly
	}
	if err := v.checkRange("write zeroes", off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	end := off + length
	lk := v.locks.Lock(v.alignDown(off), v.alignUp(end))
	defer v.locks.Unlock(lk)

	a, b := v.alignUp(off), v.alignDown(end)
	if a >= b {
		// No whole aligned block inside: one read-modify-write.
		if err := v.writeRMW(nil, off, length, false, false); err != nil {
			return err
		}
		return v.syncIf(fua)
	}
	if err := v.zeroAligned(a, b, noHole, fastZero); err != nil {
		return err
	}
	if off < a {
		if err := v.writeRMW(nil, off, a-off, false, false); err != nil {
			return err
		}
	}
	if b < end {
		if err := v.writeRMW(nil, b, end-b, false, false); err != nil {
			return err
		}
	}
	return v.syncIf(fua)
}

// zeroAligned zeroes the aligned range [a, b).
func (v *Volume) zeroAligned(a, b int64, noHole, fastZero bool) error {
	if !noHole {
		_, err := v.dev.PunchHole(v.dataOff+a, b-a, false)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) {
			return v.ioErr("write zeroes (punch hole)", a, b-a, err)
		}
	}
	_, err := v.dev.ZeroRange(v.dataOff+a, b-a, !fastZero)
	if err != nil {
		if fastZero && errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("volume %s: write zeroes [%d, +%d): no fast way to zero on this device (fast zero asked): %w",
				v.name, a, b-a, unix.ENOTSUP)
		}
		return v.ioErr("write zeroes", a, b-a, err)
	}
	return nil
}

func (v *Volume) syncIf(fua bool) error {
	if fua {
		return v.syncLocked()
	}
	return nil
}

// Cache is NBD's prefetch hint. It only checks the range: the device is
// opened with O_DIRECT, so the page cache that posix_fadvise(WILLNEED)
// would fill is one keel's reads never look at, and reading the range into
// memory keel would then throw away helps nothing. (datapath/cache, the
// read cache, is where a prefetch would pay off.)
func (v *Volume) Cache(off, length int64) error {
	if err := v.begin(); err != nil {
		return err
	}
	defer v.end()
	return v.checkRange("cache", off, length)
}

// BlockStatus reports the allocation of [off, off+length) as consecutive
// extents starting at off, through fn(length, hole, zero), until the range
// is covered or fn returns false. A hole is also zero; data is reported
// with zero false unless the device knows better (dio.Mem does for zeroed
// ranges).
func (v *Volume) BlockStatus(off, length int64, fn func(length int64, hole, zero bool) bool) error {
	if err := v.begin(); err != nil {
		return err
	}
	defer v.end()
	if err := v.checkRange("block status", off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	if err := v.dev.Extents(v.dataOff+off, length, fn); err != nil {
		return v.ioErr("block status", off, length, err)
	}
	return nil
}
