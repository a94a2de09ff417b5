package repl_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"keel/datapath/iobuf"
	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// silentReplica completes the handshake as node, then never answers: like
// a peer behind a cut link, where TCP stalls without an error. With
// readAll it drains what it receives; without, it reads nothing more, so
// the primary's socket buffers fill and its writes block.
func silentReplica(t *testing.T, node uint64, readAll bool) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	var mu sync.Mutex
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			go func() {
				var b [replproto.HeaderSize]byte
				if _, err := io.ReadFull(c, b[:]); err != nil {
					return
				}
				(&replproto.Header{Type: replproto.TypeHelloAck, Aux: node}).Encode(&b)
				c.Write(b[:])
				if readAll {
					io.Copy(io.Discard, c)
				}
			}()
		}
	}()
	return l.Addr().String()
}

// TestStalledPeerTimesOut: an idle stream to a silent peer is declared lost
// when its PING goes unanswered; a write to it fails with ErrTimeout (never
// succeeds); both are reported through OnPeerLost.
func TestStalledPeerTimesOut(t *testing.T) {
	addr := silentReplica(t, 2, true)
	lost := make(chan repl.Loss, 8)
	p := repl.NewPeer(repl.PeerConfig{Self: 1, Node: 2, Addr: addr,
		FrameTimeout: 300 * time.Millisecond, PingInterval: 50 * time.Millisecond,
		BackoffMin: 10 * time.Millisecond, BackoffMax: 20 * time.Millisecond,
		OnPeerLost: func(l repl.Loss) { lost <- l }})
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.WaitUp(ctx); err != nil {
		t.Fatal(err)
	}
	l := within(t, lost, 10*time.Second, "OnPeerLost for an idle stalled stream")
	if !errors.Is(l.Err, repl.ErrTimeout) || l.Volume != 0 {
		t.Fatalf("idle loss %+v, want a timeout of the stream", l)
	}
	if err := p.WaitUp(ctx); err != nil {
		t.Fatal(err)
	}
	err := p.Send(ctx, &repl.Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Payload: make([]byte, 4096)})
	if !errors.Is(err, repl.ErrPeerLost) || !errors.Is(err, repl.ErrTimeout) {
		t.Fatalf("write to a stalled peer: %v, want ErrPeerLost/ErrTimeout", err)
	}
	if l := within(t, lost, 10*time.Second, "OnPeerLost after the write"); !errors.Is(l.Err, repl.ErrTimeout) {
		t.Fatalf("loss %+v", l)
	}
}

// TestBlockedWriteTimesOut: a peer that stops reading fills the socket
// buffers, so the writer blocks in writev; the watchdog fails the stream
// and the frame when the frame goes unanswered past its deadline.
func TestBlockedWriteTimesOut(t *testing.T) {
	addr := silentReplica(t, 2, false)
	lost := make(chan repl.Loss, 8)
	p := repl.NewPeer(repl.PeerConfig{Self: 1, Node: 2, Addr: addr,
		FrameTimeout: 300 * time.Millisecond, PingInterval: time.Hour, BackoffMin: time.Hour,
		OnPeerLost: func(l repl.Loss) { lost <- l }})
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.WaitUp(ctx); err != nil {
		t.Fatal(err)
	}
	big := make([]byte, replproto.MaxPayload) // far more than the socket buffers hold
	err := p.Send(ctx, &repl.Request{Type: replproto.TypeWrite, Volume: 1, Epoch: 1, Payload: big})
	if !errors.Is(err, repl.ErrPeerLost) {
		t.Fatalf("write to a peer that does not read: %v", err)
	}
	within(t, lost, 10*time.Second, "OnPeerLost")
}

