package repl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"keel/netpath/replproto"
	"keel/netpath/sock"
)

// PeerConfig configures the primary side's stream to one peer node.
type PeerConfig struct {
	// Self is this node's id, sent in HELLO.
	Self uint64
	// Node is the peer's node id. HELLO names it and the peer's HELLO_ACK
	// must carry it (0: accept any peer at Addr).
	Node uint64
	// Addr is the peer's replication listener, host:port.
	Addr string
	// Dial opens the TCP connection: the node passes a netpath/sock
	// Dialer's DialContext, so that the stream is pinned to the replication
	// network. nil: a plain net.Dialer (tests).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	// WindowFrames and WindowBytes bound the frames in flight (queued or
	// sent and not finished): defaults 256 frames, 64 MiB.
	WindowFrames int
	WindowBytes  int64
	// FrameTimeout is the deadline for every frame's answer, for every
	// write to the socket and for PONGs: past it the stream is declared
	// lost. It is also the TCP_USER_TIMEOUT of the stream's sockets.
	// Default 5 s.
	FrameTimeout time.Duration
	// PingInterval is how often the stream measures its round trip, and
	// so how soon an idle stream to a vanished peer is noticed. Default 1 s.
	PingInterval time.Duration
	// DialTimeout bounds dial plus handshake. Default FrameTimeout.
	DialTimeout time.Duration
	// ZeroCopyMin is the smallest payload sent with MSG_ZEROCOPY; smaller
	// frames go with writev, where the page pinning and completion costs
	// more than the copy. 0: 64 KiB. Negative: never.
	ZeroCopyMin int
	// BackoffMin and BackoffMax bound the reconnect backoff (exponential,
	// jittered). Defaults 50 ms and 5 s.
	BackoffMin, BackoffMax time.Duration

	// Fence is shared by all the node's Peers: a stale-epoch NACK on any
	// stream fences the volume. nil: a private one (tests).
	Fence *Fence
	// OnPeerLost is called when the stream fails (Volume 0) and when the
	// peer refuses a frame for a reason other than a stale epoch (that
	// volume only). It runs on a stream goroutine and must not block.
	OnPeerLost func(Loss)
	Metrics    *Metrics
	Logger     *slog.Logger

	// zcFailpoint (tests) is consulted before the call-th (from 0)
	// sendmsg(MSG_ZEROCOPY) of a frame; an error it returns stands for that
	// call's result.
	zcFailpoint func(call int) error
}

// Peer is the primary side of replication to one peer node: one long-lived
// TCP stream at a time that carries the frames of every volume replicated
// to that node, reconnected with backoff after a loss. Frames submitted
// while the stream is down fail at once with ErrPeerDown: a Peer never
// queues writes for later, because the node must report the peer as out of
// sync rather than pretend.
//
// All methods are safe for concurrent use.
type Peer struct {
	cfg   PeerConfig
	log   *slog.Logger
	m     *peerMetrics
	fence *Fence

	cur atomic.Pointer[stream] // the stream up now; nil while down

	mu   sync.Mutex    // guards upCh
	upCh chan struct{} // closed while a stream is up; replaced when it goes down

	ctx      context.Context // canceled by Close
	cancel   context.CancelFunc
	loopDone chan struct{}
}

