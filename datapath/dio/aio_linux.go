package dio

import (
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"keel/datapath/iobuf"
)

// Linux native AIO (io_setup/io_submit/io_getevents/io_destroy), issued as
// raw system calls: no cgo, no libaio, and not io_uring.
//
// The kernel's structures, as include/uapi/linux/aio_abi.h lays them out on
// a little-endian 64-bit machine:
//
//	struct iocb (64 bytes)                  struct io_event (32 bytes)
//	 0 aio_data       u64  (our slot index)  0 data  u64  (iocb.aio_data)
//	 8 aio_key        u32                    8 obj   u64  (iocb address)
//	12 aio_rw_flags   u32  (RWF_DSYNC: FUA) 16 res   s64  (bytes, or -errno)
//	16 aio_lio_opcode u16  (0 PREAD, 1 PWRITE)
//	18 aio_reqprio    s16                   24 res2  s64
//	20 aio_fildes     u32
//	24 aio_buf        u64  (buffer address)
//	32 aio_nbytes     u64
//	40 aio_offset     s64
//	48 aio_reserved2  u64
//	56 aio_flags      u32
//	60 aio_resfd      u32
type iocb struct {
	data     uint64
	key      uint32
	rwFlags  uint32
	opcode   uint16
	reqprio  int16
	fildes   uint32
	buf      uint64
	nbytes   uint64
	offset   int64
	reserved uint64
	flags    uint32
	resfd    uint32
}

type ioEvent struct {
	data uint64
	obj  uint64
	res  int64
	res2 int64
}

const (
	iocbCmdPread  = 0
	iocbCmdPwrite = 1

	// aioBatch is max_nr of one io_getevents: events completed per wakeup
	// of the reaper.
	aioBatch = 64
	// wakeTag marks the zero-length read Close submits to wake the reaper.
	wakeTag = ^uint64(0)
)

// aioReq is one preallocated submission slot. It is owned by the free
// list, or by the one goroutine that took it from there, or — between its
// iocb being queued and its completion — by the submitter role, the
// kernel and the reaper.
type aioReq struct {
	cb  iocb
	res atomic.Int64 // written by the reaper before it signals done; atomic because the
	// happens-before edge from the submitter to the reaper runs through the
	// kernel, where the race detector cannot see it
	done    chan struct{}  // capacity 1: completion (or refusal) signal
	refused bool           // set before done is signalled: io_submit refused the iocb, it was not issued
	keep    unsafe.Pointer // the buffer while the kernel holds its address
}

// aioEngine is a File's AIO context and its reaper goroutine.
type aioEngine struct {
	ctx   uintptr
	fd    int
	mode  AIOMode
	reqs  []aioReq
	free  chan *aioReq // slots not in use; capacity len(reqs)
	busy  atomic.Int32 // ReadAt/WriteAt calls in progress (AIOConcurrent)
	wake  aioReq       // the zero-length read that wakes the reaper at Close
	wbuf  *iobuf.Buf   // its (aligned, empty) buffer
	reapd chan struct{}

	smu        sync.Mutex // guards sq and submitting
	sq         []*iocb    // iocbs queued for the next io_submit
	submitting bool       // a caller holds the submitter role
	spare      []*iocb    // the other half of sq's double buffer; owned by the submitter role

	stopOnce sync.Once
	stopping atomic.Bool

	submits   atomic.Int64 // requests completed through AIO
	fallbacks atomic.Int64 // requests AIO could not take (no slot, io_submit refused)
	short     atomic.Int64 // completions shorter than asked, finished synchronously
	calls     atomic.Int64 // io_submit calls that issued at least one iocb
}

// EnableAIO makes ReadAt and WriteAt use Linux native AIO according to
// mode, with up to depth requests submitted at once (more take the
// synchronous path for the excess). It must be called before the File is
// shared. If the kernel refuses an AIO context (io_setup: aio-max-nr
// reached, ENOSYS), the File stays synchronous, Stats().AIOSetupFailures
// counts it, and the *Error is returned for the caller to log; the File
// remains fully usable.
func (f *File) EnableAIO(mode AIOMode, depth int) error {
	if mode == AIODefault {
		mode = DefaultAIO
	}
	if mode == AIOOff || f.aio != nil {
		return nil
	}
	if depth <= 0 {
		depth = 128
	}
	var ctx uintptr
	if _, _, en := unix.Syscall(unix.SYS_IO_SETUP, uintptr(depth+1), uintptr(unsafe.Pointer(&ctx)), 0); en != 0 {
		f.aioSetupFailures.Add(1)
		return &Error{Op: "io_setup", Path: f.path, Off: -1, Len: -1, Err: en}
	}
	e := &aioEngine{
		ctx: ctx, fd: f.fd, mode: mode,
		reqs:  make([]aioReq, depth),
		free:  make(chan *aioReq, depth),
		reapd: make(chan struct{}),
		wbuf:  iobuf.Get(iobuf.Align),
		sq:    make([]*iocb, 0, depth),
		spare: make([]*iocb, 0, depth),
	}
	for i := range e.reqs {
		r := &e.reqs[i]
		r.done = make(chan struct{}, 1)
		r.cb.data = uint64(i)
		r.cb.fildes = uint32(f.fd)
		e.free <- r
	}
	go e.reap()
	f.aio = e
	return nil
}

