package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
	"keel/datapath/iobuf"
	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// The sync engine: as a volume's primary, this node brings each
// out-of-sync member whose node is live back into the in-sync set, one
// syncTask per member (see the package doc, "Recovery"):
//
//  1. ask the coordinator for a slot (Agent.RequestSync); refused, wait
//     the answer's retry time raised by capped exponential backoff with
//     jitter (Agent.SyncRetryWait) and ask again;
//  2. granted: attach the member as a catching peer of a new view at the
//     same epoch, behind a barrier (the range lock over the whole volume)
//     so that every write from then on reaches it and every earlier one is
//     finished, and so recorded in the write-intent bitmap;
//  3. snapshot what to copy (catch_up: the bitmap's dirty regions;
//     remirror: the whole volume) and copy it range by range, each under
//     the range lock (no live write to the range is in flight, none
//     overtakes the copy: invariant 3), read with O_DIRECT into an
//     aligned buffer that is the buffer the replication stream sends
//     (zero-copy), paced by the recovery throttle; a range that is all
//     zeroes here goes as a ZEROES frame. Up to syncDepth ranges are in
//     flight at once (each with its own buffer and range lock, held until
//     the member acknowledges it), so that reading the next ranges here
//     overlaps sending and writing the earlier ones there, and the copy is
//     not bound by one round trip per range;
//  4. FLUSH the member; then, behind the barrier again (no live write in
//     flight), if no live write to it failed, ask the coordinator to
//     rejoin it (Agent.Rejoin) and act on the new assignment: the member
//     is in sync at the next epoch. While the rejoin's outcome is unknown
//     (a transport error) the barrier stays, so that no write is
//     acknowledged at the old epoch without it.
//
// A failure of a live write to the catching member, a copy frame refused,
// a rejoin refused: the task detaches the member and starts over after a
// backoff. It stops for good when the assignment no longer asks for it
// (another epoch, the member in sync or gone, its node not live), when
// this node steps down, and when the node stops.

// syncBackoff shapes the waits after a failed copy or slot request
// (refusals use the coordinator's retry time: Agent.SyncRetryWait).
var syncBackoff = coordclient.Backoff{Base: time.Second, Max: time.Minute}

// syncChunk is the largest range one copy frame carries.
const syncChunk = 4 << 20

// syncDepth is how many copy frames of one task are in flight at once
// (syncDepth × syncChunk bytes of buffers while it copies).
const syncDepth = 4

var errDetached = errors.New("node: the catching member left the view")

// syncTask is one copy of r's volume to one out-of-sync member at one
// epoch.
type syncTask struct {
	r      *replica
	target coordapi.NodeID
	addr   string
	epoch  uint64
	ctx    context.Context
	cancel context.CancelFunc
	log    *slog.Logger

	failMu  sync.Mutex // guards failErr
	failErr error      // a live write to the catching member failed

	copied atomic.Int64 // bytes of this attempt acknowledged by the member

	mu         sync.Mutex        // guards following: progress for the reports
	kind       coordapi.SyncKind // "" until a slot is granted
	total      int64
	sampleAt   time.Time
	sampleDone int64
	rate       int64
}

// updateSyncs starts a task for every out-of-sync, live member that as
// (this node's primary assignment, already acted on) lists and that has
// none, and stops the tasks as no longer asks for.
func (r *replica) updateSyncs(as coordapi.Assignment) {
	v := r.view()
	if v.primary && uint64(as.Epoch) < v.epoch {
		return // an older assignment (a reconcile pass overtaken by a loss or rejoin answer): says nothing
	}
	want := map[coordapi.NodeID]coordapi.Peer{}
	if as.Role == coordapi.RolePrimary && as.InSync && v.primary && v.epoch == uint64(as.Epoch) {
		for _, p := range as.Peers {
			if p.Node != r.x.self && !p.InSync && p.Live && p.ReplAddr != "" {
				want[p.Node] = p
			}
		}
	}
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	for id, t := range r.syncs {
		if p, ok := want[id]; !ok || t.epoch != v.epoch || t.addr != p.ReplAddr {
			t.cancel()
			delete(r.syncs, id)
		}
	}
	if r.x.ctx.Err() != nil {
		return
	}
	for id, p := range want {
		if r.syncs[id] != nil {
			continue
		}
		ctx, cancel := context.WithCancel(r.x.ctx)
		t := &syncTask{
			r: r, target: id, addr: p.ReplAddr, epoch: v.epoch, ctx: ctx, cancel: cancel,
			log: r.x.log.With("volume", r.id, "target", string(id), "epoch", v.epoch),
		}
		r.syncs[id] = t
		r.x.syncWG.Add(1)
		go t.run()
	}
}

