//go:build linux

package repl

import (
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawWriteSupported: the writer issues writev itself through the socket's
// RawConn, so that a submitter's write never waits for the socket.
const rawWriteSupported = true

// maxIov is the most buffers one writev takes (the kernel's IOV_MAX).
const maxIov = 1024

// rawWriter is the writer role's writev: preallocated iovecs and a
// callback made once, so that a write allocates nothing.
type rawWriter struct {
	iov   []unix.Iovec
	n     int // iovecs in use
	sent  int
	errno syscall.Errno
	wait  bool
	fn    func(fd uintptr) bool
}

func (w *rawWriter) init() {
	w.fn = w.call
	w.iov = make([]unix.Iovec, 2*maxBatch+1)
}

// writev writes bufs (the first maxIov non-empty ones) with one writev,
// and with wait also waits until the socket takes some bytes. It returns
// the bytes written; a partial write is not an error.
func (w *rawWriter) writev(rc syscall.RawConn, bufs [][]byte, wait bool) (int, error) {
	k := 0
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		if k == maxIov {
			break
		}
		if k == len(w.iov) {
			w.iov = append(w.iov, unix.Iovec{})
			w.iov = w.iov[:cap(w.iov)]
		}
		w.iov[k].Base = &b[0]
		w.iov[k].SetLen(len(b))
		k++
	}
	if k == 0 {
		return 0, nil
	}
	w.n, w.sent, w.errno, w.wait = k, 0, 0, wait
	err := rc.Write(w.fn)
	clear(w.iov[:k]) // no references to the callers' buffers stay behind
	if err != nil {
		return 0, err
	}
	if w.errno != 0 {
		return 0, os.NewSyscallError("writev", w.errno)
	}
	return w.sent, nil
}

// call is the RawConn.Write callback: one writev. On EAGAIN it returns
// false (wait for writability) when waiting, else true having sent nothing.
func (w *rawWriter) call(fd uintptr) bool {
	n, e := sysRetry(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&w.iov[0])), uintptr(w.n))
	if e == unix.EAGAIN {
		if w.wait {
			return false
		}
		e = 0
	}
	w.sent, w.errno = n, e
	return true
}
