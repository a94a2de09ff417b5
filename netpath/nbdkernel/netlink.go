package nbdkernel

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// The kernel's "nbd" generic netlink family (include/uapi/linux/nbd-netlink.h).
const (
	familyName     = "nbd"
	familyVersion  = 1
	mcastGroupName = "nbd_mc_group"

	cmdConnect     = 1 // NBD_CMD_CONNECT
	cmdDisconnect  = 2 // NBD_CMD_DISCONNECT
	cmdReconfigure = 3 // NBD_CMD_RECONFIGURE
	cmdLinkDead    = 4 // NBD_CMD_LINK_DEAD (multicast)
	cmdStatus      = 5 // NBD_CMD_STATUS

	attrIndex           = 1  // NBD_ATTR_INDEX, u32
	attrSizeBytes       = 2  // NBD_ATTR_SIZE_BYTES, u64
	attrBlockSizeBytes  = 3  // NBD_ATTR_BLOCK_SIZE_BYTES, u64
	attrTimeout         = 4  // NBD_ATTR_TIMEOUT, u64 seconds
	attrServerFlags     = 5  // NBD_ATTR_SERVER_FLAGS, u64
	attrClientFlags     = 6  // NBD_ATTR_CLIENT_FLAGS, u64
	attrSockets         = 7  // NBD_ATTR_SOCKETS, nested
	attrDeadConnTimeout = 8  // NBD_ATTR_DEAD_CONN_TIMEOUT, u64 seconds
	attrDeviceList      = 9  // NBD_ATTR_DEVICE_LIST, nested
	attrBackend         = 10 // NBD_ATTR_BACKEND_IDENTIFIER, string

	sockItem = 1 // NBD_SOCK_ITEM, nested
	sockFD   = 1 // NBD_SOCK_FD, u32

	deviceItem      = 1 // NBD_DEVICE_ITEM, nested
	deviceIndex     = 1 // NBD_DEVICE_INDEX, u32
	deviceConnected = 2 // NBD_DEVICE_CONNECTED, u8
)

// Client flags (NBD_ATTR_CLIENT_FLAGS).
const (
	// ClientDestroyOnDisconnect removes the device when it disconnects.
	ClientDestroyOnDisconnect = 1 << 0
	// ClientDisconnectOnClose disconnects the device when its last opener
	// closes it.
	ClientDisconnectOnClose = 1 << 1
)

// ErrNoNetlink means the running kernel has no "nbd" generic netlink
// family: the nbd module is not loaded (and could not be autoloaded), or
// the kernel predates the netlink interface (4.12).
var ErrNoNetlink = errors.New("the kernel has no nbd netlink interface (modprobe nbd)")

// Netlink is a connection to the kernel's NBD netlink interface. It is safe
// for concurrent use; requests are serialised.
type Netlink struct {
	sock *genlSocket
	fam  family
}

// OpenNetlink opens a generic netlink socket and resolves the "nbd"
// family. It fails with an error wrapping ErrNoNetlink when the family
// does not exist.
func OpenNetlink(ctx context.Context) (*Netlink, error) {
	s, err := openGenl()
	if err != nil {
		return nil, err
	}
	f, err := s.resolveFamily(ctx, familyName)
	if err != nil {
		s.Close()
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%w: %w", ErrNoNetlink, err)
		}
		return nil, err
	}
	return &Netlink{sock: s, fam: f}, nil
}

// Close closes the netlink socket. Attached devices stay attached.
func (n *Netlink) Close() error { return n.sock.Close() }