// NewPeer starts connecting to the peer in the background and returns.
func NewPeer(cfg PeerConfig) *Peer {
	if cfg.WindowFrames <= 0 {
		cfg.WindowFrames = 256
	}
	if cfg.WindowBytes <= 0 {
		cfg.WindowBytes = 64 << 20
	}
	if cfg.FrameTimeout <= 0 {
		cfg.FrameTimeout = 5 * time.Second
	}
	if cfg.PingInterval <= 0 {
		cfg.PingInterval = time.Second
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = cfg.FrameTimeout
	}
	if cfg.ZeroCopyMin == 0 {
		cfg.ZeroCopyMin = 64 << 10
	}
	if cfg.BackoffMin <= 0 {
		cfg.BackoffMin = 50 * time.Millisecond
	}
	if cfg.BackoffMax < cfg.BackoffMin {
		cfg.BackoffMax = max(5*time.Second, cfg.BackoffMin)
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = d.DialContext
	}
	if cfg.Fence == nil {
		cfg.Fence = NewFence(nil)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Peer{
		cfg:      cfg,
		log:      log.With("peer", cfg.Node, "addr", cfg.Addr),
		m:        cfg.Metrics.peer(cfg.Node),
		fence:    cfg.Fence,
		upCh:     make(chan struct{}),
		loopDone: make(chan struct{}),
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	go p.loop()
	return p
}

// Node is the peer's node id.
func (p *Peer) Node() uint64 { return p.cfg.Node }

// Fence is the fence table the Peer reports stale epochs to.
func (p *Peer) Fence() *Fence { return p.fence }

// Up reports whether a stream to the peer is up now.
func (p *Peer) Up() bool { return p.cur.Load() != nil }

// WaitUp waits until a stream is up, ctx is done or the Peer is closed.
func (p *Peer) WaitUp(ctx context.Context) error {
	for {
		p.mu.Lock()
		ch := p.upCh
		p.mu.Unlock()
		select {
		case <-ch:
			if p.Up() {
				return nil
			}
		case <-ctx.Done():
			return ctx.Err()
		case <-p.ctx.Done():
			return ErrClosed
		}
	}
}

// Close stops the Peer: the stream is closed, unfinished frames fail with
// ErrClosed, and no more connections are made. It waits for the stream's
// goroutines to end. OnPeerLost is not called for a Close.
func (p *Peer) Close() error {
	p.cancel()
	if st := p.cur.Load(); st != nil {
		st.fail(ErrClosed)
	}
	<-p.loopDone
	return nil
}

// Send replicates req to the peer and waits for its answer: Fanout to one
// peer.
func (p *Peer) Send(ctx context.Context, req *Request) error {
	var res [1]error
	peers := [1]*Peer{p}
	return Fanout(ctx, peers[:], req, res[:])
}

// Submit sends op.Req to the peer and returns without waiting; op.Done is
// called exactly once with the outcome, possibly before Submit returns
// (when the op is refused at once, or when Submit wrote the frame itself
// and the answer came back first). ctx bounds only the wait for window
// space. op.Req.Payload is borrowed until Done.
func (p *Peer) Submit(ctx context.Context, op *Op) {
	if err := op.Req.check(); err != nil {
		op.finish(err)
		return
	}
	op.hasCRC = false
	p.submit(ctx, op)
}

func (p *Peer) submit(ctx context.Context, op *Op) {
	if p.ctx.Err() != nil {
		op.finish(ErrClosed)
		return
	}
	if e := p.fence.Epoch(op.Req.Volume); op.Req.Epoch < e {
		p.m.error("fenced")
		op.finish(&NackError{Peer: p.cfg.Node, Volume: op.Req.Volume, Type: op.Req.Type,
			Reason: replproto.ReasonStaleEpoch, Epoch: e})
		return
	}
	st := p.cur.Load()
	if st == nil {
		p.m.error("down")
		op.finish(fmt.Errorf("%w: peer %d at %s", ErrPeerDown, p.cfg.Node, p.cfg.Addr))
		return
	}
	st.submit(ctx, op)
}

// loop keeps a stream up until Close: connect, run, report the loss, back
// off, reconnect.
func (p *Peer) loop() {
	defer close(p.loopDone)
	bo := backoff{min: p.cfg.BackoffMin, max: p.cfg.BackoffMax}
	failures := 0
	for p.ctx.Err() == nil {
		st, err := p.connect()
		if err != nil {
			if p.ctx.Err() != nil {
				return
			}
			failures++
			if failures == 1 {
				p.log.Warn("replication stream: cannot connect; retrying with backoff", "err", err)
			} else {
				p.log.Debug("replication stream: connect failed", "err", err, "attempt", failures)
			}
			if !p.sleep(bo.next()) {
				return
			}
			continue
		}
		failures = 0
		upAt := time.Now()
		p.publish(st)
		if p.ctx.Err() != nil { // Close raced with publishing: it may not have seen st
			st.fail(ErrClosed)
		}
		cause := st.run()
		p.markDown(st)
		closed := p.ctx.Err() != nil
		lost := &StreamError{Peer: p.cfg.Node, Err: cause}
		if closed {
			st.failAll(ErrClosed)
			return
		}
		p.m.error(lossReason(cause))
		p.log.Warn("replication stream lost", "err", cause, "up_for", time.Since(upAt).Round(time.Millisecond))
		if p.cfg.OnPeerLost != nil {
			p.cfg.OnPeerLost(Loss{Peer: p.cfg.Node, Err: lost})
		}
		st.failAll(lost)
		if time.Since(upAt) > bo.max {
			bo.reset() // it was up for a good while: this is not a flapping link
		}
		if !p.sleep(bo.next()) {
			return
		}
	}
}

func lossReason(err error) string {
	switch {
	case errors.Is(err, ErrTimeout):
		return "timeout"
	case errors.Is(err, ErrProtocol):
		return "protocol"
	}
	return "stream"
}

func (p *Peer) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-p.ctx.Done():
		return false
	}
}

