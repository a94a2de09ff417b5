package repl

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"keel/datapath/iobuf"
	"keel/netpath/replproto"
	"keel/netpath/sock"
)

// Applier is what a replica needs from the node: its replicas, addressed by
// the coordinator's volume id. The node implements it around its volumes.
// Its methods are called concurrently (disjoint ranges of one volume too)
// and must be safe for that; the Server has already ordered overlapping
// frames.
type Applier interface {
	// Epoch returns the highest epoch durably recorded for vol. It returns
	// an error wrapping ErrUnknownVolume when vol has no replica here. It
	// is called for every frame, so it should be cheap (a memory read).
	Epoch(vol uint64) (uint64, error)
	// ApplyEpoch durably records e as vol's highest epoch seen (e.g. in the
	// superblock, with fdatasync) before it returns. The Server calls it
	// before acknowledging anything at e, and only once every frame of an
	// older epoch that it accepted has been answered.
	ApplyEpoch(vol uint64, e uint64) error
	// WriteAt writes p at off. p is borrowed for the call (an aligned
	// iobuf buffer). flags are the frame's (replproto allows FlagFUA,
	// FlagDegraded and FlagSync on it): with FlagFUA, p is on stable
	// storage when it returns; with FlagDegraded, the range is recorded in
	// the replica's write-intent bitmap before it is written; a live write
	// without FlagDegraded says the volume is fully in sync again; FlagSync
	// marks a catch-up or re-mirror copy.
	WriteAt(vol uint64, p []byte, off int64, flags replproto.Flags) error
	// Trim discards [off, off+length); reads of it may return zeroes.
	// flags as WriteAt's.
	Trim(vol uint64, off, length int64, flags replproto.Flags) error
	// WriteZeroes zeroes [off, off+length); FlagNoHole forbids
	// deallocating; other flags as WriteAt's.
	WriteZeroes(vol uint64, off, length int64, flags replproto.Flags) error
	// Flush makes every write that has returned durable.
	Flush(vol uint64) error
}

// SyncApplier is implemented by an Applier that can also apply a write
// synchronously on the calling goroutine (a blocking pwrite, where WriteAt
// may queue native AIO and sleep until another goroutine reaps its
// completion), with WriteAt's result, locks and durability. The Server
// detects it in NewServer and calls WriteAtSync for a WRITE that is the only
// frame in flight on its stream (queue depth 1: no completion wake-up to
// wait for, the lower latency), WriteAt otherwise (at depth, AIO batches
// submissions and does not park a thread per frame).
type SyncApplier interface {
	WriteAtSync(vol uint64, p []byte, off int64, flags replproto.Flags) error
}

// ServerConfig configures the replica side.
type ServerConfig struct {
	// Node is this node's id: a HELLO naming another node is refused, and
	// HELLO_ACK carries it.
	Node    uint64
	Applier Applier
	// Workers is how many frames are applied at once, across all streams
	// and volumes. Default 32.
	Workers int
	// StreamFrames and StreamBytes bound what one stream may have received
	// and not yet answered; past them the server stops reading the stream
	// (TCP pushes back on the primary). Defaults 512 and 128 MiB.
	StreamFrames int
	StreamBytes  int64
	// IdleTimeout closes a stream that sends nothing, not even a PING, for
	// that long (the primary pings every second). Default 15 s.
	IdleTimeout time.Duration
	// WriteTimeout bounds writing replies. Default 5 s.
	WriteTimeout time.Duration
	Metrics      *Metrics
	Logger       *slog.Logger
}

// Server is the replica side: it accepts replication streams from primary
// nodes and applies their frames through the Applier, in the order
// invariant 3 asks for, fenced by epoch, answering each frame with ACK or
// NACK. A malformed frame closes only its own stream; a corrupt payload gets
// a NACK for that frame only.
//
// All methods are safe for concurrent use.
type Server struct {
	cfg     ServerConfig
	app     Applier
	syncApp SyncApplier // app, if it is one
	log     *slog.Logger
	m       *Metrics

	ack, nack         prometheus.Counter
	inline            prometheus.Counter // WRITEs applied on a stream's reader (dispatch)
	live, deg, sync   prometheus.Counter // applied range bytes by class
	applyTime         [replproto.TypeRemirrorWrite + 1]prometheus.Observer
	workers, inflight sync.WaitGroup
	streamWG          sync.WaitGroup

	mu        sync.Mutex // guards following
	vols      map[uint64]*volState
	streams   map[*sconn]struct{}
	byPrimary map[uint64]*sconn // the newest stream from each primary node
	splits    map[splitKey]*sconn
	listeners map[net.Listener]struct{}
	closed    bool

	qmu     sync.Mutex // guards ready, qhead and qclosed
	qcond   sync.Cond
	ready   []*sframe
	qhead   int
	qclosed bool
}

