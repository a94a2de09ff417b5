//go:build !linux

package dio

import "golang.org/x/sys/unix"

// File is only implemented on Linux (O_DIRECT, fallocate modes, statx
// DIOALIGN, pwritev2). Elsewhere Open and Create fail with ENOTSUP, so that
// the rest of keel still builds and vets.
type File struct{ path string }

func unsupported(op, path string) error {
	return &Error{Op: op + " (direct I/O is implemented on Linux only)", Path: path, Off: -1, Len: -1, Err: unix.ENOTSUP}
}

// Open fails: File is Linux-only.
func Open(path string, readOnly bool) (*File, error) { return nil, unsupported("open", path) }

// Create fails: File is Linux-only.
func Create(path string, size int64) (*File, error) { return nil, unsupported("create", path) }

func (f *File) Name() string                     { return f.path }
func (f *File) Size() int64                      { return 0 }
func (f *File) MemAlign() int                    { return 512 }
func (f *File) OffsetAlign() int                 { return 512 }
func (f *File) IsBlockDevice() bool              { return false }
func (f *File) Stats() Stats                     { return Stats{} }
func (f *File) Sync() error                      { return unsupported("fdatasync", f.path) }
func (f *File) Close() error                     { return unsupported("close", f.path) }
func (f *File) ReadAt(p []byte, off int64) error { return unsupported("pread", f.path) }
func (f *File) WriteAt(p []byte, off int64, fua bool) error {
	return unsupported("pwrite", f.path)
}
func (f *File) ReadAtSync(p []byte, off int64) error { return unsupported("pread", f.path) }
func (f *File) WriteAtSync(p []byte, off int64, fua bool) error {
	return unsupported("pwrite", f.path)
}
func (f *File) PunchHole(off, n int64, fallback bool) (bool, error) {
	return false, unsupported("fallocate", f.path)
}
func (f *File) ZeroRange(off, n int64, fallback bool) (bool, error) {
	return false, unsupported("fallocate", f.path)
}
func (f *File) Extents(off, n int64, fn func(length int64, hole, zero bool) bool) error {
	return unsupported("lseek", f.path)
}

// EnableAIO fails: File is Linux-only.
func (f *File) EnableAIO(mode AIOMode, depth int) error { return unsupported("io_setup", f.path) }

// AIO is AIOOff: File is Linux-only.
func (f *File) AIO() AIOMode { return AIOOff }
