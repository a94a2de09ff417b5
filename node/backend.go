package node

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"keel/netpath/nbd"
	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// Backend is the NBD backend of a volume this node leads: reads are
// served from the local replica, writes, trims, zeroings and flushes are
// applied locally and on every in-sync secondary before they are
// acknowledged. See the package doc for the write path step by step.
//
// Every request is refused with ESHUTDOWN unless this node is the volume's
// primary at the epoch it acts on, holds a valid lease, and no replica has
// fenced that epoch. A local disk error returns that errno.
type Backend struct {
	r *replica
}

var (
	_ nbd.Backend     = (*Backend)(nil)
	_ nbd.SyncBackend = (*Backend)(nil)
)

// Size is the volume size.
func (b *Backend) Size() int64 { return b.r.vol.Size() }

// BlockSize is the preferred block size.
func (b *Backend) BlockSize() int { return b.r.vol.BlockSize() }

// MinBlockSize is 1: unaligned requests are read-modify-written by every
// replica's volume.
func (b *Backend) MinBlockSize() int { return b.r.vol.MinBlockSize() }

// ReadOnly is false: a replicated volume is served writable by its
// primary.
func (b *Backend) ReadOnly() bool { return false }

// ReadAt reads from the local replica, which holds every acknowledged
// write: an acknowledgement waits for the local write. It borrows p.
func (b *Backend) ReadAt(p []byte, off int64) error {
	if _, err := b.r.authorized(time.Now().Add(b.r.x.timing.PeerWait)); err != nil {
		return err
	}
	return b.r.vol.ReadAt(p, off)
}

// ReadAtSync is ReadAt with the local read done synchronously on the
// calling goroutine (netpath/nbd calls it for a request alone on its
// connection).
func (b *Backend) ReadAtSync(p []byte, off int64) error {
	if _, err := b.r.authorized(time.Now().Add(b.r.x.timing.PeerWait)); err != nil {
		return err
	}
	return b.r.vol.ReadAtSync(p, off)
}

// WriteAt replicates a write. It borrows p until it returns: p is the
// buffer written locally and handed to every replication stream.
func (b *Backend) WriteAt(p []byte, off int64, fua bool) error {
	o := localOp{kind: opWrite, p: p, off: off, n: int64(len(p)), fua: fua}
	return b.r.replicate(&o)
}

// WriteAtSync is WriteAt with the local write done synchronously on the
// calling goroutine (netpath/nbd calls it for a request alone on its
// connection); the frames go out first, as for WriteAt.
func (b *Backend) WriteAtSync(p []byte, off int64, fua bool) error {
	o := localOp{kind: opWrite, p: p, off: off, n: int64(len(p)), fua: fua, sync: true}
	return b.r.replicate(&o)
}

// Trim replicates a trim.
func (b *Backend) Trim(off, length int64, fua bool) error {
	o := localOp{kind: opTrim, off: off, n: length, fua: fua}
	return b.r.replicate(&o)
}

// WriteZeroes replicates a zeroing. With fastZero the local replica goes
// first: if it has no fast way, nothing was sent anywhere.
func (b *Backend) WriteZeroes(off, length int64, noHole, fastZero, fua bool) error {
	o := localOp{kind: opZeroes, off: off, n: length, noHole: noHole, fastZero: fastZero, fua: fua}
	return b.r.replicate(&o)
}

// Flush makes every acknowledged write durable on every in-sync replica:
// fdatasync here and a FLUSH frame (which waits for every earlier frame
// of the volume) to each secondary.
func (b *Backend) Flush() error {
	o := localOp{kind: opFlush}
	return b.r.replicate(&o)
}

// Cache checks the range on the local replica.
func (b *Backend) Cache(off, length int64) error {
	if _, err := b.r.authorized(time.Now().Add(b.r.x.timing.PeerWait)); err != nil {
		return err
	}
	return b.r.vol.Cache(off, length)
}

// BlockStatus reports the local replica's allocation.
func (b *Backend) BlockStatus(off, length int64, fn func(length int64, hole, zero bool) bool) error {
	if _, err := b.r.authorized(time.Now().Add(b.r.x.timing.PeerWait)); err != nil {
		return err
	}
	return b.r.vol.BlockStatus(off, length, fn)
}

type opKind uint8

const (
	opWrite opKind = iota
	opTrim
	opZeroes
	opFlush
)

