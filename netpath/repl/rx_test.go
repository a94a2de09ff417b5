package repl

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"testing"

	"keel/datapath/iobuf"
	"keel/netpath/replproto"
)

// chunkSrc is a readv test double over a byte stream: each call fills a,
// then b, with at most the next chunk size's bytes (cycling through
// chunks), as readv(2) does with what the socket holds.
type chunkSrc struct {
	data   []byte
	chunks []int
	i      int
	calls  int
}

func (c *chunkSrc) readv(a, b []byte) (int, error) {
	if len(a) == 0 && len(b) == 0 {
		panic("readv of nothing")
	}
	c.calls++
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	limit := len(c.data)
	if len(c.chunks) > 0 {
		limit = min(limit, max(1, c.chunks[c.i%len(c.chunks)]))
		c.i++
	}
	n := copy(a, c.data[:limit])
	n += copy(b, c.data[n:limit])
	c.data = c.data[n:]
	return n, nil
}

// testFrames encodes a stream of n frames of mixed types: WRITEs of
// varying sizes whose payloads name their frame, FLUSHes, TRIMs, PINGs.
func testFrames(r *rand.Rand, n int) ([]replproto.Header, [][]byte, []byte) {
	var hs []replproto.Header
	var ps [][]byte
	var wire []byte
	for i := range n {
		h := replproto.Header{Volume: 7, Epoch: 1, Seq: uint64(i + 1), Offset: uint64(i) * 4096}
		var p []byte
		switch r.IntN(6) {
		case 0:
			h.Type = replproto.TypeFlush
			h.Offset = 0
		case 1:
			h.Type, h.Length = replproto.TypeTrim, 8192
		case 2:
			h = replproto.Header{Type: replproto.TypePing, Aux: uint64(i)}
		default:
			h.Type = replproto.TypeWrite
			p = make([]byte, []int{4, 512, 4096, 4096, 8192, 65536}[r.IntN(6)])
			for j := range p {
				p[j] = byte(i*31 + j)
			}
			binary.LittleEndian.PutUint32(p, uint32(i))
			h.Length, h.PayloadCRC = uint32(len(p)), replproto.PayloadCRC(p)
		}
		var b [replproto.HeaderSize]byte
		h.Encode(&b)
		wire = append(append(wire, b[:]...), p...)
		hs, ps = append(hs, h), append(ps, p)
	}
	return hs, ps, wire
}

// readFrames reads frames off fr as readLoop does until an error.
func readFrames(t *testing.T, fr *frameReader) ([]replproto.Header, [][]byte, error) {
	var hs []replproto.Header
	var ps [][]byte
	for {
		if err := fr.header(); err != nil {
			return hs, ps, err
		}
		var h replproto.Header
		if err := h.Decode(&fr.hdr); err != nil {
			return hs, ps, err
		}
		var p []byte
		if n := h.PayloadLen(); n > 0 {
			buf := iobuf.Get(n)
			if err := fr.payload(buf.Bytes()); err != nil {
				buf.Release()
				return hs, ps, err
			}
			p = bytes.Clone(buf.Bytes())
			buf.Release()
		}
		hs, ps = append(hs, h), append(ps, p)
	}
}

func checkFrames(t *testing.T, wantH, gotH []replproto.Header, wantP, gotP [][]byte) {
	t.Helper()
	if len(gotH) != len(wantH) {
		t.Fatalf("read %d frames, want %d", len(gotH), len(wantH))
	}
	for i := range wantH {
		if gotH[i] != wantH[i] {
			t.Fatalf("frame %d: header %s, want %s", i, gotH[i].String(), wantH[i].String())
		}
		if !bytes.Equal(gotP[i], wantP[i]) {
			t.Fatalf("frame %d (%s): payload differs", i, wantH[i].String())
		}
	}
}

// TestFrameReaderChunks: whatever way the stream is cut into reads (a
// header in pieces, several frames in one read, a payload split across
// reads, a read ending inside the next header), frames come out intact and
// in order, and the stream ends with io.EOF.
func TestFrameReaderChunks(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	hs, ps, wire := testFrames(r, 300)
	for _, chunks := range [][]int{
		nil,  // everything at once
		{1},  // a byte at a time
		{63}, // headers never whole
		{64}, // exactly a header
		{65}, // a header and a byte
		{4096 + 64 + 10},
		{100, 5000, 7, 64, 4160, 3},
		{1 << 20},
	} {
		fr := &frameReader{}
		src := &chunkSrc{data: wire, chunks: chunks}
		fr.src = src.readv
		gotH, gotP, err := readFrames(t, fr)
		if err != io.EOF {
			t.Fatalf("chunks %v: stream ended with %v, want io.EOF", chunks, err)
		}
		checkFrames(t, hs, gotH, ps, gotP)
	}
}