// NewServer starts the apply workers and returns the Server; streams come
// from Serve or ServeConn.
func NewServer(cfg ServerConfig) *Server {
	if cfg.Applier == nil {
		panic("repl: NewServer without an Applier")
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 32
	}
	if cfg.StreamFrames <= 0 {
		cfg.StreamFrames = 512
	}
	if cfg.StreamBytes <= 0 {
		cfg.StreamBytes = 128 << 20
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 15 * time.Second
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 5 * time.Second
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		cfg: cfg, app: cfg.Applier, log: log, m: cfg.Metrics,
		ack: cfg.Metrics.srvFrames.WithLabelValues("ack"), nack: cfg.Metrics.srvFrames.WithLabelValues("nack"),
		live: cfg.Metrics.srvClass.WithLabelValues("live"), deg: cfg.Metrics.srvClass.WithLabelValues("degraded"),
		sync: cfg.Metrics.srvClass.WithLabelValues("sync"), inline: cfg.Metrics.srvInline,
		vols:      make(map[uint64]*volState),
		streams:   make(map[*sconn]struct{}),
		byPrimary: make(map[uint64]*sconn),
		splits:    make(map[splitKey]*sconn),
		listeners: make(map[net.Listener]struct{}),
	}
	for _, t := range []replproto.Type{replproto.TypeWrite, replproto.TypeTrim, replproto.TypeZeroes, replproto.TypeFlush} {
		s.applyTime[t] = cfg.Metrics.srvApply.WithLabelValues(t.String())
	}
	s.syncApp, _ = cfg.Applier.(SyncApplier)
	s.qcond.L = &s.qmu
	s.workers.Add(cfg.Workers)
	for range cfg.Workers {
		go s.worker()
	}
	return s
}

// Serve accepts streams on l until l fails or the Server is closed; it
// closes l when it returns. The node passes a listener from netpath/sock
// pinned to the replication network.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		go s.ServeConn(c)
	}
}

// ServeConn serves one stream on c until it ends, then closes c. It
// returns the reason the stream ended (io.EOF when the primary closed it).
func (s *Server) ServeConn(c net.Conn) error {
	sc := &sconn{
		s: s, conn: c,
		wake:       make(chan struct{}, 1),
		attach:     make(chan struct{}, 1),
		dead:       make(chan struct{}),
		writerDone: make(chan struct{}),
		readerDone: make(chan struct{}),
		pending:    make([]byte, 0, maxBatch*replproto.HeaderSize),
		wbuf:       make([]byte, 0, maxBatch*replproto.HeaderSize),
	}
	sc.cond.L = &sc.mu
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.Close()
		return ErrClosed
	}
	s.streams[sc] = struct{}{}
	s.streamWG.Add(1)
	s.mu.Unlock()
	s.m.srvStreams.Inc()
	defer func() {
		s.m.srvStreams.Dec()
		s.mu.Lock()
		delete(s.streams, sc)
		s.mu.Unlock()
		s.streamWG.Done()
	}()

	refused := func(err error) error {
		sc.shutdown()
		close(sc.writerDone)
		s.log.Warn("replication stream refused", "remote", c.RemoteAddr().String(), "err", err)
		return err
	}
	if _, ok := c.(syscall.Conn); ok {
		// Replies unacknowledged this long mean the primary is gone.
		if err := sock.SetUserTimeout(c, s.cfg.WriteTimeout); err != nil {
			return refused(err)
		}
	}
	hello, err := sc.handshake()
	if err != nil {
		return refused(err)
	}
	switch {
	case hello.Flags&replproto.FlagReplies != 0:
		// The reply connection of a split stream: hand it to the stream.
		if err := s.attachReplies(sc, &hello); err != nil {
			return refused(err)
		}
		return nil
	case hello.Flags&replproto.FlagSplit != 0:
		if err := sc.ack(); err != nil {
			return refused(err)
		}
		if err := s.awaitReplies(sc, hello.Volume); err != nil {
			return refused(err)
		}
	default:
		if err := sc.ack(); err != nil {
			return refused(err)
		}
		sc.wconn = c
	}
	if rc, ok := sc.wconn.(syscall.Conn); ok {
		sc.wrc, _ = rc.SyscallConn()
	}
	sc.directFn = sc.directWrite
	// A new stream from a primary node supersedes its older one: the
	// primary keeps one stream per peer, so the old one is dead to it.
	// Stop the old reader before this one reads anything, so that frames
	// still buffered on the old connection cannot be registered after
	// frames of the new one (invariant 3 across a reconnect).
	s.mu.Lock()
	old := s.byPrimary[sc.primary]
	s.byPrimary[sc.primary] = sc
	s.mu.Unlock()
	if old != nil {
		old.shutdown()
		<-old.readerDone
	}
	go sc.writeLoop()
	err = sc.readLoop()
	close(sc.readerDone)
	sc.shutdown()
	<-sc.writerDone
	s.mu.Lock()
	if s.byPrimary[sc.primary] == sc {
		delete(s.byPrimary, sc.primary)
	}
	s.mu.Unlock()
	if errors.Is(err, io.EOF) {
		s.log.Debug("replication stream closed by primary", "primary", sc.primary)
	} else {
		s.log.Warn("replication stream closed", "primary", sc.primary, "err", err)
	}
	return err
}

