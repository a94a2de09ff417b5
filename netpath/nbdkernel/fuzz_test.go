package nbdkernel

import (
	"bytes"
	"io"
	"testing"

	"golang.org/x/sys/unix"
)

// FuzzNetlinkReply feeds arbitrary datagrams to every decoder of what the
// kernel sends: message splitting, acknowledgements, generic netlink
// headers, attributes, the family, status and link-dead answers. None may
// panic or read out of bounds; decoded attributes must survive a
// re-encode.
func FuzzNetlinkReply(f *testing.F) {
	f.Add(statusReply(1, 0x1d, []DeviceStatus{{Index: 0, Connected: true}, {Index: 3}}))
	f.Add(linkDeadMsg(0x1d, 4))
	f.Add(errorMsg(9, -int32(unix.EINVAL), "bad attribute"))
	f.Add(errorMsg(9, 0, ""))
	var w attrWriter
	w.U16(unix.CTRL_ATTR_FAMILY_ID, 0x1d)
	w.Nest(unix.CTRL_ATTR_MCAST_GROUPS, func(w *attrWriter) {
		w.Nest(1, func(w *attrWriter) {
			w.String(unix.CTRL_ATTR_MCAST_GRP_NAME, "nbd_mc_group")
			w.U32(unix.CTRL_ATTR_MCAST_GRP_ID, 0x17)
		})
	})
	f.Add(encodeRequest(unix.GENL_ID_CTRL, 0, 1, unix.CTRL_CMD_NEWFAMILY, 2, func(x *attrWriter) { x.b = append(x.b, w.b...) }))
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0})

	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = decodeLinkDead(0x1d, b)
		msgs, err := parseMessages(b)
		if err != nil {
			return
		}
		for _, m := range msgs {
			if m.Type == unix.NLMSG_ERROR {
				_ = ackError("fuzz", m)
				continue
			}
			g, err := parseGenl(m.Payload)
			if err != nil {
				continue
			}
			_, _ = decodeStatus(g.Attrs)
			_, _ = decodeFamily(g.Attrs)
			// Re-encode the top-level attributes and parse them again.
			var w attrWriter
			for _, a := range g.Attrs {
				typ := a.Type
				if a.Nested {
					typ |= attrNested
				}
				w.header(typ, len(a.Data))
				w.b = append(w.b, a.Data...)
				w.pad()
			}
			again, err := parseAttrs(w.b)
			if err != nil || len(again) != len(g.Attrs) {
				t.Fatalf("re-encoded attributes do not parse back: %v (%d vs %d)", err, len(again), len(g.Attrs))
			}
			for i := range again {
				if again[i].Type != g.Attrs[i].Type || again[i].Nested != g.Attrs[i].Nested || !bytes.Equal(again[i].Data, g.Attrs[i].Data) {
					t.Fatalf("attribute %d changed in a round trip", i)
				}
			}
		}
	})
}

// FuzzHandshake plays arbitrary server bytes against the client
// handshake: it must end with an export or an error, never panic, never
// accept an export of size 0, and never ask for a huge allocation.
func FuzzHandshake(f *testing.F) {
	f.Add(goodGo().b)
	f.Add(exportNameFallback(true).b)
	f.Add(exportNameFallback(false).b)
	f.Add(new(srv).greet(1).reply(goOpt, repFlagError|6, []byte("no such export")).b)
	f.Add(new(srv).greet(1).reply(goOpt, 3, make([]byte, 3)).b)
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := Handshake(&script{r: bytes.NewReader(b)}, "v1")
		if err == nil && e.Size == 0 {
			t.Fatal("export of size 0 accepted")
		}
		_, _ = e.KernelBlockSize()
	})
}

var _ io.ReadWriter = (*script)(nil)