// localOp is one replicated request: what the local volume does and what
// the replication frame says.
type localOp struct {
	kind                  opKind
	p                     []byte // opWrite: borrowed from the NBD layer
	off, n                int64
	fua, noHole, fastZero bool
	sync                  bool // opWrite: the local write on the calling goroutine (WriteAtSync)
}

func (o *localOp) request(vol, epoch uint64, degraded bool) repl.Request {
	req := repl.Request{Volume: vol, Epoch: epoch, Offset: uint64(o.off)}
	switch o.kind {
	case opWrite:
		req.Type, req.Payload = replproto.TypeWrite, o.p
	case opTrim:
		req.Type, req.Length = replproto.TypeTrim, uint32(o.n)
	case opZeroes:
		req.Type, req.Length = replproto.TypeZeroes, uint32(o.n)
		if o.noHole {
			req.Flags |= replproto.FlagNoHole
		}
	case opFlush:
		req.Type, req.Offset = replproto.TypeFlush, 0
	}
	if o.fua && o.kind != opFlush {
		req.Flags |= replproto.FlagFUA
	}
	if degraded && o.kind != opFlush {
		req.Flags |= replproto.FlagDegraded
	}
	return req
}

func (r *replica) local(o *localOp) error {
	switch o.kind {
	case opWrite:
		if o.sync {
			return r.vol.WriteAtSync(o.p, o.off, o.fua)
		}
		return r.vol.WriteAt(o.p, o.off, o.fua)
	case opTrim:
		return r.vol.Trim(o.off, o.n, o.fua)
	case opZeroes:
		return r.vol.WriteZeroes(o.off, o.n, o.noHole, o.fastZero, o.fua)
	}
	return r.vol.Flush()
}

// round is one replicated request's frames to a set of peers and their
// outcomes. Pooled: a request takes one, so the steady state allocates
// nothing (no goroutine, no op per peer).
type round struct {
	ops     []repl.Op
	to      []*peer // the in-sync peers sent to, then the catching ones
	nsync   int     // to[:nsync] are in sync
	left    atomic.Int32
	done    chan struct{} // capacity 1: the last op's completion
	doneFn  func(*repl.Op)
	acked   []uint64 // node numbers of the peers that acknowledged, any round
	lost    []uint64 // peers found lost in this round
	lostP   []*peer  // and their Peers and errors, to report
	lostErr []error
	missing []*peer
}

var roundPool = sync.Pool{New: func() any {
	rd := &round{done: make(chan struct{}, 1)}
	rd.doneFn = rd.opDone
	return rd
}}

func (rd *round) opDone(*repl.Op) {
	if rd.left.Add(-1) == 0 {
		rd.done <- struct{}{}
	}
}

// send submits req to every peer of to (in sync) and of catching without
// waiting. req.Payload is borrowed until wait returns.
func (rd *round) send(ctx context.Context, to, catching []*peer, req *repl.Request) {
	rd.to = append(append(rd.to[:0], to...), catching...)
	rd.nsync = len(to)
	n := len(rd.to)
	if cap(rd.ops) < n {
		rd.ops = make([]repl.Op, n)
	}
	rd.ops = rd.ops[:n]
	if n == 0 {
		return
	}
	rd.left.Store(int32(n))
	for i, p := range rd.to {
		op := &rd.ops[i]
		op.Req = *req
		op.Done = rd.doneFn
		p.rp.Submit(ctx, op)
	}
}

// wait returns once every op of the last send has completed: then no
// stream touches the payload any more.
func (rd *round) wait() {
	if len(rd.to) > 0 {
		<-rd.done
	}
}

func (rd *round) release() {
	clear(rd.to)
	clear(rd.missing)
	clear(rd.lostP)
	clear(rd.lostErr)
	rd.to, rd.missing, rd.lostP, rd.lostErr = rd.to[:0], rd.missing[:0], rd.lostP[:0], rd.lostErr[:0]
	roundPool.Put(rd)
}

