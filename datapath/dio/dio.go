// Package dio owns keel's direct disk I/O: a replica's backing store opened
// with O_DIRECT (File) and an in-memory, crashable twin of it for tests (Mem).
// Both have the same method set, which datapath/volume consumes through its
// Device interface.
//
// # Method set
//
//	Name() string                                  file path (or Mem's name) for messages
//	Size() int64                                   bytes addressable
//	MemAlign() int                                 buffer address alignment O_DIRECT needs
//	OffsetAlign() int                              offset and length alignment O_DIRECT needs
//	ReadAt(p, off) error                           all of p, or an error
//	WriteAt(p, off, fua) error                     all of p; fua: durable before return
//	Sync() error                                   fdatasync: every completed write durable
//	PunchHole(off, n, fallback) (fast, error)      deallocate; reads return zeroes
//	ZeroRange(off, n, fallback) (fast, error)      zero, keeping the blocks allocated
//	Extents(off, n, fn) error                      allocation map: holes and data
//	Close() error
//
// ReadAt, WriteAt, PunchHole and ZeroRange need off and every length to be
// multiples of OffsetAlign, and ReadAt/WriteAt buffers to start at a multiple
// of MemAlign (iobuf buffers always do). The caller (datapath/volume) turns
// unaligned requests into aligned ones; dio never bounces through a buffer of
// its own on the read/write path.
//
// Buffer ownership: ReadAt and WriteAt borrow p for the duration of the call
// and retain nothing.
//
// # Opening
//
// Open and Create take an flock(2) on the file (exclusive read-write, shared
// read-only; EWOULDBLOCK when another holder has it). The direct-I/O
// alignment is probed once: STATX_DIOALIGN where the kernel and file system
// report it; else, for a block device, its logical block size (BLKSSZGET);
// else 512 raised to the file system's block size, a conservative guess
// that is always a multiple of the device's logical block size. Create
// preallocates the whole file (fallocate mode 0; ftruncate where that is
// unsupported) and fsyncs the directory so the new file survives a crash.
//
// # Zeroing and FAST_ZERO
//
// PunchHole and ZeroRange try fallocate(2) first. When the file system
// refuses the mode (EOPNOTSUPP, or EINVAL for that range), they write zeroes
// from a pooled aligned buffer instead if fallback is true, and report
// fast == false; if fallback is false they return an *Error wrapping
// EOPNOTSUPP (== ENOTSUP on Linux) and write nothing, which is what NBD's
// FAST_ZERO asks for. Fallbacks are counted (File.Stats).
//
// # Errors
//
// Every failure is an *Error carrying the operation, the path, the range and
// the unix.Errno, so errors.Is(err, unix.EIO) and errors.Is(err, unix.ENOSPC)
// work through any amount of %w wrapping above.
//
// # Concurrency
//
// All methods of File and Mem are safe for concurrent use. File never uses
// the file position (pread/pwrite only; lseek for SEEK_DATA/SEEK_HOLE moves a
// position nothing reads). Mem serialises every operation under one mutex.
package dio

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Error is a failed device operation.
type Error struct {
	Op   string     // the system call or operation: "pread", "pwritev2", "fallocate(punch hole)", ...
	Path string     // the file, device or Mem name
	Off  int64      // byte offset of the request, -1 when not applicable
	Len  int64      // byte length of the request, -1 when not applicable
	Err  unix.Errno // what the kernel (or Mem's fault injection) answered
}

func (e *Error) Error() string {
	if e.Off < 0 {
		return fmt.Sprintf("dio: %s %s: %v", e.Op, e.Path, e.Err)
	}
	return fmt.Sprintf("dio: %s %s [%d, +%d): %v", e.Op, e.Path, e.Off, e.Len, e.Err)
}

// Unwrap returns the errno, so errors.Is(err, unix.EIO) works.
func (e *Error) Unwrap() error { return e.Err }

// asErrno extracts the errno of a syscall error; anything else is EIO.
func asErrno(err error) unix.Errno {
	if en, ok := err.(unix.Errno); ok {
		return en
	}
	return unix.EIO
}

// Stats counts the slow paths a device took since it was opened, so that a
// silent fallback is visible.
type Stats struct {
	// FUAFallbacks: FUA writes done as write + fdatasync because
	// pwritev2(RWF_DSYNC) was refused.
	FUAFallbacks int64
	// ZeroFallbacks: PunchHole/ZeroRange calls served by writing zeroes.
	ZeroFallbacks int64
	// ZeroBytesWritten: bytes of zeroes written by those fallbacks.
	ZeroBytesWritten int64
}

// zeroChunk is the largest write the written-zeroes fallback issues.
const zeroChunk = 1 << 20

func checkAligned(name, op string, off, n int64, align int) error {
	a := int64(align)
	if off < 0 || n < 0 || off%a != 0 || n%a != 0 {
		return &Error{Op: op + " (unaligned to " + itoa(align) + ")", Path: name, Off: off, Len: n, Err: unix.EINVAL}
	}
	return nil
}

func itoa(n int) string { return fmt.Sprint(n) }