// TestFrameReaderOneReadPerWrite: back-to-back WRITEs all in the socket
// take one read each (the payload and the next header together), plus the
// first header's and the final EOF.
func TestFrameReaderOneReadPerWrite(t *testing.T) {
	var wire []byte
	const n = 50
	for i := range n {
		p := make([]byte, 4096)
		h := replproto.Header{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Seq: uint64(i + 1),
			Length: 4096, PayloadCRC: replproto.PayloadCRC(p)}
		var b [replproto.HeaderSize]byte
		h.Encode(&b)
		wire = append(append(wire, b[:]...), p...)
	}
	src := &chunkSrc{data: wire}
	fr := &frameReader{src: src.readv}
	gotH, _, err := readFrames(t, fr)
	if err != io.EOF || len(gotH) != n {
		t.Fatalf("read %d frames, ended with %v", len(gotH), err)
	}
	if want := n + 2; src.calls != want {
		t.Errorf("%d reads for %d frames, want %d", src.calls, n, want)
	}
}

// TestFrameReaderTruncated: a stream that ends inside a header or a
// payload reports io.ErrUnexpectedEOF, at a frame boundary io.EOF.
func TestFrameReaderTruncated(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	_, _, wire := testFrames(r, 20)
	for _, cut := range []int{1, 63, 64 + 1, len(wire) - 1} {
		src := &chunkSrc{data: wire[:cut], chunks: []int{7, 300}}
		_, _, err := readFrames(t, &frameReader{src: src.readv})
		if !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, replproto.ErrShort) {
			t.Errorf("cut at %d: %v, want unexpected EOF", cut, err)
		}
	}
}

// TestFrameReaderSocket runs the raw readv path on a real TCP connection
// with the frames written in odd pieces.
func TestFrameReaderSocket(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r := rand.New(rand.NewPCG(5, 6))
	hs, ps, wire := testFrames(r, 400)
	go func() {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			return
		}
		defer c.Close()
		for rest := wire; len(rest) > 0; {
			k := min(len(rest), 1+r.IntN(9000))
			if _, err := c.Write(rest[:k]); err != nil {
				return
			}
			rest = rest[k:]
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fr := newFrameReader(c)
	if fr.raw != rawReadSupported {
		t.Fatalf("raw readv %v on a TCP connection, want %v", fr.raw, rawReadSupported)
	}
	gotH, gotP, err := readFrames(t, fr)
	if err != io.EOF {
		t.Fatalf("stream ended with %v, want io.EOF", err)
	}
	checkFrames(t, hs, gotH, ps, gotP)
}

// FuzzFrameReader: for any stream bytes and any cut into reads, the frame
// reader yields the frames a plain sequential decoder yields, and fails
// where it fails.
func FuzzFrameReader(f *testing.F) {
	r := rand.New(rand.NewPCG(7, 8))
	_, _, wire := testFrames(r, 6)
	f.Add(wire, []byte{1})
	f.Add(wire, []byte{63, 65, 200})
	f.Add(wire[:100], []byte{0})
	f.Add([]byte("KEEL"), []byte{2})
	f.Fuzz(func(t *testing.T, data, cuts []byte) {
		chunks := make([]int, len(cuts))
		for i, c := range cuts {
			chunks[i] = int(c)*37 + 1
		}
		src := &chunkSrc{data: data, chunks: chunks}
		gotH, gotP, gotErr := readFrames(t, &frameReader{src: src.readv})

		// Reference: header, then payload, with io.ReadFull.
		var wantH []replproto.Header
		var wantP [][]byte
		var wantErr error
		rd := bytes.NewReader(data)
		for {
			var b [replproto.HeaderSize]byte
			if _, err := io.ReadFull(rd, b[:]); err != nil {
				wantErr = err
				break
			}
			var h replproto.Header
			if err := h.Decode(&b); err != nil {
				wantErr = err
				break
			}
			var p []byte
			if n := h.PayloadLen(); n > 0 {
				if rd.Len() < n {
					wantErr = io.ErrUnexpectedEOF
					break
				}
				p = make([]byte, n)
				io.ReadFull(rd, p)
			}
			wantH, wantP = append(wantH, h), append(wantP, p)
		}
		checkFrames(t, wantH, gotH, wantP, gotP)
		if (gotErr == io.EOF) != (wantErr == io.EOF) || (gotErr == io.ErrUnexpectedEOF) != (wantErr == io.ErrUnexpectedEOF) {
			t.Fatalf("ended with %v, reference with %v", gotErr, wantErr)
		}
	})
}
