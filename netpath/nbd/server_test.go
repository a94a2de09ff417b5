package nbd_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"keel/netpath/nbd"
	"keel/netpath/nbdproto"
)

const size = 16 << 20

func TestOptionHaggling(t *testing.T) {
	m := newMem(size)
	ro := newMem(1 << 20)
	f := start(t, nbd.Config{Exports: []nbd.Export{
		{Name: "vol", Description: "test volume", Backend: m},
		{Name: "ro", Backend: ro, ReadOnly: true},
	}})
	c := f.dial()
	if hf := c.greet(nbdproto.FlagCFixedNewstyle | nbdproto.FlagCNoZeroes); hf != nbdproto.FlagFixedNewstyle|nbdproto.FlagNoZeroes {
		t.Fatalf("handshake flags %#x", hf)
	}

	// LIST: one SERVER per export, then ACK.
	rs := c.option(nbdproto.OptList, nil)
	if len(rs) != 3 || final(rs) != nbdproto.RepAck {
		t.Fatalf("LIST: %+v", rs)
	}
	name, desc, err := nbdproto.DecodeRepServer(rs[0].data)
	if err != nil || name != "vol" || desc != "test volume" {
		t.Fatalf("LIST entry %q %q %v", name, desc, err)
	}
	if r := final(c.option(nbdproto.OptList, []byte{1})); r != nbdproto.RepErrInvalid {
		t.Fatalf("LIST with data: %v", r)
	}

	// Unknown options, STARTTLS and extended headers are refused and the
	// handshake goes on.
	for _, opt := range []nbdproto.Option{99, nbdproto.OptPeekExport, nbdproto.OptExtendedHeaders} {
		if r := final(c.option(opt, []byte("junk"))); r != nbdproto.RepErrUnsup {
			t.Fatalf("%v: %v", opt, r)
		}
	}
	if r := final(c.option(nbdproto.OptStartTLS, nil)); r != nbdproto.RepErrPolicy {
		t.Fatalf("STARTTLS: %v", r)
	}

	// INFO of an unknown export.
	info := func(name string, infos ...nbdproto.InfoType) []optReply {
		return c.option(nbdproto.OptInfo, nbdproto.AppendInfoRequest(nil, nbdproto.InfoRequest{Name: name, Infos: infos}))
	}
	if r := final(info("nope")); r != nbdproto.RepErrUnknown {
		t.Fatalf("INFO unknown: %v", r)
	}
	if r := final(c.option(nbdproto.OptInfo, []byte{0, 0, 0, 9, 'x'})); r != nbdproto.RepErrInvalid {
		t.Fatalf("INFO malformed: %v", r)
	}
	// INFO of a known one, before structured replies: no DF.
	got := map[nbdproto.InfoType]nbdproto.Info{}
	rs = info("vol", nbdproto.InfoName, nbdproto.InfoDescription, nbdproto.InfoBlockSize)
	if final(rs) != nbdproto.RepAck {
		t.Fatalf("INFO vol: %+v", rs)
	}
	for _, r := range rs[:len(rs)-1] {
		if r.rep != nbdproto.RepInfo {
			t.Fatalf("INFO reply %v", r.rep)
		}
		in, err := nbdproto.DecodeInfo(r.data)
		if err != nil {
			t.Fatal(err)
		}
		got[in.Type] = in
	}
	wantFlags := nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagSendFUA | nbdproto.FlagSendTrim |
		nbdproto.FlagSendWriteZeroes | nbdproto.FlagSendFastZero | nbdproto.FlagSendCache | nbdproto.FlagCanMultiConn
	if e := got[nbdproto.InfoExport]; e.Size != size || e.Flags != wantFlags {
		t.Fatalf("INFO_EXPORT size %d flags %#x, want %d %#x", e.Size, e.Flags, size, wantFlags)
	}
	if got[nbdproto.InfoName].Text != "vol" || got[nbdproto.InfoDescription].Text != "test volume" {
		t.Fatalf("INFO name/description: %+v", got)
	}
	if b := got[nbdproto.InfoBlockSize]; b.Minimum != 1 || b.Preferred != 4096 || b.Maximum != 32<<20 {
		t.Fatalf("INFO_BLOCK_SIZE %+v", b)
	}
	// The read-only export: READ_ONLY, no write features.
	rs = info("ro")
	in, _ := nbdproto.DecodeInfo(rs[0].data)
	if in.Flags != nbdproto.FlagHasFlags|nbdproto.FlagReadOnly|nbdproto.FlagSendFlush|nbdproto.FlagSendCache|nbdproto.FlagCanMultiConn {
		t.Fatalf("read-only flags %#x", in.Flags)
	}

	// Meta contexts need structured replies first.
	meta := func(opt nbdproto.Option, name string, queries ...string) []optReply {
		return c.option(opt, nbdproto.AppendMetaContextRequest(nil, nbdproto.MetaContextRequest{Name: name, Queries: queries}))
	}
	if r := final(meta(nbdproto.OptSetMetaContext, "vol", nbdproto.ContextBaseAllocation)); r != nbdproto.RepErrInvalid {
		t.Fatalf("SET_META_CONTEXT before STRUCTURED_REPLY: %v", r)
	}
	if r := final(c.option(nbdproto.OptStructuredReply, []byte{0})); r != nbdproto.RepErrInvalid {
		t.Fatalf("STRUCTURED_REPLY with data: %v", r)
	}
	if r := final(c.option(nbdproto.OptStructuredReply, nil)); r != nbdproto.RepAck {
		t.Fatalf("STRUCTURED_REPLY: %v", r)
	}
	c.sr = true
	for _, q := range [][]string{nil, {"base:"}, {"x-other:thing", nbdproto.ContextBaseAllocation}} {
		rs := meta(nbdproto.OptListMetaContext, "vol", q...)
		if len(rs) != 2 || final(rs) != nbdproto.RepAck {
			t.Fatalf("LIST_META_CONTEXT %q: %+v", q, rs)
		}
		id, ctx, _ := nbdproto.DecodeRepMetaContext(rs[0].data)
		if id != 0 || ctx != nbdproto.ContextBaseAllocation {
			t.Fatalf("LIST_META_CONTEXT %q: %d %q", q, id, ctx)
		}
	}
	for _, q := range [][]string{nil, {"base:"}, {"base:nothing", "qemu:dirty-bitmap:x"}} {
		if rs := meta(nbdproto.OptSetMetaContext, "vol", q...); len(rs) != 1 || final(rs) != nbdproto.RepAck {
			t.Fatalf("SET_META_CONTEXT %q selects something: %+v", q, rs)
		}
	}
	if r := final(meta(nbdproto.OptSetMetaContext, "nope", nbdproto.ContextBaseAllocation)); r != nbdproto.RepErrUnknown {
		t.Fatalf("SET_META_CONTEXT unknown export: %v", r)
	}
	if r := final(c.option(nbdproto.OptSetMetaContext, []byte{0, 0, 0, 0, 0, 0, 0, 1})); r != nbdproto.RepErrInvalid {
		t.Fatalf("SET_META_CONTEXT malformed: %v", r)
	}
	rs = meta(nbdproto.OptSetMetaContext, "vol", nbdproto.ContextBaseAllocation)
	if len(rs) != 2 || rs[0].rep != nbdproto.RepMetaContext {
		t.Fatalf("SET_META_CONTEXT: %+v", rs)
	}

	// GO: DF now advertised.
	c.goExport("vol", []nbdproto.InfoType{nbdproto.InfoBlockSize})
	if c.flags != wantFlags|nbdproto.FlagSendDF || c.size != size {
		t.Fatalf("GO flags %#x size %d", c.flags, c.size)
	}
	w := pattern(8192, 3)
	if r := c.do(nbdproto.CmdWrite, 0, 4096, 8192, w); r.errno != 0 {
		t.Fatalf("write: %v", r.errno)
	}
	r := c.do(nbdproto.CmdRead, nbdproto.CmdFlagDF, 4096, 8192, nil)
	if r.errno != 0 || r.typ != nbdproto.ReplyTypeOffsetData {
		t.Fatalf("read: %v type %d", r.errno, r.typ)
	}
	mustEqual(t, r.data, w, "read after write")
	r = c.do(nbdproto.CmdBlockStatus, 0, 0, 3*4096, nil)
	want := []nbdproto.BlockDescriptor{bd(4096, nbdproto.StateHole|nbdproto.StateZero), bd(8192, 0)}
	if r.errno != 0 || fmt.Sprint(r.descs) != fmt.Sprint(want) {
		t.Fatalf("block status: %v %v, want %v", r.errno, r.descs, want)
	}
}

