package nbdkernel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"

	"github.com/pojntfx/go-nbd/pkg/backend"
	"github.com/pojntfx/go-nbd/pkg/protocol"
	"github.com/pojntfx/go-nbd/pkg/server"
)

// serveGoNBD runs go-nbd's server on one end of a pipe: a third-party
// implementation of the server side to check the handshake against.
func serveGoNBD(t *testing.T, mem []byte) net.Conn {
	t.Helper()
	c, s := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = server.Handle(s, []*server.Export{{Name: "disk", Backend: backend.NewMemoryBackend(mem)}}, &server.Options{SupportsMultiConn: true})
		s.Close()
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return c
}

func TestHandshakeAgainstGoNBD(t *testing.T) {
	mem := make([]byte, 1<<20)
	copy(mem[4096:], "keel was here")
	c := serveGoNBD(t, mem)
	e, err := Handshake(c, "disk")
	if err != nil {
		t.Fatal(err)
	}
	want := Export{Name: "disk", Size: 1 << 20, Flags: FlagHasFlags | FlagCanMultiConn, MinBlock: 1, PrefBlock: 4096, MaxBlock: 32 << 20}
	if e != want {
		t.Fatalf("export %+v, want %+v", e, want)
	}
	// The stream must now be at the start of the transmission phase: a
	// READ gets its reply, so the handshake read nothing too many.
	req := binary.BigEndian.AppendUint32(nil, protocol.TRANSMISSION_MAGIC_REQUEST)
	req = binary.BigEndian.AppendUint16(req, 0)
	req = binary.BigEndian.AppendUint16(req, protocol.TRANSMISSION_TYPE_REQUEST_READ)
	req = binary.BigEndian.AppendUint64(req, 77)
	req = binary.BigEndian.AppendUint64(req, 4096)
	req = binary.BigEndian.AppendUint32(req, 13)
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, 16+13)
	if _, err := io.ReadFull(c, reply); err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint32(reply[0:4]) != protocol.TRANSMISSION_MAGIC_REPLY || binary.BigEndian.Uint64(reply[8:16]) != 77 {
		t.Fatalf("reply header %x", reply[:16])
	}
	if string(reply[16:]) != "keel was here" {
		t.Fatalf("read %q", reply[16:])
	}
	bs, err := e.KernelBlockSize()
	if err != nil || bs != 4096 {
		t.Fatalf("kernel block size %d, %v", bs, err)
	}
}

func TestHandshakeUnknownExportGoNBD(t *testing.T) {
	c := serveGoNBD(t, make([]byte, 4096))
	_, err := Handshake(c, "nope")
	var re *ReplyError
	if !errors.As(err, &re) || re.Reply != protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN {
		t.Fatalf("err %v, want NBD_REP_ERR_UNKNOWN", err)
	}
}

// script is a scripted server: Handshake reads from what the server
// "sent" and writes into Sent.
type script struct {
	r    *bytes.Reader
	Sent bytes.Buffer
}

func (s *script) Read(p []byte) (int, error)  { return s.r.Read(p) }
func (s *script) Write(p []byte) (int, error) { return s.Sent.Write(p) }

type srv struct{ b []byte }

func (s *srv) greet(flags uint16) *srv {
	s.b = binary.BigEndian.AppendUint64(s.b, protocol.NEGOTIATION_MAGIC_OLDSTYLE)
	s.b = binary.BigEndian.AppendUint64(s.b, protocol.NEGOTIATION_MAGIC_OPTION)
	s.b = binary.BigEndian.AppendUint16(s.b, flags)
	return s
}

func (s *srv) reply(opt, typ uint32, data []byte) *srv {
	s.b = binary.BigEndian.AppendUint64(s.b, protocol.NEGOTIATION_MAGIC_REPLY)
	s.b = binary.BigEndian.AppendUint32(s.b, opt)
	s.b = binary.BigEndian.AppendUint32(s.b, typ)
	s.b = binary.BigEndian.AppendUint32(s.b, uint32(len(data)))
	s.b = append(s.b, data...)
	return s
}