// splitKey names a split stream awaiting its reply connection.
type splitKey struct{ primary, id uint64 }

// awaitReplies registers sc, the frame connection of split stream id, and
// waits for its reply connection.
func (s *Server) awaitReplies(sc *sconn, id uint64) error {
	key := splitKey{sc.primary, id}
	s.mu.Lock()
	s.splits[key] = sc
	s.mu.Unlock()
	t := time.NewTimer(s.cfg.IdleTimeout)
	defer t.Stop()
	var err error
	select {
	case <-sc.attach:
	case <-t.C:
		err = fmt.Errorf("%w: split stream %d: no reply connection within %v", ErrProtocol, id, s.cfg.IdleTimeout)
	case <-sc.dead:
		err = ErrClosed
	}
	s.mu.Lock()
	if s.splits[key] == sc {
		delete(s.splits, key)
	}
	s.mu.Unlock()
	return err
}

// attachReplies hands rc's connection to the split stream its HELLO names
// as that stream's reply connection. On success the stream owns the
// connection.
func (s *Server) attachReplies(rc *sconn, h *replproto.Header) error {
	key := splitKey{rc.primary, h.Volume}
	s.mu.Lock()
	target := s.splits[key]
	delete(s.splits, key)
	s.mu.Unlock()
	if target == nil {
		return rc.refuse(replproto.ReasonInvalid, fmt.Errorf("%w: reply connection for unknown stream %d of node %d", ErrProtocol, h.Volume, rc.primary))
	}
	if err := rc.ack(); err != nil {
		target.shutdown()
		return err
	}
	target.mu.Lock()
	if target.closed {
		target.mu.Unlock()
		return ErrClosed
	}
	target.wconn = rc.conn
	target.mu.Unlock()
	target.attach <- struct{}{}
	return nil
}

// Close stops accepting, closes every stream, waits for the frames being
// applied to finish and stops the workers.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for sc := range s.streams {
		sc.shutdown()
	}
	s.mu.Unlock()
	s.streamWG.Wait()
	s.inflight.Wait()
	s.qmu.Lock()
	s.qclosed = true
	s.qcond.Broadcast()
	s.qmu.Unlock()
	s.workers.Wait()
	return nil
}