// stopSyncs stops every task (this node is no longer the primary).
func (r *replica) stopSyncs() {
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	for id, t := range r.syncs {
		t.cancel()
		delete(r.syncs, id)
	}
}

// syncTargets lists the members tasks run for (their Peers must stay up).
func (r *replica) syncTargets() []coordapi.NodeID {
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	out := make([]coordapi.NodeID, 0, len(r.syncs))
	for id := range r.syncs {
		out = append(out, id)
	}
	return out
}

// syncReports is the progress of every copy that holds a slot, for the
// heartbeat (reporting one keeps its slot).
func (r *replica) syncReports(now time.Time) []coordapi.SyncReport {
	r.syncMu.Lock()
	tasks := make([]*syncTask, 0, len(r.syncs))
	for _, t := range r.syncs {
		tasks = append(tasks, t)
	}
	r.syncMu.Unlock()
	var out []coordapi.SyncReport
	for _, t := range tasks {
		if rep, ok := t.report(now); ok {
			out = append(out, rep)
		}
	}
	slices.SortFunc(out, func(a, b coordapi.SyncReport) int {
		switch {
		case a.Target < b.Target:
			return -1
		case a.Target > b.Target:
			return 1
		}
		return 0
	})
	return out
}

// catchFailed: a live write to p, a catching member, failed. Its task
// stops this attempt (the member may lack the write) and starts over.
func (r *replica) catchFailed(p *peer, err error) {
	r.syncMu.Lock()
	t := r.syncs[p.id]
	r.syncMu.Unlock()
	if t == nil {
		return
	}
	t.failMu.Lock()
	first := t.failErr == nil
	if first {
		t.failErr = err
	}
	t.failMu.Unlock()
	if first {
		t.log.Warn("a live write to the member being caught up failed: its sync starts over later", "err", err)
		r.detach(p, t.epoch)
	}
}

// attach makes p a catching member of the current view (at epoch e):
// behind the whole-volume range lock, so that every write in flight has
// finished (and, the view being degraded, is recorded in the bitmap) and
// every later one is sent to p.
func (r *replica) attach(p *peer, e uint64) error {
	lk := r.locks.Lock(0, max(r.vol.Size(), 1))
	defer r.locks.Unlock(lk)
	r.setMu.Lock()
	defer r.setMu.Unlock()
	cur := r.view()
	if !cur.primary || cur.epoch != e {
		return fmt.Errorf("node: volume %s is no longer led here at epoch %d", r.id, e)
	}
	catching := slices.DeleteFunc(slices.Clone(cur.catching), func(q *peer) bool { return q.num == p.num })
	r.publishLocked(cur.with(append(catching, p)))
	return nil
}

// detach removes p from the catching members of the view at epoch e (if
// it is still that view).
func (r *replica) detach(p *peer, e uint64) {
	r.setMu.Lock()
	defer r.setMu.Unlock()
	cur := r.view()
	if !cur.primary || cur.epoch != e || !slices.Contains(cur.catching, p) {
		return
	}
	r.publishLocked(cur.with(slices.DeleteFunc(slices.Clone(cur.catching), func(q *peer) bool { return q == p })))
}

