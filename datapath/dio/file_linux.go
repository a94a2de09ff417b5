package dio

import (
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"keel/datapath/iobuf"
)

// File is a regular file or a raw block device opened with O_DIRECT.
//
// It is locked with flock(2) while open (exclusive for read-write, shared
// for read-only), so that two processes cannot serve the same replica.
type File struct {
	fd       int
	path     string
	size     int64
	memAlign int
	offAlign int
	readOnly bool
	blockDev bool

	// Capabilities found missing at run time; once set they stay set.
	noDSync     atomic.Bool // pwritev2(RWF_DSYNC) refused: FUA is write + fdatasync
	noPunch     atomic.Bool // fallocate(PUNCH_HOLE) refused
	noZeroRange atomic.Bool // fallocate(ZERO_RANGE) refused

	fuaFallbacks  atomic.Int64
	zeroFallbacks atomic.Int64
	zeroBytes     atomic.Int64
	closed        atomic.Bool

	// aio is the native AIO engine, nil when off; set by EnableAIO before
	// the File is shared, read-only afterwards.
	aio              *aioEngine
	aioSetupFailures atomic.Int64

	syncRequests atomic.Int64 // ReadAtSync/WriteAtSync calls
}

// Open opens an existing file or block device for direct I/O and probes its
// alignment.
func Open(path string, readOnly bool) (*File, error) {
	flags := unix.O_RDWR
	if readOnly {
		flags = unix.O_RDONLY
	}
	fd, err := openRetry(path, flags|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &Error{Op: "open(O_DIRECT)", Path: path, Off: -1, Len: -1, Err: asErrno(err)}
	}
	f, err := newFile(fd, path, readOnly)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return f, nil
}

// Create makes a new regular file of size bytes (it must not exist),
// preallocates it with fallocate(2) (mode 0; ftruncate where the file system
// does not support it), makes the new directory entry durable and returns
// it open for direct I/O. On failure the file is removed.
func Create(path string, size int64) (*File, error) {
	if size <= 0 {
		return nil, &Error{Op: "create (size must be positive)", Path: path, Off: 0, Len: size, Err: unix.EINVAL}
	}
	fd, err := openRetry(path, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_DIRECT|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, &Error{Op: "create(O_DIRECT)", Path: path, Off: -1, Len: -1, Err: asErrno(err)}
	}
	fail := func(e *Error) (*File, error) {
		unix.Close(fd)
		os.Remove(path)
		return nil, e
	}
	if err := retryEINTR(func() error { return unix.Fallocate(fd, 0, 0, size) }); err != nil {
		en := asErrno(err)
		if en != unix.EOPNOTSUPP && en != unix.ENOSYS {
			return fail(&Error{Op: "fallocate(preallocate)", Path: path, Off: 0, Len: size, Err: en})
		}
		if err := retryEINTR(func() error { return unix.Ftruncate(fd, size) }); err != nil {
			return fail(&Error{Op: "ftruncate", Path: path, Off: 0, Len: size, Err: asErrno(err)})
		}
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return fail(err.(*Error))
	}
	f, err := newFile(fd, path, false)
	if err != nil {
		return fail(err.(*Error))
	}
	return f, nil
}

func newFile(fd int, path string, readOnly bool) (*File, error) {
	f := &File{fd: fd, path: path, readOnly: readOnly}
	how := unix.LOCK_EX
	if readOnly {
		how = unix.LOCK_SH
	}
	if err := retryEINTR(func() error { return unix.Flock(fd, how|unix.LOCK_NB) }); err != nil {
		return nil, &Error{Op: "flock (in use by another process?)", Path: path, Off: -1, Len: -1, Err: asErrno(err)}
	}
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_BASIC_STATS|unix.STATX_DIOALIGN, &stx); err != nil {
		return nil, &Error{Op: "statx", Path: path, Off: -1, Len: -1, Err: asErrno(err)}
	}
	switch stx.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		f.size = int64(stx.Size)
	case unix.S_IFBLK:
		f.blockDev = true
		end, err := unix.Seek(fd, 0, unix.SEEK_END)
		if err != nil {
			return nil, &Error{Op: "lseek(SEEK_END)", Path: path, Off: -1, Len: -1, Err: asErrno(err)}
		}
		f.size = end
	default:
		return nil, &Error{Op: "open (not a regular file or block device)", Path: path, Off: -1, Len: -1, Err: unix.EINVAL}
	}
	f.memAlign, f.offAlign = probeAlign(fd, &stx, f.blockDev)
	return f, nil
}

