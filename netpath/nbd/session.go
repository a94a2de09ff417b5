package nbd

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"keel/datapath/iobuf"
	"keel/netpath/nbdproto"
)

// Sizes and limits of the transmission phase.
const (
	// readBufSize is the reader's buffer: one read syscall can bring in
	// the headers (and small payloads) of many pipelined requests.
	readBufSize = 64 << 10
	// directReadMin is the payload remainder from which the reader reads
	// straight into the request's buffer instead of through readBuf.
	directReadMin = 16 << 10
	// maxWriteDrain is the largest payload of a refused WRITE (too large,
	// read-only, out of range) that is read and discarded to keep the
	// stream in sync; a larger one closes the connection after the reply.
	maxWriteDrain = 64 << 20
	// maxDescriptors bounds the extents of one BLOCK_STATUS reply so that
	// the payload (context id + descriptors) fits in 4 KiB; the protocol
	// lets a server answer less than the range asked.
	maxDescriptors = (4096 - 4) / nbdproto.BlockDescriptorSize
)

var (
	errDisc     = errors.New("nbd: client sent NBD_CMD_DISC")
	errBadMagic = errors.New("nbd: bad request magic; closing the connection")
)

// Messages of structured error replies (package-level so that replying
// does not allocate).
var (
	msgUnknownCmd = []byte("unknown command")
	msgBadFlags   = []byte("command flags not valid for this command")
	msgTooLarge   = []byte("request length above the maximum block size")
	msgReadOnly   = []byte("export is read-only")
	msgRange      = []byte("request beyond the end of the export")
	msgAlign      = []byte("request not aligned to the minimum block size")
	msgNoMeta     = []byte("no metadata context negotiated")
	msgZeroLen    = []byte("zero-length block status request")
	msgShutdown   = []byte("server shutting down")
	msgInternal   = []byte("internal server error")
)

// allowedFlags are the command flags each command accepts. FUA is valid
// for every command (the protocol says so; it is a no-op where nothing is
// written); DF is a no-op because reads are always one chunk.
var allowedFlags = [...]nbdproto.CmdFlags{
	nbdproto.CmdRead:        nbdproto.CmdFlagFUA | nbdproto.CmdFlagDF,
	nbdproto.CmdWrite:       nbdproto.CmdFlagFUA,
	nbdproto.CmdDisc:        0xffff,
	nbdproto.CmdFlush:       nbdproto.CmdFlagFUA,
	nbdproto.CmdTrim:        nbdproto.CmdFlagFUA,
	nbdproto.CmdCache:       nbdproto.CmdFlagFUA,
	nbdproto.CmdWriteZeroes: nbdproto.CmdFlagFUA | nbdproto.CmdFlagNoHole | nbdproto.CmdFlagFastZero,
	nbdproto.CmdBlockStatus: nbdproto.CmdFlagFUA | nbdproto.CmdFlagReqOne,
}

// request is one request in flight, from its header being read to its
// reply being written. The session preallocates MaxInFlight of them; one
// is owned by exactly one goroutine at a time: the reader fills it, a
// worker executes it, the goroutine holding the
// writer role writes and retires it back to the free list.
type request struct {
	ss     *session
	req    nbdproto.Request
	errno  nbdproto.Errno
	msg    []byte     // message of a structured error reply (static)
	buf    *iobuf.Buf // READ data, WRITE payload or BLOCK_STATUS payload; released on retire
	need   int        // bytes charged against MaxInFlightBytes
	start  time.Time
	hdr    [32]byte // reply header (simple 16, chunk 20 + 8 offset or + 6 error)
	hdrLen int
	data   []byte // what follows hdr on the wire
	next   *request

	bs   blockStatus
	bsFn func(length int64, hole, zero bool) bool // r.onExtent, bound once
}