func TestGoUnknownExportThenKnown(t *testing.T) {
	f, _ := startMem(t, size)
	c := f.dial()
	c.greet(nbdproto.FlagCFixedNewstyle)
	rs := c.option(nbdproto.OptGo, nbdproto.AppendInfoRequest(nil, nbdproto.InfoRequest{Name: "nope"}))
	if final(rs) != nbdproto.RepErrUnknown {
		t.Fatalf("GO unknown: %+v", rs)
	}
	// The default export by the empty name, plain simple replies.
	c.goExport("", nil)
	if c.size != size || c.flags&nbdproto.FlagSendDF != 0 {
		t.Fatalf("size %d flags %#x", c.size, c.flags)
	}
	r := c.do(nbdproto.CmdRead, 0, 0, 512, nil)
	if !r.simple || r.errno != 0 || len(r.data) != 512 {
		t.Fatalf("read: %+v", r)
	}
	// BLOCK_STATUS without a meta context: EINVAL, simple reply.
	if r := c.do(nbdproto.CmdBlockStatus, 0, 0, 4096, nil); r.errno != nbdproto.EINVAL || !r.simple {
		t.Fatalf("block status without context: %+v", r)
	}
}

func TestExportName(t *testing.T) {
	f, m := startMem(t, size)
	m.put(0, []byte("hello"))
	for _, noZeroes := range []bool{false, true} {
		c := f.dial()
		flags := nbdproto.FlagCFixedNewstyle
		if noZeroes {
			flags |= nbdproto.FlagCNoZeroes
		}
		c.greet(flags)
		c.write(nbdproto.AppendOption(nil, nbdproto.OptExportName, []byte("vol")))
		n := nbdproto.ExportNameReplySize
		if !noZeroes {
			n += nbdproto.ExportNameZeroes
		}
		b := c.read(n)
		if got := binary.BigEndian.Uint64(b); got != size {
			t.Fatalf("export size %x", b[:8])
		}
		for _, z := range b[nbdproto.ExportNameReplySize:] {
			if z != 0 {
				t.Fatal("non-zero padding")
			}
		}
		r := c.do(nbdproto.CmdRead, 0, 0, 5, nil)
		if string(r.data) != "hello" {
			t.Fatalf("read %q", r.data)
		}
	}
	// An unknown name cannot be refused politely: the connection closes.
	c := f.dial()
	c.greet(nbdproto.FlagCFixedNewstyle)
	c.write(nbdproto.AppendOption(nil, nbdproto.OptExportName, []byte("nope")))
	c.expectClosed()
}

