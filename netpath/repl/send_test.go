package repl_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// wireReplica is a replica that checks the wire itself: it completes the
// handshake (split or not) as node 2, then reads every frame and fails the
// test unless windowed frames arrive in sequence order 1, 2, 3, ... with
// payloads that match their checksums and carry their own sequence number
// (see stamp). It acknowledges every frame and answers PINGs. With pause,
// it stops reading for a moment now and then, so that the primary's small
// socket buffers fill and its writes come back short.
type wireReplica struct {
	t      *testing.T
	l      net.Listener
	pause  bool
	frames atomic.Int64
	bad    chan error // the first violation

	mu     sync.Mutex // guards following
	conns  []net.Conn
	waitN  int64         // reached is closed once frames reaches waitN
	waitCh chan struct{} // nil: nobody waits
}

// reached returns a channel closed once the replica has received n frames.
func (r *wireReplica) reached(n int64) <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	ch := make(chan struct{})
	if r.frames.Load() >= n {
		close(ch)
		return ch
	}
	r.waitN, r.waitCh = n, ch
	return ch
}

func (r *wireReplica) received() {
	n := r.frames.Add(1)
	r.mu.Lock()
	if r.waitCh != nil && n >= r.waitN {
		close(r.waitCh)
		r.waitCh = nil
	}
	r.mu.Unlock()
}

func newWireReplica(t *testing.T, pause bool) *wireReplica {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &wireReplica{t: t, l: l, pause: pause, bad: make(chan error, 1)}
	t.Cleanup(func() {
		l.Close()
		r.mu.Lock()
		for _, c := range r.conns {
			c.Close()
		}
		r.mu.Unlock()
	})
	go r.accept()
	return r
}

func (r *wireReplica) addr() string { return r.l.Addr().String() }

func (r *wireReplica) fail(err error) {
	select {
	case r.bad <- err:
	default:
	}
}

// check fails the test if the replica saw a violation.
func (r *wireReplica) check() {
	r.t.Helper()
	select {
	case err := <-r.bad:
		r.t.Fatal(err)
	default:
	}
}

func (r *wireReplica) accept() {
	splits := make(map[uint64]chan net.Conn)
	var smu sync.Mutex
	for {
		c, err := r.l.Accept()
		if err != nil {
			return
		}
		r.mu.Lock()
		r.conns = append(r.conns, c)
		r.mu.Unlock()
		var b [replproto.HeaderSize]byte
		var h replproto.Header
		if _, err := io.ReadFull(c, b[:]); err != nil {
			continue
		}
		if err := h.Decode(&b); err != nil || h.Type != replproto.TypeHello {
			r.fail(fmt.Errorf("handshake: %v %v", h, err))
			continue
		}
		(&replproto.Header{Type: replproto.TypeHelloAck, Aux: 2}).Encode(&b)
		if _, err := c.Write(b[:]); err != nil {
			continue
		}
		switch {
		case h.Flags&replproto.FlagReplies != 0:
			smu.Lock()
			ch := splits[h.Volume]
			delete(splits, h.Volume)
			smu.Unlock()
			if ch != nil {
				ch <- c
			}
		case h.Flags&replproto.FlagSplit != 0:
			ch := make(chan net.Conn, 1)
			smu.Lock()
			splits[h.Volume] = ch
			smu.Unlock()
			go func() {
				select {
				case rc := <-ch:
					r.serve(c, rc)
				case <-time.After(10 * time.Second):
					r.fail(fmt.Errorf("no reply connection"))
				}
			}()
		default:
			go r.serve(c, c)
		}
	}
}

// serve reads frames from c and answers on rc.
func (r *wireReplica) serve(c, rc net.Conn) {
	var b [replproto.HeaderSize]byte
	var h replproto.Header
	var payload []byte
	next := uint64(1)
	for n := 0; ; n++ {
		if r.pause && n%16 == 15 {
			time.Sleep(2 * time.Millisecond) // not synchronisation: it lets the sender's buffers fill
		}
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return
		}
		if err := h.Decode(&b); err != nil {
			r.fail(fmt.Errorf("frame %d: %w", n, err))
			return
		}
		var reply replproto.Header
		switch {
		case h.Type == replproto.TypePing:
			reply = replproto.Header{Type: replproto.TypePong, Aux: h.Aux}
		case h.Type.Windowed():
			if h.Seq != next {
				r.fail(fmt.Errorf("frame %d: sequence %d, want %d: frames out of order on the wire", n, h.Seq, next))
				return
			}
			next++
			if k := h.PayloadLen(); k > 0 {
				if cap(payload) < k {
					payload = make([]byte, k)
				}
				payload = payload[:k]
				if _, err := io.ReadFull(c, payload); err != nil {
					return
				}
				if replproto.PayloadCRC(payload) != h.PayloadCRC {
					r.fail(fmt.Errorf("frame seq %d: payload checksum mismatch: a write resumed at the wrong place", h.Seq))
					return
				}
				if got := binary.LittleEndian.Uint64(payload); got != h.Offset {
					r.fail(fmt.Errorf("frame seq %d at %d carries the payload stamped %d", h.Seq, h.Offset, got))
					return
				}
			}
			r.received()
			reply = replproto.Header{Type: replproto.TypeAck, Volume: h.Volume, Epoch: h.Epoch, Seq: h.Seq}
		default:
			r.fail(fmt.Errorf("unexpected %s", h.Type))
			return
		}
		reply.Encode(&b)
		if _, err := rc.Write(b[:]); err != nil {
			return
		}
	}
}

