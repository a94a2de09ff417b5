package nbdkernel

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// bb builds expected byte layouts by hand, independently of attrWriter.
type bb struct{ b []byte }

func (x *bb) u8(v uint8)   { x.b = append(x.b, v) }
func (x *bb) u16(v uint16) { x.b = binary.NativeEndian.AppendUint16(x.b, v) }
func (x *bb) u32(v uint32) { x.b = binary.NativeEndian.AppendUint32(x.b, v) }
func (x *bb) u64(v uint64) { x.b = binary.NativeEndian.AppendUint64(x.b, v) }
func (x *bb) raw(s string) { x.b = append(x.b, s...) }
func (x *bb) zero(n int)   { x.b = append(x.b, make([]byte, n)...) }

// hdr writes an nlattr header: length (header + payload), type.
func (x *bb) hdr(n, typ uint16) { x.u16(n); x.u16(typ) }

func TestEncodeConnectLayout(t *testing.T) {
	r := ConnectRequest{
		Index:           3,
		Size:            1 << 30,
		BlockSize:       4096,
		Timeout:         30 * time.Second,
		DeadConnTimeout: 59500 * time.Millisecond, // rounds up to 60 s
		ServerFlags:     FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagCanMultiConn,
		Sockets:         []int{7, 8},
		Backend:         "keel:x",
	}
	got := encodeRequest(0x1d, unix.NLM_F_REQUEST|unix.NLM_F_ACK, 42, cmdConnect, familyVersion, func(w *attrWriter) { encodeConnect(w, r) })

	var x bb
	// nlmsghdr: len, type, flags, seq, port
	x.u32(140)
	x.u16(0x1d)
	x.u16(unix.NLM_F_REQUEST | unix.NLM_F_ACK)
	x.u32(42)
	x.u32(0)
	// genlmsghdr: cmd, version, reserved
	x.u8(cmdConnect)
	x.u8(1)
	x.u16(0)
	x.hdr(8, 1) // NBD_ATTR_INDEX
	x.u32(3)
	x.hdr(12, 2) // NBD_ATTR_SIZE_BYTES
	x.u64(1 << 30)
	x.hdr(12, 3) // NBD_ATTR_BLOCK_SIZE_BYTES
	x.u64(4096)
	x.hdr(12, 4) // NBD_ATTR_TIMEOUT
	x.u64(30)
	x.hdr(12, 8) // NBD_ATTR_DEAD_CONN_TIMEOUT
	x.u64(60)
	x.hdr(12, 5) // NBD_ATTR_SERVER_FLAGS
	x.u64(0x10d)
	x.hdr(12, 6) // NBD_ATTR_CLIENT_FLAGS
	x.u64(0)
	x.hdr(28, 7|0x8000) // NBD_ATTR_SOCKETS, nested
	x.hdr(12, 1|0x8000) //   NBD_SOCK_ITEM, nested
	x.hdr(8, 1)         //     NBD_SOCK_FD
	x.u32(7)
	x.hdr(12, 1|0x8000)
	x.hdr(8, 1)
	x.u32(8)
	x.hdr(11, 10) // NBD_ATTR_BACKEND_IDENTIFIER, "keel:x\0" + 1 pad
	x.raw("keel:x")
	x.zero(2)
	if !bytes.Equal(got, x.b) {
		t.Fatalf("connect request:\n got %x\nwant %x", got, x.b)
	}
}

func TestEncodeConnectAnyDevice(t *testing.T) {
	r := ConnectRequest{Index: -1, Size: 4096, BlockSize: 512, Sockets: []int{3}}
	var w attrWriter
	encodeConnect(&w, r)
	attrs, err := parseAttrs(w.b)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := find(attrs, attrIndex); ok {
		t.Error("Index -1 must leave out NBD_ATTR_INDEX so the kernel picks a device")
	}
	for _, typ := range []uint16{attrTimeout, attrDeadConnTimeout, attrBackend} {
		if _, ok := find(attrs, typ); ok {
			t.Errorf("attribute %d written although unset", typ)
		}
	}
}

func TestEncodeReconfigureLayout(t *testing.T) {
	var w attrWriter
	encodeReconfigure(&w, ReconfigureRequest{Index: 1, Sockets: []int{9}, Backend: "ab"})
	var x bb
	x.hdr(8, 1)
	x.u32(1)
	x.hdr(16, 7|0x8000)
	x.hdr(12, 1|0x8000)
	x.hdr(8, 1)
	x.u32(9)
	x.hdr(7, 10)
	x.raw("ab")
	x.zero(2)
	if !bytes.Equal(w.b, x.b) {
		t.Fatalf("reconfigure attributes:\n got %x\nwant %x", w.b, x.b)
	}
}