// session is one client connection.
type session struct {
	srv  *Server
	nc   net.Conn
	log  *slog.Logger
	done chan struct{} // closed when the connection has ended

	bound *Export // guarded by srv.mu: the export transmission serves, for RemoveExport

	// Set by the handshake, read-only afterwards.
	exp      *Export
	be       Backend
	sbe      SyncBackend // be's synchronous calls, nil when it has none
	size     uint64
	minBlock uint64
	maxReq   uint32
	ro       bool
	sr       bool // structured replies
	metaCtx  bool // base:allocation selected
	flags    nbdproto.TransmissionFlags
	m        *exportMetrics // nil: no metrics

	ctl      sync.Mutex  // guards w's creation against interrupt and forceClose
	w        wire        // the transmission stream; set once before the reader starts
	stopping atomic.Bool // Shutdown interrupted the reader

	// Owned by the reader goroutine.
	rbuf       *iobuf.Buf
	rb         []byte // rbuf.Bytes()
	rpos, rend int    // unread bytes are rb[rpos:rend]
	nworkers   int    // workers started (for the log)

	work     chan *request // reader → workers; capacity MaxInFlight, never blocks
	idle     atomic.Int32  // workers free for a new request and not yet claimed
	inflight atomic.Int32  // requests holding a slot
	running  atomic.Int32  // requests handed to workers and not yet executed

	mu       sync.Mutex // guards free, bytes, waiting
	cond     sync.Cond  // L is &mu; signalled on release while the reader waits
	free     []*request // free slots
	bytes    int        // payload bytes charged by requests in flight
	maxBytes int
	waiting  bool

	wmu          sync.Mutex // guards whead, wtail, writing, werr
	whead, wtail *request   // replies ready to be written, in completion order
	writing      bool       // some goroutine holds the writer role
	werr         error      // first write error; replies after it are dropped

	iov [][]byte // owned by the writer role

	lastErrLog atomic.Int64 // unix nanos of the last backend error logged
	suppressed atomic.Int64 // backend errors not logged since
}

func newSession(s *Server, c net.Conn) *session {
	return &session{
		srv:  s,
		nc:   c,
		log:  s.log.With("remote", c.RemoteAddr().String()),
		done: make(chan struct{}),
	}
}

// interrupt makes the reader stop at its next read. Called by Shutdown.
func (ss *session) interrupt() {
	ss.ctl.Lock()
	defer ss.ctl.Unlock()
	ss.stopping.Store(true)
	if ss.w != nil {
		ss.w.stopReading()
	} else {
		ss.nc.SetReadDeadline(time.Now())
	}
}

// forceClose breaks the connection at once: blocked reads and writes
// fail. The descriptor itself is closed when the session ends.
func (ss *session) forceClose() {
	ss.ctl.Lock()
	defer ss.ctl.Unlock()
	if ss.w != nil {
		ss.w.shutdown()
	} else {
		ss.nc.Close()
	}
}

// setExport fixes the export and negotiated features for transmission.
func (ss *session) setExport(exp *Export, sr, metaCtx bool) {
	ss.exp = exp
	ss.be = exp.Backend
	ss.sbe = exp.syncBE
	ss.size = exportSize(exp)
	minB, _ := blockSizes(exp.Backend)
	ss.minBlock = uint64(minB)
	ss.maxReq = uint32(ss.srv.cfg.MaxRequest)
	ss.ro = exp.readOnly()
	ss.sr = sr
	ss.metaCtx = metaCtx
	ss.flags = transmissionFlags(exp, sr)
}

// transmit runs the transmission phase until the client disconnects, the
// stream breaks or the server shuts down; it returns once every request
// read has been answered (or its connection has failed).
func (ss *session) transmit() {
	ss.nc.SetDeadline(time.Time{})
	// bind before taking ctl: Shutdown and RemoveExport take srv.mu, then ctl.
	if !ss.srv.bind(ss, ss.exp) {
		ss.stopping.Store(true) // the export was removed during the handshake
	}
	ss.ctl.Lock()
	ss.w = newWire(ss.nc)
	if ss.stopping.Load() {
		ss.w.stopReading() // Shutdown came during the handshake's last step
	}
	ss.ctl.Unlock()
	defer ss.w.close()
	cfg := &ss.srv.cfg
	ss.log = ss.log.With("export", ss.exp.Name)
	ss.m = cfg.Metrics.forExport(ss.exp.Name)
	if ss.m != nil {
		ss.m.conns.Inc()
		defer ss.m.conns.Dec()
	}
	ss.rbuf = iobuf.Get(readBufSize)
	ss.rb = ss.rbuf.Bytes()
	defer ss.rbuf.Release()

	reqs := make([]request, cfg.MaxInFlight)
	ss.free = make([]*request, 0, cfg.MaxInFlight)
	for i := range reqs {
		r := &reqs[i]
		r.ss = ss
		r.bsFn = r.onExtent
		ss.free = append(ss.free, r)
	}
	ss.maxBytes = max(cfg.MaxInFlightBytes, cfg.MaxRequest)
	ss.cond.L = &ss.mu
	ss.work = make(chan *request, cfg.MaxInFlight)
	ss.iov = make([][]byte, 0, 2*cfg.MaxInFlight)
	ss.log.Debug("nbd: transmission", "structured_replies", ss.sr, "base_allocation", ss.metaCtx, "flags", fmt.Sprintf("%#x", uint16(ss.flags)))

	err := ss.readLoop()
	switch {
	case errors.Is(err, errDisc):
		ss.log.Debug("nbd: client disconnected")
	case ss.stopping.Load():
		ss.log.Debug("nbd: server shutting down")
	case errors.Is(err, errBadMagic):
		ss.log.Warn("nbd: closing connection", "err", err)
	case errors.Is(err, io.EOF):
		ss.log.Debug("nbd: client closed the connection")
	default:
		ss.log.Debug("nbd: connection ended", "err", err)
	}
	ss.waitIdle()
	close(ss.work)
	ss.log.Debug("nbd: connection done", "workers", ss.nworkers)
}