func (p *Peer) publish(st *stream) {
	p.cur.Store(st)
	p.m.up.Set(1)
	p.m.connects.Inc()
	p.mu.Lock()
	close(p.upCh)
	p.mu.Unlock()
}

// markDown unpublishes st if it is the current stream: from then on
// submits fail with ErrPeerDown and WaitUp waits for the next stream.
// fail calls it at once, so nothing is submitted to a dying stream.
func (p *Peer) markDown(st *stream) {
	if p.cur.CompareAndSwap(st, nil) {
		p.m.up.Set(0)
		p.mu.Lock()
		p.upCh = make(chan struct{})
		p.mu.Unlock()
	}
}

// connect dials the peer and runs the handshake: HELLO, then HELLO_ACK
// naming the node we meant to reach. When MSG_ZEROCOPY can be used on the
// connection, the stream is split: the first connection carries only
// frames (this side never reads it again: a zero-copy completion alone on
// its error queue would fail reads through Go's netpoller), and a second
// connection carries the replies.
func (p *Peer) connect() (*stream, error) {
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.DialTimeout)
	defer cancel()
	conn, err := p.dial(ctx)
	if err != nil {
		return nil, err
	}
	// The connections made so far are closed when the deadline or Close
	// fires during the handshake (the AfterFunc runs on its own goroutine).
	var cmu sync.Mutex
	conns := []net.Conn{conn}
	closed := false
	closeAll := func() {
		cmu.Lock()
		defer cmu.Unlock()
		closed = true
		for _, c := range conns {
			c.Close()
		}
	}
	stop := context.AfterFunc(ctx, closeAll)
	defer stop()

	var rc syscall.RawConn
	if sc, ok := conn.(syscall.Conn); ok {
		rc, _ = sc.SyscallConn()
	}
	zcOn := false
	if p.cfg.ZeroCopyMin > 0 && rc != nil && zcSupported {
		if err := enableZeroCopy(rc); err != nil {
			p.m.fallback("unsupported")
			p.log.Info("MSG_ZEROCOPY unavailable on the replication stream: large frames use writev", "err", err)
		} else {
			zcOn = true
		}
	}
	var id uint64
	var flags replproto.Flags
	if zcOn {
		id, flags = rand.Uint64()|1, replproto.FlagSplit
	}
	if err := p.handshake(conn, flags, id); err != nil {
		closeAll()
		return nil, err
	}
	rconn := conn
	if zcOn {
		if rconn, err = p.dial(ctx); err != nil {
			closeAll()
			return nil, err
		}
		cmu.Lock()
		conns = append(conns, rconn)
		if closed {
			rconn.Close()
		}
		cmu.Unlock()
		if err := p.handshake(rconn, replproto.FlagReplies, id); err != nil {
			closeAll()
			return nil, fmt.Errorf("reply connection: %w", err)
		}
	}
	if !stop() { // the deadline or Close fired: the connections are closed
		return nil, ctx.Err()
	}
	return newStream(p, conn, rconn, rc, zcOn), nil
}