func TestAbortAndBadHandshakes(t *testing.T) {
	f, _ := startMem(t, size)

	c := f.dial()
	c.greet(nbdproto.FlagCFixedNewstyle)
	if r := final(c.option(nbdproto.OptAbort, nil)); r != nbdproto.RepAck {
		t.Fatalf("ABORT: %v", r)
	}
	c.expectClosed()

	// Unknown client flags.
	c = f.dial()
	c.greet(1 << 7)
	c.expectClosed()

	// Bad option magic.
	c = f.dial()
	c.greet(nbdproto.FlagCFixedNewstyle)
	c.write(make([]byte, nbdproto.OptionHeaderSize))
	c.expectClosed()

	// A large option is drained and refused; haggling goes on.
	c = f.dial()
	c.greet(nbdproto.FlagCFixedNewstyle)
	if r := final(c.option(nbdproto.OptInfo, make([]byte, 200<<10))); r != nbdproto.RepErrTooBig {
		t.Fatalf("200 KiB option: %v", r)
	}
	c.goExport("vol", nil)
	if r := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Fatalf("flush after haggling: %v", r.errno)
	}

	// A huge one closes the connection.
	c = f.dial()
	c.greet(nbdproto.FlagCFixedNewstyle)
	c.write(nbdproto.AppendOption(nil, nbdproto.OptInfo, nil)[:12])
	c.write([]byte{0x40, 0, 0, 0})
	c.expectClosed()
}

func TestHandshakeTimeout(t *testing.T) {
	m := newMem(size)
	f := start(t, nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m}}, HandshakeTimeout: 200 * time.Millisecond})
	c := f.dial()
	c.greet(nbdproto.FlagCFixedNewstyle)
	c.expectClosed() // never sends an option
}