// readLoop reads and dispatches requests until an error ends the stream.
func (ss *session) readLoop() error {
	for {
		if err := ss.fill(nbdproto.RequestSize); err != nil {
			return err
		}
		hdr := (*[nbdproto.RequestSize]byte)(ss.rb[ss.rpos : ss.rpos+nbdproto.RequestSize])
		req, err := nbdproto.DecodeRequest(hdr)
		if err != nil {
			return fmt.Errorf("%w (%x)", errBadMagic, hdr[:4])
		}
		ss.consume(nbdproto.RequestSize)
		if req.Type == nbdproto.CmdDisc {
			return errDisc
		}
		if err := ss.handle(req); err != nil {
			return err
		}
	}
}

// handle takes one decoded request: validates it, reads its payload and
// hands it to a worker.
func (ss *session) handle(req nbdproto.Request) error {
	errno, msg := ss.validate(&req)
	need := 0
	if errno == 0 && (req.Type == nbdproto.CmdRead || req.Type == nbdproto.CmdWrite) {
		need = int(req.Length)
	}
	r := ss.acquire(need)
	if errno == 0 && ss.stopping.Load() {
		errno, msg = nbdproto.ESHUTDOWN, msgShutdown
	}
	r.req, r.errno, r.msg, r.start = req, errno, msg, time.Now()

	if req.Type == nbdproto.CmdWrite && req.Length > 0 {
		if errno != 0 {
			if req.Length > maxWriteDrain {
				ss.finish(r)
				return fmt.Errorf("WRITE of %d bytes refused and too large to drain", req.Length)
			}
			if err := ss.discard(int(req.Length)); err != nil {
				ss.release(r)
				ss.rpos, ss.rend = 0, 0 // mid-payload: nothing buffered is a request
				return err
			}
		} else {
			r.buf = iobuf.Get(int(req.Length))
			if err := ss.readPayload(r.buf.Bytes()); err != nil {
				r.buf.Release()
				r.buf = nil
				ss.release(r)
				ss.rpos, ss.rend = 0, 0 // mid-payload: nothing buffered is a request
				return err
			}
		}
	}
	if errno != 0 {
		ss.finish(r)
		return nil
	}
	if req.Type == nbdproto.CmdRead && req.Length > 0 {
		r.buf = iobuf.Get(int(req.Length))
	}
	if ss.inline(&req) {
		ss.running.Add(1)
		ss.exec(r)
		ss.running.Add(-1)
		ss.finish(r)
		return nil
	}
	if ss.idle.Add(-1) < 0 {
		ss.idle.Add(1)
		ss.nworkers++
		go ss.worker()
	}
	ss.running.Add(1)
	ss.work <- r
	return nil
}

// maxInline is the largest READ or WRITE the reader executes itself.
// Its reply must fit the sockets' buffers: the reader writing a reply that
// a client does not read while it is still sending must not block.
const maxInline = 128 << 10