// AIO reports the mode in use: AIOOff unless EnableAIO succeeded.
func (f *File) AIO() AIOMode {
	if f.aio == nil {
		return AIOOff
	}
	return f.aio.mode
}

// reap completes events until Close's wake read arrives, then destroys the
// context: nothing else touches it once the reaper owns its end.
func (e *aioEngine) reap() {
	defer close(e.reapd)
	var evs [aioBatch]ioEvent
	for {
		n, _, en := unix.Syscall6(unix.SYS_IO_GETEVENTS, e.ctx, 1, aioBatch, uintptr(unsafe.Pointer(&evs[0])), 0, 0)
		if en != 0 {
			if en == unix.EINTR {
				continue
			}
			// The context is gone (Close destroyed it because the wake
			// read could not be submitted): nothing is in flight.
			return
		}
		woken := false
		for i := range int(n) {
			ev := &evs[i]
			if ev.data == wakeTag {
				woken = true
				continue
			}
			r := &e.reqs[ev.data]
			r.res.Store(ev.res)
			r.done <- struct{}{}
		}
		if woken {
			unix.Syscall(unix.SYS_IO_DESTROY, e.ctx, 0, 0)
			return
		}
	}
}

// stop waits until no request is submitted, wakes the reaper, and waits
// for it to destroy the context.
func (e *aioEngine) stop() {
	e.stopOnce.Do(func() {
		e.stopping.Store(true)
		for range len(e.reqs) { // every slot back: nothing in flight
			<-e.free
		}
		w := &e.wake.cb
		w.data = wakeTag
		w.fildes = uint32(e.fd)
		w.opcode = iocbCmdPread
		w.buf = uint64(uintptr(unsafe.Pointer(&e.wbuf.Bytes()[0])))
		p := uintptr(unsafe.Pointer(w))
		for {
			_, _, en := unix.Syscall(unix.SYS_IO_SUBMIT, e.ctx, 1, uintptr(unsafe.Pointer(&p)))
			if en == unix.EINTR || en == unix.EAGAIN {
				continue
			}
			if en != 0 {
				// Destroying the context makes the waiting io_getevents
				// return EINVAL.
				unix.Syscall(unix.SYS_IO_DESTROY, e.ctx, 0, 0)
			}
			break
		}
		<-e.reapd
		e.wbuf.Release()
	})
}

// begin claims a free slot for the caller's request, or returns nil when
// the request should go the synchronous way: the engine is stopping, the
// mode is AIOConcurrent and the caller is alone (busy counts it), or every
// slot is in use.
func (e *aioEngine) begin() *aioReq {
	if e.stopping.Load() {
		return nil
	}
	if e.mode == AIOConcurrent && e.busy.Load() <= 1 {
		return nil
	}
	select {
	case r := <-e.free:
		return r
	default:
		e.fallbacks.Add(1)
		return nil
	}
}

// submit issues op on p at off with rwFlags through slot r and waits for
// its completion. It reports the kernel's result (bytes or -errno) and
// ok == false if io_submit refused the request, which then was not
// issued. The slot is back on the free list when submit returns.
//
// The iocb is queued; the caller that finds no submitter takes the role
// and issues everything queued in one io_submit (one block-layer plug and
// one doorbell for the lot), looping until the queue is empty. When other
// calls are in progress it first yields once, so that callers already
// runnable queue their iocbs into the same io_submit.
func (e *aioEngine) submit(r *aioReq, op uint16, p []byte, off int64, rwFlags uint32) (res int64, ok bool) {
	r.keep = unsafe.Pointer(&p[0])
	r.cb.opcode = op
	r.cb.rwFlags = rwFlags
	r.cb.buf = uint64(uintptr(r.keep))
	r.cb.nbytes = uint64(len(p))
	r.cb.offset = off
	r.refused = false
	e.smu.Lock()
	e.sq = append(e.sq, &r.cb)
	lead := !e.submitting
	e.submitting = true
	e.smu.Unlock()
	if lead {
		if e.busy.Load() > 1 {
			runtime.Gosched()
		}
		e.flush()
	}
	<-r.done
	r.keep = nil
	if r.refused {
		e.free <- r
		e.fallbacks.Add(1)
		return 0, false
	}
	res = r.res.Load()
	e.free <- r
	e.submits.Add(1)
	return res, true
}