// TestRequestErrors drives each validation error and checks that the
// connection stays in sync after it.
func TestRequestErrors(t *testing.T) {
	for _, sr := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", sr), func(t *testing.T) {
			f, m := startMem(t, size)
			c := f.open("vol", sr)
			payload := pattern(4096, 9)
			check := func(what string, r reply, want nbdproto.Errno) {
				t.Helper()
				if r.errno != want {
					t.Fatalf("%s: errno %v, want %v", what, r.errno, want)
				}
				if sr && want != 0 && (r.typ != nbdproto.ReplyTypeError || r.msg == "") {
					t.Fatalf("%s: structured error chunk %d with message %q", what, r.typ, r.msg)
				}
				// The stream is still in sync: a write and a read work.
				if r := c.do(nbdproto.CmdWrite, 0, 8192, 4096, payload); r.errno != 0 {
					t.Fatalf("%s: write after: %v", what, r.errno)
				}
				if r := c.do(nbdproto.CmdRead, 0, 8192, 4096, nil); r.errno != 0 || string(r.data) != string(payload) {
					t.Fatalf("%s: read after: %v", what, r.errno)
				}
			}
			check("unknown command", c.do(42, 0, 0, 4096, nil), nbdproto.EINVAL)
			check("resize", c.do(nbdproto.CmdResize, 0, 0, 0, nil), nbdproto.EINVAL)
			check("bad read flag", c.do(nbdproto.CmdRead, nbdproto.CmdFlagNoHole, 0, 4096, nil), nbdproto.EINVAL)
			check("unknown flag", c.do(nbdproto.CmdFlush, 1<<9, 0, 0, nil), nbdproto.EINVAL)
			check("bad write flag", c.do(nbdproto.CmdWrite, nbdproto.CmdFlagReqOne, 0, 4096, payload), nbdproto.EINVAL)
			check("read past end", c.do(nbdproto.CmdRead, 0, size-4096, 8192, nil), nbdproto.EINVAL)
			check("read offset past end", c.do(nbdproto.CmdRead, 0, 1<<62, 1, nil), nbdproto.EINVAL)
			check("read wrapping", c.do(nbdproto.CmdRead, 0, ^uint64(0), 2, nil), nbdproto.EINVAL)
			check("write past end", c.do(nbdproto.CmdWrite, 0, size-2048, 4096, payload), nbdproto.ENOSPC)
			check("zeroes past end", c.do(nbdproto.CmdWriteZeroes, 0, size, 1, nil), nbdproto.ENOSPC)
			check("trim past end", c.do(nbdproto.CmdTrim, 0, size, 4096, nil), nbdproto.EINVAL)
			check("cache past end", c.do(nbdproto.CmdCache, 0, size, 4096, nil), nbdproto.EINVAL)
			check("oversize read", c.do(nbdproto.CmdRead, 0, 0, 32<<20+1, nil), nbdproto.EOVERFLOW)
			big := make([]byte, 33<<20)
			check("oversize write (drained)", c.do(nbdproto.CmdWrite, 0, 0, uint32(len(big)), big), nbdproto.EOVERFLOW)
			if sr {
				check("block status of 0 bytes", c.do(nbdproto.CmdBlockStatus, 0, 0, 0, nil), nbdproto.EINVAL)
				check("block status past end", c.do(nbdproto.CmdBlockStatus, 0, size-4096, 8192, nil), nbdproto.EINVAL)
			}
			// Zero-length requests succeed.
			r := c.do(nbdproto.CmdRead, 0, 0, 0, nil)
			if r.errno != 0 || len(r.data) != 0 || (sr && r.typ != nbdproto.ReplyTypeNone) {
				t.Fatalf("zero-length read: %+v", r)
			}
			check("zero-length write", c.do(nbdproto.CmdWrite, 0, size, 0, nil), 0)
			// The oversize write did not touch the data.
			if m.at(0, 1)[0] != 0 {
				t.Fatal("refused write reached the backend")
			}
		})
	}
}

func TestReadOnly(t *testing.T) {
	m := newMem(size)
	f := start(t, nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m, ReadOnly: true}}})
	c := f.open("vol", true)
	if c.flags&nbdproto.FlagReadOnly == 0 {
		t.Fatal("READ_ONLY not advertised")
	}
	for i := 0; i < 3; i++ {
		if r := c.do(nbdproto.CmdWrite, 0, 0, 4096, pattern(4096, 1)); r.errno != nbdproto.EPERM {
			t.Fatalf("write: %v", r.errno)
		}
		if r := c.do(nbdproto.CmdTrim, 0, 0, 4096, nil); r.errno != nbdproto.EPERM {
			t.Fatalf("trim: %v", r.errno)
		}
		if r := c.do(nbdproto.CmdWriteZeroes, 0, 0, 4096, nil); r.errno != nbdproto.EPERM {
			t.Fatalf("write zeroes: %v", r.errno)
		}
		if r := c.do(nbdproto.CmdRead, 0, 0, 4096, nil); r.errno != 0 {
			t.Fatalf("read: %v", r.errno)
		}
		if r := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); r.errno != 0 {
			t.Fatalf("flush: %v", r.errno)
		}
	}
	if m.at(0, 1)[0] != 0 {
		t.Fatal("write reached a read-only backend")
	}
}

func TestBadMagicClosesOnlyThatConnection(t *testing.T) {
	f, _ := startMem(t, size)
	good := f.open("vol", false)
	bad := f.open("vol", true)
	junk := make([]byte, nbdproto.RequestSize)
	copy(junk, "GARBAGE!")
	bad.write(junk)
	bad.expectClosed()
	if r := good.do(nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 0, 4096, pattern(4096, 5)); r.errno != 0 {
		t.Fatalf("other connection: %v", r.errno)
	}
	// New connections are still served.
	if r := f.open("vol", true).do(nbdproto.CmdRead, 0, 0, 4096, nil); r.errno != 0 {
		t.Fatalf("new connection: %v", r.errno)
	}
}