// inline reports whether the reader should execute q itself, on the
// backend's synchronous path, instead of handing it to a worker: a READ or
// WRITE of up to maxInline bytes, with a backend that has synchronous
// calls, nothing else of the connection being executed, and no further
// request already read into the buffer. That is a client at queue depth
// 1: the request needs no wakeup of a worker (and of a thread to run it)
// and its reply goes out from the reader, which then reads the next. A
// client that has pipelined more finds them dispatched as usual, behind
// at most this one request.
func (ss *session) inline(q *nbdproto.Request) bool {
	return ss.sbe != nil && (q.Type == nbdproto.CmdRead || q.Type == nbdproto.CmdWrite) &&
		q.Length <= maxInline && ss.rpos == ss.rend && ss.running.Load() == 0
}

// validate checks a request against the export; a non-zero errno is the
// request's answer.
func (ss *session) validate(q *nbdproto.Request) (nbdproto.Errno, []byte) {
	if int(q.Type) >= len(allowedFlags) {
		return nbdproto.EINVAL, msgUnknownCmd
	}
	if q.Flags&^allowedFlags[q.Type] != 0 {
		return nbdproto.EINVAL, msgBadFlags
	}
	rangeErr := nbdproto.EINVAL
	switch q.Type {
	case nbdproto.CmdFlush:
		return 0, nil
	case nbdproto.CmdRead:
		if q.Length > ss.maxReq {
			return nbdproto.EOVERFLOW, msgTooLarge
		}
	case nbdproto.CmdWrite:
		if q.Length > ss.maxReq {
			return nbdproto.EOVERFLOW, msgTooLarge
		}
		fallthrough
	case nbdproto.CmdWriteZeroes:
		if ss.ro {
			return nbdproto.EPERM, msgReadOnly
		}
		rangeErr = nbdproto.ENOSPC
	case nbdproto.CmdTrim:
		if ss.ro {
			return nbdproto.EPERM, msgReadOnly
		}
	case nbdproto.CmdBlockStatus:
		if !ss.metaCtx {
			return nbdproto.EINVAL, msgNoMeta
		}
		if q.Length == 0 {
			return nbdproto.EINVAL, msgZeroLen
		}
	}
	if q.Offset > ss.size || uint64(q.Length) > ss.size-q.Offset {
		return rangeErr, msgRange
	}
	if ss.minBlock > 1 && (q.Offset|uint64(q.Length))%ss.minBlock != 0 {
		return nbdproto.EINVAL, msgAlign
	}
	return 0, nil
}

// worker executes requests handed over by the reader.
func (ss *session) worker() {
	for r := range ss.work {
		ss.exec(r)
		ss.running.Add(-1)
		ss.finish(r)
		ss.idle.Add(1)
	}
}

// exec runs a valid request against the backend and sets its errno. A
// panic in the backend is that request's EIO.
func (ss *session) exec(r *request) {
	defer func() {
		if p := recover(); p != nil {
			r.errno, r.msg = nbdproto.EIO, msgInternal
			ss.log.Error("nbd: backend panicked", "command", r.req.Type.String(),
				"offset", r.req.Offset, "length", r.req.Length, "panic", p, "stack", string(debug.Stack()))
		}
	}()
	q := &r.req
	off, n := int64(q.Offset), int64(q.Length)
	fua := q.Flags&nbdproto.CmdFlagFUA != 0
	var err error
	switch q.Type {
	case nbdproto.CmdRead:
		switch {
		case n == 0:
		case ss.alone():
			err = ss.sbe.ReadAtSync(r.buf.Bytes(), off)
		default:
			err = ss.be.ReadAt(r.buf.Bytes(), off)
		}
	case nbdproto.CmdWrite:
		switch {
		case n == 0:
		case ss.alone():
			err = ss.sbe.WriteAtSync(r.buf.Bytes(), off, fua)
		default:
			err = ss.be.WriteAt(r.buf.Bytes(), off, fua)
		}
	case nbdproto.CmdFlush:
		err = ss.be.Flush()
	case nbdproto.CmdTrim:
		if n > 0 {
			err = ss.be.Trim(off, n, fua)
		}
	case nbdproto.CmdWriteZeroes:
		if n > 0 {
			err = ss.be.WriteZeroes(off, n, q.Flags&nbdproto.CmdFlagNoHole != 0, q.Flags&nbdproto.CmdFlagFastZero != 0, fua)
		}
	case nbdproto.CmdCache:
		if n > 0 {
			err = ss.be.Cache(off, n)
		}
	case nbdproto.CmdBlockStatus:
		err = ss.blockStatus(r)
	}
	if err != nil {
		r.errno = ErrnoOf(err)
		ss.logBackendError(r, err)
	}
}