func (t *syncTask) report(now time.Time) (coordapi.SyncReport, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.kind == "" {
		return coordapi.SyncReport{}, false
	}
	done := t.copied.Load()
	if d := now.Sub(t.sampleAt); d >= time.Second {
		t.rate = int64(float64(done-t.sampleDone) / d.Seconds())
		t.sampleAt, t.sampleDone = now, done
	}
	return coordapi.SyncReport{Target: t.target, Kind: t.kind, Done: done, Total: t.total, Rate: max(t.rate, 0)}, true
}

func (t *syncTask) setKind(k coordapi.SyncKind) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.kind, t.total, t.rate = k, 0, 0
	t.sampleAt, t.sampleDone = time.Now(), 0
	t.copied.Store(0)
}

func (t *syncTask) setTotal(n int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.total = n
}

func (t *syncTask) failed() error {
	t.failMu.Lock()
	defer t.failMu.Unlock()
	return t.failErr
}

// sleep waits d or until the task is stopped; false when stopped.
func (t *syncTask) sleep(d time.Duration) bool {
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-tm.C:
		return true
	case <-t.ctx.Done():
		return false
	}
}

// run asks for a slot and copies until the member rejoins or the task is
// stopped.
func (t *syncTask) run() {
	r, x := t.r, t.r.x
	defer x.syncWG.Done()
	defer func() {
		r.syncMu.Lock()
		if r.syncs[t.target] == t {
			delete(r.syncs, t.target)
		}
		r.syncMu.Unlock()
		t.cancel()
	}()
	refusals, failures := 0, 0
	for t.ctx.Err() == nil {
		ctx, cancel := context.WithTimeout(t.ctx, 10*time.Second)
		g, err := x.auth.RequestSync(ctx, r.id, coordapi.Epoch(t.epoch), t.target)
		cancel()
		switch {
		case t.ctx.Err() != nil:
			return
		case err != nil:
			x.m.slotRequests.WithLabelValues("error").Inc()
			failures++
			var ae *coordapi.Error
			if errors.As(err, &ae) && (ae.Code == coordapi.CodeStaleEpoch || ae.Code == coordapi.CodeNotPrimary || ae.Code == coordapi.CodeConflict || ae.Code == coordapi.CodeNotFound) {
				// The coordinator is elsewhere (another epoch, the member in
				// sync or gone): the next assignment stops or restarts this.
				t.log.Info("sync slot request refused: waiting for the current assignment", "err", err)
				x.auth.Kick()
			} else {
				t.log.Warn("sync slot request failed; retrying", "err", err)
			}
			t.sleep(syncBackoff.Wait(failures-1, rand.Float64))
			continue
		case !g.Granted:
			x.m.slotRequests.WithLabelValues("refused").Inc()
			refusals++
			wait := x.auth.SyncRetryWait(refusals, g)
			t.log.Info("no sync slot: waiting", "reason", g.Reason, "retry_in", wait.Round(time.Millisecond))
			t.sleep(wait)
			continue
		}
		x.m.slotRequests.WithLabelValues("granted").Inc()
		refusals = 0
		x.m.syncsRunning.Inc()
		err = t.sync(g.Kind)
		x.m.syncsRunning.Dec()
		if err == nil {
			x.m.syncs.WithLabelValues("rejoined").Inc()
			return
		}
		if t.ctx.Err() != nil {
			x.m.syncs.WithLabelValues("stopped").Inc()
			t.log.Info("sync stopped", "err", err)
			return
		}
		x.m.syncs.WithLabelValues("failed").Inc()
		failures++
		wait := syncBackoff.Wait(failures-1, rand.Float64)
		t.log.Warn("sync failed; starting over later", "kind", g.Kind, "copied", t.copied.Load(), "retry_in", wait.Round(time.Millisecond), "err", err)
		t.sleep(wait)
	}
}

// span is a byte range of the volume to copy.
type span struct{ off, n int64 }

// plan is what a copy of kind must send: the whole volume for a
// re-mirror (or when there is no bitmap), else the dirty regions.
func (t *syncTask) plan(kind coordapi.SyncKind) []span {
	r := t.r
	size := r.vol.Size()
	if kind == coordapi.SyncRemirror || r.bm == nil {
		return []span{{0, size}}
	}
	var out []span
	r.bm.DirtyRegions(func(off, n int64) bool {
		out = append(out, span{off, n})
		return true
	})
	return out
}

