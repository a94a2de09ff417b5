package nbd_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"keel/netpath/nbd"
	"keel/netpath/nbdproto"
)

const blk = 4096

// memBackend is an in-memory nbd.Backend: a byte slice with a status per
// 4 KiB block (hole, zero), for tests. hook, when set, runs before every
// operation and can block, fail or panic it.
type memBackend struct {
	mu       sync.Mutex // guards data, hole, zero
	data     []byte
	hole     []bool // block not allocated (trimmed, or never written)
	zero     []bool // block known to read as zeroes
	ro       bool
	minBlock int

	flushes atomic.Int64
	hook    atomic.Pointer[func(op string, off, length int64) error]
}

func newMem(size int) *memBackend {
	n := (size + blk - 1) / blk
	m := &memBackend{data: make([]byte, size), hole: make([]bool, n), zero: make([]bool, n), minBlock: 1}
	for i := range m.hole {
		m.hole[i], m.zero[i] = true, true
	}
	return m
}

// at returns a copy of n bytes at off.
func (m *memBackend) at(off, n int) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.data[off:off+n]...)
}

// put stores data at off, as a write would.
func (m *memBackend) put(off int, data []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], data)
	m.mark(int64(off), int64(len(data)), false, false)
}

func (m *memBackend) setHook(f func(op string, off, length int64) error) { m.hook.Store(&f) }

func (m *memBackend) run(op string, off, length int64) error {
	if f := m.hook.Load(); f != nil && *f != nil {
		return (*f)(op, off, length)
	}
	return nil
}

func (m *memBackend) Size() int64       { return int64(len(m.data)) }
func (m *memBackend) BlockSize() int    { return 4096 }
func (m *memBackend) MinBlockSize() int { return m.minBlock }
func (m *memBackend) ReadOnly() bool    { return m.ro }