// TestOutOfOrderReplies: a read the backend holds back is overtaken by a
// later one.
func TestOutOfOrderReplies(t *testing.T) {
	for _, sr := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", sr), func(t *testing.T) {
			f, m := startMem(t, size)
			m.put(0, pattern(8192, 1))
			release := make(chan struct{})
			m.setHook(func(op string, off, length int64) error {
				if op == "read" && off == 0 {
					<-release
				}
				return nil
			})
			c := f.open("vol", sr)
			// Both requests in one write, so the server has both before
			// it dispatches the first.
			var b [2 * nbdproto.RequestSize]byte
			c.handle = 10
			reqA := nbdproto.Request{Type: nbdproto.CmdRead, Handle: 11, Offset: 0, Length: 4096}
			reqB := nbdproto.Request{Type: nbdproto.CmdRead, Handle: 12, Offset: 4096, Length: 4096}
			reqA.Encode((*[28]byte)(b[:28]))
			reqB.Encode((*[28]byte)(b[28:]))
			c.pending[11], c.pending[12] = reqA, reqB
			c.write(b[:])
			first := c.recv()
			close(release)
			second := c.recv()
			if first.handle != 12 || second.handle != 11 {
				t.Fatalf("replies in order %d, %d; want 12 then 11", first.handle, second.handle)
			}
			mustEqual(t, first.data, m.at(4096, 4096), "read B")
			mustEqual(t, second.data, m.at(0, 4096), "read A")
		})
	}
}

// TestDiscWithInFlight: requests in flight when DISC arrives are answered
// before the connection closes.
func TestDiscWithInFlight(t *testing.T) {
	f, m := startMem(t, size)
	release := make(chan struct{})
	started := make(chan struct{}, 4)
	m.setHook(func(op string, off, length int64) error {
		if op == "write" {
			started <- struct{}{}
			<-release
		}
		return nil
	})
	c := f.open("vol", true)
	var msg []byte
	var hb [nbdproto.RequestSize]byte
	for i := uint64(0); i < 3; i++ {
		req := nbdproto.Request{Type: nbdproto.CmdWrite, Handle: 100 + i, Offset: i * 4096, Length: 4096}
		req.Encode(&hb)
		msg = append(append(msg, hb[:]...), pattern(4096, byte(i))...)
		c.pending[req.Handle] = req
	}
	nbdproto.Request{Type: nbdproto.CmdDisc, Handle: 200}.Encode(&hb)
	msg = append(msg, hb[:]...)
	c.write(msg)
	for i := 0; i < 3; i++ {
		<-started
	}
	close(release)
	seen := map[uint64]bool{}
	for i := 0; i < 3; i++ {
		r := c.recv()
		if r.errno != 0 {
			t.Fatalf("write %d: %v", r.handle, r.errno)
		}
		seen[r.handle] = true
	}
	if len(seen) != 3 {
		t.Fatalf("replies %v", seen)
	}
	c.expectClosed()
	mustEqual(t, m.at(8192, 4096), pattern(4096, 2), "third write")
}

// TestShutdownWithInFlight: Shutdown lets the request in flight finish and
// be answered, answers a request already received with ESHUTDOWN, and
// returns only after the connection ended.
func TestShutdownWithInFlight(t *testing.T) {
	m := newMem(size)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m}}, MaxInFlight: 1})
	serveDone := make(chan error, 1)
	go func() { serveDone <- srv.Serve(l) }()
	f := &fixture{t: t, srv: srv, addr: l.Addr().String()}

	started, release := make(chan struct{}), make(chan struct{})
	var finished atomic.Bool
	m.setHook(func(op string, off, length int64) error {
		if op == "read" && off == 0 {
			close(started)
			<-release
			finished.Store(true)
		}
		return nil
	})
	interrupted := make(chan struct{})
	nbd.SetShutdownHook(srv, func() { close(interrupted) })

	c := f.open("vol", true)
	var b [2 * nbdproto.RequestSize]byte
	reqA := nbdproto.Request{Type: nbdproto.CmdRead, Handle: 1, Offset: 0, Length: 4096}
	reqB := nbdproto.Request{Type: nbdproto.CmdRead, Handle: 2, Offset: 4096, Length: 4096}
	reqA.Encode((*[28]byte)(b[:28]))
	reqB.Encode((*[28]byte)(b[28:]))
	c.pending[1], c.pending[2] = reqA, reqB
	c.write(b[:])
	<-started // A in the backend; B waits for A's slot (MaxInFlight 1)

	shutdownDone := make(chan error, 1)
	go func() { shutdownDone <- srv.Shutdown(context.Background()) }()
	<-interrupted
	close(release)
	if r := c.recv(); r.handle != 1 || r.errno != 0 {
		t.Fatalf("in-flight read: handle %d errno %v", r.handle, r.errno)
	}
	if r := c.recv(); r.handle != 2 || r.errno != nbdproto.ESHUTDOWN {
		t.Fatalf("queued read: handle %d errno %v", r.handle, r.errno)
	}
	c.expectClosed()
	if err := <-shutdownDone; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if !finished.Load() {
		t.Fatal("Shutdown returned before the in-flight request finished")
	}
	if err := <-serveDone; !errors.Is(err, nbd.ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	if _, err := net.Dial("tcp", f.addr); err == nil {
		t.Fatal("listener still accepting")
	}
}

