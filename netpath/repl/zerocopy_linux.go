//go:build linux

package repl

import (
	"errors"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// zcSys holds a stream's MSG_ZEROCOPY syscall state: preallocated message
// headers, so that neither sending nor reaping completions allocates.
// The sender goroutine owns the send half, the completion goroutine the
// receive half.
type zcSys struct {
	// send half
	msg     unix.Msghdr
	iov     [2]unix.Iovec
	sent    int
	errno   syscall.Errno
	writeFn func(fd uintptr) bool

	// completion half
	rmsg   unix.Msghdr
	oob    [64]uint64 // control messages, 8-byte aligned
	notes  []zcNote
	pollFn func(fd uintptr)
}

// zcNote is one completion notification: ids lo..hi, copied or not.
type zcNote struct {
	lo, hi uint32
	copied bool
}

const zcSupported = true

// enableZeroCopy sets SO_ZEROCOPY on the socket. It fails on kernels or
// sockets without MSG_ZEROCOPY; the stream then sends everything with writev.
func enableZeroCopy(rc syscall.RawConn) error {
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ZEROCOPY, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return os.NewSyscallError("setsockopt SO_ZEROCOPY", serr)
	}
	return nil
}

func (z *zcSys) init() {
	z.writeFn = z.sendmsg
	z.pollFn = z.reap
	z.msg.Iov = &z.iov[0]
	z.rmsg.Control = (*byte)(unsafe.Pointer(&z.oob[0]))
}

// sendmsg is the RawConn.Write callback: one sendmsg(MSG_ZEROCOPY) of the
// prepared iovecs. It returns false (wait for writability) on EAGAIN.
func (z *zcSys) sendmsg(fd uintptr) bool {
	n, e := sysRetry(unix.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&z.msg)), unix.MSG_ZEROCOPY)
	if e == unix.EAGAIN {
		return false
	}
	z.sent, z.errno = n, e
	return true
}

// sendZeroCopy sends the bytes of hdr and payload from offset off with one
// sendmsg(MSG_ZEROCOPY), waiting for writability (and the write deadline)
// as needed. It returns the bytes sent; n > 0 means the call took an id.
func (z *zcSys) sendZeroCopy(rc syscall.RawConn, hdr, payload []byte, off int) (int, error) {
	z.msg.Iovlen = 0
	if off < len(hdr) {
		z.iov[0].Base = &hdr[off]
		z.iov[0].SetLen(len(hdr) - off)
		z.iov[1].Base = &payload[0]
		z.iov[1].SetLen(len(payload))
		z.msg.Iovlen = 2
	} else {
		p := payload[off-len(hdr):]
		z.iov[0].Base = &p[0]
		z.iov[0].SetLen(len(p))
		z.msg.Iovlen = 1
	}
	z.sent, z.errno = 0, 0
	err := rc.Write(z.writeFn)
	z.iov[0].Base, z.iov[1].Base = nil, nil
	if err != nil {
		return 0, err
	}
	if z.errno != 0 {
		return 0, os.NewSyscallError("sendmsg MSG_ZEROCOPY", z.errno)
	}
	return z.sent, nil
}

// errNoBufs reports whether a zero-copy send failed for lack of locked
// memory or option memory: the frame falls back to writev.
func errNoBufs(err error) bool { return errors.Is(err, unix.ENOBUFS) }

// poll reaps every zero-copy completion queued on the socket's error
// queue into z.notes, without blocking.
func (z *zcSys) poll(rc syscall.RawConn) error {
	z.notes = z.notes[:0]
	return rc.Control(z.pollFn)
}

// reap is the RawConn.Control callback of poll. The Control reference keeps
// the descriptor from being closed (and its number reused) while it runs.
func (z *zcSys) reap(fd uintptr) {
	for {
		z.rmsg.Controllen = uint64(len(z.oob) * 8)
		z.rmsg.Iov, z.rmsg.Iovlen = nil, 0
		if _, e := sysRetry(unix.SYS_RECVMSG, fd, uintptr(unsafe.Pointer(&z.rmsg)), unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT); e != 0 {
			return // EAGAIN: the queue is empty
		}
		z.parse(int(z.rmsg.Controllen))
	}
}

// parse appends the zero-copy notifications among n bytes of control
// messages.
func (z *zcSys) parse(n int) {
	oob := unsafe.Slice((*byte)(unsafe.Pointer(&z.oob[0])), len(z.oob)*8)[:n]
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		l := int(h.Len)
		if l < unix.SizeofCmsghdr || l > len(oob) {
			return
		}
		data := oob[unix.CmsgLen(0):l]
		if (h.Level == unix.SOL_IP && h.Type == unix.IP_RECVERR || h.Level == unix.SOL_IPV6 && h.Type == unix.IPV6_RECVERR) &&
			len(data) >= int(unsafe.Sizeof(unix.SockExtendedErr{})) {
			ee := (*unix.SockExtendedErr)(unsafe.Pointer(&data[0]))
			if ee.Origin == unix.SO_EE_ORIGIN_ZEROCOPY && ee.Errno == 0 {
				z.notes = append(z.notes, zcNote{lo: ee.Info, hi: ee.Data, copied: ee.Code&unix.SO_EE_CODE_ZEROCOPY_COPIED != 0})
			}
		}
		sp := unix.CmsgSpace(l - unix.CmsgLen(0))
		if sp > len(oob) {
			return
		}
		oob = oob[sp:]
	}
}