// RaiseEpoch durably raises vol's epoch to e in stream order: it waits for
// the frames already accepted at older epochs to be answered, persists e
// through the Applier, and from then on refuses frames below e. The node
// calls it when the coordinator announces a new epoch to this replica. A
// raise to an epoch already reached does nothing.
func (s *Server) RaiseEpoch(vol, e uint64) error {
	durable, err := s.app.Epoch(vol)
	if err != nil {
		return err
	}
	vs, err := s.volume(vol, durable)
	if err != nil {
		return err
	}
	f := getFrame()
	f.kind, f.h.Volume, f.h.Epoch = kindRaise, vol, e
	f.raiseDone = make(chan error, 1)
	done := f.raiseDone
	s.inflight.Add(1)
	ready, v, _, _ := vs.register(f, nil, durable, nil)
	switch v {
	case noop:
		s.inflight.Done()
		putFrame(f)
		return nil
	case refusedBroken:
		s.inflight.Done()
		putFrame(f)
		return fmt.Errorf("repl: volume %d: %w", vol, vs.brokenErr())
	}
	s.push(ready)
	return <-done
}

// Forget drops the server's state for vol (its ordering and epoch cache,
// and a failed epoch write that keeps it refusing frames), so that the
// next frame starts from the Applier's epoch again. It refuses while
// frames of vol are in flight.
func (s *Server) Forget(vol uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	vs, ok := s.vols[vol]
	if !ok {
		return nil
	}
	vs.mu.Lock()
	busy := len(vs.active)
	vs.mu.Unlock()
	if busy > 0 {
		return fmt.Errorf("repl: volume %d has %d frames in flight", vol, busy)
	}
	delete(s.vols, vol)
	return nil
}

func (vs *volState) brokenErr() error {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	return vs.broken
}

// volume returns vol's state, creating it at the Applier's epoch.
func (s *Server) volume(vol, durable uint64) (*volState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	vs, ok := s.vols[vol]
	if !ok {
		vs = &volState{id: vol, epoch: durable, persisted: durable}
		s.vols[vol] = vs
	}
	return vs, nil
}

// push queues frames for the workers.
func (s *Server) push(fs []*sframe) {
	if len(fs) == 0 {
		return
	}
	s.qmu.Lock()
	s.ready = append(s.ready, fs...)
	if len(fs) == 1 {
		s.qcond.Signal()
	} else {
		s.qcond.Broadcast()
	}
	s.qmu.Unlock()
}

// pop takes the oldest ready frame, waiting for one; nil once closed.
func (s *Server) pop() *sframe {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	for s.qhead == len(s.ready) {
		if s.qclosed {
			return nil
		}
		s.qcond.Wait()
	}
	f := s.ready[s.qhead]
	s.ready[s.qhead] = nil
	s.qhead++
	if s.qhead == len(s.ready) {
		s.ready, s.qhead = s.ready[:0], 0
	}
	return f
}

func (s *Server) worker() {
	defer s.workers.Done()
	var scratch [16]*sframe
	for {
		f := s.pop()
		if f == nil {
			return
		}
		s.run(f, scratch[:0])
	}
}

// run applies one frame whose dependencies are done, answers it, and
// releases the frames that waited for it.
func (s *Server) run(f *sframe, scratch []*sframe) {
	vs := f.vs
	if f.kind == kindRaise {
		err := s.app.ApplyEpoch(vs.id, f.h.Epoch)
		vs.raised(f.h.Epoch, err)
		if err != nil {
			s.log.Error("cannot persist a replica's epoch: refusing its frames", "volume", vs.id, "epoch", f.h.Epoch, "err", err)
		}
		if f.raiseDone != nil {
			f.raiseDone <- err
		}
	} else {
		r := s.apply(f)
		if o := s.applyTime[f.h.Type]; o != nil {
			o.Observe(time.Since(f.recv).Seconds())
		}
		f.sc.answer(&r)
	}
	ready := vs.complete(f, scratch)
	s.push(ready)
	clear(ready)
	if f.buf != nil {
		f.buf.Release()
	}
	if f.sc != nil {
		f.sc.release(f.credit)
	}
	putFrame(f)
	s.inflight.Done()
}

