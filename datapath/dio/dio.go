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
//	ReadAtSync(p, off), WriteAtSync(p, off, fua)   the same, never through AIO
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
// # Native AIO
//
// File.EnableAIO switches ReadAt and WriteAt to Linux native AIO
// (io_setup/io_submit/io_getevents/io_destroy as raw system calls; not
// io_uring, which keel does not use). With a blocking pread per request, a
// server at queue depth 32 parks about 32 OS threads in system calls, and
// every completion costs the Go runtime a P handoff and a futex wakeup.
// With AIO the caller's goroutine queues its iocb and sleeps on its slot's
// channel; the caller that finds no submitter at work takes the submitter
// role and issues everything queued in one io_submit (io_submit does not
// block for O_DIRECT in the common case), looping until the queue is empty.
// When other calls are in progress it first yields once (runtime.Gosched),
// so that callers already runnable join the same io_submit: one block-layer
// plug and one doorbell (a virtio notify, a VM exit on this machine) for
// the batch instead of one per request. One reaper goroutine blocks in
// io_getevents (min_nr 1, max_nr 64) and wakes the callers of every event
// it gets:
//
//	caller goroutines                        reaper goroutine
//	 take a slot from free (none: pread)      io_getevents(ctx, 1, 64) ──┐
//	 fill its iocb, queue it                                             │
//	 submitter: io_submit(every queued) ─ kernel ─► event{data: slot} ◄──┘
//	 <-slot.done  ◄───────────────────────────  slot.res = res; slot.done <- {}
//	 put the slot back on free
//
// Measured and not kept: completing through an eventfd (IOCB_FLAG_RESFD)
// read in Go's poller, with the events taken from the kernel's completion
// ring in user space, so that no thread blocks in io_getevents. With
// GOMAXPROCS=1 it is far better: a goroutine blocked in io_getevents holds
// the only P until sysmon takes it back, and 4 KiB random reads at QD1 fell
// to 0.47x the IOPS (p50 330 µs) with this reaper, against 1.03x with the
// poller one, in the same run (QD32: 1.34x). With two Ps (the default on
// this machine) it cost more at QD1: each wakeup goes through netpoll and
// two eventfd reads, 16 system calls and 7.7 context switches per NBD
// request against 13.5 and 5.7, and a higher p50 in four runs of five.
// Choosing the reaper by GOMAXPROCS would take the best of both.
//
// A FUA write carries RWF_DSYNC in the iocb's aio_rw_flags (Linux 4.13).
// Slots are preallocated (EnableAIO's depth): the steady state allocates
// nothing. Whatever AIO cannot take is served synchronously, so AIO never
// changes what a request returns: no free slot, io_submit refusing the
// request (EAGAIN when the kernel's queue is full, or any refusal of the
// iocb), a completion shorter than asked (the rest is done with pread or
// pwrite, as a short read or write would be), and -EINTR/-EAGAIN
// completions. An iocb io_submit refuses goes back to its own caller
// (EAGAIN refuses the rest of the batch too). A negative result is the
// request's *Error (op "aio pread", "aio pwrite") with that errno. If
// io_setup fails (aio-max-nr reached, ENOSYS) the File stays synchronous
// and Stats counts it.
//
// AIOConcurrent uses AIO only while another request is in progress on the
// File: a lone request has lower latency as a plain pread, since it needs
// no wakeup of another goroutine. That signal feeds back on itself at
// depth, though: a blocking pread holds its P, so the next caller runs
// alone too; with a variant that went synchronous after three lone calls
// in a row, 4 KiB random writes at QD32 through keel serve were 79%
// synchronous. The queue depth that should choose is the client's
// (netpath/nbd's requests in flight), which dio cannot see.
//
// Close waits for every slot to come back, then submits a zero-length read
// whose completion tells the reaper to destroy the context and end, so
// that nothing uses the context after io_destroy.
//
// Buffers handed to the kernel are Go heap memory (iobuf), which the
// garbage collector does not move; a slot keeps the buffer's pointer
// while the kernel holds its address, so it cannot be freed early either.
//
// # Synchronous on request
//
// ReadAtSync and WriteAtSync are ReadAt and WriteAt with a blocking
// pread/pwrite(v2) on the calling thread whatever the AIO mode (same
// alignment rules, same results, FUA as RWF_DSYNC or write + fdatasync).
// They are for a caller that knows the request is alone: netpath/nbd calls
// them (through datapath/volume) when a request is the only one in flight on
// its connection, which is the client's queue depth, not the File's. That
// is the choice AIOConcurrent could not make from inside dio. Stats counts
// them (SyncRequests). Mem has both, as its ReadAt and WriteAt.
//
// # Errors
//
// Every failure is an *Error carrying the operation, the path, the range and
// the unix.Errno, so errors.Is(err, unix.EIO) and errors.Is(err, unix.ENOSPC)
// work through any amount of %w wrapping above.
//
// # Concurrency
//
// All methods of File and Mem are safe for concurrent use, except
// EnableAIO, which must be called before the File is shared. File never uses
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
	// AIOSetupFailures: EnableAIO calls that io_setup refused (the File
	// stayed synchronous).
	AIOSetupFailures int64
	// AIORequests: reads and writes completed through native AIO.
	AIORequests int64
	// AIOFallbacks: reads and writes AIO was on for but could not take
	// (every slot in use, or io_submit refused: EAGAIN, ...), served
	// synchronously instead. AIOConcurrent's deliberate lone-request
	// synchronous path is not counted.
	AIOFallbacks int64
	// AIOShort: AIO completions shorter than asked, finished synchronously.
	AIOShort int64
	// AIOSubmitCalls: io_submit calls that issued requests; below
	// AIORequests when several requests went in one call.
	AIOSubmitCalls int64
	// SyncRequests: ReadAtSync and WriteAtSync calls (synchronous on the
	// caller's request, whatever the AIO mode).
	SyncRequests int64
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

