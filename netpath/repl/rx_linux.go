//go:build linux

package repl

import (
	"io"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawReadSupported: the replica's reader issues readv itself through the
// socket's RawConn (rx.go).
const rawReadSupported = true

// rawReader is frameReader's readv: preallocated iovecs and a callback
// made once, so that a read allocates nothing. RawConn.Read waits for
// readability through Go's poller and honours the read deadline.
type rawReader struct {
	rc    syscall.RawConn
	iov   [2]unix.Iovec
	n     int // iovecs in use
	got   int
	errno syscall.Errno
	fn    func(fd uintptr) bool
}

func (r *rawReader) init(rc syscall.RawConn) {
	r.rc = rc
	r.fn = r.call
}

func (r *rawReader) readv(a, b []byte) (int, error) {
	k := 0
	for _, p := range [2][]byte{a, b} {
		if len(p) > 0 {
			r.iov[k].Base = &p[0]
			r.iov[k].SetLen(len(p))
			k++
		}
	}
	r.n, r.got, r.errno = k, 0, 0
	err := r.rc.Read(r.fn)
	r.iov = [2]unix.Iovec{} // no references to the buffers stay behind
	switch {
	case err != nil:
		return 0, err
	case r.errno != 0:
		return 0, os.NewSyscallError("readv", r.errno)
	case r.got == 0:
		return 0, io.EOF
	}
	return r.got, nil
}

// call is the RawConn.Read callback: one readv; on EAGAIN it returns false
// (wait for readability).
func (r *rawReader) call(fd uintptr) bool {
	n, e := sysRetry(unix.SYS_READV, fd, uintptr(unsafe.Pointer(&r.iov[0])), uintptr(r.n))
	if e == unix.EAGAIN {
		return false
	}
	r.got, r.errno = n, e
	return true
}

// sysRetry makes one system call for a RawConn callback, again while it
// is interrupted (EINTR). It returns the call's result (0 on an error) and
// errno: EAGAIN for the callback to decide whether to wait.
func sysRetry(trap, a1, a2, a3 uintptr) (int, unix.Errno) {
	for {
		n, _, e := unix.Syscall(trap, a1, a2, a3)
		switch e {
		case unix.EINTR:
			continue
		case 0:
			return int(n), 0
		}
		return 0, e
	}
}