// apply runs a data or flush frame through the Applier and returns the
// reply.
func (s *Server) apply(f *sframe) replproto.Header {
	h := &f.h
	durable, err := s.app.Epoch(h.Volume)
	if err != nil {
		reason, errno := nackReason(err)
		return s.nackHeader(h, reason, 0, errno)
	}
	if v, cur := f.vs.admit(h.Epoch, durable); v != admitted {
		if v == refusedStale {
			return s.nackHeader(h, replproto.ReasonStaleEpoch, cur, 0)
		}
		return s.nackHeader(h, replproto.ReasonIO, cur, syscall.EIO)
	}
	vol, off, n := h.Volume, int64(h.Offset), int64(h.Length)
	switch h.Type {
	case replproto.TypeWrite:
		if s.syncApp != nil && f.sc.busy.Load() == 1 {
			err = s.syncApp.WriteAtSync(vol, f.buf.Bytes(), off, h.Flags)
		} else {
			err = s.app.WriteAt(vol, f.buf.Bytes(), off, h.Flags)
		}
	case replproto.TypeTrim:
		err = s.app.Trim(vol, off, n, h.Flags)
	case replproto.TypeZeroes:
		err = s.app.WriteZeroes(vol, off, n, h.Flags)
	case replproto.TypeFlush:
		err = s.app.Flush(vol)
	}
	if err != nil {
		reason, errno := nackReason(err)
		s.log.Warn("replica failed a frame", "volume", vol, "type", h.Type.String(), "off", off, "len", n, "err", err)
		return s.nackHeader(h, reason, h.Epoch, errno)
	}
	if h.Type != replproto.TypeFlush {
		switch {
		case h.Flags&replproto.FlagSync != 0:
			s.sync.Add(float64(n))
		case h.Flags&replproto.FlagDegraded != 0:
			s.deg.Add(float64(n))
		default:
			s.live.Add(float64(n))
		}
	}
	s.ack.Inc()
	return replproto.Header{Type: replproto.TypeAck, Volume: vol, Epoch: h.Epoch, Seq: h.Seq}
}

func (s *Server) nackHeader(h *replproto.Header, reason replproto.Reason, epoch uint64, errno syscall.Errno) replproto.Header {
	s.nack.Inc()
	s.m.srvNacks.WithLabelValues(nackMetric(reason)).Inc()
	return replproto.Header{Type: replproto.TypeNack, Volume: h.Volume, Epoch: epoch, Seq: h.Seq, Code: reason, Aux: uint64(errno)}
}

// dispatch registers a received frame with its volume and queues what can
// run. It owns buf and the stream credit from here on.
//
// lone: nothing of a next frame has been read yet. A WRITE that is then
// alone on its stream (queue depth 1) and ready at once is applied here,
// on the reader goroutine, with SyncApplier.WriteAtSync, and answered
// directly: no hand-off to a worker, whose wake-up would cost more than
// the disk write it schedules (the replica-side half of the QD1 path). A
// frame that arrives meanwhile waits in the socket for at most that one
// write; at any depth above 1 the reader finds the next header already
// read or the stream busy, and the workers apply as before.
func (s *Server) dispatch(sc *sconn, h *replproto.Header, buf *iobuf.Buf, credit int, lone bool) {
	refuse := func(reason replproto.Reason, epoch uint64, errno syscall.Errno) {
		r := s.nackHeader(h, reason, epoch, errno)
		sc.answer(&r)
		if buf != nil {
			buf.Release()
		}
		sc.release(credit)
	}
	switch {
	case h.Type == replproto.TypeCatchupWrite, h.Type == replproto.TypeRemirrorWrite:
		refuse(replproto.ReasonUnsupported, 0, 0)
		return
	case h.Type.HasRange() && h.Offset+uint64(h.Length) > math.MaxInt64:
		refuse(replproto.ReasonInvalid, 0, syscall.EINVAL)
		return
	}
	durable, err := s.app.Epoch(h.Volume)
	if err != nil {
		reason, errno := nackReason(err)
		refuse(reason, 0, errno)
		return
	}
	vs, err := s.volume(h.Volume, durable)
	if err != nil {
		refuse(replproto.ReasonShutdown, 0, 0)
		return
	}
	f := getFrame()
	f.h, f.buf, f.credit, f.sc, f.recv = *h, buf, credit, sc, time.Now()
	f.kind = kindData
	if h.Type == replproto.TypeFlush {
		f.kind = kindFlush
	} else {
		f.lo, f.hi = h.Offset, h.Offset+uint64(h.Length)
	}
	raise := getFrame()
	s.inflight.Add(2)
	ready, v, cur, usedRaise := vs.register(f, raise, durable, sc.ready[:0])
	if !usedRaise {
		s.inflight.Done()
		putFrame(raise)
	}
	switch v {
	case refusedStale, refusedBroken:
		s.inflight.Done()
		f.buf = nil
		putFrame(f)
		if v == refusedStale {
			refuse(replproto.ReasonStaleEpoch, cur, 0)
		} else {
			refuse(replproto.ReasonIO, cur, syscall.EIO)
		}
		return
	}
	if lone && s.syncApp != nil && len(ready) == 1 && ready[0] == f && f.kind == kindData &&
		h.Type == replproto.TypeWrite && sc.busy.Load() == 1 {
		clear(ready)
		sc.ready = ready[:0]
		s.inline.Inc()
		s.run(f, sc.inl[:0])
		return
	}
	s.push(ready)
	clear(ready)
	sc.ready = ready[:0]
}