// AIOMode chooses how File issues ReadAt and WriteAt.
type AIOMode int

const (
	// AIODefault is DefaultAIO, the mode measured to serve best.
	AIODefault AIOMode = iota
	// AIOOff: every request is a blocking pread/pwrite(v2) in the
	// caller's thread.
	AIOOff
	// AIOAlways: every request is submitted with io_submit and completed
	// by the reaper.
	AIOAlways
	// AIOConcurrent: a request goes through AIO only while another
	// ReadAt/WriteAt is in progress on the file; a lone request (queue
	// depth 1) takes the synchronous path, which has the lower latency.
	AIOConcurrent
)

// DefaultAIO is what AIODefault means. Measured through keel serve with
// fio's nbd engine (4 KiB random, loopback, 2 shared cores, medians of 6
// alternating runs, ratios to AIOOff): AIOAlways 1.39x on reads and 1.29x on
// writes at queue depth 32, but 0.76x at queue depth 1 (two goroutine
// wakeups instead of none); AIOConcurrent 1.17x, 0.98x and 0.97x. The
// queue-depth-32 targets decide it; a latency-bound deployment can choose
// AIOConcurrent or AIOOff (volume.Options.AIO, KEEL_DIO_AIO).
const DefaultAIO = AIOAlways

// ParseAIOMode reads a mode by name ("off", "always", "concurrent",
// "default") or number (0 off, 1 always, 2 concurrent).
func ParseAIOMode(s string) (AIOMode, error) {
	switch s {
	case "default", "":
		return AIODefault, nil
	case "off", "0":
		return AIOOff, nil
	case "always", "on", "1":
		return AIOAlways, nil
	case "concurrent", "2":
		return AIOConcurrent, nil
	}
	return AIODefault, fmt.Errorf("dio: unknown AIO mode %q (want off, always or concurrent): %w", s, unix.EINVAL)
}

func (m AIOMode) String() string {
	switch m {
	case AIODefault:
		return "default"
	case AIOOff:
		return "off"
	case AIOAlways:
		return "always"
	case AIOConcurrent:
		return "concurrent"
	}
	return "AIOMode(" + itoa(int(m)) + ")"
}