func TestConnectRequestValidate(t *testing.T) {
	ok := ConnectRequest{Size: 8192, BlockSize: 4096, Sockets: []int{3}}
	if err := ok.validate(); err != nil {
		t.Fatalf("valid request refused: %v", err)
	}
	for name, mut := range map[string]func(*ConnectRequest){
		"no sockets":        func(r *ConnectRequest) { r.Sockets = nil },
		"block size 8192":   func(r *ConnectRequest) { r.BlockSize = 8192 },
		"block size 3000":   func(r *ConnectRequest) { r.BlockSize = 3000 },
		"unaligned size":    func(r *ConnectRequest) { r.Size = 4097 },
		"zero size":         func(r *ConnectRequest) { r.Size = 0 },
		"multi without CMC": func(r *ConnectRequest) { r.Sockets = []int{3, 4} },
	} {
		r := ok
		mut(&r)
		if err := r.validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestParseAttrsRoundTrip(t *testing.T) {
	var w attrWriter
	w.U8(1, 0xab)
	w.U16(2, 0xbeef)
	w.U32(3, 0xdeadbeef)
	w.U64(4, 1<<40)
	w.String(5, "hello")
	w.Nest(6, func(w *attrWriter) { w.U32(1, 5); w.String(2, "x") })
	attrs, err := parseAttrs(w.b)
	if err != nil {
		t.Fatal(err)
	}
	if len(attrs) != 6 {
		t.Fatalf("%d attributes, want 6", len(attrs))
	}
	if v, _ := attrs[0].u8(); v != 0xab {
		t.Errorf("u8 %#x", v)
	}
	if v, _ := attrs[1].u16(); v != 0xbeef {
		t.Errorf("u16 %#x", v)
	}
	if v, _ := attrs[2].u32(); v != 0xdeadbeef {
		t.Errorf("u32 %#x", v)
	}
	if v, _ := attrs[3].u64(); v != 1<<40 {
		t.Errorf("u64 %#x", v)
	}
	if s := attrs[4].str(); s != "hello" {
		t.Errorf("string %q", s)
	}
	if !attrs[5].Nested || attrs[5].Type != 6 {
		t.Errorf("nest: type %d nested %v", attrs[5].Type, attrs[5].Nested)
	}
	inner, err := parseAttrs(attrs[5].Data)
	if err != nil || len(inner) != 2 || inner[1].str() != "x" {
		t.Errorf("inner attributes %+v, %v", inner, err)
	}
}

func TestParseAttrsRejectsTruncation(t *testing.T) {
	for name, b := range map[string][]byte{
		"short header":     {4, 0},
		"length too big":   {9, 0, 1, 0, 1, 2, 3, 4},
		"length too small": {2, 0, 1, 0},
	} {
		if _, err := parseAttrs(b); !errors.Is(err, errShortAttr) {
			t.Errorf("%s: err %v, want errShortAttr", name, err)
		}
	}
	if _, err := (attr{Data: []byte{1, 2}}).u32(); err == nil {
		t.Error("u32 from 2 bytes accepted")
	}
}

// statusReply builds the kernel's NBD_CMD_STATUS answer as the kernel lays
// it out (nla_nest_start_noflag: no NLA_F_NESTED).
func statusReply(seq uint32, famID uint16, devs []DeviceStatus) []byte {
	var items bb
	for _, d := range devs {
		items.hdr(4+8+8, deviceItem)
		items.hdr(8, deviceIndex)
		items.u32(uint32(d.Index))
		items.hdr(5, deviceConnected)
		c := uint8(0)
		if d.Connected {
			c = 1
		}
		items.u8(c)
		items.zero(3)
	}
	var body bb
	body.u8(cmdStatus)
	body.u8(1)
	body.u16(0)
	body.hdr(uint16(4+len(items.b)), attrDeviceList)
	body.b = append(body.b, items.b...)
	var m bb
	m.u32(uint32(16 + len(body.b)))
	m.u16(famID)
	m.u16(0)
	m.u32(seq)
	m.u32(0)
	m.b = append(m.b, body.b...)
	return m.b
}

func TestDecodeStatus(t *testing.T) {
	want := []DeviceStatus{{Index: 0, Connected: true}, {Index: 1}, {Index: 7, Connected: true}}
	msgs, err := parseMessages(statusReply(5, 0x1d, want))
	if err != nil || len(msgs) != 1 {
		t.Fatalf("parse: %v, %d messages", err, len(msgs))
	}
	g, err := parseGenl(msgs[0].Payload)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeStatus(g.Attrs)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("got %+v want %+v", got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Errorf("device %d: got %+v want %+v", i, got[i], want[i])
		}
	}
}

func linkDeadMsg(famID uint16, index uint32) []byte {
	var m bb
	m.u32(16 + 4 + 8)
	m.u16(famID)
	m.u16(0)
	m.u32(0)
	m.u32(0)
	m.u8(cmdLinkDead)
	m.u8(1)
	m.u16(0)
	m.hdr(8, attrIndex)
	m.u32(index)
	return m.b
}

func TestDecodeLinkDead(t *testing.T) {
	b := append(linkDeadMsg(0x1d, 2), linkDeadMsg(0x1d, 5)...)
	b = append(b, linkDeadMsg(0x99, 9)...) // another family: skipped
	got, err := decodeLinkDead(0x1d, b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != 2 || got[1] != 5 {
		t.Fatalf("indexes %v, want [2 5]", got)
	}
}

func errorMsg(seq uint32, code int32, extMsg string) []byte {
	var body bb
	body.u32(uint32(code))
	// echoed request header (capped)
	body.u32(20)
	body.u16(0x1d)
	body.u16(unix.NLM_F_REQUEST)
	body.u32(seq)
	body.u32(0)
	flags := uint16(unix.NLM_F_CAPPED)
	if extMsg != "" {
		flags |= unix.NLM_F_ACK_TLVS
		n := 4 + len(extMsg) + 1
		body.hdr(uint16(n), nlmErrAttrMsg)
		body.raw(extMsg)
		body.u8(0)
		body.zero(align4(n) - n)
	}
	var m bb
	m.u32(uint32(16 + len(body.b)))
	m.u16(unix.NLMSG_ERROR)
	m.u16(flags)
	m.u32(seq)
	m.u32(0)
	m.b = append(m.b, body.b...)
	return m.b
}

func TestAckError(t *testing.T) {
	msgs, err := parseMessages(errorMsg(1, -int32(unix.EBUSY), "nbd0 already in use"))
	if err != nil {
		t.Fatal(err)
	}
	err = ackError("nbd connect", msgs[0])
	if !errors.Is(err, unix.EBUSY) {
		t.Fatalf("err %v does not unwrap to EBUSY", err)
	}
	var ne *NetlinkError
	if !errors.As(err, &ne) || ne.Msg != "nbd0 already in use" {
		t.Fatalf("err %#v: want the extended ack message", err)
	}
	msgs, _ = parseMessages(errorMsg(1, 0, ""))
	if err := ackError("x", msgs[0]); err != nil {
		t.Fatalf("acknowledgement decoded as %v", err)
	}
}

func TestDecodeFamily(t *testing.T) {
	var w attrWriter
	w.U16(unix.CTRL_ATTR_FAMILY_ID, 0x1d)
	w.String(unix.CTRL_ATTR_FAMILY_NAME, "nbd")
	w.U32(unix.CTRL_ATTR_VERSION, 1)
	w.U32(unix.CTRL_ATTR_MAXATTR, 10)
	w.Nest(unix.CTRL_ATTR_MCAST_GROUPS, func(w *attrWriter) {
		w.Nest(1, func(w *attrWriter) {
			w.String(unix.CTRL_ATTR_MCAST_GRP_NAME, "nbd_mc_group")
			w.U32(unix.CTRL_ATTR_MCAST_GRP_ID, 0x17)
		})
	})
	attrs, err := parseAttrs(w.b)
	if err != nil {
		t.Fatal(err)
	}
	f, err := decodeFamily(attrs)
	if err != nil {
		t.Fatal(err)
	}
	if f.ID != 0x1d || f.Version != 1 || f.MaxAttr != 10 || f.Groups["nbd_mc_group"] != 0x17 {
		t.Fatalf("family %+v", f)
	}
}

// The controller family exists on every Linux kernel: resolving it
// exercises the socket, the request and the reply decoding for real.
func TestResolveControllerFamily(t *testing.T) {
	s, err := openGenl()
	if err != nil {
		t.Skipf("no generic netlink here: %v", err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f, err := s.resolveFamily(ctx, "nlctrl")
	if err != nil {
		t.Fatal(err)
	}
	if f.ID != unix.GENL_ID_CTRL {
		t.Fatalf("nlctrl has id %#x, want %#x", f.ID, unix.GENL_ID_CTRL)
	}
	if _, ok := f.Groups["notify"]; !ok {
		t.Errorf("nlctrl groups %v: want \"notify\"", f.Groups)
	}
	_, err = s.resolveFamily(ctx, "keel-nofamily")
	if !errors.Is(err, unix.ENOENT) {
		t.Fatalf("unknown family: err %v, want ENOENT", err)
	}
}

// On a kernel without the nbd module (this build machine), opening the
// netlink interface fails with ErrNoNetlink, not with something vague.
func TestOpenNetlinkWithoutModule(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := OpenNetlink(ctx)
	if err == nil {
		n.Close()
		t.Skip("this kernel has the nbd netlink family")
	}
	if !errors.Is(err, ErrNoNetlink) {
		t.Fatalf("err %v, want ErrNoNetlink", err)
	}
}