// sconn is one replication stream on the replica. Its reader goroutine
// (ServeConn's) reads frames and registers them; workers apply them and
// queue replies; its writer goroutine writes the replies in batches.
type sconn struct {
	s          *Server
	conn       net.Conn // frames (and replies, unless split)
	wconn      net.Conn // replies; set before the writer starts, under mu
	attach     chan struct{}
	primary    uint64 // the primary's node id, from HELLO
	rx         prometheus.Counter
	wake       chan struct{} // capacity 1: replies are pending
	dead       chan struct{} // closed by shutdown
	writerDone chan struct{}
	readerDone chan struct{} // closed when the reader will register no more frames
	deadOnce   sync.Once

	mu     sync.Mutex // guards following (cond waits on it)
	cond   sync.Cond
	frames int          // frames received and not yet answered
	busy   atomic.Int32 // frames received and not yet answered (reply queued or written); no lock
	bytes  int64        // their payload bytes
	closed bool

	// Reader only.
	hdr   [replproto.HeaderSize]byte
	h     replproto.Header
	ready []*sframe
	inl   [16]*sframe // run's scratch for a frame applied on the reader

	wmu     sync.Mutex // guards pending and writing
	pending []byte     // encoded replies not yet written
	writing bool       // a goroutine owns the reply socket's write side

	// Direct reply writes (by whoever set writing).
	wrc      syscall.RawConn // wconn's, nil unless it has one
	direct   []byte          // the bytes a direct write tries
	dsent    int
	derr     error
	directFn func(fd uintptr) bool

	// Writer only.
	wbuf []byte
}

// maxPendingPongs bounds the replies queued for a writer beyond which
// PONGs are dropped: a primary that floods PINGs without reading cannot
// grow the queue. ACKs and NACKs are bounded by the stream credit.
const maxPendingPongs = 1 << 20

// shutdown ends the stream: the reader and writer stop, replies still
// being produced by workers are dropped.
func (sc *sconn) shutdown() {
	sc.deadOnce.Do(func() {
		close(sc.dead)
		sc.conn.Close()
		sc.mu.Lock()
		sc.closed = true
		w := sc.wconn
		sc.cond.Broadcast()
		sc.mu.Unlock()
		if w != nil && w != sc.conn {
			w.Close()
		}
	})
}

// acquire takes stream credit for one frame of n payload bytes, waiting
// while the stream is at its limits. false: the stream is shutting down.
func (sc *sconn) acquire(n int) bool {
	cfg := &sc.s.cfg
	sc.mu.Lock()
	defer sc.mu.Unlock()
	for !sc.closed && (sc.frames >= cfg.StreamFrames || sc.frames > 0 && sc.bytes+int64(n) > cfg.StreamBytes) {
		sc.cond.Wait()
	}
	if sc.closed {
		return false
	}
	sc.frames++
	sc.busy.Add(1)
	sc.bytes += int64(n)
	return true
}

// answer sends the reply to a frame that took credit (acquire): it is no
// longer busy from here on, so a frame that the primary sends once it has
// the reply finds the stream otherwise idle (send's direct write, and
// apply's WriteAtSync, look at busy).
func (sc *sconn) answer(h *replproto.Header) {
	sc.busy.Add(-1)
	sc.send(h)
}

// release returns the credit of a frame that has been answered (or whose
// stream failed while it was read).
func (sc *sconn) release(n int) {
	sc.mu.Lock()
	sc.frames--
	sc.bytes -= int64(n)
	sc.cond.Signal()
	sc.mu.Unlock()
}