// probeAlign returns the memory and offset alignment direct I/O needs:
// STATX_DIOALIGN where the kernel and file system report it; else, for a
// block device, its logical block size (BLKSSZGET); else 512 — raised to the
// file system's block size for regular files, which is always a multiple of
// the device's logical block size, so a conservative guess never fails
// with EINVAL on a 4 KiB-sector disk.
func probeAlign(fd int, stx *unix.Statx_t, blockDev bool) (mem, off int) {
	if stx.Mask&unix.STATX_DIOALIGN != 0 && stx.Dio_offset_align != 0 {
		mem, off = int(stx.Dio_mem_align), int(stx.Dio_offset_align)
		if mem == 0 {
			mem = off
		}
		return mem, off
	}
	if blockDev {
		if n, err := unix.IoctlGetInt(fd, unix.BLKSSZGET); err == nil && n >= 512 {
			return n, n
		}
		return 512, 512
	}
	a := 512
	if b := int(stx.Blksize); b > a && b <= iobuf.Align && b&(b-1) == 0 {
		a = b
	}
	return a, a
}

// Name is the path the file was opened with.
func (f *File) Name() string { return f.path }

// Size is the file's size (a block device's capacity) when it was opened.
func (f *File) Size() int64 { return f.size }

// MemAlign is the buffer address alignment direct I/O needs.
func (f *File) MemAlign() int { return f.memAlign }

// OffsetAlign is the offset and length alignment direct I/O needs.
func (f *File) OffsetAlign() int { return f.offAlign }

// IsBlockDevice reports whether the file is a block device.
func (f *File) IsBlockDevice() bool { return f.blockDev }

// Stats returns the fallback counters.
func (f *File) Stats() Stats {
	return Stats{
		FUAFallbacks:     f.fuaFallbacks.Load(),
		ZeroFallbacks:    f.zeroFallbacks.Load(),
		ZeroBytesWritten: f.zeroBytes.Load(),
		AIOSetupFailures: f.aioSetupFailures.Load(),
		AIORequests:      f.aio.requests(),
		AIOFallbacks:     f.aio.fallbackCount(),
		AIOShort:         f.aio.shortCount(),
		AIOSubmitCalls:   f.aio.submitCalls(),
		SyncRequests:     f.syncRequests.Load(),
	}
}

// ReadAt reads len(p) bytes at off: through native AIO when it is enabled
// (see EnableAIO), else with pread(2), looping over short reads. Reading
// past the end of the file is an error (EIO): a replica never does it unless
// the file was truncated under it. It borrows p.
func (f *File) ReadAt(p []byte, off int64) error {
	if e := f.aio; e != nil && len(p) > 0 {
		e.busy.Add(1)
		handled, err := f.readAIO(e, p, off)
		e.busy.Add(-1)
		if handled {
			return err
		}
	}
	return f.readSync(p, off)
}

// ReadAtSync is ReadAt with pread(2) on the calling thread whatever the
// AIO mode: for a caller that knows it is the only request in flight (see
// the package doc, "Synchronous on request"). It borrows p.
func (f *File) ReadAtSync(p []byte, off int64) error {
	f.syncRequests.Add(1)
	return f.readSync(p, off)
}

// WriteAtSync is WriteAt with pwrite(2), or pwritev2(RWF_DSYNC) for fua,
// on the calling thread whatever the AIO mode. It borrows p.
func (f *File) WriteAtSync(p []byte, off int64, fua bool) error {
	f.syncRequests.Add(1)
	return f.writeSync(p, off, fua)
}

// readSync is ReadAt with pread(2).
func (f *File) readSync(p []byte, off int64) error {
	done := 0
	for done < len(p) {
		n, err := unix.Pread(f.fd, p[done:], off+int64(done))
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return &Error{Op: "pread", Path: f.path, Off: off, Len: int64(len(p)), Err: asErrno(err)}
		}
		if n == 0 {
			return &Error{Op: "pread (short: end of file)", Path: f.path, Off: off, Len: int64(len(p)), Err: unix.EIO}
		}
		done += n
	}
	return nil
}