// replicate serves one write, trim, zeroing or flush as the primary:
//
//  1. take the range lock (not for a flush) and the view to act on,
//     checking authority;
//  2. submit the frame to every in-sync secondary (asynchronously, with
//     the caller's buffer) and do the local operation meanwhile;
//  3. wait for every frame's outcome;
//  4. settle: every member of the current view's in-sync set must have
//     acknowledged (resending to members that joined the set's epoch
//     late, reporting lost members and waiting for the coordinator to
//     drop them), and authority is checked again before returning nil,
//     which acknowledges the request.
func (r *replica) replicate(o *localOp) error {
	start := time.Now()
	if o.kind != opFlush {
		lk := r.locks.Lock(o.off, o.off+max(o.n, 1))
		defer r.locks.Unlock(lk)
	}
	v, err := r.authorized(start.Add(r.x.timing.PeerWait))
	if err != nil {
		return err
	}
	r.busy()
	defer r.idle()
	if v.degraded && o.kind != opFlush {
		// Invariant 6: recorded before the write is issued anywhere.
		if err := r.mark(o.off, o.n); err != nil {
			return err
		}
	}
	var cover uint64
	if o.kind == opFlush {
		cover = r.unfl.beginFlush()
	}
	rd := roundPool.Get().(*round)
	defer rd.release()
	req := o.request(r.num, v.epoch, v.degraded)
	if o.kind == opWrite && r.x.throttle != nil {
		r.x.throttle.Foreground(len(o.p) * (len(v.peers) + len(v.catching)))
	}
	if o.kind == opZeroes && o.fastZero {
		// ENOTSUP must come before anything changed anywhere.
		if err := r.local(o); err != nil {
			return err
		}
		rd.send(r.x.ctx, v.peers, v.catching, &req)
		rd.wait()
	} else {
		rd.send(r.x.ctx, v.peers, v.catching, &req)
		if r.x.testAfterSend != nil {
			r.x.testAfterSend(o.off)
		}
		err := r.local(o)
		rd.wait()
		if err != nil {
			return err
		}
	}
	err = r.settle(o, v, rd, start)
	if err == nil && o.kind == opFlush {
		r.unfl.flushDone(cover)
	}
	return err
}

// settle finishes a request whose local part succeeded and whose frames
// (sent under v) have all completed; see replicate. It never returns nil
// unless every in-sync secondary of the current, authorized view has
// acknowledged the request (invariant 5).
func (r *replica) settle(o *localOp, v *view, rd *round, start time.Time) error {
	t := r.x.timing
	retryUntil := start.Add(t.PeerWait)
	deadline := start.Add(t.PeerWait + t.LossWait)
	rd.acked = rd.acked[:0]
	for {
		var fencedAt uint64
		rd.lost = rd.lost[:0]
		rd.lostP, rd.lostErr = rd.lostP[:0], rd.lostErr[:0]
		for i, p := range rd.to {
			err := rd.ops[i].Err()
			rd.ops[i] = repl.Op{} // drop the payload and error
			if err == nil {
				// A catching peer's acknowledgement counts too: a request
				// that straddles its rejoin is not sent to it again.
				rd.acked = append(rd.acked, p.num)
				continue
			}
			if i >= rd.nsync {
				// A member being caught up: its failure stops its sync
				// (which starts over later), never the request.
				r.catchFailed(p, err)
				continue
			}
			var ne *repl.NackError
			switch {
			case errors.Is(err, repl.ErrFenced):
				e := r.x.fence.Epoch(r.num)
				if errors.As(err, &ne) {
					e = max(e, ne.Epoch)
				}
				fencedAt = max(fencedAt, e)
			case errors.Is(err, repl.ErrPeerDown) && time.Now().Before(retryUntil) && r.x.downFor(p, time.Now()) < t.PeerWait:
				// Never sent: wait for the stream (a first connect, or a
				// reconnect after a recent loss) and resend.
				ctx, cancel := context.WithDeadline(r.x.ctx, retryUntil)
				p.rp.WaitUp(ctx)
				cancel()
			case errors.Is(err, repl.ErrUnknownVolume) && time.Now().Before(retryUntil):
				// The secondary has not opened its replica yet (it hears of
				// a new volume at its next heartbeat): give it time.
				r.pause(100*time.Millisecond, retryUntil)
			case errors.Is(err, repl.ErrClosed) && r.x.ctx.Err() != nil:
				return errNotPrimary // the node is stopping
			case errors.Is(err, repl.ErrClosed) && r.replaced(p):
				// The peer moved and its Peer was replaced: send again on
				// the new one.
			default:
				rd.lost = append(rd.lost, p.num)
				rd.lostP = append(rd.lostP, p)
				rd.lostErr = append(rd.lostErr, err)
			}
		}
		if len(rd.lost) > 0 {
			// The write reached this replica and maybe not the lost one:
			// record the range before the loss is reported (and so before
			// the request can be acknowledged), so that the lost member's
			// catch-up copies it.
			if o.kind != opFlush {
				if err := r.mark(o.off, o.n); err != nil {
					return err
				}
			}
			if err := r.markUnflushed(); err != nil {
				return err
			}
			for i, p := range rd.lostP {
				r.reportLoss(p, rd.lostErr[i])
			}
		}
		if fencedAt > v.epoch {
			if err := r.awaitEpoch(fencedAt, deadline); err != nil {
				return err
			}
		}
		if len(rd.lost) > 0 {
			if err := r.awaitDropped(v, rd.lost, deadline); err != nil {
				return err
			}
			// Again: writes noted while the loss was being settled (the
			// view is degraded now, so later ones mark themselves).
			if err := r.markUnflushed(); err != nil {
				return err
			}
			if o.kind != opFlush {
				// The secondaries that acknowledged got the frame without
				// FlagDegraded: send it again (idempotent, the range lock is
				// held) so that it is in their bitmaps too, in case one of
				// them is promoted and has to catch the lost member up.
				rd.acked = rd.acked[:0]
			}
		}
		nv, err := r.authorized(deadline)
		if err != nil {
			return err
		}
		rd.missing = rd.missing[:0]
		for _, p := range nv.peers {
			if !slices.Contains(rd.acked, p.num) {
				rd.missing = append(rd.missing, p)
			}
		}
		if len(rd.missing) == 0 {
			if o.kind != opFlush {
				if !o.fua {
					r.unfl.note(o.off, o.n)
				}
				if nv.degraded && !v.degraded {
					// Acknowledged everywhere, but a member left meanwhile
					// (another request's loss): record it like the writes
					// of the degraded view (free when marked already).
					if err := r.mark(o.off, o.n); err != nil {
						return err
					}
				}
			}
			return nil
		}
		if !time.Now().Before(deadline) {
			r.x.m.refused.WithLabelValues("loss_timeout").Inc()
			return errLossTimeout
		}
		r.x.m.resent.Add(float64(len(rd.missing)))
		if nv.degraded && o.kind != opFlush {
			if err := r.mark(o.off, o.n); err != nil {
				return err
			}
		}
		req := o.request(r.num, nv.epoch, nv.degraded)
		rd.send(r.x.ctx, rd.missing, nil, &req)
		rd.wait()
		v = nv
	}
}