// send answers a frame. When the stream has no other frame in flight,
// nobody is writing to the reply socket and nothing is pending, it writes
// the reply at once with one non-blocking write(2) (saving a hand-off to the
// writer goroutine at queue depth 1; deeper, the writer's batches save more);
// otherwise, or for what that write could not take, it appends the reply
// to the pending batch and wakes the writer. It never blocks on the
// socket, so a primary that stops reading cannot stall the workers. Once
// the stream has ended, replies are dropped.
func (sc *sconn) send(h *replproto.Header) {
	sc.wmu.Lock()
	n := len(sc.pending)
	if h.Type == replproto.TypePong && n >= maxPendingPongs {
		sc.wmu.Unlock()
		return
	}
	sc.pending = append(sc.pending, make([]byte, replproto.HeaderSize)...)
	h.Encode((*[replproto.HeaderSize]byte)(sc.pending[n:]))
	if n != 0 || sc.writing || sc.wrc == nil || sc.busy.Load() > 0 {
		sc.wmu.Unlock()
		sc.kick()
		return
	}
	// Take the reply back out and write it directly.
	sc.writing = true
	sc.direct = append(sc.direct[:0], sc.pending...)
	sc.pending = sc.pending[:0]
	sc.wmu.Unlock()

	sc.dsent, sc.derr = 0, nil
	if err := sc.wrc.Write(sc.directFn); err != nil && sc.derr == nil {
		sc.derr = err
	}
	sc.wmu.Lock()
	sc.writing = false
	if sc.derr == nil && sc.dsent < len(sc.direct) {
		// A partial (or refused: EAGAIN) write: the rest goes first.
		rest := sc.direct[sc.dsent:]
		k := len(sc.pending)
		sc.pending = append(sc.pending, rest...)
		copy(sc.pending[len(rest):], sc.pending[:k])
		copy(sc.pending, rest)
	}
	more := len(sc.pending) > 0
	err := sc.derr
	sc.wmu.Unlock()
	if err != nil {
		sc.shutdown()
		return
	}
	if more {
		sc.kick()
	}
}

// directWrite is the RawConn.Write callback of send: one write(2), never
// waiting for the socket to become writable.
func (sc *sconn) directWrite(fd uintptr) bool {
	for {
		n, err := syscall.Write(int(fd), sc.direct)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
		case err != nil:
			sc.derr = err
		default:
			sc.dsent = n
		}
		return true
	}
}

func (sc *sconn) kick() {
	select {
	case sc.wake <- struct{}{}:
	default:
	}
}