// sync runs one granted copy of kind, through the rejoin.
func (t *syncTask) sync(kind coordapi.SyncKind) error {
	r := t.r
	p := r.x.peerFor(t.target, t.addr)
	t.failMu.Lock()
	t.failErr = nil
	t.failMu.Unlock()
	t.setKind(kind)
	if err := r.attach(p, t.epoch); err != nil {
		return err
	}
	defer r.detach(p, t.epoch) // nothing once rejoined: the view is newer
	wctx, cancel := context.WithTimeout(t.ctx, r.x.timing.PeerWait)
	err := p.rp.WaitUp(wctx)
	cancel()
	if err != nil {
		return fmt.Errorf("replication stream to %s not up: %w", t.target, err)
	}
	spans := t.plan(kind)
	var total int64
	for _, s := range spans {
		total += s.n
	}
	t.setTotal(total)
	t.log.Info("sync started", "kind", kind, "bytes", total, "ranges", len(spans), "volume_size", r.vol.Size())
	start := time.Now()
	if err := t.copySpans(p, spans, kind); err != nil {
		return err
	}
	flush := repl.Request{Type: replproto.TypeFlush, Volume: r.num, Epoch: t.epoch}
	if err := p.rp.Send(t.ctx, &flush); err != nil {
		return fmt.Errorf("flushing %s after the copy: %w", t.target, err)
	}
	t.log.Info("sync copied: asking to rejoin", "kind", kind, "copied", t.copied.Load(), "took", time.Since(start).Round(time.Millisecond))
	return t.rejoin(p, kind)
}

