package nbdkernel

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Netlink message layout (host byte order), as sent and received on the
// generic netlink socket:
//
//	 0               4       6       8               12              16
//	+---------------+-------+-------+---------------+---------------+
//	| len           | type  | flags | seq           | port id       |   nlmsghdr
//	+---------------+-------+-------+---------------+---------------+
//	| cmd   | ver   | reserved      |                                   genlmsghdr
//	+-------+-------+---------------+
//	| attributes ...                                                |
//	+---------------------------------------------------------------+
//
// type is the generic netlink family id (GENL_ID_CTRL = 0x10 for the
// controller, the id the controller hands out for "nbd"), or NLMSG_ERROR /
// NLMSG_DONE. An NLMSG_ERROR payload is:
//
//	+---------------+-----------------------------+--------------------+
//	| error (int32) | request nlmsghdr (16 bytes) | ext-ack attributes |
//	+---------------+-----------------------------+--------------------+
//
// error is 0 for an acknowledgement and -errno for a failure; with
// NETLINK_CAP_ACK the request's payload is not echoed, and with
// NETLINK_EXT_ACK the kernel may append NLMSGERR_ATTR_MSG (a string) when
// NLM_F_ACK_TLVS is set in flags.

const (
	nlmsgHeaderLen = 16
	genlHeaderLen  = 4

	nlmErrAttrMsg = 1 // NLMSGERR_ATTR_MSG
)

var errShortMsg = errors.New("nbdkernel: truncated netlink message")

// message is one decoded netlink message. Payload aliases the receive
// buffer.
type message struct {
	Type    uint16
	Flags   uint16
	Seq     uint32
	Port    uint32
	Payload []byte
}

// parseMessages splits one datagram into netlink messages. It never panics
// and never reads past b.
func parseMessages(b []byte) ([]message, error) {
	var out []message
	for len(b) > 0 {
		if len(b) < nlmsgHeaderLen {
			return nil, fmt.Errorf("%w: %d bytes left, header needs %d", errShortMsg, len(b), nlmsgHeaderLen)
		}
		n := int(binary.NativeEndian.Uint32(b[0:4]))
		if n < nlmsgHeaderLen || n > len(b) {
			return nil, fmt.Errorf("%w: length %d with %d bytes left", errShortMsg, n, len(b))
		}
		out = append(out, message{
			Type:    binary.NativeEndian.Uint16(b[4:6]),
			Flags:   binary.NativeEndian.Uint16(b[6:8]),
			Seq:     binary.NativeEndian.Uint32(b[8:12]),
			Port:    binary.NativeEndian.Uint32(b[12:16]),
			Payload: b[nlmsgHeaderLen:n],
		})
		next := align4(n)
		if next >= len(b) {
			break
		}
		b = b[next:]
	}
	return out, nil
}

// genlMessage is the generic netlink view of a message's payload.
type genlMessage struct {
	Cmd     uint8
	Version uint8
	Attrs   []attr
}

func parseGenl(payload []byte) (genlMessage, error) {
	if len(payload) < genlHeaderLen {
		return genlMessage{}, fmt.Errorf("%w: generic netlink header needs %d bytes, have %d", errShortMsg, genlHeaderLen, len(payload))
	}
	attrs, err := parseAttrs(payload[genlHeaderLen:])
	if err != nil {
		return genlMessage{}, err
	}
	return genlMessage{Cmd: payload[0], Version: payload[1], Attrs: attrs}, nil
}

// ackError decodes an NLMSG_ERROR payload: nil for an acknowledgement,
// else a *NetlinkError carrying the errno and the kernel's extended-ack
// message if it sent one.
func ackError(op string, m message) error {
	if len(m.Payload) < 4 {
		return fmt.Errorf("%w: NLMSG_ERROR payload of %d bytes", errShortMsg, len(m.Payload))
	}
	code := int32(binary.NativeEndian.Uint32(m.Payload[0:4]))
	if code == 0 {
		return nil
	}
	e := &NetlinkError{Op: op, Errno: unix.Errno(-code)}
	if code > 0 {
		e.Errno = unix.Errno(code)
	}
	if m.Flags&unix.NLM_F_ACK_TLVS != 0 {
		// The echoed request header is 16 bytes with NETLINK_CAP_ACK (we
		// always set it); its own length field says how much was echoed.
		rest := m.Payload[4:]
		if len(rest) >= nlmsgHeaderLen {
			echoed := nlmsgHeaderLen
			if m.Flags&unix.NLM_F_CAPPED == 0 {
				echoed = int(binary.NativeEndian.Uint32(rest[0:4]))
			}
			if echoed >= nlmsgHeaderLen && align4(echoed) <= len(rest) {
				if attrs, err := parseAttrs(rest[align4(echoed):]); err == nil {
					if a, ok := find(attrs, nlmErrAttrMsg); ok {
						e.Msg = a.str()
					}
				}
			}
		}
	}
	return e
}

// NetlinkError is a failure the kernel returned to a netlink request. It
// unwraps to its unix.Errno, so errors.Is(err, unix.EBUSY) works.
type NetlinkError struct {
	Op    string // e.g. "nbd connect"
	Errno unix.Errno
	Msg   string // the kernel's extended-ack message, often empty
}

func (e *NetlinkError) Error() string {
	if e.Msg != "" {
		return fmt.Sprintf("%s: %v (%s)", e.Op, e.Errno, e.Msg)
	}
	return fmt.Sprintf("%s: %v", e.Op, e.Errno)
}

func (e *NetlinkError) Unwrap() error { return e.Errno }

// encodeRequest builds one generic netlink request: nlmsghdr, genlmsghdr,
// then the attributes fn writes.
func encodeRequest(family uint16, flags uint16, seq uint32, cmd, version uint8, fn func(w *attrWriter)) []byte {
	w := attrWriter{b: make([]byte, nlmsgHeaderLen+genlHeaderLen, 128)}
	w.b[nlmsgHeaderLen] = cmd
	w.b[nlmsgHeaderLen+1] = version
	if fn != nil {
		fn(&w)
	}
	binary.NativeEndian.PutUint32(w.b[0:4], uint32(len(w.b)))
	binary.NativeEndian.PutUint16(w.b[4:6], family)
	binary.NativeEndian.PutUint16(w.b[6:8], flags)
	binary.NativeEndian.PutUint32(w.b[8:12], seq)
	// Port id 0: the kernel fills in the sender's.
	return w.b
}