// dial opens one connection and sets TCP_USER_TIMEOUT to the frame
// deadline, whatever dialer made it: a cut link must reset the connection
// rather than stall it.
func (p *Peer) dial(ctx context.Context) (net.Conn, error) {
	conn, err := p.cfg.Dial(ctx, "tcp", p.cfg.Addr)
	if err != nil {
		p.m.error("dial")
		return nil, fmt.Errorf("dial %s: %w", p.cfg.Addr, err)
	}
	if _, ok := conn.(syscall.Conn); ok {
		if err := sock.SetUserTimeout(conn, p.cfg.FrameTimeout); err != nil {
			conn.Close()
			p.m.error("dial")
			return nil, fmt.Errorf("dial %s: %w", p.cfg.Addr, err)
		}
	}
	return conn, nil
}

func (p *Peer) handshake(conn net.Conn, flags replproto.Flags, id uint64) error {
	if err := p.hello(conn, flags, id); err != nil {
		p.m.error("handshake")
		return err
	}
	return nil
}

func (p *Peer) hello(conn net.Conn, flags replproto.Flags, id uint64) error {
	deadline := time.Now().Add(p.cfg.FrameTimeout)
	conn.SetDeadline(deadline)
	var b [replproto.HeaderSize]byte
	hello := replproto.Header{Type: replproto.TypeHello, Flags: flags, Volume: id, Aux: p.cfg.Self, Offset: p.cfg.Node}
	hello.Encode(&b)
	if _, err := conn.Write(b[:]); err != nil {
		return fmt.Errorf("handshake with %s: %w", p.cfg.Addr, err)
	}
	if _, err := io.ReadFull(conn, b[:]); err != nil {
		return fmt.Errorf("handshake with %s: %w", p.cfg.Addr, err)
	}
	var h replproto.Header
	if err := h.Decode(&b); err != nil {
		return fmt.Errorf("handshake with %s: %w: %w", p.cfg.Addr, ErrProtocol, err)
	}
	switch {
	case h.Type == replproto.TypeNack:
		return fmt.Errorf("handshake with %s: %w", p.cfg.Addr, &NackError{Peer: p.cfg.Node, Type: replproto.TypeHello, Reason: h.Code})
	case h.Type != replproto.TypeHelloAck:
		return fmt.Errorf("handshake with %s: %w: answered HELLO with %s", p.cfg.Addr, ErrProtocol, h.Type)
	case p.cfg.Node != 0 && h.Aux != p.cfg.Node:
		return fmt.Errorf("handshake with %s: %w: reached node %d, want %d", p.cfg.Addr, ErrProtocol, h.Aux, p.cfg.Node)
	}
	conn.SetDeadline(time.Time{})
	return nil
}

// The completion reaper's retry delays while an answered frame still
// awaits its zero-copy completion. The completion is normally queued by
// the time the ACK arrives (the kernel frees the sent data when the peer's
// TCP acknowledgement covers it, which precedes the ACK frame), so the
// first, immediate reap almost always finds it.
const (
	zcRetryMin = 20 * time.Microsecond
	zcRetryMax = 5 * time.Millisecond
)

// maxBatch bounds the replies a replica's writer batches (server.go).
const maxBatch = 64