// TestStreamChurnRace closes and reopens hundreds of replication streams
// concurrently while writes flow on all of them: server-side connections
// are cut in bursts and some Peers are closed and replaced. Run under
// -race. Afterwards every slot on the replica holds its last acknowledged
// write or a later one: a reconnect never lets an older frame land last.
func TestStreamChurnRace(t *testing.T) {
	streams, dur := 200, 1500*time.Millisecond
	if testing.Short() {
		streams, dur = 50, 500*time.Millisecond
	}
	const vol, slot = 1, 512
	app := newMemApplier()
	app.addVolume(vol, streams*slot, 1)
	r := startReplica(t, 2, app, repl.ServerConfig{Workers: 8})
	var losses atomic.Int64
	cfg := func(i int) repl.PeerConfig {
		zc := 0 // half the streams split (zero-copy on), half on one connection
		if i%2 == 1 {
			zc = -1
		}
		return repl.PeerConfig{Self: uint64(100 + i), Node: 2, Addr: r.addr, ZeroCopyMin: zc,
			BackoffMin: time.Millisecond, BackoffMax: 20 * time.Millisecond,
			OnPeerLost: func(repl.Loss) { losses.Add(1) }}
	}
	peers := make([]atomic.Pointer[repl.Peer], streams)
	for i := range peers {
		peers[i].Store(repl.NewPeer(cfg(i)))
	}
	stop := make(chan struct{})
	timer := time.AfterFunc(dur, func() { close(stop) })
	defer timer.Stop()

	acked := make([]uint64, streams)
	var sent, failed atomic.Int64
	var wg sync.WaitGroup
	for i := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			payload := make([]byte, 8)
			req := repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Offset: uint64(i * slot), Payload: payload}
			for seq := uint64(1); ; seq++ {
				select {
				case <-stop:
					return
				default:
				}
				p := peers[i].Load()
				binary.LittleEndian.PutUint64(payload, seq)
				sent.Add(1)
				err := p.Send(context.Background(), &req)
				switch {
				case err == nil:
					acked[i] = seq
				case errors.Is(err, repl.ErrPeerLost), errors.Is(err, repl.ErrPeerDown), errors.Is(err, repl.ErrClosed):
					failed.Add(1)
					ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
					p.WaitUp(ctx) // a closed or still-down peer: try again with the current one
					cancel()
				default:
					t.Errorf("slot %d: %v", i, err)
					return
				}
			}
		}()
	}
	// Cut server-side connections in bursts: after each burst wait for as
	// many new streams to be accepted before cutting again.
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(1, 2))
		for {
			select {
			case <-stop:
				return
			default:
			}
			n := r.l.cut(1 + rng.IntN(60))
			for range n {
				select {
				case <-r.l.accepted:
				case <-stop:
					return
				}
			}
		}
	}()
	// Close and replace a tenth of the Peers at a time, round after round,
	// each round once the previous round's replacements are up.
	wg.Add(1)
	go func() {
		defer wg.Done()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() {
			<-stop
			cancel()
		}()
		for round := 0; ; round++ {
			var fresh []*repl.Peer
			for i := round % 10; i < streams; i += 10 {
				p := repl.NewPeer(cfg(i))
				fresh = append(fresh, p)
				peers[i].Swap(p).Close()
			}
			for _, p := range fresh {
				if p.WaitUp(ctx) != nil {
					return
				}
			}
		}
	}()
	wg.Wait()
	for i := range peers {
		peers[i].Load().Close()
	}
	r.srv.Close()
	data, _, _ := app.snapshot(vol)
	okSlots := 0
	for i := range streams {
		got := binary.LittleEndian.Uint64(data[i*slot:])
		if got < acked[i] {
			t.Errorf("slot %d holds write %d, but write %d was acknowledged", i, got, acked[i])
		}
		if acked[i] > 0 {
			okSlots++
		}
	}
	t.Logf("%d streams: %d writes sent, %d failed by churn, %d stream losses reported, %d connections accepted, %d slots with acknowledged writes",
		streams, sent.Load(), failed.Load(), losses.Load(), r.l.total.Load(), okSlots)
	if failed.Load() == 0 || losses.Load() == 0 {
		t.Fatal("no churn happened")
	}
}

// TestReplyDeadlineAfterIdle: replies written by the server's write loop
// (a burst) must not leave a write deadline behind: the first reply after
// an idle spell longer than WriteTimeout is written directly, and a stale
// deadline would make it fail and kill the stream.
func TestReplyDeadlineAfterIdle(t *testing.T) {
	const vol, size = 7, 1 << 20
	app := newMemApplier()
	app.addVolume(vol, size, 1)
	const wt = 200 * time.Millisecond
	r := startReplica(t, 2, app, repl.ServerConfig{WriteTimeout: wt})
	p := newPeer(t, 1, r, repl.PeerConfig{WindowFrames: 64, ZeroCopyMin: -1})
	buf := iobuf.Get(4096)
	defer buf.Release()
	burst := func(n int) {
		t.Helper()
		ops := make([]repl.Op, n)
		var wg sync.WaitGroup
		wg.Add(n)
		for i := range ops {
			ops[i] = repl.Op{Req: repl.Request{Type: replproto.TypeWrite, Volume: vol, Epoch: 1, Offset: uint64(i%256) * 4096, Payload: buf.Bytes()},
				Done: func(*repl.Op) { wg.Done() }}
			p.Submit(context.Background(), &ops[i])
		}
		wg.Wait()
		for i := range ops {
			if err := ops[i].Err(); err != nil {
				t.Fatalf("write %d of %d: %v", i, n, err)
			}
		}
	}
	burst(64)
	// Let the write loop's deadline pass: the condition under test is the
	// passing of wall time itself.
	<-time.After(2 * wt)
	burst(1)
	if n := r.l.total.Load(); n != 1 {
		t.Fatalf("%d connections accepted: the stream was lost and redialled after the idle spell", n)
	}
}
