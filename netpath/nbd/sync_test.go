package nbd_test

import (
	"sync/atomic"
	"testing"

	"keel/netpath/nbd"
	"keel/netpath/nbdproto"
)

// syncMem is a memBackend that also implements nbd.SyncBackend and counts
// which calls the server made.
type syncMem struct {
	*memBackend
	syncReads, syncWrites   atomic.Int64
	asyncReads, asyncWrites atomic.Int64
}

var _ nbd.SyncBackend = (*syncMem)(nil)

func (m *syncMem) ReadAt(p []byte, off int64) error {
	m.asyncReads.Add(1)
	return m.memBackend.ReadAt(p, off)
}

func (m *syncMem) WriteAt(p []byte, off int64, fua bool) error {
	m.asyncWrites.Add(1)
	return m.memBackend.WriteAt(p, off, fua)
}

func (m *syncMem) ReadAtSync(p []byte, off int64) error {
	m.syncReads.Add(1)
	return m.memBackend.ReadAt(p, off)
}

func (m *syncMem) WriteAtSync(p []byte, off int64, fua bool) error {
	m.syncWrites.Add(1)
	return m.memBackend.WriteAt(p, off, fua)
}

func (m *syncMem) counts() [4]int64 {
	return [4]int64{m.syncReads.Load(), m.syncWrites.Load(), m.asyncReads.Load(), m.asyncWrites.Load()}
}

// A request alone on its connection takes the backend's synchronous calls.
func TestSyncAtDepthOne(t *testing.T) {
	m := &syncMem{memBackend: newMem(1 << 20)}
	for _, add := range []bool{false, true} { // NewServer's exports, and AddExport's
		var f *fixture
		if add {
			f = start(t, nbd.Config{})
			if err := f.srv.AddExport(nbd.Export{Name: "vol", Backend: m}); err != nil {
				t.Fatal(err)
			}
		} else {
			f = start(t, nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m}}})
		}
		before := m.counts()
		c := f.open("vol", true)
		for i := range 20 {
			data := pattern(4096, byte(i))
			off := uint64(i%8) * 4096
			if r := c.do(nbdproto.CmdWrite, nbdproto.CmdFlagFUA*nbdproto.CmdFlags(i%2), off, 4096, data); r.errno != 0 {
				t.Fatalf("write: %v", r.errno)
			}
			r := c.do(nbdproto.CmdRead, 0, off, 4096, nil)
			if r.errno != 0 {
				t.Fatalf("read: %v", r.errno)
			}
			mustEqual(t, r.data, data, "read back")
		}
		got := m.counts()
		for i := range got {
			got[i] -= before[i]
		}
		if got != [4]int64{20, 20, 0, 0} {
			t.Errorf("AddExport %v: sync reads, writes, async reads, writes = %v; want 20 20 0 0", add, got)
		}
	}
}

// With other requests in flight on the connection, reads and writes go
// through ReadAt and WriteAt. The three requests arrive in one write, so
// the reader has the others buffered and executes none itself.
func TestAsyncAtDepth(t *testing.T) {
	m, entered, gate := gatedFirstRead()
	f := start(t, nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m}}})
	c := f.open("vol", true)
	data := pattern(4096, 9)
	var msg []byte
	for i, q := range []nbdproto.Request{
		{Type: nbdproto.CmdRead, Offset: 0, Length: 4096},
		{Type: nbdproto.CmdWrite, Offset: 8192, Length: 4096},
		{Type: nbdproto.CmdRead, Offset: 8192, Length: 4096},
	} {
		q.Handle = uint64(100 + i)
		var h [nbdproto.RequestSize]byte
		q.Encode(&h)
		msg = append(msg, h[:]...)
		if q.Type == nbdproto.CmdWrite {
			msg = append(msg, data...)
		}
		c.pending[q.Handle] = q
	}
	c.write(msg)
	<-entered // request 100 is in the backend
	// Requests 101 and 102 complete while 100 is held.
	seen := map[uint64]bool{}
	for range 2 {
		r := c.recv()
		if r.errno != 0 {
			t.Fatalf("reply %d: %v", r.handle, r.errno)
		}
		seen[r.handle] = true
	}
	if !seen[101] || !seen[102] {
		t.Fatalf("replies %v, want 101 and 102 first", seen)
	}
	close(gate)
	if r := c.recv(); r.handle != 100 || r.errno != 0 {
		t.Fatalf("reply %d (%v), want 100", r.handle, r.errno)
	}
	got := m.counts()
	// Request 100 may have started before the worker of 101 took it (sync)
	// or after (async); 101 and 102 always found 100 running.
	if got[1] != 0 || got[3] != 1 || got[0]+got[2] != 2 || got[2] < 1 {
		t.Errorf("sync reads, writes, async reads, writes = %v; want the write and read behind the held read through AIO", got)
	}
}

// A client at depth 1 gets its requests executed by the reader itself, on
// the synchronous path; a request blocked there holds up only the reading
// of the client's next requests, which are then served as usual.
func TestInlineAtDepthOne(t *testing.T) {
	m, entered, gate := gatedFirstRead()
	f := start(t, nbd.Config{Exports: []nbd.Export{{Name: "vol", Backend: m}}})
	c := f.open("vol", true)
	h1 := c.send(nbdproto.CmdRead, 0, 0, 4096, nil)
	<-entered
	h2 := c.send(nbdproto.CmdWrite, 0, 8192, 4096, pattern(4096, 3))
	close(gate)
	for _, h := range []uint64{h1, h2} {
		if r := c.recv(); r.handle != h || r.errno != 0 {
			t.Fatalf("reply %d (%v), want %d: the reader executes the first before reading the second", r.handle, r.errno, h)
		}
	}
	if got := m.counts(); got != [4]int64{1, 1, 0, 0} {
		t.Errorf("sync reads, writes, async reads, writes = %v; want 1 1 0 0", got)
	}
}

// gatedFirstRead is a sync-capable backend whose first read at offset 0
// closes entered and then waits until gate is closed.
func gatedFirstRead() (m *syncMem, entered, gate chan struct{}) {
	m = &syncMem{memBackend: newMem(1 << 20)}
	entered, gate = make(chan struct{}), make(chan struct{})
	var first atomic.Bool
	m.setHook(func(op string, off, length int64) error {
		if op == "read" && off == 0 && first.CompareAndSwap(false, true) {
			close(entered)
			<-gate
		}
		return nil
	})
	return m, entered, gate
}