// flush issues the queued iocbs until the queue is empty, then gives up
// the submitter role. An iocb io_submit refuses is handed back to its
// caller (refused), which serves it synchronously: EAGAIN (no room in the
// kernel's queue) refuses the rest of the batch, any other error only the
// iocb it names.
// REQUIRES: the submitter role.
func (e *aioEngine) flush() {
	for {
		e.smu.Lock()
		batch := e.sq
		if len(batch) == 0 {
			e.submitting = false
			e.smu.Unlock()
			return
		}
		e.sq = e.spare[:0]
		e.smu.Unlock()
		for i := 0; i < len(batch); {
			n, _, en := unix.Syscall(unix.SYS_IO_SUBMIT, uintptr(e.ctx), uintptr(len(batch)-i), uintptr(unsafe.Pointer(&batch[i])))
			switch {
			case en == unix.EINTR:
			case en == unix.EAGAIN:
				for _, cb := range batch[i:] {
					e.refuse(cb)
				}
				i = len(batch)
			case en != 0:
				e.refuse(batch[i])
				i++
			default:
				e.calls.Add(1)
				i += int(n)
			}
		}
		clear(batch)
		e.spare = batch[:0]
	}
}

func (e *aioEngine) refuse(cb *iocb) {
	r := &e.reqs[cb.data]
	r.refused = true
	r.done <- struct{}{}
}

// readAIO reads p at off through the engine. handled == false means the
// request was not issued and the caller must do it synchronously.
func (f *File) readAIO(e *aioEngine, p []byte, off int64) (handled bool, err error) {
	r := e.begin()
	if r == nil {
		return false, nil
	}
	res, ok := e.submit(r, iocbCmdPread, p, off, 0)
	if !ok {
		return false, nil
	}
	switch {
	case res == int64(len(p)):
		return true, nil
	case res < 0:
		en := unix.Errno(-res)
		if en == unix.EINTR || en == unix.EAGAIN {
			return true, f.readSync(p, off)
		}
		return true, &Error{Op: "aio pread", Path: f.path, Off: off, Len: int64(len(p)), Err: en}
	default:
		e.short.Add(1)
		return true, f.readSync(p[res:], off+res)
	}
}

// writeAIO writes p at off through the engine, FUA as RWF_DSYNC in the
// iocb. handled == false means the request was not issued (this includes
// a kernel refusing RWF_DSYNC at submission) and the caller must do it
// synchronously.
func (f *File) writeAIO(e *aioEngine, p []byte, off int64, fua bool) (handled bool, err error) {
	var flags uint32
	if fua {
		if f.noDSync.Load() {
			return false, nil
		}
		flags = unix.RWF_DSYNC
	}
	r := e.begin()
	if r == nil {
		return false, nil
	}
	res, ok := e.submit(r, iocbCmdPwrite, p, off, flags)
	if !ok {
		return false, nil
	}
	switch {
	case res == int64(len(p)):
		return true, nil
	case res < 0:
		en := unix.Errno(-res)
		if en == unix.EINTR || en == unix.EAGAIN || (fua && (en == unix.EOPNOTSUPP || en == unix.ENOSYS)) {
			return true, f.writeSync(p, off, fua)
		}
		return true, &Error{Op: "aio pwrite", Path: f.path, Off: off, Len: int64(len(p)), Err: en}
	case res == 0:
		return true, &Error{Op: "aio pwrite (wrote nothing)", Path: f.path, Off: off, Len: int64(len(p)), Err: unix.EIO}
	default:
		e.short.Add(1)
		return true, f.writeSync(p[res:], off+res, fua)
	}
}

// Counters for Stats; a nil engine counts nothing.
func (e *aioEngine) requests() int64 {
	if e == nil {
		return 0
	}
	return e.submits.Load()
}

func (e *aioEngine) fallbackCount() int64 {
	if e == nil {
		return 0
	}
	return e.fallbacks.Load()
}

func (e *aioEngine) shortCount() int64 {
	if e == nil {
		return 0
	}
	return e.short.Load()
}

func (e *aioEngine) submitCalls() int64 {
	if e == nil {
		return 0
	}
	return e.calls.Load()
}
