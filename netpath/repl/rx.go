package repl

import (
	"io"
	"net"
	"syscall"

	"keel/netpath/replproto"
)

// frameReader is the replica's reading half of a stream: a frame's header,
// then its payload straight into the caller's aligned buffer, with the next
// frame's header asked for in the same readv as the payload's last bytes.
// Back-to-back WRITE frames (a primary at depth) so take one read system
// call per frame instead of two, and no payload byte is copied in user
// space: the payload's bytes only ever land in the payload buffer, and the
// header scratch area is exactly one header long.
//
//	readv iov[0]: the payload's remaining bytes (the iobuf buffer)
//	      iov[1]: hdr[0:64], the next frame's header
//
// A readv that ends inside the next header leaves its first bytes in hdr
// (have counts them) and the header read completes it.
//
// The reader goroutine alone uses it.
type frameReader struct {
	conn net.Conn
	rv   rawReader // readv through conn's RawConn; unused without one
	raw  bool      // conn has a RawConn and this platform a readv
	hdr  [replproto.HeaderSize]byte
	have int // bytes of the next header already in hdr

	src func(a, b []byte) (int, error) // tests: stands for readv
}

func newFrameReader(conn net.Conn) *frameReader {
	fr := &frameReader{conn: conn}
	if sc, ok := conn.(syscall.Conn); ok && rawReadSupported {
		if rc, err := sc.SyscallConn(); err == nil {
			fr.rv.init(rc)
			fr.raw = true
		}
	}
	return fr
}

// readv reads into a then b (either may be empty, not both) with one read
// system call: readv(2) through the RawConn, or, without one, a Read into
// the first non-empty buffer. A read of nothing at the end of the stream
// returns io.EOF.
func (fr *frameReader) readv(a, b []byte) (int, error) {
	if fr.src != nil {
		return fr.src(a, b)
	}
	if fr.raw {
		return fr.rv.readv(a, b)
	}
	if len(a) == 0 {
		a = b
	}
	return fr.conn.Read(a)
}

// header reads the next frame's header; it is in fr.hdr until the next
// call of header or payload.
func (fr *frameReader) header() error {
	for fr.have < replproto.HeaderSize {
		n, err := fr.readv(fr.hdr[fr.have:], nil)
		fr.have += n
		if fr.have == replproto.HeaderSize {
			break
		}
		if err != nil {
			if err == io.EOF && fr.have > 0 {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	fr.have = 0
	return nil
}

// payload fills p, the current frame's payload, and keeps what comes of
// the next frame's header in fr.hdr. The current header must have been
// decoded: fr.hdr is overwritten.
func (fr *frameReader) payload(p []byte) error {
	for len(p) > 0 {
		n, err := fr.readv(p, fr.hdr[:])
		if n > len(p) {
			fr.have = n - len(p)
			n = len(p)
		}
		p = p[n:]
		if len(p) == 0 {
			return nil // an error repeats on the next read
		}
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}