func TestShutdownDeadline(t *testing.T) {
	m := newMem(size)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m}}})
	go srv.Serve(l)
	f := &fixture{t: t, srv: srv, addr: l.Addr().String()}
	started, release := make(chan struct{}), make(chan struct{})
	defer close(release)
	m.setHook(func(op string, off, length int64) error {
		if op == "flush" {
			close(started)
			<-release
		}
		return nil
	})
	c := f.open("vol", false)
	c.send(nbdproto.CmdFlush, 0, 0, 0, nil)
	<-started
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := srv.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Shutdown with a stuck backend: %v", err)
	}
	c.expectClosed()
}

func TestCommands(t *testing.T) {
	f, m := startMem(t, size)
	c := f.open("vol", true)
	data := pattern(64<<10, 7)
	if r := c.do(nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 1<<20, uint32(len(data)), data); r.errno != 0 {
		t.Fatalf("write: %v", r.errno)
	}
	// Unaligned read.
	r := c.do(nbdproto.CmdRead, 0, 1<<20+3, 1000, nil)
	mustEqual(t, r.data, data[3:1003], "unaligned read")
	if r := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); r.errno != 0 || m.flushes.Load() != 1 {
		t.Fatalf("flush: %v, %d flushes", r.errno, m.flushes.Load())
	}
	if r := c.do(nbdproto.CmdCache, 0, 0, 1<<20, nil); r.errno != 0 {
		t.Fatalf("cache: %v", r.errno)
	}
	// TRIM 16 KiB at 1M: holes reported; data after still data.
	if r := c.do(nbdproto.CmdTrim, 0, 1<<20, 16<<10, nil); r.errno != 0 {
		t.Fatalf("trim: %v", r.errno)
	}
	r = c.do(nbdproto.CmdBlockStatus, 0, 1<<20, 64<<10, nil)
	want := []nbdproto.BlockDescriptor{bd(16<<10, nbdproto.StateHole|nbdproto.StateZero), bd(48<<10, 0)}
	if fmt.Sprint(r.descs) != fmt.Sprint(want) {
		t.Fatalf("block status after trim: %v, want %v", r.descs, want)
	}
	// REQ_ONE: only the first extent, within the request.
	r = c.do(nbdproto.CmdBlockStatus, nbdproto.CmdFlagReqOne, 1<<20, 64<<10, nil)
	if fmt.Sprint(r.descs) != fmt.Sprint(want[:1]) {
		t.Fatalf("block status REQ_ONE: %v", r.descs)
	}
	r = c.do(nbdproto.CmdBlockStatus, nbdproto.CmdFlagReqOne, 1<<20+4096, 4096, nil)
	if fmt.Sprint(r.descs) != fmt.Sprint([]nbdproto.BlockDescriptor{bd(4096, 3)}) {
		t.Fatalf("block status REQ_ONE, short: %v", r.descs)
	}
	// WRITE_ZEROES: with NO_HOLE, zero but allocated; FAST_ZERO refused
	// by this backend with NO_HOLE.
	if r := c.do(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole|nbdproto.CmdFlagFastZero, 1<<20+32<<10, 4096, nil); r.errno != nbdproto.ENOTSUP {
		t.Fatalf("fast zero: %v", r.errno)
	}
	if r := c.do(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole|nbdproto.CmdFlagFUA, 1<<20+32<<10, 4096, nil); r.errno != 0 {
		t.Fatalf("write zeroes: %v", r.errno)
	}
	r = c.do(nbdproto.CmdBlockStatus, 0, 1<<20+28<<10, 12<<10, nil)
	want = []nbdproto.BlockDescriptor{bd(4096, 0), bd(4096, nbdproto.StateZero), bd(4096, 0)}
	if fmt.Sprint(r.descs) != fmt.Sprint(want) {
		t.Fatalf("block status after write zeroes: %v, want %v", r.descs, want)
	}
	r = c.do(nbdproto.CmdRead, 0, 1<<20+32<<10, 4096, nil)
	mustEqual(t, r.data, make([]byte, 4096), "zeroed block")
}