// awaitEpoch handles a stale-epoch refusal: a replica has seen epoch e,
// newer than the view the frame was sent under. If this node is about to
// act on a newer epoch itself (its agent already has it, or its own
// replica-loss report is being answered), it waits for the view to reach
// e; otherwise it has been deposed, and it stops acknowledging at once.
func (r *replica) awaitEpoch(e uint64, deadline time.Time) error {
	r.x.auth.Kick()
	for {
		v := r.view()
		if !v.primary || v.epoch >= e {
			return nil // the caller's authorization check decides
		}
		if !r.behind(v, time.Now()) && !r.lossPending() {
			r.x.m.refused.WithLabelValues("fenced").Inc()
			return errFenced
		}
		if !r.waitChange(v, deadline) {
			r.x.m.refused.WithLabelValues("fenced").Inc()
			return errFenced
		}
	}
}

// replaced reports whether the current view reaches p's node through
// another Peer than p.
func (r *replica) replaced(p *peer) bool {
	for _, q := range r.view().peers {
		if q.num == p.num && q != p {
			return true
		}
	}
	return false
}

func (r *replica) lossPending() bool {
	r.lossMu.Lock()
	defer r.lossMu.Unlock()
	return r.lossRunning
}

// awaitDropped waits until every peer of lost is out of the in-sync set of
// a view newer than v (or this node is no longer the primary).
func (r *replica) awaitDropped(v *view, lost []uint64, deadline time.Time) error {
	for {
		nv := r.view()
		if !nv.primary {
			return nil
		}
		if nv.epoch > v.epoch && !slices.ContainsFunc(lost, nv.has) {
			return nil
		}
		if !r.waitChange(nv, deadline) {
			if r.x.ctx.Err() != nil {
				return errNotPrimary
			}
			r.x.m.refused.WithLabelValues("loss_timeout").Inc()
			return errLossTimeout
		}
	}
}

// pause waits for d (bounded by until) or a change of view.
func (r *replica) pause(d time.Duration, until time.Time) {
	d = min(d, time.Until(until))
	if d <= 0 {
		return
	}
	v := r.view()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-v.next:
	case <-r.x.ctx.Done():
	}
}