// copySpans copies spans to p in syncChunk ranges, syncDepth of them at
// once: one goroutine hands out the ranges in order, syncDepth copiers
// (each with its own buffer) copy them. The first failure stops the
// hand-out and cancels the copies in flight; it is returned once every
// copier has ended, so that no buffer or range lock outlives the call.
func (t *syncTask) copySpans(p *peer, spans []span, kind coordapi.SyncKind) error {
	type rng struct{ off, n int64 }
	ctx, cancel := context.WithCancel(t.ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	fail := func(err error) {
		errOnce.Do(func() { firstErr = err })
		cancel()
	}
	work := make(chan rng)
	for range syncDepth {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := iobuf.Get(syncChunk)
			defer buf.Release()
			for c := range work {
				if err := t.copyRange(ctx, p, buf, c.off, c.n, kind); err != nil {
					fail(err)
					return
				}
			}
		}()
	}
hand:
	for _, s := range spans {
		for off := s.off; off < s.off+s.n; off += syncChunk {
			n := min(syncChunk, s.off+s.n-off)
			if err := t.check(p); err != nil {
				fail(err)
				break hand
			}
			if t.r.x.testBeforeRegion != nil {
				t.r.x.testBeforeRegion(off, n)
			}
			select {
			case work <- rng{off, n}:
			case <-ctx.Done():
				break hand
			}
		}
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return t.ctx.Err() // stopped while handing out: not a completed copy
}

// check says whether the copy may go on: the task runs, no live write to
// the member failed, and the member is still a catching peer of the view.
func (t *syncTask) check(p *peer) error {
	if err := t.ctx.Err(); err != nil {
		return err
	}
	if err := t.failed(); err != nil {
		return fmt.Errorf("a live write to %s failed: %w", t.target, err)
	}
	v := t.r.view()
	if !v.primary || v.epoch != t.epoch || !slices.Contains(v.catching, p) {
		return errDetached
	}
	return nil
}

// allZero reports whether [off, off+n) reads as zeroes on the local
// replica by its allocation (holes and zeroed extents), without reading.
func (r *replica) allZero(off, n int64) bool {
	zero := true
	err := r.vol.BlockStatus(off, n, func(_ int64, hole, z bool) bool {
		zero = zero && (hole || z)
		return zero
	})
	return err == nil && zero
}

// copyRange sends [off, off+n) of the local replica to p as a sync frame
// and waits for its acknowledgement, holding the range lock meanwhile.
// ctx is the copy's (canceled when another range failed).
func (t *syncTask) copyRange(ctx context.Context, p *peer, buf *iobuf.Buf, off, n int64, kind coordapi.SyncKind) error {
	r := t.r
	zero := r.allZero(off, n)
	if !zero && r.x.throttle != nil {
		// Before the lock: a throttled copy must not hold up live writes.
		if err := r.x.throttle.Wait(ctx, int(n)); err != nil {
			return err
		}
	}
	lk := r.locks.Lock(off, off+n)
	defer r.locks.Unlock(lk)
	req := repl.Request{Volume: r.num, Epoch: t.epoch, Offset: uint64(off), Flags: replproto.FlagSync}
	how := "data"
	if zero && r.allZero(off, n) {
		req.Type, req.Length, how = replproto.TypeZeroes, uint32(n), "zeroes"
	} else {
		b := buf.Bytes()[:n]
		if err := r.vol.ReadAt(b, off); err != nil {
			return fmt.Errorf("reading [%d, +%d) to copy it: %w", off, n, err)
		}
		req.Type, req.Payload = replproto.TypeWrite, b
	}
	if r.x.testInCopy != nil {
		r.x.testInCopy(off, n)
	}
	if err := p.rp.Send(ctx, &req); err != nil {
		return fmt.Errorf("copying [%d, +%d) to %s: %w", off, n, t.target, err)
	}
	t.copied.Add(n)
	r.copied.Add(n)
	r.x.m.syncBytes.WithLabelValues(string(kind), how).Add(float64(n))
	return nil
}

// rejoin asks the coordinator to put the member back in the in-sync set,
// behind the whole-volume range lock: no live write is in flight, so none
// can fail on the member between the check and the new view.
func (t *syncTask) rejoin(p *peer, kind coordapi.SyncKind) error {
	r := t.r
	lk := r.locks.Lock(0, max(r.vol.Size(), 1))
	defer r.locks.Unlock(lk)
	if err := t.check(p); err != nil {
		return err
	}
	copied := t.copied.Load()
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithTimeout(t.ctx, 10*time.Second)
		as, err := r.x.auth.Rejoin(ctx, r.id, coordapi.Epoch(t.epoch), t.target, kind, copied)
		cancel()
		if err == nil {
			t.log.Info("member back in sync", "kind", kind, "copied", copied, "volume_size", r.vol.Size(), "new_epoch", as.Epoch)
			if err := r.apply(as); err != nil {
				t.log.Error("cannot act on the rejoin's assignment", "err", err)
			}
			return nil
		}
		var ae *coordapi.Error
		if errors.As(err, &ae) {
			switch ae.Code {
			case coordapi.CodeTimeout, coordapi.CodeOverloaded, coordapi.CodeNotLeader, coordapi.CodeInternal:
			default:
				// Refused: nothing changed at the coordinator.
				x := r.x
				if ae.Code == coordapi.CodeStaleEpoch || ae.Code == coordapi.CodeNotPrimary {
					x.auth.Kick()
				}
				return fmt.Errorf("rejoin refused: %w", err)
			}
		}
		// The outcome is unknown: the coordinator may have put the member
		// in sync at the next epoch. Writes stay held (the barrier) while
		// this node may still acknowledge at t.epoch; once it may not
		// (stopped, the lease lapsed: the next assignment says what
		// happened) the barrier can go.
		if t.ctx.Err() != nil || !r.x.auth.LeaseValid(time.Now()) {
			return fmt.Errorf("rejoin's outcome unknown: %w", err)
		}
		t.log.Warn("rejoin failed; asking again (writes wait)", "err", err)
		if !t.sleep(min(50*time.Millisecond<<min(attempt, 5), time.Second)) {
			return fmt.Errorf("rejoin's outcome unknown: %w", err)
		}
	}
}