// TestBlockStatusLimits: a fragmented map is answered with at most 511
// descriptors, all within the request.
func TestBlockStatusLimits(t *testing.T) {
	f, m := startMem(t, size)
	m.mu.Lock()
	for b := 0; b < 2048; b += 2 {
		m.hole[b], m.zero[b] = false, false
	}
	m.mu.Unlock()
	c := f.open("vol", true)
	r := c.do(nbdproto.CmdBlockStatus, 0, 0, 8<<20, nil)
	if len(r.descs) != 511 {
		t.Fatalf("%d descriptors", len(r.descs))
	}
	var sum uint64
	for i, d := range r.descs {
		if d.Length != 4096 || (d.Status == 0) != (i%2 == 0) {
			t.Fatalf("descriptor %d: %+v", i, d)
		}
		sum += uint64(d.Length)
	}
	if sum >= 8<<20 {
		t.Fatalf("descriptors cover %d bytes", sum)
	}
	// A backend that reports nothing: one descriptor of status 0.
	m.setHook(func(op string, off, length int64) error {
		if op == "status" {
			return errSkip
		}
		return nil
	})
	if r := c.do(nbdproto.CmdBlockStatus, 0, 0, 4096, nil); r.errno != nbdproto.EIO {
		t.Fatalf("status error: %v", r.errno)
	}
}

var errSkip = errors.New("injected")

func TestBackendPanicAndErrors(t *testing.T) {
	f, m := startMem(t, size)
	m.setHook(func(op string, off, length int64) error {
		switch off {
		case 4096:
			panic("backend bug")
		case 8192:
			return fmt.Errorf("disk: %w", unix.ENOSPC)
		case 12288:
			return &net.OpError{Op: "write", Err: unix.EDQUOT}
		case 16384:
			return errors.New("no errno at all")
		case 20480:
			return unix.ESHUTDOWN
		}
		return nil
	})
	for _, sr := range []bool{false, true} {
		c := f.open("vol", sr)
		for _, tc := range []struct {
			off  uint64
			want nbdproto.Errno
		}{{4096, nbdproto.EIO}, {8192, nbdproto.ENOSPC}, {12288, nbdproto.ENOSPC}, {16384, nbdproto.EIO}, {20480, nbdproto.ESHUTDOWN}, {0, 0}} {
			if r := c.do(nbdproto.CmdWrite, 0, tc.off, 4096, pattern(4096, 1)); r.errno != tc.want {
				t.Fatalf("write at %d: %v, want %v", tc.off, r.errno, tc.want)
			}
			if r := c.do(nbdproto.CmdRead, 0, tc.off, 4096, nil); r.errno != tc.want {
				t.Fatalf("read at %d: %v, want %v", tc.off, r.errno, tc.want)
			}
		}
	}
}

