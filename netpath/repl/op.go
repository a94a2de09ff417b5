package repl

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"keel/netpath/replproto"
)

// Request is one replicated operation, as the primary's volume issues it.
type Request struct {
	// Type is replproto.TypeWrite, TypeTrim, TypeZeroes or TypeFlush (or,
	// once issue 6 implements them, TypeCatchupWrite / TypeRemirrorWrite).
	Type  replproto.Type
	Flags replproto.Flags // FlagFUA; FlagNoHole for ZEROES
	// Volume and Epoch: the coordinator's volume id and this primary's
	// epoch for it.
	Volume uint64
	Epoch  uint64
	Offset uint64
	// Length is the range length of TRIM and ZEROES; for data types it is
	// taken from len(Payload).
	Length uint32
	// Payload is the data of a WRITE: the buffer that came off the NBD
	// socket. It is borrowed, not copied: the caller must neither modify
	// nor release it until the operation has finished (Fanout or Send has
	// returned, or Op.Done has been called), because the kernel may read it
	// until then (MSG_ZEROCOPY).
	Payload []byte
}

func (r *Request) length() uint32 {
	if r.Type.HasPayload() {
		return uint32(len(r.Payload))
	}
	return r.Length
}

func (r *Request) check() error {
	if !r.Type.Windowed() {
		return fmt.Errorf("repl: %s is not a replicated operation", r.Type)
	}
	if r.Type.HasPayload() && len(r.Payload) > replproto.MaxPayload {
		return fmt.Errorf("repl: payload of %d bytes exceeds %d: %w", len(r.Payload), replproto.MaxPayload, replproto.ErrTooLarge)
	}
	if !r.Type.HasPayload() && len(r.Payload) != 0 {
		return fmt.Errorf("repl: %s carries no payload", r.Type)
	}
	h := replproto.Header{Type: r.Type, Flags: r.Flags, Volume: r.Volume, Epoch: r.Epoch, Seq: 1, Offset: r.Offset, Length: r.length()}
	return h.Validate()
}

// Op is one Request to one peer: the asynchronous form. The caller owns
// the Op (it may pool and reuse it once Done has been called).
type Op struct {
	Req Request
	// Done is called exactly once when the op has finished: acknowledged,
	// refused or failed; Err says which. It runs on a stream goroutine (or
	// on the submitter's, when the op is refused before sending) and must
	// not block. After Done the peer no longer touches Req.Payload.
	Done func(*Op)

	err error

	// Set by Submit and the stream; guarded by the stream's mu once the op
	// is in a window.
	crc       uint32
	hasCRC    bool
	seq       uint64
	bytes     int // payload bytes counted in the window
	queued    int64
	acked     bool // an ACK or NACK arrived
	zcPending bool // a MSG_ZEROCOPY send of it awaits its completion
	hdr       [replproto.HeaderSize]byte
}

// Err is the op's outcome once Done has been called: nil when the peer
// acknowledged it.
func (op *Op) Err() error { return op.err }

func (op *Op) finish(err error) {
	op.err = err
	if op.Done != nil {
		op.Done(op)
	}
}

// fanout is one Fanout call's state, pooled: ops for each peer and a
// countdown that wakes the caller.
type fanout struct {
	ops    []Op
	left   atomic.Int32
	done   chan struct{}
	doneFn func(*Op)
}

var fanoutPool = sync.Pool{New: func() any {
	fo := &fanout{done: make(chan struct{}, 1)}
	fo.doneFn = fo.opDone
	return fo
}}

func (fo *fanout) opDone(*Op) {
	if fo.left.Add(-1) == 0 {
		fo.done <- struct{}{}
	}
}

// Fanout sends req to every peer in parallel (one frame on each peer's
// stream) and waits until every peer has answered or failed. results[i]
// receives peers[i]'s outcome (nil: acknowledged); results must be at least
// as long as peers. It returns nil when every peer acknowledged, else the
// first peer's error.
//
// ctx bounds only the wait for space in a full in-flight window. Once a
// frame is sent, Fanout waits for its answer or the peer's frame deadline,
// whatever ctx says, because the payload must not be released while a
// peer's kernel may still read it. req.Payload is borrowed until Fanout
// returns; its checksum is computed once for all peers.
//
// Fanout does not allocate in steady state: op structs are pooled and each
// peer's long-lived sender goroutine does the sending.
func Fanout(ctx context.Context, peers []*Peer, req *Request, results []error) error {
	if len(results) < len(peers) {
		panic(fmt.Sprintf("repl: Fanout with %d results for %d peers", len(results), len(peers)))
	}
	if len(peers) == 0 {
		return nil
	}
	if err := req.check(); err != nil {
		for i := range peers {
			results[i] = err
		}
		return err
	}
	fo := fanoutPool.Get().(*fanout)
	if cap(fo.ops) < len(peers) {
		fo.ops = make([]Op, len(peers))
	}
	fo.ops = fo.ops[:len(peers)]
	var crc uint32
	if req.Type.HasPayload() {
		crc = replproto.PayloadCRC(req.Payload)
	}
	fo.left.Store(int32(len(peers)))
	for i := range peers {
		op := &fo.ops[i]
		op.Req = *req
		op.Done = fo.doneFn
		op.crc, op.hasCRC = crc, true
	}
	for i, p := range peers {
		p.submit(ctx, &fo.ops[i])
	}
	<-fo.done
	var first error
	for i := range peers {
		op := &fo.ops[i]
		results[i] = op.err
		if first == nil && op.err != nil {
			first = op.err
		}
		*op = Op{} // drop references to the payload and errors
	}
	fanoutPool.Put(fo)
	return first
}
