package nbd

import (
	"errors"

	"golang.org/x/sys/unix"

	"keel/netpath/nbdproto"
)

// Backend is the block device an export serves. netpath/nbd defines it and
// datapath/volume implements it (without importing this package).
//
// All methods are called concurrently, from any number of connections of
// the export. Errors should wrap a unix.Errno (errors.As finds it); the
// server translates it once, at the edge, into an NBD error (see ErrnoOf).
type Backend interface {
	// Size is the export size in bytes; it does not change while served.
	Size() int64
	// BlockSize is the preferred block size to advertise (4096): a power
	// of two, at least 512 and at least MinBlockSize.
	BlockSize() int
	// MinBlockSize is the minimum block size: a power of two up to 64 KiB.
	// 1 means unaligned requests are served (by read-modify-write).
	MinBlockSize() int
	// ReadOnly reports whether the backend refuses writes.
	ReadOnly() bool
	// ReadAt fills p with the data at off. It borrows p for the call.
	ReadAt(p []byte, off int64) error
	// WriteAt writes p at off; with fua, the data is on stable storage
	// when it returns. It borrows p for the call and never retains it.
	WriteAt(p []byte, off int64, fua bool) error
	// Flush makes every write that completed before it was called durable,
	// whichever connection issued it: the server advertises
	// NBD_FLAG_CAN_MULTI_CONN on that promise.
	Flush() error
	// Trim discards the range (a hint; it may do nothing).
	Trim(off, length int64, fua bool) error
	// WriteZeroes makes the range read back as zeroes. With noHole it
	// must stay allocated. With fastZero it must fail quickly with an
	// error wrapping unix.ENOTSUP when zeroing would not be faster than
	// writing, without changing the contents.
	WriteZeroes(off, length int64, noHole, fastZero, fua bool) error
	// Cache is a hint that the range will be read soon.
	Cache(off, length int64) error
	// BlockStatus reports the allocation of the range as consecutive
	// extents, in order from off: it calls fn for each until fn returns
	// false or the range is covered. hole: not allocated; zero: reads as
	// zeroes. Extents reaching past the range are allowed (the server
	// clips them).
	BlockStatus(off, length int64, fn func(length int64, hole, zero bool) bool) error
}

// SyncBackend is implemented by a Backend that can also serve a READ or
// WRITE synchronously on the calling goroutine (a blocking pread/pwrite,
// where ReadAt and WriteAt may queue the I/O to native AIO and sleep until
// another goroutine reaps its completion), with the same results, locks
// and durability. The server detects it when the export is added, and
// calls ReadAtSync/WriteAtSync for a request that is the only one in
// flight on its connection (queue depth 1: no wakeup to wait for, the
// lower latency) and ReadAt/WriteAt otherwise (at depth, AIO batches
// submissions and does not park a thread per request). datapath/volume
// implements it; a Backend without it is served through ReadAt and
// WriteAt alone.
type SyncBackend interface {
	ReadAtSync(p []byte, off int64) error
	WriteAtSync(p []byte, off int64, fua bool) error
}

// Export is one named block device served by a Server.
type Export struct {
	// Name is the export's canonical name, as clients select it.
	Name string
	// Description is shown to humans (NBD_OPT_LIST, NBD_INFO_DESCRIPTION).
	Description string
	// Backend serves the export's I/O. Every connection of the export
	// shares it.
	Backend Backend
	// ReadOnly serves the export read-only even if the backend can write.
	ReadOnly bool

	syncBE SyncBackend // Backend, if it is one; set by NewServer and AddExport
}

// readOnly reports whether the export is read-only by either side's say.
func (e *Export) readOnly() bool { return e.ReadOnly || e.Backend.ReadOnly() }

// ErrnoOf translates a backend error into the NBD error sent to the
// client: the unix.Errno that err wraps, when the protocol defines it (with
// EDQUOT and EFBIG as ENOSPC and EROFS as EPERM, as the protocol asks);
// anything else, including an error without an errno, is EIO. A nil error
// is 0.
func ErrnoOf(err error) nbdproto.Errno {
	if err == nil {
		return 0
	}
	var en unix.Errno
	if !errors.As(err, &en) {
		return nbdproto.EIO
	}
	switch en {
	case unix.EPERM, unix.EROFS:
		return nbdproto.EPERM
	case unix.EIO:
		return nbdproto.EIO
	case unix.ENOMEM:
		return nbdproto.ENOMEM
	case unix.EINVAL:
		return nbdproto.EINVAL
	case unix.ENOSPC, unix.EDQUOT, unix.EFBIG:
		return nbdproto.ENOSPC
	case unix.EOVERFLOW:
		return nbdproto.EOVERFLOW
	case unix.ENOTSUP:
		return nbdproto.ENOTSUP
	case unix.ESHUTDOWN:
		return nbdproto.ESHUTDOWN
	}
	return nbdproto.EIO
}
