package nbdkernel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Socket is one connection to an NBD server that has finished the
// handshake and is ready to be handed to the kernel (ConnectRequest or
// ReconfigureRequest Sockets). It is a plain blocking file descriptor
// outside Go's poller: after the kernel takes it, only the kernel reads
// and writes it. The owner keeps it to watch the connection (Broken), to
// cut it (Shutdown) and to learn whether the kernel took it (Adopted),
// and closes it once the kernel has let it go.
//
// A Socket is not safe for concurrent use.
type Socket struct {
	fd     int
	Export Export
	Remote string // the address dialled
}

// DialOptions tune the connection given to the kernel.
type DialOptions struct {
	// Timeout bounds the dial and the handshake (default 10 s).
	Timeout time.Duration
	// UserTimeout is the TCP user timeout of the connection once the
	// kernel has it (default Timeout): data unacknowledged for this long
	// breaks the connection, so that a partitioned server is detected even
	// while the kernel waits for a reply.
	UserTimeout time.Duration
	// KeepAlive is the TCP keepalive idle time (default 5 s; probes every
	// 2 s, 3 probes): an idle connection to a vanished host breaks too.
	KeepAlive time.Duration
}

// Dial connects to an NBD server, runs the handshake for export, and
// returns the connection as a Socket. addr is "host:port" for TCP, or
// "unix:/path" (or an absolute path) for a Unix socket.
func Dial(ctx context.Context, addr, export string, opt DialOptions) (*Socket, error) {
	if opt.Timeout <= 0 {
		opt.Timeout = 10 * time.Second
	}
	if opt.UserTimeout <= 0 {
		opt.UserTimeout = opt.Timeout
	}
	if opt.KeepAlive <= 0 {
		opt.KeepAlive = 5 * time.Second
	}
	network, address := splitAddr(addr)
	ctx, cancel := context.WithTimeout(ctx, opt.Timeout)
	defer cancel()
	d := net.Dialer{KeepAlive: -1}
	c, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("nbd dial %s: %w", addr, err)
	}
	defer c.Close() // the Socket holds a duplicate
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	e, err := Handshake(c, export)
	stop()
	if err != nil {
		return nil, fmt.Errorf("nbd dial %s export %q: %w", addr, export, ctxErr(ctx, err))
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("nbd dial %s: %T has no file descriptor", addr, c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(f uintptr) {
		fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil || derr != nil {
		return nil, os.NewSyscallError("fcntl(F_DUPFD_CLOEXEC)", errors.Join(err, derr))
	}
	s := &Socket{fd: fd, Export: e, Remote: addr}
	if err := s.prepare(network, opt); err != nil {
		s.Close()
		return nil, fmt.Errorf("nbd dial %s: %w", addr, err)
	}
	return s, nil
}

func splitAddr(addr string) (network, address string) {
	switch {
	case strings.HasPrefix(addr, "unix:"):
		return "unix", strings.TrimPrefix(addr, "unix:")
	case strings.HasPrefix(addr, "/"):
		return "unix", addr
	default:
		return "tcp", addr
	}
}

// prepare makes the descriptor what the kernel expects: blocking (the
// O_NONBLOCK the runtime set is shared by the duplicate), with no send
// timeout of its own (the kernel sets one when it adopts the socket, which
// is how Adopted tells), and for TCP with keepalive and a user timeout.
func (s *Socket) prepare(network string, opt DialOptions) error {
	if err := unix.SetNonblock(s.fd, false); err != nil {
		return os.NewSyscallError("fcntl(O_NONBLOCK off)", err)
	}
	if err := unix.SetsockoptTimeval(s.fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{}); err != nil {
		return os.NewSyscallError("setsockopt(SO_SNDTIMEO)", err)
	}
	if network != "tcp" {
		return nil
	}
	for _, o := range []struct {
		level, name, value int
		what               string
	}{
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1, "TCP_NODELAY"},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1, "SO_KEEPALIVE"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, int(max(opt.KeepAlive/time.Second, 1)), "TCP_KEEPIDLE"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 2, "TCP_KEEPINTVL"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 3, "TCP_KEEPCNT"},
		{unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(opt.UserTimeout / time.Millisecond), "TCP_USER_TIMEOUT"},
	} {
		if err := unix.SetsockoptInt(s.fd, o.level, o.name, o.value); err != nil {
			return os.NewSyscallError("setsockopt("+o.what+")", err)
		}
	}
	return nil
}

// Fd is the descriptor to put in a ConnectRequest or ReconfigureRequest.
func (s *Socket) Fd() int { return s.fd }

// Close closes this process's reference. A socket the kernel adopted stays
// open until the kernel drops it too.
func (s *Socket) Close() error {
	if s.fd < 0 {
		return nil
	}
	err := unix.Close(s.fd)
	s.fd = -1
	if err != nil {
		return os.NewSyscallError("close", err)
	}
	return nil
}

// Broken reports, without blocking, whether the connection is over: the
// peer closed or reset it, it was shut down (by the kernel when it marked
// the connection dead, or by Shutdown), or it failed.
func (s *Socket) Broken() (bool, error) {
	b, err := Broken([]*Socket{s}, 0)
	if err != nil {
		return false, err
	}
	return b[0], nil
}

// Broken waits up to wait (0: not at all) for any of socks to break, and
// reports which are broken. A nil entry counts as broken.
func Broken(socks []*Socket, wait time.Duration) ([]bool, error) {
	fds := make([]unix.PollFd, len(socks))
	for i, s := range socks {
		fds[i].Fd = -1
		if s != nil && s.fd >= 0 {
			fds[i] = unix.PollFd{Fd: int32(s.fd), Events: unix.POLLRDHUP}
		}
	}
	ms := int(wait / time.Millisecond)
	for {
		_, err := unix.Poll(fds, ms)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, os.NewSyscallError("poll", err)
		}
		break
	}
	out := make([]bool, len(socks))
	for i := range fds {
		out[i] = fds[i].Fd < 0 || fds[i].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
	}
	return out, nil
}

// Shutdown shuts the connection down in both directions. The kernel's
// receiver for this connection sees end of stream and marks it dead
// (NBD_CMD_LINK_DEAD); queued requests move to another live connection or
// wait for a reconfigure. Used to leave a primary that is no longer the
// primary.
func (s *Socket) Shutdown() error {
	if err := unix.Shutdown(s.fd, unix.SHUT_RDWR); err != nil && err != unix.ENOTCONN {
		return os.NewSyscallError("shutdown", err)
	}
	return nil
}

// Adopted reports whether the kernel has taken this socket into a device.
// The kernel sets the socket's send timeout to the device's request
// timeout when it adopts it (nbd_add_socket, nbd_reconnect_socket), and
// Dial left it at zero; so this needs a device with a Timeout, which
// keel always sets. It is how a caller learns which sockets of a
// Reconfigure found a dead slot, since the kernel ignores the others
// without an error.
func (s *Socket) Adopted() (bool, error) {
	tv, err := unix.GetsockoptTimeval(s.fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO)
	if err != nil {
		return false, os.NewSyscallError("getsockopt(SO_SNDTIMEO)", err)
	}
	return tv.Sec != 0 || tv.Usec != 0, nil
}