// handshake reads and checks HELLO; the caller answers it (ack) once it
// knows what to do with the connection. Answers go directly on the
// connection, before any writer runs.
func (sc *sconn) handshake() (replproto.Header, error) {
	s := sc.s
	sc.conn.SetDeadline(time.Now().Add(s.cfg.IdleTimeout))
	var h replproto.Header
	if _, err := io.ReadFull(sc.conn, sc.hdr[:]); err != nil {
		return h, fmt.Errorf("reading HELLO: %w", err)
	}
	if err := h.Decode(&sc.hdr); err != nil {
		s.m.srvBad.WithLabelValues(malformedWhat(err)).Inc()
		if errors.Is(err, replproto.ErrBadVersion) {
			return h, sc.refuse(replproto.ReasonVersion, err)
		}
		return h, fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	if h.Type != replproto.TypeHello {
		s.m.srvBad.WithLabelValues("unexpected_type").Inc()
		return h, fmt.Errorf("%w: stream opened with %s, not HELLO", ErrProtocol, h.Type)
	}
	if h.Offset != 0 && h.Offset != s.cfg.Node {
		return h, sc.refuse(replproto.ReasonWrongNode, fmt.Errorf("%w: HELLO from node %d for node %d, this is %d", ErrRefused, h.Aux, h.Offset, s.cfg.Node))
	}
	sc.primary = h.Aux
	sc.rx = s.m.srvRxBytes.WithLabelValues(strconv.FormatUint(sc.primary, 10))
	return h, nil
}

// ack answers HELLO with HELLO_ACK.
func (sc *sconn) ack() error {
	r := replproto.Header{Type: replproto.TypeHelloAck, Aux: sc.s.cfg.Node}
	var b [replproto.HeaderSize]byte
	r.Encode(&b)
	if _, err := sc.conn.Write(b[:]); err != nil {
		return err
	}
	return sc.conn.SetDeadline(time.Time{})
}

// refuse answers HELLO with a NACK and returns err.
func (sc *sconn) refuse(reason replproto.Reason, err error) error {
	r := replproto.Header{Type: replproto.TypeNack, Code: reason}
	var b [replproto.HeaderSize]byte
	r.Encode(&b)
	sc.conn.Write(b[:])
	return err
}

// malformedWhat names a decode error for the malformed-stream metric.
func malformedWhat(err error) string {
	switch {
	case errors.Is(err, replproto.ErrBadMagic):
		return "bad_magic"
	case errors.Is(err, replproto.ErrBadVersion):
		return "bad_version"
	case errors.Is(err, replproto.ErrHeaderChecksum):
		return "header_checksum"
	case errors.Is(err, replproto.ErrTooLarge):
		return "oversize"
	case errors.Is(err, replproto.ErrUnknownType):
		return "unknown_type"
	}
	return "bad_field"
}

// readLoop reads frames until the stream ends. Payloads are read straight
// from the socket into an aligned iobuf buffer, no intermediate copy, each
// with the next header in the same readv (frameReader).
func (sc *sconn) readLoop() error {
	s := sc.s
	h := &sc.h
	fr := newFrameReader(sc.conn)
	for {
		sc.conn.SetReadDeadline(time.Now().Add(s.cfg.IdleTimeout))
		if err := fr.header(); err != nil {
			return err
		}
		if err := h.Decode(&fr.hdr); err != nil {
			s.m.srvBad.WithLabelValues(malformedWhat(err)).Inc()
			return fmt.Errorf("%w: %w", ErrProtocol, err)
		}
		sc.rx.Add(replproto.HeaderSize)
		switch {
		case h.Type == replproto.TypePing:
			r := replproto.Header{Type: replproto.TypePong, Aux: h.Aux}
			sc.send(&r)
			continue
		case !h.Type.Windowed():
			s.m.srvBad.WithLabelValues("unexpected_type").Inc()
			return fmt.Errorf("%w: primary sent %s", ErrProtocol, h.Type)
		}
		n := h.PayloadLen()
		if !sc.acquire(n) {
			return ErrClosed
		}
		var buf *iobuf.Buf
		if h.Type.HasPayload() {
			buf = iobuf.Get(n)
			if err := fr.payload(buf.Bytes()); err != nil {
				buf.Release()
				sc.busy.Add(-1)
				sc.release(n)
				return err
			}
			sc.rx.Add(float64(n))
			if replproto.PayloadCRC(buf.Bytes()) != h.PayloadCRC {
				buf.Release()
				r := s.nackHeader(h, replproto.ReasonBadChecksum, 0, 0)
				sc.answer(&r)
				sc.release(n)
				s.log.Warn("replication payload checksum mismatch: frame refused", "primary", sc.primary, "frame", h.String())
				continue
			}
		}
		s.dispatch(sc, h, buf, n, fr.have == 0)
	}
}

// writeLoop writes the pending replies, all that have accumulated in one
// write, swapping the pending buffer with its own (double buffering).
func (sc *sconn) writeLoop() {
	defer close(sc.writerDone)
	wt := sc.s.cfg.WriteTimeout
	for {
		select {
		case <-sc.wake:
		case <-sc.dead:
			return
		}
		sc.wmu.Lock()
		if sc.writing || len(sc.pending) == 0 {
			sc.wmu.Unlock() // a direct writer owns the socket and kicks when done
			continue
		}
		sc.writing = true
		sc.pending, sc.wbuf = sc.wbuf[:0], sc.pending
		sc.wmu.Unlock()
		sc.wconn.SetWriteDeadline(time.Now().Add(wt))
		_, err := sc.wconn.Write(sc.wbuf)
		if err == nil {
			// A direct reply (send) goes through RawConn.Write, which
			// refuses once a deadline has passed: leave none behind, or
			// the first direct reply after an idle spell kills the stream.
			err = sc.wconn.SetWriteDeadline(time.Time{})
		}
		sc.wmu.Lock()
		sc.writing = false
		more := len(sc.pending) > 0
		sc.wmu.Unlock()
		if err != nil {
			sc.shutdown()
			return
		}
		if more {
			sc.kick()
		}
	}
}
