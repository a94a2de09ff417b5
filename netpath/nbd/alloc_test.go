package nbd_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"keel/datapath/iobuf"
	"keel/netpath/nbd"
	"keel/netpath/nbdproto"
)

// rawLoad drives READ and WRITE requests over a connection with
// preallocated buffers, so that whatever it allocates is the server's.
type rawLoad struct {
	c       net.Conn
	sr      bool
	qd      int
	msg     []byte // qd writes then qd reads, headers and payloads
	replies []byte
	handle  uint64
}

func newRawLoad(c *client, qd int) *rawLoad {
	l := &rawLoad{c: c.c, sr: c.sr, qd: qd}
	var h [nbdproto.RequestSize]byte
	for i := 0; i < qd; i++ {
		nbdproto.Request{Type: nbdproto.CmdWrite, Handle: uint64(i), Offset: uint64(i) * 4096, Length: 4096}.Encode(&h)
		l.msg = append(append(l.msg, h[:]...), pattern(4096, byte(i))...)
	}
	for i := 0; i < qd; i++ {
		nbdproto.Request{Type: nbdproto.CmdRead, Handle: uint64(qd + i), Offset: uint64(i) * 4096, Length: 4096}.Encode(&h)
		l.msg = append(l.msg, h[:]...)
	}
	readReply := nbdproto.SimpleReplySize + 4096
	if l.sr {
		readReply = nbdproto.ChunkHeaderSize + 8 + 4096
	}
	l.replies = make([]byte, qd*nbdproto.SimpleReplySize+qd*readReply)
	return l
}

// round sends the writes, waits for their replies, then the reads. With
// qd 1 it is one write and one read, each waited for.
func (l *rawLoad) round() error {
	wlen := l.qd * (nbdproto.RequestSize + 4096)
	if _, err := l.c.Write(l.msg[:wlen]); err != nil {
		return err
	}
	n := l.qd * nbdproto.SimpleReplySize
	if _, err := io.ReadFull(l.c, l.replies[:n]); err != nil {
		return err
	}
	for i := 0; i < l.qd; i++ {
		if e := binary.BigEndian.Uint32(l.replies[i*16+4:]); e != 0 {
			return fmt.Errorf("write errno %d", e)
		}
	}
	if _, err := l.c.Write(l.msg[wlen:]); err != nil {
		return err
	}
	if _, err := io.ReadFull(l.c, l.replies[n:]); err != nil {
		return err
	}
	return nil
}

// TestSteadyStateAllocs: serving READ and WRITE requests allocates
// nothing per request once the connection is warm, at QD1 and at QD8
// (replies batched),
// with simple and structured replies. The bound is 0.05 allocations per
// round rather than 0: sync.Pool (under iobuf) may drop a buffer at a GC,
// and the next Get then allocates one.
func TestSteadyStateAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	for _, tc := range []struct {
		sr, sync bool
		qd       int
	}{{false, false, 1}, {true, false, 1}, {false, false, 8}, {true, false, 8}, {true, true, 1}, {false, true, 8}} {
		t.Run(fmt.Sprintf("structured=%v/sync-backend=%v/qd=%d", tc.sr, tc.sync, tc.qd), func(t *testing.T) {
			// With metrics: recording must not allocate either.
			var be nbd.Backend = newMem(size)
			if tc.sync {
				be = &syncMem{memBackend: be.(*memBackend)}
			}
			f := start(t, nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: be}}, Metrics: nbd.NewMetrics(nil)})
			c := f.open("vol", tc.sr)
			c.c.SetDeadline(time.Time{})
			l := newRawLoad(c, tc.qd)
			for i := 0; i < 200; i++ {
				if err := l.round(); err != nil {
					t.Fatal(err)
				}
			}
			var err error
			allocs := testing.AllocsPerRun(2000, func() {
				if e := l.round(); e != nil {
					err = e
				}
			})
			if err != nil {
				t.Fatal(err)
			}
			// Check the data read back (replies may come in any order), so
			// that the load measures real work.
			rep := l.replies[tc.qd*nbdproto.SimpleReplySize:]
			for i := 0; i < tc.qd; i++ {
				hl := nbdproto.SimpleReplySize
				if tc.sr {
					hl = nbdproto.ChunkHeaderSize + 8
				}
				handle := binary.BigEndian.Uint64(rep[8:16])
				if !bytes.Equal(rep[hl:hl+4096], pattern(4096, byte(handle-uint64(tc.qd)))) {
					t.Fatalf("read %d returned other data", handle)
				}
				rep = rep[hl+4096:]
			}
			t.Logf("%.3f allocations per round of %d writes and %d reads", allocs, tc.qd, tc.qd)
			if allocs > 0.05 {
				t.Fatalf("%.3f allocations per round, want none", allocs)
			}
		})
	}
}

