package nbd

import (
	"net"
	"time"
)

// wire is a connection's byte stream in the transmission phase. Read is
// called by the reader only; writev by the goroutine holding the writer
// role only; the other methods from anywhere.
type wire interface {
	// Read reads into p like io.Reader; io.EOF when the peer is done.
	Read(p []byte) (int, error)
	// writev writes every byte of bufs.
	writev(bufs [][]byte) error
	// stopReading makes a blocked Read, and every later one, fail.
	stopReading()
	// shutdown makes blocked and later reads and writes fail.
	shutdown()
	// close releases the connection; no goroutine may use it afterwards.
	close() error
}

// newWire returns the transmission wire for c.
//
// Measured and rejected: taking TCP and Unix sockets out of Go's poller
// (a dup in blocking mode, read(2)/writev(2) directly) saves the EAGAIN
// read and the epoll_wait per request, but a goroutine blocked in read(2)
// holds its P until sysmon retakes it, and at QD32 on two cores that
// stalled the workers: 4 KiB random reads fell to about half the IOPS of
// the poller version in the same run.
func newWire(c net.Conn) wire {
	return &netWire{c: c, base: make([][]byte, 0, 64)}
}

// netWire drives a net.Conn through Go's poller.
type netWire struct {
	c    net.Conn
	base [][]byte    // backing array of iov, reused; owned by the writer role
	iov  net.Buffers // consumed by WriteTo
}

func (w *netWire) Read(p []byte) (int, error) { return w.c.Read(p) }

func (w *netWire) writev(bufs [][]byte) error {
	w.base = append(w.base[:0], bufs...)
	w.iov = w.base
	_, err := w.iov.WriteTo(w.c) // consumes w.iov; net.Buffers uses writev(2) on sockets
	clear(w.base)
	return err
}

func (w *netWire) stopReading() { w.c.SetReadDeadline(time.Now()) }
func (w *netWire) shutdown()    { w.c.Close() }
func (w *netWire) close() error { return w.c.Close() }