// stream is one connection to the peer, from handshake to failure. It
// runs three goroutines, four with MSG_ZEROCOPY: the sender, which writes
// frames when a submitter hands it the writer role (send.go); the
// watchdog, which fails the stream on a missed deadline and asks for the
// PINGs; the receiver (ACK, NACK, PONG); and the completion reaper.
// Submitters write their frames themselves when they can (send.go).
type stream struct {
	p     *Peer
	conn  net.Conn        // frames (and replies, unless split)
	rconn net.Conn        // replies: conn, or the split stream's reply connection
	rc    syscall.RawConn // conn's, nil unless TCP
	base  time.Time       // clock origin for queued times and pings

	timeout, pingEvery int64 // nanoseconds
	zcMin              int
	zcOn               bool
	direct             bool // submitters may write (rc and raw writev are available)

	dead   chan struct{} // closed by fail
	closed chan struct{} // closed by fail once the sockets are closed
	space  chan struct{} // capacity 1: poked when the window frees
	zcKick chan struct{} // capacity 1: wakes the reaper
	kick   chan struct{} // capacity 1: hands the writer role to the sender goroutine

	mu      sync.Mutex // guards following
	err     error      // the cause of failure; set once
	win     window
	zc      zcTracker
	pingOut bool  // a PING awaits its PONG
	pingAt  int64 // when the last PING was sent
	zcWait  int   // answered ops that await only their zero-copy completion
	pend    []*Op // admitted frames no writer has taken yet, in sequence order
	pendZC  bool  // pend holds a frame that goes with MSG_ZEROCOPY
	pingDue bool  // the watchdog asks the writer for a PING
	writing bool  // a goroutine holds the writer role (send.go)

	wg sync.WaitGroup

	// The writer role's (send.go): only its holder touches these.
	spare    []*Op    // pend's other buffer
	payloads [][]byte // the payloads of the frames taken from pend
	out      [][]byte // bytes taken and not yet written, in wire order
	iov      [][]byte // a zero-copy frame's rest after ENOBUFS
	wbufs    net.Buffers
	ping     [replproto.HeaderSize]byte // encoded by the watchdog under mu with pingDue
	raw      rawWriter
	zsys     zcSys // send half
	sdone    []*Op

	// Receiver goroutine only.
	br   *bufio.Reader
	rhdr [replproto.HeaderSize]byte
	rh   replproto.Header

	// Completion goroutine only.
	zdone []*Op
}

// newStream takes over conn (frames) and rconn (replies: conn itself
// unless the stream is split).
func newStream(p *Peer, conn, rconn net.Conn, rc syscall.RawConn, zcOn bool) *stream {
	st := &stream{
		p:         p,
		conn:      conn,
		rconn:     rconn,
		rc:        rc,
		zcOn:      zcOn,
		base:      time.Now(),
		timeout:   int64(p.cfg.FrameTimeout),
		pingEvery: int64(p.cfg.PingInterval),
		zcMin:     p.cfg.ZeroCopyMin,
		dead:      make(chan struct{}),
		closed:    make(chan struct{}),
		space:     make(chan struct{}, 1),
		zcKick:    make(chan struct{}, 1),
		kick:      make(chan struct{}, 1),
		win:       newWindow(p.cfg.WindowFrames, p.cfg.WindowBytes),
		pend:      make([]*Op, 0, p.cfg.WindowFrames),
		spare:     make([]*Op, 0, p.cfg.WindowFrames),
		payloads:  make([][]byte, 0, p.cfg.WindowFrames),
		out:       make([][]byte, 0, 2*p.cfg.WindowFrames+1),
		iov:       make([][]byte, 0, 2),
		br:        bufio.NewReaderSize(rconn, 64<<10),
	}
	st.zsys.init()
	st.raw.init()
	st.direct = rc != nil && rawWriteSupported
	return st
}

func (st *stream) now() int64 { return int64(time.Since(st.base)) }

// run starts the stream's goroutines and returns the cause of its failure
// once they have all ended (the socket is closed by then).
func (st *stream) run() error {
	st.wg.Add(3)
	go st.sendLoop()
	go st.watchLoop()
	go st.recvLoop()
	if st.zcOn {
		st.wg.Add(1)
		go st.reapLoop()
	}
	<-st.dead
	st.wg.Wait()
	<-st.closed
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.err
}

