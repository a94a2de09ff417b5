package node

// A small pipelined NBD client for the tests: the handshake is
// netpath/nbdkernel's, transmission uses simple replies. Several goroutines
// may issue requests on one connection at once; replies are matched by
// handle. It is exported (TestNBDClient, DialTestNBD) for the black-box
// tests of package node_test, which see this file's exported names.

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"keel/netpath/nbdkernel"
	"keel/netpath/nbdproto"
)

// TestNBDClient is one NBD connection.
type TestNBDClient struct {
	conn net.Conn
	exp  nbdkernel.Export

	wmu sync.Mutex // serialises request writes

	mu      sync.Mutex // guards following
	next    uint64
	waiting map[uint64]*call
	err     error // the connection failed
	done    chan struct{}
}

type call struct {
	rbuf []byte // READ destination
	res  chan error
}

// DialTestNBD connects to export at addr.
func DialTestNBD(ctx context.Context, addr, export string) (*TestNBDClient, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	exp, err := nbdkernel.Handshake(conn, export)
	if err != nil {
		conn.Close()
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	c := &TestNBDClient{conn: conn, exp: exp, waiting: map[uint64]*call{}, done: make(chan struct{})}
	go c.readLoop()
	return c, nil
}

// mustDialNBD dials, retrying until the export is served (the node adds it
// a moment after the coordinator names the primary) or 30 s pass.
func mustDialNBD(t testing.TB, addr, export string) *TestNBDClient {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := DialTestNBD(ctx, addr, export)
		cancel()
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("NBD export %q at %s not served within 30s: %v", export, addr, err)
		}
		time.Sleep(50 * time.Millisecond) // polling a server in another goroutine's control
	}
}

// Close sends NBD_CMD_DISC and closes the connection.
func (c *TestNBDClient) Close() error {
	c.wmu.Lock()
	var b [nbdproto.RequestSize]byte
	nbdproto.Request{Type: nbdproto.CmdDisc}.Encode(&b)
	c.conn.Write(b[:])
	c.wmu.Unlock()
	return c.conn.Close()
}

func (c *TestNBDClient) readLoop() {
	defer close(c.done)
	var hdr [16]byte
	for {
		if _, err := io.ReadFull(c.conn, hdr[:]); err != nil {
			c.fail(err)
			return
		}
		rep, err := nbdproto.DecodeSimpleReply(hdr[:])
		if err != nil {
			c.fail(err)
			return
		}
		c.mu.Lock()
		cl := c.waiting[rep.Handle]
		delete(c.waiting, rep.Handle)
		c.mu.Unlock()
		if cl == nil {
			c.fail(fmt.Errorf("reply for unknown handle %d", rep.Handle))
			return
		}
		if rep.Errno == 0 && cl.rbuf != nil {
			if _, err := io.ReadFull(c.conn, cl.rbuf); err != nil {
				cl.res <- err
				c.fail(err)
				return
			}
		}
		if rep.Errno != 0 {
			cl.res <- nbdErr(rep.Errno)
		} else {
			cl.res <- nil
		}
	}
}

// nbdErr maps an NBD errno back to the unix errno it names.
func nbdErr(e nbdproto.Errno) error {
	switch e {
	case 1:
		return unix.EPERM
	case 5:
		return unix.EIO
	case 12:
		return unix.ENOMEM
	case 22:
		return unix.EINVAL
	case 28:
		return unix.ENOSPC
	case 75:
		return unix.EOVERFLOW
	case 95:
		return unix.ENOTSUP
	case 108:
		return unix.ESHUTDOWN
	}
	return fmt.Errorf("nbd errno %d", e)
}

func (c *TestNBDClient) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
	for h, cl := range c.waiting {
		cl.res <- fmt.Errorf("connection failed: %w", err)
		delete(c.waiting, h)
	}
}

func (c *TestNBDClient) do(cmd nbdproto.Cmd, flags nbdproto.CmdFlags, off int64, length uint32, payload, rbuf []byte) error {
	cl := &call{rbuf: rbuf, res: make(chan error, 1)}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.next++
	h := c.next
	c.waiting[h] = cl
	c.mu.Unlock()
	var b [nbdproto.RequestSize]byte
	nbdproto.Request{Flags: flags, Type: cmd, Handle: h, Offset: uint64(off), Length: length}.Encode(&b)
	c.wmu.Lock()
	_, err := c.conn.Write(b[:])
	if err == nil && payload != nil {
		_, err = c.conn.Write(payload)
	}
	c.wmu.Unlock()
	if err != nil {
		c.fail(err)
	}
	return <-cl.res
}

// Write writes p at off (with FUA if fua).
func (c *TestNBDClient) Write(p []byte, off int64, fua bool) error {
	var fl nbdproto.CmdFlags
	if fua {
		fl = nbdproto.CmdFlagFUA
	}
	return c.do(nbdproto.CmdWrite, fl, off, uint32(len(p)), p, nil)
}

// Read fills p from off.
func (c *TestNBDClient) Read(p []byte, off int64) error {
	return c.do(nbdproto.CmdRead, 0, off, uint32(len(p)), nil, p)
}

// Flush sends NBD_CMD_FLUSH.
func (c *TestNBDClient) Flush() error { return c.do(nbdproto.CmdFlush, 0, 0, 0, nil, nil) }

// Trim sends NBD_CMD_TRIM.
func (c *TestNBDClient) Trim(off int64, n uint32) error {
	return c.do(nbdproto.CmdTrim, 0, off, n, nil, nil)
}

// Zero sends NBD_CMD_WRITE_ZEROES (NO_HOLE if noHole).
func (c *TestNBDClient) Zero(off int64, n uint32, noHole bool) error {
	var fl nbdproto.CmdFlags
	if noHole {
		fl = nbdproto.CmdFlagNoHole
	}
	return c.do(nbdproto.CmdWriteZeroes, fl, off, n, nil, nil)
}
