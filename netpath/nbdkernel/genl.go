package nbdkernel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// genlSocket is one generic netlink socket. Requests are serialised: mu
// guards seq and the exchange of one request and its replies, so a
// genlSocket is safe for concurrent use.
type genlSocket struct {
	f *os.File // nonblocking, in the runtime poller: deadlines and Close unblock reads

	mu  sync.Mutex // guards following
	seq uint32
	buf []byte
}

const recvBufLen = 64 << 10

func openGenl() (*genlSocket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, os.NewSyscallError("socket(AF_NETLINK, NETLINK_GENERIC)", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("bind(netlink)", err)
	}
	// Extended acks carry the kernel's reason for a refusal; capped acks
	// keep error replies short. Both are optional: older kernels refuse
	// them and still work.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	return &genlSocket{
		f:   os.NewFile(uintptr(fd), "netlink-generic"),
		seq: uint32(time.Now().UnixNano()),
		buf: make([]byte, recvBufLen),
	}, nil
}

func (s *genlSocket) Close() error { return s.f.Close() }

// request sends one request with NLM_F_REQUEST|NLM_F_ACK and returns the
// generic netlink messages the kernel answered before its acknowledgement.
// A refusal is a *NetlinkError.
func (s *genlSocket) request(ctx context.Context, op string, family uint16, cmd, version uint8, fn func(w *attrWriter)) ([]genlMessage, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	seq := s.seq
	req := encodeRequest(family, unix.NLM_F_REQUEST|unix.NLM_F_ACK, seq, cmd, version, fn)

	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(30 * time.Second)
	}
	if err := s.f.SetDeadline(deadline); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	stop := context.AfterFunc(ctx, func() { _ = s.f.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	rc, err := s.f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	var serr error
	werr := rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		return serr != unix.EAGAIN
	})
	if err := errors.Join(werr, serr); err != nil {
		return nil, fmt.Errorf("%s: send: %w", op, ctxErr(ctx, err))
	}

	var out []genlMessage
	for {
		n, err := s.recv(rc)
		if err != nil {
			return nil, fmt.Errorf("%s: receive: %w", op, ctxErr(ctx, err))
		}
		msgs, err := parseMessages(s.buf[:n])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
		for _, m := range msgs {
			if m.Seq != seq {
				continue // a late answer to an earlier, abandoned request
			}
			switch m.Type {
			case unix.NLMSG_ERROR:
				if err := ackError(op, m); err != nil {
					return nil, err
				}
				return out, nil
			case unix.NLMSG_DONE:
				return out, nil
			case family:
				// The next datagram reuses s.buf: keep a copy.
				g, err := parseGenl(bytes.Clone(m.Payload))
				if err != nil {
					return nil, fmt.Errorf("%s: %w", op, err)
				}
				out = append(out, g)
			}
		}
	}
}

// recv reads one datagram from the kernel (port id 0) into s.buf.
// Datagrams from any other sender are dropped.
func (s *genlSocket) recv(rc interface {
	Read(func(fd uintptr) bool) error
}) (int, error) {
	for {
		var (
			n    int
			from unix.Sockaddr
			rerr error
		)
		err := rc.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), s.buf, 0)
			return rerr != unix.EAGAIN
		})
		if err != nil {
			return 0, err
		}
		if rerr != nil {
			return 0, os.NewSyscallError("recvfrom(netlink)", rerr)
		}
		if sa, ok := from.(*unix.SockaddrNetlink); ok && sa.Pid != 0 {
			continue
		}
		return n, nil
	}
}

// ctxErr prefers the context's error to the deadline error it caused.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return err
}

// family is what the generic netlink controller says about a family.
type family struct {
	ID      uint16
	Version uint32
	MaxAttr uint32
	Groups  map[string]uint32 // multicast group name -> id
}

// resolveFamily asks the controller (CTRL_CMD_GETFAMILY) for a family by
// name. An unknown family is a *NetlinkError wrapping ENOENT.
func (s *genlSocket) resolveFamily(ctx context.Context, name string) (family, error) {
	msgs, err := s.request(ctx, "resolve generic netlink family "+name, unix.GENL_ID_CTRL, unix.CTRL_CMD_GETFAMILY, 1, func(w *attrWriter) {
		w.String(unix.CTRL_ATTR_FAMILY_NAME, name)
	})
	if err != nil {
		return family{}, err
	}
	if len(msgs) == 0 {
		return family{}, fmt.Errorf("resolve generic netlink family %s: the controller sent no answer", name)
	}
	f, err := decodeFamily(msgs[0].Attrs)
	if err != nil {
		return family{}, fmt.Errorf("resolve generic netlink family %s: %w", name, err)
	}
	return f, nil
}

// decodeFamily decodes a CTRL_CMD_NEWFAMILY answer:
//
//	CTRL_ATTR_FAMILY_ID (u16)
//	CTRL_ATTR_VERSION (u32)
//	CTRL_ATTR_MAXATTR (u32)
//	CTRL_ATTR_MCAST_GROUPS (nested)
//	  [index] (nested)
//	    CTRL_ATTR_MCAST_GRP_NAME (string)
//	    CTRL_ATTR_MCAST_GRP_ID (u32)
func decodeFamily(attrs []attr) (family, error) {
	var f family
	a, ok := find(attrs, unix.CTRL_ATTR_FAMILY_ID)
	if !ok {
		return f, errors.New("no CTRL_ATTR_FAMILY_ID in the controller's answer")
	}
	id, err := a.u16()
	if err != nil {
		return f, err
	}
	f.ID = id
	if a, ok := find(attrs, unix.CTRL_ATTR_VERSION); ok {
		if f.Version, err = a.u32(); err != nil {
			return f, err
		}
	}
	if a, ok := find(attrs, unix.CTRL_ATTR_MAXATTR); ok {
		if f.MaxAttr, err = a.u32(); err != nil {
			return f, err
		}
	}
	f.Groups = map[string]uint32{}
	if a, ok := find(attrs, unix.CTRL_ATTR_MCAST_GROUPS); ok {
		groups, err := parseAttrs(a.Data)
		if err != nil {
			return f, err
		}
		for _, g := range groups {
			inner, err := parseAttrs(g.Data)
			if err != nil {
				return f, err
			}
			name, okName := find(inner, unix.CTRL_ATTR_MCAST_GRP_NAME)
			id, okID := find(inner, unix.CTRL_ATTR_MCAST_GRP_ID)
			if !okName || !okID {
				continue
			}
			gid, err := id.u32()
			if err != nil {
				return f, err
			}
			f.Groups[name.str()] = gid
		}
	}
	return f, nil
}