// ConnectRequest is NBD_CMD_CONNECT: configure a device with sockets that
// have finished the NBD handshake, and start it.
type ConnectRequest struct {
	// Index is the device (/dev/nbd<Index>) to use; -1 lets the kernel
	// pick a free one (creating a new device when all are in use).
	Index int
	// Size is the device size in bytes; a multiple of BlockSize.
	Size uint64
	// BlockSize is the logical block size: a power of two, 512..4096 (the
	// page size) on kernel 6.1.
	BlockSize uint32
	// Timeout is the per-request timeout: a request without a reply after
	// this long marks its connection dead and is requeued on a live one
	// (or waits for a reconnect). Whole seconds; zero leaves the kernel's
	// default of no timeout, which can hang I/O forever: do not.
	Timeout time.Duration
	// DeadConnTimeout is how long I/O waits for NBD_CMD_RECONFIGURE to
	// bring a connection back once all are dead, before failing with EIO.
	DeadConnTimeout time.Duration
	// ServerFlags are the transmission flags of the handshake
	// (NBD_FLAG_SEND_FLUSH, _FUA, _TRIM, _READ_ONLY, _CAN_MULTI_CONN...).
	// Without NBD_FLAG_SEND_FLUSH the kernel never sends a flush.
	ServerFlags uint16
	// ClientFlags: ClientDestroyOnDisconnect, ClientDisconnectOnClose.
	ClientFlags uint64
	// Sockets are connected stream socket descriptors, each past the
	// handshake. The kernel takes its own reference; the caller may close
	// them afterwards or keep them to watch the connections.
	Sockets []int
	// Backend is an identifier shown in /sys/block/nbdX/backend; once set,
	// every reconfigure must present the same string.
	Backend string
}

func seconds(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	return uint64((d + time.Second - 1) / time.Second)
}

func writeSockets(w *attrWriter, fds []int) {
	w.Nest(attrSockets, func(w *attrWriter) {
		for _, fd := range fds {
			w.Nest(sockItem, func(w *attrWriter) { w.U32(sockFD, uint32(fd)) })
		}
	})
}

// encodeConnect writes NBD_CMD_CONNECT's attributes:
//
//	NBD_ATTR_INDEX (u32, absent for "any free device")
//	NBD_ATTR_SIZE_BYTES (u64)
//	NBD_ATTR_BLOCK_SIZE_BYTES (u64)
//	NBD_ATTR_TIMEOUT (u64 s)              when > 0
//	NBD_ATTR_DEAD_CONN_TIMEOUT (u64 s)    when > 0
//	NBD_ATTR_SERVER_FLAGS (u64)
//	NBD_ATTR_CLIENT_FLAGS (u64)
//	NBD_ATTR_SOCKETS (nested)
//	  NBD_SOCK_ITEM (nested) { NBD_SOCK_FD (u32) }   one per socket
//	NBD_ATTR_BACKEND_IDENTIFIER (string)  when set
func encodeConnect(w *attrWriter, r ConnectRequest) {
	if r.Index >= 0 {
		w.U32(attrIndex, uint32(r.Index))
	}
	w.U64(attrSizeBytes, r.Size)
	w.U64(attrBlockSizeBytes, uint64(r.BlockSize))
	if t := seconds(r.Timeout); t > 0 {
		w.U64(attrTimeout, t)
	}
	if t := seconds(r.DeadConnTimeout); t > 0 {
		w.U64(attrDeadConnTimeout, t)
	}
	w.U64(attrServerFlags, uint64(r.ServerFlags))
	w.U64(attrClientFlags, r.ClientFlags)
	writeSockets(w, r.Sockets)
	if r.Backend != "" {
		w.String(attrBackend, r.Backend)
	}
}

func (r ConnectRequest) validate() error {
	if len(r.Sockets) == 0 {
		return errors.New("no sockets")
	}
	if r.BlockSize < 512 || r.BlockSize > 4096 || r.BlockSize&(r.BlockSize-1) != 0 {
		return fmt.Errorf("block size %d: want a power of two from 512 to 4096", r.BlockSize)
	}
	if r.Size == 0 || r.Size%uint64(r.BlockSize) != 0 {
		return fmt.Errorf("size %d: want a positive multiple of the block size %d", r.Size, r.BlockSize)
	}
	if len(r.Sockets) > 1 && r.ServerFlags&FlagCanMultiConn == 0 {
		return fmt.Errorf("%d connections: the server does not advertise NBD_FLAG_CAN_MULTI_CONN", len(r.Sockets))
	}
	return nil
}

// Connect sends NBD_CMD_CONNECT and returns the index of the device the
// kernel configured.
func (n *Netlink) Connect(ctx context.Context, r ConnectRequest) (int, error) {
	if err := r.validate(); err != nil {
		return 0, fmt.Errorf("nbd connect: %w", err)
	}
	msgs, err := n.sock.request(ctx, "nbd connect", n.fam.ID, cmdConnect, familyVersion, func(w *attrWriter) { encodeConnect(w, r) })
	if err != nil {
		return 0, err
	}
	for _, m := range msgs {
		if a, ok := find(m.Attrs, attrIndex); ok {
			idx, err := a.u32()
			if err != nil {
				return 0, fmt.Errorf("nbd connect: %w", err)
			}
			return int(idx), nil
		}
	}
	if r.Index >= 0 {
		return r.Index, nil
	}
	return 0, errors.New("nbd connect: the kernel did not say which device it configured")
}