// fail ends the stream with cause err (the first cause wins): it wakes
// every goroutine and waiter and aborts the connection. With SO_LINGER 0
// the close resets the connection and the kernel drops its send queue, so
// it holds no more references to payload pages that were sent zero-copy.
func (st *stream) fail(err error) {
	st.mu.Lock()
	if st.err != nil {
		st.mu.Unlock()
		return
	}
	st.err = err
	st.mu.Unlock()
	st.p.markDown(st)
	close(st.dead)
	for _, c := range [2]net.Conn{st.conn, st.rconn} {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close() // the second Close of an unsplit stream's conn is harmless
	}
	close(st.closed) // the sockets are gone: Close returns after close(2)
}

// failAll finishes every op left in the window once the goroutines have
// ended: those answered keep their answer (an ACK stays a success even if
// its zero-copy completion never came: the socket is closed, the kernel is
// done with the pages), the others fail with err.
func (st *stream) failAll(err error) {
	st.mu.Lock()
	ops := st.win.Drain(nil)
	st.zc.queue, st.zc.head = nil, 0
	clear(st.pend) // every op in pend is in the window too
	st.pend = st.pend[:0]
	st.mu.Unlock()
	for _, op := range ops {
		st.p.m.inflightFrames.Dec()
		st.p.m.inflightBytes.Sub(float64(op.bytes))
		if op.acked {
			op.finish(op.err)
		} else {
			op.finish(err)
		}
	}
}

func (st *stream) poke() {
	select {
	case st.space <- struct{}{}:
	default:
	}
}

// freeLocked removes a finished op from the window. REQUIRES: st.mu.
func (st *stream) freeLocked(op *Op) {
	st.win.Free(op.seq)
	st.poke()
}

// finish reports a finished op; called without st.mu, after freeLocked.
func (st *stream) finish(op *Op) {
	st.p.m.inflightFrames.Dec()
	st.p.m.inflightBytes.Sub(float64(op.bytes))
	st.p.m.frame.Observe(float64(st.now()-op.queued) / 1e9)
	op.finish(op.err)
}

// reapLocked pops the ledger entries whose ids have all completed, counts
// their bytes as copied or not, and appends the ops that are now finished
// (answered too) to done, freed from the window. REQUIRES: st.mu.
func (st *stream) reapLocked(done []*Op) []*Op {
	m := st.p.m
	for {
		e, ok := st.zc.popDone()
		if !ok {
			return done
		}
		if e.copied {
			m.kernelCopy.Add(float64(e.bytes))
		} else {
			m.zcBytes.Add(float64(e.bytes))
		}
		e.op.zcPending = false
		if e.op.acked {
			st.zcWait--
			st.freeLocked(e.op)
			done = append(done, e.op)
		}
	}
}

// finishAll finishes ops collected under st.mu, then forgets them.
func (st *stream) finishAll(ops []*Op) {
	for i, op := range ops {
		st.finish(op)
		ops[i] = nil
	}
}

func (st *stream) recvLoop() {
	defer st.wg.Done()
	for {
		if _, err := io.ReadFull(st.br, st.rhdr[:]); err != nil {
			st.fail(err)
			return
		}
		h := &st.rh
		if err := h.Decode(&st.rhdr); err != nil {
			st.fail(fmt.Errorf("%w: %w", ErrProtocol, err))
			return
		}
		switch h.Type {
		case replproto.TypeAck, replproto.TypeNack:
			if err := st.answer(h); err != nil {
				st.fail(err)
				return
			}
		case replproto.TypePong:
			now := st.now()
			st.mu.Lock()
			match := st.pingOut && uint64(st.pingAt) == h.Aux
			if match {
				st.pingOut = false
			}
			st.mu.Unlock()
			if match {
				st.p.m.rtt.Observe(float64(now-int64(h.Aux)) / 1e9)
			}
		default:
			st.fail(fmt.Errorf("%w: peer sent %s", ErrProtocol, h.Type))
			return
		}
	}
}