func infoExport(size uint64, flags uint16) []byte {
	b := binary.BigEndian.AppendUint16(nil, protocol.NEGOTIATION_TYPE_INFO_EXPORT)
	b = binary.BigEndian.AppendUint64(b, size)
	return binary.BigEndian.AppendUint16(b, flags)
}

func infoBlock(minB, pref, maxB uint32) []byte {
	b := binary.BigEndian.AppendUint16(nil, protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE)
	b = binary.BigEndian.AppendUint32(b, minB)
	b = binary.BigEndian.AppendUint32(b, pref)
	return binary.BigEndian.AppendUint32(b, maxB)
}

const goOpt = protocol.NEGOTIATION_ID_OPTION_GO

func goodGo() *srv {
	return new(srv).greet(3).
		reply(goOpt, protocol.NEGOTIATION_TYPE_REPLY_INFO, append(binary.BigEndian.AppendUint16(nil, 1), "v1"...)).
		reply(goOpt, protocol.NEGOTIATION_TYPE_REPLY_INFO, infoExport(1<<30, FlagHasFlags|FlagSendFlush|FlagSendFUA|FlagCanMultiConn)).
		reply(goOpt, protocol.NEGOTIATION_TYPE_REPLY_INFO, infoBlock(512, 4096, 32<<20)).
		reply(goOpt, protocol.NEGOTIATION_TYPE_REPLY_ACK, nil)
}

func exportNameFallback(noZeroes bool) *srv {
	flags := uint16(1)
	if noZeroes {
		flags |= hsFlagNoZeroes
	}
	s := new(srv).greet(flags).reply(goOpt, repErrUnsup, nil)
	s.b = binary.BigEndian.AppendUint64(s.b, 8<<20)
	s.b = binary.BigEndian.AppendUint16(s.b, FlagHasFlags|FlagSendFlush)
	if !noZeroes {
		s.b = append(s.b, make([]byte, 124)...)
	}
	return s
}

func TestHandshakeScripted(t *testing.T) {
	sc := &script{r: bytes.NewReader(goodGo().b)}
	e, err := Handshake(sc, "v1")
	if err != nil {
		t.Fatal(err)
	}
	if e.Size != 1<<30 || e.Flags&FlagSendFlush == 0 || e.PrefBlock != 4096 || e.MinBlock != 512 {
		t.Fatalf("export %+v", e)
	}
	// What the client sent: flags FIXED_NEWSTYLE|NO_ZEROES, then GO with
	// the name and one info request, NBD_INFO_BLOCK_SIZE.
	want := binary.BigEndian.AppendUint32(nil, 3)
	want = appendGo(want, "v1")
	if !bytes.Equal(sc.Sent.Bytes(), want) {
		t.Fatalf("client sent %x\nwant %x", sc.Sent.Bytes(), want)
	}
	if n := len(want); n != 4+16+4+2+2+2 {
		t.Fatalf("NBD_OPT_GO request is %d bytes", n)
	}

	for _, noZeroes := range []bool{false, true} {
		sc := &script{r: bytes.NewReader(exportNameFallback(noZeroes).b)}
		e, err := Handshake(sc, "v1")
		if err != nil {
			t.Fatalf("no zeroes %v: %v", noZeroes, err)
		}
		if e.Size != 8<<20 || e.Flags != FlagHasFlags|FlagSendFlush {
			t.Fatalf("export %+v", e)
		}
		if sc.r.Len() != 0 {
			t.Fatalf("no zeroes %v: %d server bytes left unread", noZeroes, sc.r.Len())
		}
	}
}