// ReconfigureRequest is NBD_CMD_RECONFIGURE on a running device.
type ReconfigureRequest struct {
	Index int
	// Sockets replace dead connections: the kernel gives each one to the
	// first dead connection slot it finds, and silently ignores sockets
	// when no slot is dead (check with Socket.Adopted).
	Sockets []int
	// Backend must equal the identifier given at connect, if one was.
	Backend string
	// Timeout and DeadConnTimeout change the device's timeouts when > 0.
	Timeout         time.Duration
	DeadConnTimeout time.Duration
}

// encodeReconfigure writes NBD_CMD_RECONFIGURE's attributes:
//
//	NBD_ATTR_INDEX (u32)
//	NBD_ATTR_TIMEOUT (u64 s)              when > 0
//	NBD_ATTR_DEAD_CONN_TIMEOUT (u64 s)    when > 0
//	NBD_ATTR_SOCKETS (nested, as for connect)  when any
//	NBD_ATTR_BACKEND_IDENTIFIER (string)  when set
func encodeReconfigure(w *attrWriter, r ReconfigureRequest) {
	w.U32(attrIndex, uint32(r.Index))
	if t := seconds(r.Timeout); t > 0 {
		w.U64(attrTimeout, t)
	}
	if t := seconds(r.DeadConnTimeout); t > 0 {
		w.U64(attrDeadConnTimeout, t)
	}
	if len(r.Sockets) > 0 {
		writeSockets(w, r.Sockets)
	}
	if r.Backend != "" {
		w.String(attrBackend, r.Backend)
	}
}

// Reconfigure sends NBD_CMD_RECONFIGURE.
func (n *Netlink) Reconfigure(ctx context.Context, r ReconfigureRequest) error {
	if r.Index < 0 {
		return fmt.Errorf("nbd reconfigure: device index %d", r.Index)
	}
	_, err := n.sock.request(ctx, fmt.Sprintf("nbd reconfigure nbd%d", r.Index), n.fam.ID, cmdReconfigure, familyVersion, func(w *attrWriter) { encodeReconfigure(w, r) })
	return err
}

// Disconnect sends NBD_CMD_DISCONNECT: the kernel sends NBD_CMD_DISC on
// every connection, shuts the sockets down, fails queued I/O and
// unconfigures the device.
func (n *Netlink) Disconnect(ctx context.Context, index int) error {
	if index < 0 {
		return fmt.Errorf("nbd disconnect: device index %d", index)
	}
	_, err := n.sock.request(ctx, fmt.Sprintf("nbd disconnect nbd%d", index), n.fam.ID, cmdDisconnect, familyVersion, func(w *attrWriter) {
		w.U32(attrIndex, uint32(index))
	})
	return err
}

// DeviceStatus is one entry of NBD_CMD_STATUS.
type DeviceStatus struct {
	Index int
	// Connected is the kernel's "configured" bit: the device has a
	// configuration (it may still have lost every connection).
	Connected bool
}

// Status sends NBD_CMD_STATUS for one device, or for all with index -1.
func (n *Netlink) Status(ctx context.Context, index int) ([]DeviceStatus, error) {
	msgs, err := n.sock.request(ctx, "nbd status", n.fam.ID, cmdStatus, familyVersion, func(w *attrWriter) {
		if index >= 0 {
			w.U32(attrIndex, uint32(index))
		}
	})
	if err != nil {
		return nil, err
	}
	var out []DeviceStatus
	for _, m := range msgs {
		st, err := decodeStatus(m.Attrs)
		if err != nil {
			return nil, fmt.Errorf("nbd status: %w", err)
		}
		out = append(out, st...)
	}
	return out, nil
}