// alone reports whether a READ or WRITE being executed should take the
// backend's synchronous path: the backend has one and no other request of
// the connection has been read and not yet executed. That is the client's
// queue depth as the server sees it, counted up to the end of execution
// rather than to the reply being written (as inflight is): a client at
// depth 1 sends its next request only once it has the reply, which comes
// after the count went down, so its every request runs alone, whatever the
// scheduling. Such a request gets a blocking pread/pwrite on the worker: no
// AIO submission and no wakeup by the reaper. At depth, requests overlap
// and go through ReadAt/WriteAt (AIO); one that arrives while a
// synchronous call blocks counts it, so a blocking call never makes the
// next request alone too (the feedback that sank dio's AIOConcurrent).
func (ss *session) alone() bool { return ss.sbe != nil && ss.running.Load() == 1 }

// logBackendError logs a backend error, at most once a second per
// connection (a failing disk must not flood the log).
func (ss *session) logBackendError(r *request, err error) {
	if r.errno == nbdproto.ENOTSUP && r.req.Type == nbdproto.CmdWriteZeroes {
		return // FAST_ZERO refused: the expected answer, not a fault
	}
	now := time.Now().UnixNano()
	last := ss.lastErrLog.Load()
	if now-last < int64(time.Second) || !ss.lastErrLog.CompareAndSwap(last, now) {
		ss.suppressed.Add(1)
		return
	}
	ss.log.Warn("nbd: backend error", "command", r.req.Type.String(), "offset", r.req.Offset,
		"length", r.req.Length, "errno", r.errno.String(), "err", err, "suppressed_since_last", ss.suppressed.Swap(0))
}

// blockStatus answers BLOCK_STATUS for base:allocation into r.buf.
func (ss *session) blockStatus(r *request) error {
	maxN := maxDescriptors
	if r.req.Flags&nbdproto.CmdFlagReqOne != 0 {
		maxN = 1
	}
	r.buf = iobuf.Get(4 + nbdproto.BlockDescriptorSize*maxN)
	st := &r.bs
	*st = blockStatus{remaining: int64(r.req.Length), max: maxN, out: r.buf.Bytes()[4:]}
	be32put(r.buf.Bytes(), metaContextID)
	if err := ss.be.BlockStatus(int64(r.req.Offset), int64(r.req.Length), r.bsFn); err != nil {
		return err
	}
	st.stopped = true
	if st.curLen > 0 {
		st.put()
	}
	if st.n == 0 {
		// The backend reported nothing: status 0 ("allocated, contents
		// unknown") is always a safe answer.
		st.curLen, st.curFlags = int64(r.req.Length), 0
		st.put()
	}
	r.buf.Resize(4 + nbdproto.BlockDescriptorSize*st.n)
	return nil
}

// blockStatus accumulates the descriptors of one BLOCK_STATUS reply,
// merging consecutive extents of equal status.
type blockStatus struct {
	remaining int64 // of the request not yet described
	curLen    int64 // the extent being merged (not yet in out)
	curFlags  uint32
	n, max    int // descriptors in out, and the most allowed
	stopped   bool
	out       []byte
}

func (st *blockStatus) put() {
	nbdproto.PutBlockDescriptor(st.out[st.n*nbdproto.BlockDescriptorSize:], uint32(st.curLen), st.curFlags)
	st.n++
	st.curLen = 0
}

// onExtent is the callback given to Backend.BlockStatus.
func (r *request) onExtent(length int64, hole, zero bool) bool {
	st := &r.bs
	if st.stopped || st.remaining <= 0 {
		return false
	}
	if length <= 0 {
		return true
	}
	length = min(length, st.remaining)
	var f uint32
	if hole {
		f |= nbdproto.StateHole
	}
	if zero {
		f |= nbdproto.StateZero
	}
	if st.curLen > 0 && f == st.curFlags {
		st.curLen += length
	} else {
		if st.curLen > 0 {
			if st.n+1 >= st.max {
				// No room for another descriptor after this one: answer
				// the prefix described so far.
				st.stopped = true
				return false
			}
			st.put()
		}
		st.curLen, st.curFlags = length, f
	}
	st.remaining -= length
	return st.remaining > 0
}