// stamp fills p with a pattern that starts with off, so the replica can
// tell whose payload a frame carries.
func stamp(p []byte, off uint64) {
	for i := range p {
		p[i] = byte(off>>3) + byte(i*7)
	}
	binary.LittleEndian.PutUint64(p, off)
}

// smallBufDial dials with tiny socket buffers: writes of a few frames come
// back short or EAGAIN, so frames go partly by a submitter and partly by
// the sender goroutine.
func smallBufDial(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4096) })
		return serr
	}}
	return d.DialContext(ctx, network, addr)
}

// TestSendOrderAcrossWriters: many goroutines submit at once, so frames go
// out written directly by their submitters, batched by whoever holds the
// writer role, resumed by the sender goroutine after short writes (tiny
// socket buffers, a replica that pauses) and, with zero-copy on, large
// frames sent by the sender goroutine between small ones. Every frame
// reaches the replica whole and in sequence order, and every op is
// acknowledged exactly once.
func TestSendOrderAcrossWriters(t *testing.T) {
	for _, c := range []struct {
		name  string
		zcMin int
		dial  func(context.Context, string, string) (net.Conn, error)
		pause bool
	}{
		{"writev", -1, nil, false},
		{"writev-short-writes", -1, smallBufDial, true},
		{"zerocopy-mixed", 16 << 10, nil, false},
		{"zerocopy-mixed-short-writes", 16 << 10, smallBufDial, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := newWireReplica(t, c.pause)
			p := repl.NewPeer(repl.PeerConfig{Self: 1, Node: 2, Addr: r.addr(), Dial: c.dial,
				ZeroCopyMin: c.zcMin, WindowFrames: 32, FrameTimeout: 20 * time.Second})
			defer p.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := p.WaitUp(ctx); err != nil {
				t.Fatal(err)
			}
			const writers, each = 8, 150
			var done atomic.Int64
			var wg sync.WaitGroup
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					fin := make(chan *repl.Op, 1)
					for i := range each {
						size := 4096
						if (w+i)%5 == 0 {
							size = 64 << 10 // zero-copy when it is on
						}
						off := uint64(w*each+i) * 4096
						buf := make([]byte, size)
						stamp(buf, off)
						calls := 0
						op := &repl.Op{Req: repl.Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Offset: off, Payload: buf},
							Done: func(op *repl.Op) { calls++; fin <- op }}
						p.Submit(ctx, op)
						<-fin
						if calls != 1 {
							t.Errorf("Done called %d times", calls)
						}
						if err := op.Err(); err != nil {
							t.Errorf("write %d/%d: %v", w, i, err)
							return
						}
						done.Add(1)
					}
				}()
			}
			wg.Wait()
			r.check()
			if got := done.Load(); got != writers*each {
				t.Fatalf("%d writes acknowledged, want %d", got, writers*each)
			}
			if got := r.frames.Load(); got != writers*each {
				t.Fatalf("replica received %d frames, want %d", got, writers*each)
			}
		})
	}
}

// TestCloseDuringDirectSends: the Peer closes while submitters are in the
// middle of writing their own frames (tiny socket buffers and a pausing
// replica keep writes in progress). Close returns, every op finishes
// exactly once, with success or an error, and whatever reached the replica
// was whole and in order.
func TestCloseDuringDirectSends(t *testing.T) {
	for round := range 5 {
		r := newWireReplica(t, true)
		p := repl.NewPeer(repl.PeerConfig{Self: 1, Node: 2, Addr: r.addr(), Dial: smallBufDial,
			ZeroCopyMin: -1, WindowFrames: 64, FrameTimeout: 20 * time.Second})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := p.WaitUp(ctx); err != nil {
			t.Fatal(err)
		}
		const writers = 8
		var calls, failed atomic.Int64
		var wg sync.WaitGroup
		stop := make(chan struct{})
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				fin := make(chan *repl.Op, 1)
				buf := make([]byte, 16<<10)
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					off := uint64(w<<20+i) * 4096
					stamp(buf, off)
					op := &repl.Op{Req: repl.Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Offset: off, Payload: buf},
						Done: func(op *repl.Op) { calls.Add(1); fin <- op }}
					p.Submit(ctx, op)
					if (<-fin).Err() != nil {
						failed.Add(1)
					}
				}
			}()
		}
		select {
		case <-r.reached(int64(20 * (round + 1))):
		case <-ctx.Done():
			t.Fatal("no frames reached the replica")
		}
		closed := make(chan struct{})
		go func() { p.Close(); close(closed) }()
		select {
		case <-closed:
		case <-ctx.Done():
			t.Fatal("Close did not return")
		}
		close(stop)
		wg.Wait() // every submitter's op finished: Done was called for each
		cancel()
		r.check()
		if failed.Load() == 0 && calls.Load() > 0 {
			// Submitters loop until stop, so at least one op met the closed Peer.
			t.Fatalf("round %d: no op failed after Close", round)
		}
	}
}