// answer applies an ACK or NACK to its op.
func (st *stream) answer(h *replproto.Header) error {
	st.mu.Lock()
	op := st.win.Get(h.Seq)
	if op == nil || op.acked || op.Req.Volume != h.Volume {
		st.mu.Unlock()
		return fmt.Errorf("%w: %s for no frame in flight", ErrProtocol, h)
	}
	op.acked = true
	var nack *NackError
	if h.Type == replproto.TypeNack {
		nack = &NackError{Peer: st.p.cfg.Node, Volume: h.Volume, Seq: h.Seq, Type: op.Req.Type, Reason: h.Code}
		switch h.Code {
		case replproto.ReasonStaleEpoch:
			nack.Epoch = h.Epoch
		case replproto.ReasonIO, replproto.ReasonInvalid:
			nack.Errno = syscall.Errno(h.Aux)
		}
		op.err = nack
	} else {
		op.err = nil
	}
	done := !op.zcPending
	if done {
		st.freeLocked(op)
	} else {
		st.zcWait++
	}
	st.mu.Unlock()
	if nack != nil {
		st.nacked(nack)
	}
	if done {
		st.finish(op)
	} else {
		select {
		case st.zcKick <- struct{}{}:
		default:
		}
	}
	return nil
}

// nacked acts on a refusal before the op is finished, so that its caller
// already sees the volume fenced or the loss reported.
func (st *stream) nacked(e *NackError) {
	p := st.p
	if e.Reason == replproto.ReasonStaleEpoch {
		p.m.error("stale_epoch")
		if p.fence.Observe(e.Volume, e.Epoch) {
			p.log.Warn("replica has a newer epoch: volume fenced", "volume", e.Volume, "replica_epoch", e.Epoch)
		}
		return
	}
	p.m.error(nackMetric(e.Reason))
	p.log.Warn("replica refused a frame", "volume", e.Volume, "err", e)
	if p.cfg.OnPeerLost != nil {
		p.cfg.OnPeerLost(Loss{Peer: p.cfg.Node, Volume: e.Volume, Err: e})
	}
}

func nackMetric(r replproto.Reason) string {
	switch r {
	case replproto.ReasonIO:
		return "io"
	case replproto.ReasonUnknownVolume:
		return "unknown_volume"
	case replproto.ReasonBadChecksum:
		return "bad_checksum"
	case replproto.ReasonInvalid:
		return "invalid"
	}
	return "refused"
}

// reapLoop collects MSG_ZEROCOPY completions from the socket's error queue
// and finishes the frames that were waiting only for them. It never blocks
// in a system call (a goroutine per stream parked in poll(2) would hold the
// scheduler's Ps): the receiver wakes it when an answered frame still
// awaits its completion, and it reaps without waiting, retrying on a short
// timer only while such frames remain.
func (st *stream) reapLoop() {
	defer st.wg.Done()
	m := st.p.m
	t := time.NewTimer(time.Hour)
	t.Stop()
	for {
		select {
		case <-st.zcKick:
		case <-st.dead:
			return
		}
		for delay := zcRetryMin; ; delay = min(2*delay, zcRetryMax) {
			if err := st.zsys.poll(st.rc); err != nil {
				return // the socket is closed
			}
			st.mu.Lock()
			for _, n := range st.zsys.notes {
				c := st.zc.complete(n.lo, n.hi, n.copied)
				if n.copied {
					m.zcCopied.Add(float64(c))
				}
			}
			st.zdone = st.reapLocked(st.zdone[:0])
			waiting := st.zcWait
			st.mu.Unlock()
			st.finishAll(st.zdone)
			if waiting == 0 {
				break
			}
			t.Reset(delay)
			select {
			case <-t.C:
			case <-st.dead:
				return
			}
		}
	}
}
