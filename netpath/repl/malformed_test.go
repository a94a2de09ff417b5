package repl_test

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// rawStream is a hand-driven replication stream, for sending what a Peer
// never would.
type rawStream struct {
	t *testing.T
	c net.Conn
}

func dialRaw(t *testing.T, r *replica, self, to uint64) (*rawStream, replproto.Header) {
	t.Helper()
	return dialRawHello(t, r, replproto.Header{Type: replproto.TypeHello, Aux: self, Offset: to})
}

func dialRawHello(t *testing.T, r *replica, hello replproto.Header) (*rawStream, replproto.Header) {
	t.Helper()
	c, err := net.Dial("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s := &rawStream{t: t, c: c}
	s.send(hello, nil)
	h, err := s.read()
	if err != nil {
		t.Fatalf("reading the HELLO answer: %v", err)
	}
	return s, h
}

func (s *rawStream) sendBytes(b []byte) {
	s.t.Helper()
	if _, err := s.c.Write(b); err != nil {
		s.t.Fatalf("write: %v", err)
	}
}

func (s *rawStream) send(h replproto.Header, payload []byte) {
	s.t.Helper()
	var b [replproto.HeaderSize]byte
	h.Encode(&b)
	s.sendBytes(append(b[:], payload...))
}

func (s *rawStream) read() (replproto.Header, error) {
	s.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [replproto.HeaderSize]byte
	var h replproto.Header
	if _, err := io.ReadFull(s.c, b[:]); err != nil {
		return h, err
	}
	return h, h.Decode(&b)
}

// expectClosed: the server closed the stream (EOF or reset, not a timeout).
func (s *rawStream) expectClosed(what string) {
	s.t.Helper()
	_, err := s.read()
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		s.t.Fatalf("%s: stream not closed by the server (read: %v)", what, err)
	}
}