// acquire takes a free request slot and charges need bytes, waiting while
// MaxInFlight or MaxInFlightBytes is reached. Called by the reader only.
func (ss *session) acquire(need int) *request {
	ss.mu.Lock()
	for len(ss.free) == 0 || (ss.bytes > 0 && ss.bytes+need > ss.maxBytes) {
		ss.waiting = true
		ss.cond.Wait()
	}
	r := ss.free[len(ss.free)-1]
	ss.free = ss.free[:len(ss.free)-1]
	ss.bytes += need
	r.need = need
	ss.mu.Unlock()
	ss.inflight.Add(1)
	if ss.m != nil {
		ss.m.inflight.Inc()
	}
	return r
}

// release returns a slot (its buffer already released).
func (ss *session) release(r *request) {
	r.next, r.data, r.msg = nil, nil, nil
	if ss.m != nil {
		ss.m.inflight.Dec()
	}
	ss.inflight.Add(-1)
	ss.mu.Lock()
	ss.free = append(ss.free, r)
	ss.bytes -= r.need
	if ss.waiting {
		ss.waiting = false
		ss.cond.Signal()
	}
	ss.mu.Unlock()
}

// waitIdle waits until every slot is back: all requests answered.
func (ss *session) waitIdle() {
	ss.mu.Lock()
	for len(ss.free) < cap(ss.free) {
		ss.waiting = true
		ss.cond.Wait()
	}
	ss.mu.Unlock()
}