func TestHandshakeRejects(t *testing.T) {
	cases := map[string]struct {
		s     *srv
		proto bool // want ErrProtocol (else *ReplyError or an I/O error)
	}{
		"bad magic": {s: &srv{b: bytes.Repeat([]byte{1}, 18)}, proto: true},
		"oldstyle": {s: func() *srv {
			s := new(srv)
			s.b = binary.BigEndian.AppendUint64(s.b, protocol.NEGOTIATION_MAGIC_OLDSTYLE)
			s.b = binary.BigEndian.AppendUint64(s.b, oldstyleMagic)
			s.b = append(s.b, 0, 0)
			return s
		}(), proto: true},
		"not fixed":         {s: new(srv).greet(0), proto: true},
		"ack without size":  {s: new(srv).greet(1).reply(goOpt, protocol.NEGOTIATION_TYPE_REPLY_ACK, nil), proto: true},
		"short export info": {s: new(srv).greet(1).reply(goOpt, protocol.NEGOTIATION_TYPE_REPLY_INFO, infoExport(1, 1)[:8]), proto: true},
		"wrong option":      {s: new(srv).greet(1).reply(6, protocol.NEGOTIATION_TYPE_REPLY_ACK, nil), proto: true},
		"huge reply":        {s: new(srv).greet(1).reply(goOpt, protocol.NEGOTIATION_TYPE_REPLY_INFO, make([]byte, maxOptionReplyBytes+1)), proto: true},
		"size zero":         {s: new(srv).greet(1).reply(goOpt, protocol.NEGOTIATION_TYPE_REPLY_INFO, infoExport(0, 1)).reply(goOpt, protocol.NEGOTIATION_TYPE_REPLY_ACK, nil), proto: true},
		"unknown reply":     {s: new(srv).greet(1).reply(goOpt, 77, nil), proto: true},
		"policy refusal":    {s: new(srv).greet(1).reply(goOpt, repFlagError|2, []byte("go away\x00"))},
		"truncated":         {s: &srv{b: goodGo().b[:40]}},
	}
	for name, c := range cases {
		_, err := Handshake(&script{r: bytes.NewReader(c.s.b)}, "v1")
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if got := errors.Is(err, ErrProtocol); got != c.proto {
			t.Errorf("%s: err %v, ErrProtocol %v want %v", name, err, got, c.proto)
		}
	}
	var re *ReplyError
	_, err := Handshake(&script{r: bytes.NewReader(cases["policy refusal"].s.b)}, "v1")
	if !errors.As(err, &re) || re.Msg != "go away?" {
		t.Fatalf("policy refusal: %v", err)
	}
}

func TestKernelBlockSize(t *testing.T) {
	for _, c := range []struct {
		e       Export
		want    uint32
		wantErr bool
	}{
		{e: Export{Size: 1 << 20}, want: 4096},
		{e: Export{Size: 1<<20 + 512}, want: 512},
		{e: Export{Size: 1 << 20, MinBlock: 1, PrefBlock: 4096, MaxBlock: 32 << 20}, want: 4096},
		{e: Export{Size: 1 << 20, MinBlock: 512, PrefBlock: 65536, MaxBlock: 32 << 20}, want: 4096},
		{e: Export{Size: 1 << 20, MinBlock: 1, PrefBlock: 1, MaxBlock: 32 << 20}, want: 512},
		{e: Export{Size: 1 << 20, MinBlock: 1, PrefBlock: 1024, MaxBlock: 32 << 20}, want: 1024},
		{e: Export{Size: 1 << 20, MinBlock: 8192, PrefBlock: 8192, MaxBlock: 32 << 20}, wantErr: true},
		{e: Export{Size: 1 << 20, MinBlock: 1, PrefBlock: 3000, MaxBlock: 32 << 20}, wantErr: true},
		{e: Export{Size: 1 << 20, MinBlock: 1, PrefBlock: 4096, MaxBlock: 1024}, wantErr: true},
	} {
		got, err := c.e.KernelBlockSize()
		if (err != nil) != c.wantErr || (!c.wantErr && got != c.want) {
			t.Errorf("%+v: got %d, %v; want %d (error %v)", c.e, got, err, c.want, c.wantErr)
		}
	}
}