// FuzzTransmission feeds arbitrary bytes to a server in the transmission
// phase (structured replies, base:allocation negotiated). Whatever the
// bytes, the server must not panic or hang, must end the connection when
// the client goes away, and must release every buffer it took.
func FuzzTransmission(f *testing.F) {
	var h [nbdproto.RequestSize]byte
	seed := func(reqs ...nbdproto.Request) []byte {
		var b []byte
		for _, r := range reqs {
			r.Encode(&h)
			b = append(b, h[:]...)
			if r.Type == nbdproto.CmdWrite && r.Length <= 8192 {
				b = append(b, make([]byte, r.Length)...)
			}
		}
		return b
	}
	f.Add(seed(nbdproto.Request{Type: nbdproto.CmdRead, Handle: 1, Length: 4096}))
	f.Add(seed(nbdproto.Request{Type: nbdproto.CmdWrite, Handle: 1, Offset: 512, Length: 1000},
		nbdproto.Request{Type: nbdproto.CmdFlush, Handle: 2}))
	f.Add(seed(nbdproto.Request{Type: nbdproto.CmdBlockStatus, Flags: nbdproto.CmdFlagReqOne, Handle: 3, Length: 1 << 20},
		nbdproto.Request{Type: nbdproto.CmdTrim, Handle: 4, Offset: 4096, Length: 8192},
		nbdproto.Request{Type: nbdproto.CmdWriteZeroes, Flags: nbdproto.CmdFlagNoHole | nbdproto.CmdFlagFastZero, Handle: 5, Length: 4096}))
	f.Add(seed(nbdproto.Request{Type: 99, Handle: 6}, nbdproto.Request{Type: nbdproto.CmdDisc}))
	f.Add(seed(nbdproto.Request{Type: nbdproto.CmdWrite, Handle: 7, Offset: 1 << 40, Length: 4096}))
	f.Add(seed(nbdproto.Request{Type: nbdproto.CmdWrite, Handle: 8, Length: 40 << 20}))
	f.Add([]byte("not a request at all, just text that is long enough"))
	f.Fuzz(func(t *testing.T, data []byte) {
		m := newMem(1 << 20)
		srv := nbd.NewServer(nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m}}, MaxInFlight: 4})
		before := iobuf.ReadStats().Outstanding
		a, b := net.Pipe()
		done := make(chan struct{})
		go func() {
			srv.ServeConn(a)
			close(done)
		}()
		c := &client{t: t, c: b, pending: map[uint64]nbdproto.Request{}}
		b.SetDeadline(time.Now().Add(10 * time.Second))
		c.greet(nbdproto.FlagCFixedNewstyle | nbdproto.FlagCNoZeroes)
		c.option(nbdproto.OptStructuredReply, nil)
		c.option(nbdproto.OptSetMetaContext, nbdproto.AppendMetaContextRequest(nil,
			nbdproto.MetaContextRequest{Name: "vol", Queries: []string{nbdproto.ContextBaseAllocation}}))
		c.goExport("vol", nil)
		drained := make(chan struct{})
		go func() {
			io.Copy(io.Discard, b)
			close(drained)
		}()
		b.Write(data)
		b.Close()
		<-drained
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server did not end the connection")
		}
		if after := iobuf.ReadStats().Outstanding; after != before {
			t.Fatalf("%d buffers outstanding after the connection ended, %d before", after, before)
		}
	})
}

// FuzzHandshake feeds arbitrary bytes to a server as the client's side of
// the handshake (after the greeting). The server must not panic or hang
// and must end the connection when the client goes away.
func FuzzHandshake(f *testing.F) {
	flags := []byte{0, 0, 0, 3}
	opt := func(o nbdproto.Option, data []byte) []byte { return nbdproto.AppendOption(nil, o, data) }
	join := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	f.Add(join(flags, opt(nbdproto.OptList, nil), opt(nbdproto.OptAbort, nil)))
	f.Add(join(flags, opt(nbdproto.OptStructuredReply, nil),
		opt(nbdproto.OptListMetaContext, nbdproto.AppendMetaContextRequest(nil, nbdproto.MetaContextRequest{Name: "vol", Queries: []string{"base:"}})),
		opt(nbdproto.OptSetMetaContext, nbdproto.AppendMetaContextRequest(nil, nbdproto.MetaContextRequest{Name: "vol", Queries: []string{nbdproto.ContextBaseAllocation}})),
		opt(nbdproto.OptInfo, nbdproto.AppendInfoRequest(nil, nbdproto.InfoRequest{Name: "vol", Infos: []nbdproto.InfoType{0, 1, 2, 3}})),
		opt(nbdproto.OptGo, nbdproto.AppendInfoRequest(nil, nbdproto.InfoRequest{Name: "vol"}))))
	f.Add(join(flags, opt(nbdproto.OptExportName, []byte("vol"))))
	f.Add(join(flags, opt(nbdproto.OptStartTLS, nil), opt(77, []byte("x")), opt(nbdproto.OptGo, []byte{0, 0, 0, 200})))
	f.Add(join([]byte{0, 0, 0, 1}, opt(nbdproto.OptInfo, nil)[:12], []byte{0, 1, 0, 0}))
	f.Fuzz(func(t *testing.T, data []byte) {
		srv := nbd.NewServer(nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: newMem(1 << 20)}}, HandshakeTimeout: 5 * time.Second})
		before := iobuf.ReadStats().Outstanding
		a, b := net.Pipe()
		done := make(chan struct{})
		go func() {
			srv.ServeConn(a)
			close(done)
		}()
		drained := make(chan struct{})
		go func() {
			io.Copy(io.Discard, b)
			close(drained)
		}()
		b.SetDeadline(time.Now().Add(10 * time.Second))
		b.Write(data)
		b.Close()
		<-drained
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server did not end the connection")
		}
		if after := iobuf.ReadStats().Outstanding; after != before {
			t.Fatalf("%d buffers outstanding after the connection ended, %d before", after, before)
		}
	})
}

// BenchmarkServer measures the server's own cost per request over
// loopback TCP with an in-memory backend: 4 KiB writes and reads at QD1
// and QD32.
func BenchmarkServer(b *testing.B) {
	for _, qd := range []int{1, 32} {
		b.Run(fmt.Sprintf("qd=%d", qd), func(b *testing.B) {
			f, _ := startMem(b, size)
			c := f.open("vol", true)
			c.c.SetDeadline(time.Time{})
			l := newRawLoad(c, qd)
			b.ReportAllocs()
			b.SetBytes(int64(2 * qd * 4096))
			for b.Loop() {
				if err := l.round(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*2*qd), "ns/request")
		})
	}
}