// fill makes at least n bytes available in rb[rpos:rend].
func (ss *session) fill(n int) error {
	if ss.rend-ss.rpos >= n {
		return nil
	}
	if ss.rpos > 0 {
		ss.rend = copy(ss.rb, ss.rb[ss.rpos:ss.rend])
		ss.rpos = 0
	}
	for ss.rend < n {
		m, err := ss.w.Read(ss.rb[ss.rend:])
		ss.rend += m
		if err != nil && ss.rend < n {
			if errors.Is(err, io.EOF) && ss.rend > 0 {
				return io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}

func (ss *session) consume(n int) {
	ss.rpos += n
	if ss.rpos == ss.rend {
		ss.rpos, ss.rend = 0, 0
	}
}

// readPayload fills p from the stream: what is buffered is copied, a
// large remainder is read straight into p, a small one through rb (so that
// the same read also brings in the requests that follow).
func (ss *session) readPayload(p []byte) error {
	k := copy(p, ss.rb[ss.rpos:ss.rend])
	ss.consume(k)
	p = p[k:]
	if len(p) == 0 {
		return nil
	}
	if len(p) >= directReadMin {
		_, err := io.ReadFull(ss.w, p)
		return err
	}
	if err := ss.fill(len(p)); err != nil {
		return err
	}
	copy(p, ss.rb[ss.rpos:])
	ss.consume(len(p))
	return nil
}

// discard reads and drops n bytes of the stream.
func (ss *session) discard(n int) error {
	k := min(n, ss.rend-ss.rpos)
	ss.consume(k)
	n -= k
	for n > 0 {
		m, err := ss.w.Read(ss.rb[:min(n, len(ss.rb))])
		n -= m
		if err != nil && n > 0 {
			return err
		}
	}
	return nil
}

// finish queues r's reply. If no goroutine is writing replies, the caller
// takes the writer role: it writes every queued reply (its own and those
// queued meanwhile by others) in vectored writes until the queue is empty.
// So replies go out in completion order, batched under load, and at low
// load the goroutine that completed a request writes its reply itself
// without a hand-off. With other requests in flight the new writer yields
// once first, so that completed, runnable workers join its writev.
func (ss *session) finish(r *request) {
	ss.prepareReply(r)
	ss.wmu.Lock()
	r.next = nil
	if ss.wtail == nil {
		ss.whead = r
	} else {
		ss.wtail.next = r
	}
	ss.wtail = r
	if ss.writing {
		ss.wmu.Unlock()
		return
	}
	ss.writing = true
	if ss.inflight.Load() > 1 {
		// Other requests are in flight: yield once, so that those
		// already completed and runnable queue their replies into this
		// writev (one system call and one wakeup of the client for the
		// lot) instead of each writing its own.
		ss.wmu.Unlock()
		runtime.Gosched()
		ss.wmu.Lock()
	}
	for {
		head := ss.whead
		ss.whead, ss.wtail = nil, nil
		werr := ss.werr
		ss.wmu.Unlock()
		if werr == nil {
			if err := ss.writeReplies(head); err != nil {
				ss.wmu.Lock()
				ss.werr = err
				ss.wmu.Unlock()
				ss.log.Debug("nbd: writing replies failed; closing", "err", err)
				ss.w.shutdown() // wakes the reader
			}
		}
		ss.retire(head)
		ss.wmu.Lock()
		if ss.whead == nil {
			ss.writing = false
			ss.wmu.Unlock()
			return
		}
	}
}

// prepareReply encodes r's reply header and points r.data at what
// follows it.
func (ss *session) prepareReply(r *request) {
	h := r.hdr[:]
	q := &r.req
	r.data = nil
	switch {
	case r.errno != 0 && ss.sr:
		nbdproto.PutChunkHeader(h, nbdproto.ChunkHeader{Flags: nbdproto.ReplyFlagDone, Type: nbdproto.ReplyTypeError,
			Handle: q.Handle, Length: uint32(nbdproto.ErrorPayloadSize + len(r.msg))})
		nbdproto.PutErrorPayload(h[nbdproto.ChunkHeaderSize:], r.errno, len(r.msg))
		r.hdrLen = nbdproto.ChunkHeaderSize + nbdproto.ErrorPayloadSize
		r.data = r.msg
	case r.errno != 0:
		nbdproto.PutSimpleReply(h, r.errno, q.Handle)
		r.hdrLen = nbdproto.SimpleReplySize
	case q.Type == nbdproto.CmdRead && ss.sr && q.Length == 0:
		nbdproto.PutChunkHeader(h, nbdproto.ChunkHeader{Flags: nbdproto.ReplyFlagDone, Type: nbdproto.ReplyTypeNone, Handle: q.Handle})
		r.hdrLen = nbdproto.ChunkHeaderSize
	case q.Type == nbdproto.CmdRead && ss.sr:
		nbdproto.PutChunkHeader(h, nbdproto.ChunkHeader{Flags: nbdproto.ReplyFlagDone, Type: nbdproto.ReplyTypeOffsetData,
			Handle: q.Handle, Length: nbdproto.OffsetDataHeaderSize + q.Length})
		be64put(h[nbdproto.ChunkHeaderSize:], q.Offset)
		r.hdrLen = nbdproto.ChunkHeaderSize + nbdproto.OffsetDataHeaderSize
		r.data = r.buf.Bytes()
	case q.Type == nbdproto.CmdBlockStatus:
		nbdproto.PutChunkHeader(h, nbdproto.ChunkHeader{Flags: nbdproto.ReplyFlagDone, Type: nbdproto.ReplyTypeBlockStatus,
			Handle: q.Handle, Length: uint32(r.buf.Len())})
		r.hdrLen = nbdproto.ChunkHeaderSize
		r.data = r.buf.Bytes()
	default:
		nbdproto.PutSimpleReply(h, 0, q.Handle)
		r.hdrLen = nbdproto.SimpleReplySize
		if q.Type == nbdproto.CmdRead && r.buf != nil {
			r.data = r.buf.Bytes()
		}
	}
}

// writeReplies writes the replies of the list in one vectored write
// (several, if the kernel takes less at a time).
func (ss *session) writeReplies(head *request) error {
	iov := ss.iov[:0]
	for r := head; r != nil; r = r.next {
		iov = append(iov, r.hdr[:r.hdrLen])
		if len(r.data) > 0 {
			iov = append(iov, r.data)
		}
	}
	ss.iov = iov
	err := ss.w.writev(iov)
	clear(iov)
	return err
}

// retire records the metrics of answered requests and frees their
// buffers and slots.
func (ss *session) retire(head *request) {
	for r := head; r != nil; {
		next := r.next
		if m := ss.m; m != nil {
			slot := cmdSlot(r.req.Type)
			m.ops[slot].Inc()
			m.latency[slot].Observe(time.Since(r.start).Seconds())
			if r.errno != 0 {
				m.errCounter(r.errno).Inc()
			} else if r.req.Type == nbdproto.CmdRead {
				m.read.Add(float64(r.req.Length))
			} else if r.req.Type == nbdproto.CmdWrite {
				m.written.Add(float64(r.req.Length))
			}
		}
		if r.buf != nil {
			r.buf.Release()
			r.buf = nil
		}
		ss.release(r)
		r = next
	}
}

func be64put(b []byte, v uint64) {
	be32put(b[0:4], uint32(v>>32))
	be32put(b[4:8], uint32(v))
}

func be32put(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
}