// decodeStatus decodes NBD_CMD_STATUS's answer:
//
//	NBD_ATTR_DEVICE_LIST (nested)
//	  NBD_DEVICE_ITEM (nested)   one per device
//	    NBD_DEVICE_INDEX (u32)
//	    NBD_DEVICE_CONNECTED (u8)
func decodeStatus(attrs []attr) ([]DeviceStatus, error) {
	list, ok := find(attrs, attrDeviceList)
	if !ok {
		return nil, nil
	}
	items, err := parseAttrs(list.Data)
	if err != nil {
		return nil, err
	}
	var out []DeviceStatus
	for _, it := range items {
		if it.Type != deviceItem {
			continue
		}
		inner, err := parseAttrs(it.Data)
		if err != nil {
			return nil, err
		}
		ia, ok := find(inner, deviceIndex)
		if !ok {
			return nil, errors.New("device item without NBD_DEVICE_INDEX")
		}
		idx, err := ia.u32()
		if err != nil {
			return nil, err
		}
		st := DeviceStatus{Index: int(idx)}
		if ca, ok := find(inner, deviceConnected); ok {
			c, err := ca.u8()
			if err != nil {
				return nil, err
			}
			st.Connected = c != 0
		}
		out = append(out, st)
	}
	return out, nil
}

// Monitor receives the kernel's NBD_CMD_LINK_DEAD notifications: one per
// connection the kernel marks dead (peer gone, request timeout, send
// error), carrying the device index. The kernel also shuts such a socket
// down, so a Socket kept by the caller reports Broken as well; the
// notification is the earlier and cheaper signal.
//
// A Monitor is used by one goroutine at a time.
type Monitor struct {
	sock *genlSocket
	fam  family
}

// OpenMonitor joins the "nbd_mc_group" multicast group.
func OpenMonitor(ctx context.Context) (*Monitor, error) {
	s, err := openGenl()
	if err != nil {
		return nil, err
	}
	f, err := s.resolveFamily(ctx, familyName)
	if err != nil {
		s.Close()
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%w: %w", ErrNoNetlink, err)
		}
		return nil, err
	}
	gid, ok := f.Groups[mcastGroupName]
	if !ok {
		s.Close()
		return nil, fmt.Errorf("nbd netlink family has no multicast group %q", mcastGroupName)
	}
	rc, err := s.f.SyscallConn()
	if err != nil {
		s.Close()
		return nil, err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, int(gid))
	}); err != nil || serr != nil {
		s.Close()
		return nil, os.NewSyscallError("setsockopt(NETLINK_ADD_MEMBERSHIP)", errors.Join(err, serr))
	}
	return &Monitor{sock: s, fam: f}, nil
}

// Close leaves the group and closes the socket; a blocked Next returns.
func (m *Monitor) Close() error { return m.sock.Close() }

// Next blocks until at least one link-dead notification arrives, or ctx
// ends, and returns the device indexes it carried (one per dead
// connection, so an index can repeat).
func (m *Monitor) Next(ctx context.Context) ([]int, error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Time{}
	}
	if err := m.sock.f.SetReadDeadline(deadline); err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = m.sock.f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	rc, err := m.sock.f.SyscallConn()
	if err != nil {
		return nil, err
	}
	for {
		n, err := m.sock.recv(rc)
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) {
				// The socket overflowed and notifications were lost: say
				// so, the caller must check every device it watches.
				return nil, fmt.Errorf("nbd link-dead monitor: %w", err)
			}
			return nil, fmt.Errorf("nbd link-dead monitor: %w", ctxErr(ctx, err))
		}
		idx, err := decodeLinkDead(m.fam.ID, m.sock.buf[:n])
		if err != nil {
			return nil, fmt.Errorf("nbd link-dead monitor: %w", err)
		}
		if len(idx) > 0 {
			return idx, nil
		}
	}
}

// decodeLinkDead returns the device indexes of the NBD_CMD_LINK_DEAD
// messages in one datagram; other messages are skipped.
func decodeLinkDead(familyID uint16, b []byte) ([]int, error) {
	msgs, err := parseMessages(b)
	if err != nil {
		return nil, err
	}
	var out []int
	for _, m := range msgs {
		if m.Type != familyID {
			continue
		}
		g, err := parseGenl(m.Payload)
		if err != nil {
			return nil, err
		}
		if g.Cmd != cmdLinkDead {
			continue
		}
		a, ok := find(g.Attrs, attrIndex)
		if !ok {
			return nil, errors.New("NBD_CMD_LINK_DEAD without NBD_ATTR_INDEX")
		}
		idx, err := a.u32()
		if err != nil {
			return nil, err
		}
		out = append(out, int(idx))
	}
	return out, nil
}