// WriteAt writes p at off: through native AIO when it is enabled (see
// EnableAIO), else with pwrite(2), looping over short writes. With fua the
// data is durable when WriteAt returns: RWF_DSYNC (in the iocb, or
// pwritev2), or pwrite + fdatasync where the kernel refuses RWF_DSYNC. It
// borrows p.
func (f *File) WriteAt(p []byte, off int64, fua bool) error {
	if e := f.aio; e != nil && len(p) > 0 {
		e.busy.Add(1)
		handled, err := f.writeAIO(e, p, off, fua)
		e.busy.Add(-1)
		if handled {
			return err
		}
	}
	return f.writeSync(p, off, fua)
}

// writeSync is WriteAt with pwrite(2) or pwritev2(2).
func (f *File) writeSync(p []byte, off int64, fua bool) error {
	if fua && !f.noDSync.Load() {
		err := f.pwritev2DSync(p, off)
		if err == nil {
			return nil
		}
		if en := err.(*Error).Err; en != unix.EOPNOTSUPP && en != unix.ENOSYS {
			return err
		}
		f.noDSync.Store(true)
	}
	done := 0
	for done < len(p) {
		n, err := unix.Pwrite(f.fd, p[done:], off+int64(done))
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return &Error{Op: "pwrite", Path: f.path, Off: off, Len: int64(len(p)), Err: asErrno(err)}
		}
		if n == 0 {
			return &Error{Op: "pwrite (wrote nothing)", Path: f.path, Off: off, Len: int64(len(p)), Err: unix.EIO}
		}
		done += n
	}
	if fua {
		f.fuaFallbacks.Add(1)
		return f.Sync()
	}
	return nil
}

// pwritev2DSync writes p at off with RWF_DSYNC. It issues the system call
// directly with a one-element iovec on the stack, so that it allocates
// nothing (unix.Pwritev2 builds a slice per call).
func (f *File) pwritev2DSync(p []byte, off int64) error {
	done := 0
	for done < len(p) {
		var iov unix.Iovec
		iov.Base = &p[done]
		iov.SetLen(len(p) - done)
		pos := uint64(off) + uint64(done)
		// The kernel takes the offset as (low, high) halves of a long each.
		lo, hi := uintptr(pos), uintptr(pos>>(unix.SizeofLong*8-1)>>1)
		n, _, en := unix.Syscall6(unix.SYS_PWRITEV2, uintptr(f.fd), uintptr(unsafe.Pointer(&iov)), 1, lo, hi, unix.RWF_DSYNC)
		if en != 0 {
			if en == unix.EINTR {
				continue
			}
			return &Error{Op: "pwritev2(RWF_DSYNC)", Path: f.path, Off: off, Len: int64(len(p)), Err: en}
		}
		if n == 0 {
			return &Error{Op: "pwritev2 (wrote nothing)", Path: f.path, Off: off, Len: int64(len(p)), Err: unix.EIO}
		}
		done += int(n)
	}
	return nil
}

// Sync is fdatasync(2): every write completed before the call is durable
// when it returns.
func (f *File) Sync() error {
	if err := retryEINTR(func() error { return unix.Fdatasync(f.fd) }); err != nil {
		return &Error{Op: "fdatasync", Path: f.path, Off: -1, Len: -1, Err: asErrno(err)}
	}
	return nil
}

// PunchHole deallocates [off, off+n) (fallocate PUNCH_HOLE|KEEP_SIZE); the
// range then reads as zeroes. See the package doc for fallback and fast.
func (f *File) PunchHole(off, n int64, fallback bool) (fast bool, err error) {
	return f.zero(off, n, fallback, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, "fallocate(punch hole)", &f.noPunch)
}

// ZeroRange zeroes [off, off+n) keeping it allocated (fallocate
// ZERO_RANGE|KEEP_SIZE). See the package doc for fallback and fast.
func (f *File) ZeroRange(off, n int64, fallback bool) (fast bool, err error) {
	return f.zero(off, n, fallback, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, "fallocate(zero range)", &f.noZeroRange)
}