// TestMalformedFramesStayLocal: each kind of bad input closes (or NACKs
// within) only its own stream; a well-behaved stream on the same server
// keeps working, and no partial write reaches the disk.
func TestMalformedFramesStayLocal(t *testing.T) {
	const vol = 1
	app := newMemApplier()
	app.addVolume(vol, 1<<20, 1)
	reg := prometheus.NewRegistry()
	r := startReplica(t, 2, app, repl.ServerConfig{Metrics: repl.NewMetrics(reg)})
	good := newPeer(t, 1, r, repl.PeerConfig{})
	ctx := context.Background()
	check := func(what string) {
		t.Helper()
		if err := good.Send(ctx, &repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Offset: 0, Payload: []byte(what)}); err != nil {
			t.Fatalf("after %s: the good stream failed: %v", what, err)
		}
	}
	write := replproto.Header{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Seq: 1, Offset: 4096, Length: 4}

	closing := []struct {
		name, metric string
		bytes        func() []byte
	}{
		{"bad magic", "bad_magic", func() []byte {
			var b [replproto.HeaderSize]byte
			write.Encode(&b)
			copy(b[:], "XXXX")
			return b[:]
		}},
		{"bad header checksum", "header_checksum", func() []byte {
			var b [replproto.HeaderSize]byte
			write.Encode(&b)
			b[33] ^= 0x10
			return b[:]
		}},
		{"oversize", "oversize", func() []byte {
			h := write
			h.Length = replproto.MaxPayload + 1
			var b [replproto.HeaderSize]byte
			h.Encode(&b)
			return b[:]
		}},
		{"unknown type", "unknown_type", func() []byte {
			h := write
			h.Type = 99
			var b [replproto.HeaderSize]byte
			h.Encode(&b)
			return b[:]
		}},
		{"degraded and sync together", "bad_field", func() []byte {
			h := write
			h.Flags = replproto.FlagDegraded | replproto.FlagSync
			var b [replproto.HeaderSize]byte
			h.Encode(&b)
			return b[:]
		}},
		{"an unknown flag", "bad_field", func() []byte {
			h := write
			h.Flags = 1 << 7
			var b [replproto.HeaderSize]byte
			h.Encode(&b)
			return b[:]
		}},
		{"reply type from a primary", "unexpected_type", func() []byte {
			var b [replproto.HeaderSize]byte
			(&replproto.Header{Type: replproto.TypeAck, Volume: vol, Seq: 1}).Encode(&b)
			return b[:]
		}},
	}
	for _, c := range closing {
		s, h := dialRaw(t, r, 9, 2)
		if h.Type != replproto.TypeHelloAck || h.Aux != 2 {
			t.Fatalf("%s: handshake answer %v", c.name, h)
		}
		s.sendBytes(c.bytes())
		s.expectClosed(c.name)
		if v := metricLabel(t, reg, "keel_repl_server_malformed_total", "what", c.metric); v < 1 {
			t.Errorf("%s: malformed{what=%q} = %v", c.name, c.metric, v)
		}
		check(c.name)
	}

	// A corrupt payload: NACK for that frame, the stream stays up.
	s, _ := dialRaw(t, r, 9, 2)
	bad := write
	bad.PayloadCRC = replproto.PayloadCRC([]byte("good")) ^ 1
	s.send(bad, []byte("evil"))
	h, err := s.read()
	if err != nil || h.Type != replproto.TypeNack || h.Code != replproto.ReasonBadChecksum || h.Seq != 1 {
		t.Fatalf("corrupt payload: got %v, %v; want NACK bad checksum for seq 1", h, err)
	}
	s.send(replproto.Header{Type: replproto.TypePing, Aux: 42}, nil)
	if h, err := s.read(); err != nil || h.Type != replproto.TypePong || h.Aux != 42 {
		t.Fatalf("PING after a NACK: %v, %v", h, err)
	}
	// A type reserved for catch-up, not implemented yet: NACK, stream stays.
	cu := write
	cu.Type, cu.Seq, cu.PayloadCRC = replproto.TypeCatchupWrite, 2, replproto.PayloadCRC([]byte("copy"))
	s.send(cu, []byte("copy"))
	if h, err := s.read(); err != nil || h.Type != replproto.TypeNack || h.Code != replproto.ReasonUnsupported || h.Seq != 2 {
		t.Fatalf("catch-up frame: %v, %v; want NACK unsupported", h, err)
	}
	// A well-formed write on the same raw stream still works.
	ok := write
	ok.Seq, ok.PayloadCRC = 3, replproto.PayloadCRC([]byte("fine"))
	s.send(ok, []byte("fine"))
	if h, err := s.read(); err != nil || h.Type != replproto.TypeAck || h.Seq != 3 {
		t.Fatalf("good frame after bad ones: %v, %v", h, err)
	}

	// A write whose payload never fully arrives is not applied.
	_, _, before := app.snapshot(vol)
	s2, _ := dialRaw(t, r, 10, 2)
	part := write
	part.Offset, part.Length, part.PayloadCRC = 65536, 8, replproto.PayloadCRC([]byte("partial!"))
	var hb [replproto.HeaderSize]byte
	part.Encode(&hb)
	s2.sendBytes(append(hb[:], "part"...))
	s2.c.(*net.TCPConn).CloseWrite()     // EOF in the middle of the payload
	s2.expectClosed("truncated payload") // the server has given up on the stream
	check("a truncated payload")
	data, _, after := app.snapshot(vol)
	if string(data[65536:65540]) == "part" || after.writes != before.writes+1 {
		t.Fatalf("a truncated frame was applied (writes %d -> %d)", before.writes, after.writes)
	}

	// A reply connection for a split stream that does not exist.
	s4, h4 := dialRawHello(t, r, replproto.Header{Type: replproto.TypeHello, Flags: replproto.FlagReplies, Volume: 12345, Aux: 12, Offset: 2})
	if h4.Type != replproto.TypeNack || h4.Code != replproto.ReasonInvalid {
		t.Fatalf("reply connection for an unknown stream: %v", h4)
	}
	s4.expectClosed("unknown split stream")

	// HELLO for another node: NACK wrong node, then closed.
	s3, h3 := dialRaw(t, r, 11, 77)
	if h3.Type != replproto.TypeNack || h3.Code != replproto.ReasonWrongNode {
		t.Fatalf("HELLO to the wrong node: %v", h3)
	}
	s3.expectClosed("wrong node")
	check("wrong node")
}