func (m *memBackend) ReadAt(p []byte, off int64) error {
	if err := m.run("read", off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}

func (m *memBackend) WriteAt(p []byte, off int64, fua bool) error {
	if err := m.run("write", off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	m.mark(off, int64(len(p)), false, false)
	return nil
}

func (m *memBackend) mark(off, length int64, hole, zero bool) {
	for b := off / blk; b*blk < off+length; b++ {
		m.hole[b], m.zero[b] = hole, zero
	}
}

func (m *memBackend) Flush() error {
	if err := m.run("flush", 0, 0); err != nil {
		return err
	}
	m.flushes.Add(1)
	return nil
}

func (m *memBackend) Trim(off, length int64, fua bool) error {
	if err := m.run("trim", off, length); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	// Only whole blocks become holes, as a file system would punch them.
	first, end := (off+blk-1)/blk, (off+length)/blk
	for b := first; b < end; b++ {
		clear(m.data[b*blk : (b+1)*blk])
		m.hole[b], m.zero[b] = true, true
	}
	return nil
}

func (m *memBackend) WriteZeroes(off, length int64, noHole, fastZero, fua bool) error {
	if err := m.run("zero", off, length); err != nil {
		return err
	}
	if fastZero && noHole {
		return fmt.Errorf("mem: zeroing without a hole is a write: %w", unix.ENOTSUP)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	m.mark(off, length, !noHole, true)
	return nil
}

func (m *memBackend) Cache(off, length int64) error { return m.run("cache", off, length) }

func (m *memBackend) BlockStatus(off, length int64, fn func(int64, bool, bool) bool) error {
	if err := m.run("status", off, length); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for pos := off; pos < off+length; {
		b := pos / blk
		n := (b+1)*blk - pos
		if !fn(n, m.hole[b], m.zero[b]) {
			return nil
		}
		pos += n
	}
	return nil
}

// fixture is a server on loopback TCP with one or more exports.
type fixture struct {
	t    testing.TB
	srv  *nbd.Server
	addr string
	done chan error // Serve's result
}

func start(t testing.TB, cfg nbd.Config) *fixture {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, srv: nbd.NewServer(cfg), addr: l.Addr().String(), done: make(chan error, 1)}
	go func() { f.done <- f.srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := f.srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-f.done; !errors.Is(err, nbd.ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	return f
}

func startMem(t testing.TB, size int) (*fixture, *memBackend) {
	m := newMem(size)
	return start(t, nbd.Config{Exports: []nbd.Export{{Name: "vol", Description: "test volume", Backend: m}}}), m
}

// client is a hand-written NBD client speaking raw bytes.
type client struct {
	t       testing.TB
	c       net.Conn
	sr      bool
	size    uint64
	flags   nbdproto.TransmissionFlags
	handle  uint64
	pending map[uint64]nbdproto.Request
}

func (f *fixture) dial() *client {
	f.t.Helper()
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	return &client{t: f.t, c: c, pending: make(map[uint64]nbdproto.Request)}
}

func (c *client) write(b []byte) {
	c.t.Helper()
	if _, err := c.c.Write(b); err != nil {
		c.t.Fatalf("client write: %v", err)
	}
}

func (c *client) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.c, b); err != nil {
		c.t.Fatalf("client read %d bytes: %v", n, err)
	}
	return b
}

// greet reads the greeting and answers with flags.
func (c *client) greet(flags nbdproto.ClientFlags) nbdproto.HandshakeFlags {
	c.t.Helper()
	hf, err := nbdproto.DecodeGreeting(c.read(nbdproto.GreetingSize))
	if err != nil {
		c.t.Fatal(err)
	}
	c.write(binary.BigEndian.AppendUint32(nil, uint32(flags)))
	return hf
}

type optReply struct {
	rep  nbdproto.Rep
	data []byte
}

// option sends an option and returns its replies up to the final one.
func (c *client) option(opt nbdproto.Option, data []byte) []optReply {
	c.t.Helper()
	c.write(nbdproto.AppendOption(nil, opt, data))
	var out []optReply
	for {
		h, err := nbdproto.DecodeOptionReplyHeader(c.read(nbdproto.OptionReplyHeaderSize))
		if err != nil {
			c.t.Fatal(err)
		}
		if h.Option != opt {
			c.t.Fatalf("reply to %v for option %v", h.Option, opt)
		}
		r := optReply{rep: h.Reply, data: c.read(int(h.Length))}
		out = append(out, r)
		if h.Reply == nbdproto.RepAck || h.Reply.IsError() {
			return out
		}
	}
}

// final returns the last reply's type.
func final(rs []optReply) nbdproto.Rep { return rs[len(rs)-1].rep }

// open does the handshake up to GO on export name, with structured
// replies and base:allocation when sr.
func (f *fixture) open(name string, sr bool) *client {
	c := f.dial()
	c.greet(nbdproto.FlagCFixedNewstyle | nbdproto.FlagCNoZeroes)
	if sr {
		if r := final(c.option(nbdproto.OptStructuredReply, nil)); r != nbdproto.RepAck {
			f.t.Fatalf("STRUCTURED_REPLY: %v", r)
		}
		rs := c.option(nbdproto.OptSetMetaContext, nbdproto.AppendMetaContextRequest(nil,
			nbdproto.MetaContextRequest{Name: name, Queries: []string{nbdproto.ContextBaseAllocation}}))
		if len(rs) != 2 || rs[0].rep != nbdproto.RepMetaContext || final(rs) != nbdproto.RepAck {
			f.t.Fatalf("SET_META_CONTEXT: %+v", rs)
		}
		c.sr = true
	}
	c.goExport(name, nil)
	return c
}

func (c *client) goExport(name string, infos []nbdproto.InfoType) []nbdproto.Info {
	c.t.Helper()
	rs := c.option(nbdproto.OptGo, nbdproto.AppendInfoRequest(nil, nbdproto.InfoRequest{Name: name, Infos: infos}))
	if final(rs) != nbdproto.RepAck {
		c.t.Fatalf("GO %q: %v %q", name, final(rs), rs[len(rs)-1].data)
	}
	var out []nbdproto.Info
	for _, r := range rs[:len(rs)-1] {
		in, err := nbdproto.DecodeInfo(r.data)
		if err != nil {
			c.t.Fatal(err)
		}
		if in.Type == nbdproto.InfoExport {
			c.size, c.flags = in.Size, in.Flags
		}
		out = append(out, in)
	}
	return out
}

// send sends a request (and the payload of a write); it returns the handle.
func (c *client) send(typ nbdproto.Cmd, flags nbdproto.CmdFlags, off uint64, length uint32, payload []byte) uint64 {
	c.t.Helper()
	c.handle++
	req := nbdproto.Request{Type: typ, Flags: flags, Handle: c.handle, Offset: off, Length: length}
	var b [nbdproto.RequestSize]byte
	req.Encode(&b)
	c.write(append(b[:], payload...))
	c.pending[c.handle] = req
	return c.handle
}

type reply struct {
	handle uint64
	errno  nbdproto.Errno
	msg    string
	data   []byte
	descs  []nbdproto.BlockDescriptor
	typ    nbdproto.ReplyType // of the chunk, when structured
	simple bool
}

// recv reads one reply (all chunks of it).
func (c *client) recv() reply {
	c.t.Helper()
	magic := binary.BigEndian.Uint32(c.read(4))
	switch magic {
	case nbdproto.SimpleReplyMagic:
		rest := c.read(nbdproto.SimpleReplySize - 4)
		r := reply{simple: true, errno: nbdproto.Errno(binary.BigEndian.Uint32(rest[0:4])), handle: binary.BigEndian.Uint64(rest[4:12])}
		req, ok := c.pending[r.handle]
		if !ok {
			c.t.Fatalf("reply for unknown handle %d", r.handle)
		}
		delete(c.pending, r.handle)
		if c.sr && req.Type == nbdproto.CmdRead {
			c.t.Fatalf("simple reply to a READ with structured replies negotiated")
		}
		if req.Type == nbdproto.CmdRead && r.errno == 0 {
			r.data = c.read(int(req.Length))
		}
		return r
	case nbdproto.StructuredReplyMagic:
		if !c.sr {
			c.t.Fatal("structured reply not negotiated")
		}
		var r reply
		for {
			raw := append(binary.BigEndian.AppendUint32(nil, magic), c.read(nbdproto.ChunkHeaderSize-4)...)
			h, err := nbdproto.DecodeChunkHeader(raw)
			if err != nil {
				c.t.Fatal(err)
			}
			r.handle, r.typ = h.Handle, h.Type
			req, ok := c.pending[h.Handle]
			if !ok {
				c.t.Fatalf("chunk for unknown handle %d", h.Handle)
			}
			p := c.read(int(h.Length))
			switch h.Type {
			case nbdproto.ReplyTypeNone:
			case nbdproto.ReplyTypeOffsetData:
				if off := binary.BigEndian.Uint64(p); off != req.Offset || len(p)-8 != int(req.Length) {
					c.t.Fatalf("OFFSET_DATA at %d of %d bytes for a read at %d of %d", off, len(p)-8, req.Offset, req.Length)
				}
				r.data = p[8:]
			case nbdproto.ReplyTypeBlockStatus:
				id, descs, err := nbdproto.DecodeBlockStatus(p)
				if err != nil || id != 1 {
					c.t.Fatalf("block status payload: id %d, %v", id, err)
				}
				r.descs = descs
			case nbdproto.ReplyTypeError:
				r.errno = nbdproto.Errno(binary.BigEndian.Uint32(p[0:4]))
				ml := int(binary.BigEndian.Uint16(p[4:6]))
				if 6+ml != len(p) {
					c.t.Fatalf("error chunk message length %d in %d bytes", ml, len(p))
				}
				r.msg = string(p[6:])
			default:
				c.t.Fatalf("unexpected chunk type %d", h.Type)
			}
			if h.Flags&nbdproto.ReplyFlagDone != 0 {
				delete(c.pending, h.Handle)
				return r
			}
			magic = binary.BigEndian.Uint32(c.read(4))
		}
	}
	c.t.Fatalf("bad reply magic %#x", magic)
	return reply{}
}

// do sends one request and waits for its reply.
func (c *client) do(typ nbdproto.Cmd, flags nbdproto.CmdFlags, off uint64, length uint32, payload []byte) reply {
	c.t.Helper()
	h := c.send(typ, flags, off, length, payload)
	r := c.recv()
	if r.handle != h {
		c.t.Fatalf("reply for handle %d, want %d", r.handle, h)
	}
	return r
}

// expectClosed checks that the server closed the connection.
func (c *client) expectClosed() {
	c.t.Helper()
	c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	for {
		n, err := c.c.Read(b[:])
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				c.t.Fatal("connection still open")
			}
			return
		}
		if n > 0 {
			continue // trailing replies
		}
	}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func mustEqual(t testing.TB, got, want []byte, what string) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: data differs (got %d bytes, want %d)", what, len(got), len(want))
	}
}