func (f *File) zero(off, n int64, fallback bool, mode uint32, op string, refused *atomic.Bool) (bool, error) {
	if err := checkAligned(f.path, op, off, n, f.offAlign); err != nil {
		return false, err
	}
	if n == 0 {
		return true, nil
	}
	if !refused.Load() {
		err := retryEINTR(func() error { return unix.Fallocate(f.fd, mode, off, n) })
		if err == nil {
			return true, nil
		}
		switch en := asErrno(err); en {
		case unix.EOPNOTSUPP, unix.ENOSYS:
			refused.Store(true) // the mode is not supported here at all
		case unix.EINVAL:
			// Refused for this range (a block device wants its logical
			// block alignment, for one); try writing.
		default:
			return false, &Error{Op: op, Path: f.path, Off: off, Len: n, Err: en}
		}
	}
	if !fallback {
		return false, &Error{Op: op + " (no fast way; fallback not allowed)", Path: f.path, Off: off, Len: n, Err: unix.EOPNOTSUPP}
	}
	f.zeroFallbacks.Add(1)
	return false, f.writeZeroes(off, n)
}

// writeZeroes writes n zero bytes at off from a pooled aligned buffer.
func (f *File) writeZeroes(off, n int64) error {
	b := iobuf.Get(int(min(n, zeroChunk)))
	defer b.Release()
	z := b.Bytes()
	clear(z)
	for n > 0 {
		c := min(n, int64(len(z)))
		if err := f.WriteAt(z[:c], off, false); err != nil {
			return err
		}
		f.zeroBytes.Add(c)
		off += c
		n -= c
	}
	return nil
}

// Extents reports the allocation of [off, off+n) as consecutive extents, in
// order, through fn(length, hole, zero) until fn returns false. It uses
// lseek SEEK_DATA/SEEK_HOLE: a hole reads as zeroes (hole and zero both
// true); data is reported with both false (it may or may not be zeroes).
// Where the file system cannot seek holes, everything is data.
func (f *File) Extents(off, n int64, fn func(length int64, hole, zero bool) bool) error {
	if off < 0 || n < 0 {
		return &Error{Op: "extents", Path: f.path, Off: off, Len: n, Err: unix.EINVAL}
	}
	pos, end := off, off+n
	for pos < end {
		data, err := unix.Seek(f.fd, pos, unix.SEEK_DATA)
		if err != nil {
			switch asErrno(err) {
			case unix.ENXIO: // no data at or after pos: a hole to the end
				fn(end-pos, true, true)
				return nil
			case unix.EINVAL: // SEEK_DATA unsupported: all data
				fn(end-pos, false, false)
				return nil
			default:
				return &Error{Op: "lseek(SEEK_DATA)", Path: f.path, Off: pos, Len: end - pos, Err: asErrno(err)}
			}
		}
		if data > pos {
			h := min(data, end)
			if !fn(h-pos, true, true) {
				return nil
			}
			pos = h
			continue
		}
		hole, err := unix.Seek(f.fd, pos, unix.SEEK_HOLE)
		if err != nil {
			if asErrno(err) != unix.ENXIO {
				return &Error{Op: "lseek(SEEK_HOLE)", Path: f.path, Off: pos, Len: end - pos, Err: asErrno(err)}
			}
			hole = end // pos at or past end of file: treat as data to the end
		}
		d := min(max(hole, pos+1), end)
		if !fn(d-pos, false, false) {
			return nil
		}
		pos = d
	}
	return nil
}

// Close closes the file (releasing its lock). It does not sync. With AIO
// it first waits for every submitted request to complete, then destroys
// the AIO context.
func (f *File) Close() error {
	if !f.closed.CompareAndSwap(false, true) {
		return &Error{Op: "close (already closed)", Path: f.path, Off: -1, Len: -1, Err: unix.EBADF}
	}
	if f.aio != nil {
		f.aio.stop()
	}
	if err := unix.Close(f.fd); err != nil {
		return &Error{Op: "close", Path: f.path, Off: -1, Len: -1, Err: asErrno(err)}
	}
	return nil
}

func syncDir(dir string) error {
	fd, err := openRetry(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &Error{Op: "open(directory)", Path: dir, Off: -1, Len: -1, Err: asErrno(err)}
	}
	defer unix.Close(fd)
	if err := retryEINTR(func() error { return unix.Fsync(fd) }); err != nil {
		return &Error{Op: "fsync(directory)", Path: dir, Off: -1, Len: -1, Err: asErrno(err)}
	}
	return nil
}

func openRetry(path string, flags int, mode uint32) (int, error) {
	for {
		fd, err := unix.Open(path, flags, mode)
		if !errors.Is(err, unix.EINTR) {
			return fd, err
		}
	}
}

func retryEINTR(f func() error) error {
	for {
		if err := f(); err != unix.EINTR {
			return err
		}
	}
}