func TestErrnoOf(t *testing.T) {
	cases := []struct {
		err  error
		want nbdproto.Errno
	}{
		{nil, 0},
		{unix.EPERM, nbdproto.EPERM},
		{unix.EROFS, nbdproto.EPERM},
		{unix.EIO, nbdproto.EIO},
		{unix.ENOMEM, nbdproto.ENOMEM},
		{unix.EINVAL, nbdproto.EINVAL},
		{unix.ENOSPC, nbdproto.ENOSPC},
		{unix.EDQUOT, nbdproto.ENOSPC},
		{unix.EFBIG, nbdproto.ENOSPC},
		{unix.EOVERFLOW, nbdproto.EOVERFLOW},
		{unix.ENOTSUP, nbdproto.ENOTSUP},
		{unix.EOPNOTSUPP, nbdproto.ENOTSUP},
		{unix.ESHUTDOWN, nbdproto.ESHUTDOWN},
		{unix.EBADF, nbdproto.EIO},
		{unix.EAGAIN, nbdproto.EIO},
		{fmt.Errorf("pwrite at 4096: %w", unix.ENOSPC), nbdproto.ENOSPC},
		{fmt.Errorf("outer: %w", fmt.Errorf("inner: %w", unix.EINVAL)), nbdproto.EINVAL},
		{errors.Join(errors.New("a"), unix.EPERM), nbdproto.EPERM},
		{io.ErrUnexpectedEOF, nbdproto.EIO},
		{context.DeadlineExceeded, nbdproto.EIO},
	}
	for _, c := range cases {
		if got := nbd.ErrnoOf(c.err); got != c.want {
			t.Errorf("ErrnoOf(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

func TestMinBlockSize(t *testing.T) {
	m := newMem(size)
	m.minBlock = 512
	f := start(t, nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m}}})
	c := f.dial()
	c.greet(nbdproto.FlagCFixedNewstyle)
	for _, in := range c.goExport("vol", []nbdproto.InfoType{nbdproto.InfoBlockSize}) {
		if in.Type == nbdproto.InfoBlockSize && (in.Minimum != 512 || in.Preferred != 4096) {
			t.Fatalf("block size %+v", in)
		}
	}
	if r := c.do(nbdproto.CmdRead, 0, 100, 512, nil); r.errno != nbdproto.EINVAL {
		t.Fatalf("misaligned read: %v", r.errno)
	}
	if r := c.do(nbdproto.CmdWrite, 0, 512, 100, make([]byte, 100)); r.errno != nbdproto.EINVAL {
		t.Fatalf("misaligned write: %v", r.errno)
	}
	if r := c.do(nbdproto.CmdRead, 0, 512, 1024, nil); r.errno != 0 {
		t.Fatalf("aligned read: %v", r.errno)
	}
}

func TestUnixSocketAndServeConn(t *testing.T) {
	m := newMem(size)
	srv := nbd.NewServer(nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m}}})
	path := t.TempDir() + "/nbd.sock"
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c := &client{t: t, c: nc, pending: map[uint64]nbdproto.Request{}}
	c.greet(nbdproto.FlagCFixedNewstyle | nbdproto.FlagCNoZeroes)
	c.goExport("vol", nil)
	if r := c.do(nbdproto.CmdWrite, 0, 0, 4096, pattern(4096, 2)); r.errno != 0 {
		t.Fatal(r.errno)
	}

	// ServeConn over an in-memory pipe.
	a, b := net.Pipe()
	go srv.ServeConn(a)
	c2 := &client{t: t, c: b, pending: map[uint64]nbdproto.Request{}}
	c2.greet(nbdproto.FlagCFixedNewstyle | nbdproto.FlagCNoZeroes)
	c2.goExport("vol", nil)
	r := c2.do(nbdproto.CmdRead, 0, 0, 4096, nil)
	mustEqual(t, r.data, pattern(4096, 2), "read over a pipe")
	c2.send(nbdproto.CmdDisc, 0, 0, 0, nil)
	c2.expectClosed()

	if err := srv.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, nbd.ErrServerClosed) {
		t.Fatal(err)
	}
	c.expectClosed()
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := newMem(size)
	f := start(t, nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m}}, Metrics: nbd.NewMetrics(reg)})
	c := f.open("vol", true)
	for i := 0; i < 3; i++ {
		c.do(nbdproto.CmdWrite, 0, 0, 4096, pattern(4096, 1))
	}
	c.do(nbdproto.CmdRead, 0, 0, 8192, nil)
	c.do(nbdproto.CmdRead, 0, size, 8192, nil) // EINVAL
	c.do(nbdproto.CmdFlush, 0, 0, 0, nil)

	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	vals := map[string]float64{}
	for _, mf := range mfs {
		for _, mt := range mf.GetMetric() {
			var labels []string
			for _, lp := range mt.GetLabel() {
				labels = append(labels, lp.GetName()+"="+lp.GetValue())
			}
			key := mf.GetName() + "{" + strings.Join(labels, ",") + "}"
			switch {
			case mt.GetCounter() != nil:
				vals[key] = mt.GetCounter().GetValue()
			case mt.GetGauge() != nil:
				vals[key] = mt.GetGauge().GetValue()
			case mt.GetHistogram() != nil:
				vals[key] = float64(mt.GetHistogram().GetSampleCount())
			}
		}
	}
	for key, want := range map[string]float64{
		"keel_nbd_operations_total{command=write,export=vol}":         3,
		"keel_nbd_operations_total{command=read,export=vol}":          2,
		"keel_nbd_operations_total{command=flush,export=vol}":         1,
		"keel_nbd_written_bytes_total{export=vol}":                    3 * 4096,
		"keel_nbd_read_bytes_total{export=vol}":                       8192,
		"keel_nbd_errors_total{errno=EINVAL,export=vol}":              1,
		"keel_nbd_request_duration_seconds{command=write,export=vol}": 3,
		"keel_nbd_connections{export=vol}":                            1,
		"keel_nbd_requests_in_flight{export=vol}":                     0,
	} {
		if got, ok := vals[key]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", key, got, ok, want)
		}
	}
}

func bd(length, status uint32) nbdproto.BlockDescriptor {
	return nbdproto.BlockDescriptor{Length: length, Status: status}
}
