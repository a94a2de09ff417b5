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

	"golang.org/x/sys/unix"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
	"keel/datapath/volume"
	"keel/netpath/repl"
)

// Timing holds the data path's waits. The zero value of a field takes its
// default.
type Timing struct {
	// LossWait bounds how long a write waits, after a secondary failed
	// it, for the coordinator to take that secondary out of the in-sync
	// set under a new epoch (default 30 s). Past it the write fails with
	// EIO; the replica reports impaired meanwhile.
	LossWait time.Duration
	// PeerWait bounds how long a write waits for a secondary that has no
	// stream up yet, or that does not hold the volume yet (it is still
	// opening it), before it reports the secondary lost (default 5 s: a
	// reconnect's backoff, or a secondary's next heartbeat).
	PeerWait time.Duration
	// ImpairedAfter: a replica with requests in flight and none completed
	// for this long reports impaired ("no I/O progress"), default 5 s.
	ImpairedAfter time.Duration
	// FrameTimeout is the replication frame deadline (repl.PeerConfig),
	// default 5 s; also the replication sockets' TCP_USER_TIMEOUT.
	FrameTimeout time.Duration
}

func (t Timing) withDefaults() Timing {
	if t.LossWait <= 0 {
		t.LossWait = 30 * time.Second
	}
	if t.PeerWait <= 0 {
		t.PeerWait = 5 * time.Second
	}
	if t.ImpairedAfter <= 0 {
		t.ImpairedAfter = 5 * time.Second
	}
	if t.FrameTimeout <= 0 {
		t.FrameTimeout = 5 * time.Second
	}
	return t
}

// authority is what the data path needs from the coordinator agent
// (*coordclient.Agent): the lease and assignment check before every
// acknowledgement, the replica-loss report, and the sync engine's slot
// requests and rejoins.
type authority interface {
	Authority(vol coordapi.VolumeID, epoch coordapi.Epoch, now time.Time) bool
	Assignment(vol coordapi.VolumeID) (coordapi.Assignment, bool)
	LeaseValid(now time.Time) bool
	ReportReplicaLoss(ctx context.Context, vol coordapi.VolumeID, epoch coordapi.Epoch, lost coordapi.NodeID, reason string) (coordapi.Assignment, error)
	RequestSync(ctx context.Context, vol coordapi.VolumeID, epoch coordapi.Epoch, target coordapi.NodeID) (coordapi.SyncGrant, error)
	SyncRetryWait(refusals int, g coordapi.SyncGrant) time.Duration
	Rejoin(ctx context.Context, vol coordapi.VolumeID, epoch coordapi.Epoch, target coordapi.NodeID, kind coordapi.SyncKind, copied int64) (coordapi.Assignment, error)
	Kick()
}

// recoveryThrottle paces catch-up and re-mirror traffic on the
// replication path (netpath/sock.Throttle): Wait before sending n bytes of
// a copy, Foreground to count live replication.
type recoveryThrottle interface {
	Wait(ctx context.Context, n int) error
	Foreground(n int)
}

// Errors of the replicated data path. Each wraps the errno the NBD client
// gets.
var (
	errNotPrimary  = fmt.Errorf("node: this node is not the volume's primary: %w", unix.ESHUTDOWN)
	errFenced      = fmt.Errorf("node: a replica has seen a newer epoch (fenced): %w", unix.ESHUTDOWN)
	errNoAuthority = fmt.Errorf("node: no valid lease or assignment for this epoch: %w", unix.ESHUTDOWN)
	errLossTimeout = fmt.Errorf("node: a secondary failed and the coordinator did not settle the in-sync set in time: %w", unix.EIO)
)

// replicator is the part of the node that the replicated volumes share:
// the coordinator agent, the fence table, one repl.Peer per remote node,
// the waits and the metrics.
type replicator struct {
	self   coordapi.NodeID
	auth   authority
	fence  *repl.Fence
	timing Timing
	m      *metrics
	log    *slog.Logger
	ctx    context.Context // cancelled when the node stops
	// newPeer starts the replication stream to a node.
	newPeer func(id coordapi.NodeID, addr string) *repl.Peer
	// raise durably raises a replica's epoch in the order of the frames
	// the replica server has accepted (repl.Server.RaiseEpoch), so that no
	// frame of an older primary is applied after this node acts on the
	// new epoch.
	raise func(r *replica, epoch uint64) error
	// throttle paces the sync engine's copies; nil: unthrottled.
	throttle recoveryThrottle
	// testAfterSend, when set (tests only), runs between submitting a
	// request's frames and its local operation (with the offset: a
	// pointer to the request would make every request escape to the heap).
	testAfterSend func(off int64)
	// testBeforeRegion, when set (tests only), runs before the sync engine
	// copies each range.
	testBeforeRegion func(off, n int64)
	// testInCopy, when set (tests only), runs in a sync copier holding a
	// range's lock, after reading it and before sending it.
	testInCopy func(off, n int64)

	syncWG sync.WaitGroup // the sync engine's tasks (Node.Close waits for them)

	mu     sync.Mutex // guards peers, lostAt
	peers  map[coordapi.NodeID]*peer
	lostAt map[uint64]time.Time // when each peer's last stream failed
}

// peerLost is the Peers' OnPeerLost: it records when a stream failed, so
// that a write finding that peer still down long after does not wait
// PeerWait for a reconnect that is not coming.
func (x *replicator) peerLost(l repl.Loss) {
	if l.Volume != 0 {
		return // one frame refused: the request that sent it handles it
	}
	x.mu.Lock()
	if x.lostAt == nil {
		x.lostAt = map[uint64]time.Time{}
	}
	x.lostAt[l.Peer] = time.Now()
	x.mu.Unlock()
}

// downFor is how long ago p's last stream failed (0: never, as far as this
// node knows).
func (x *replicator) downFor(p *peer, now time.Time) time.Duration {
	x.mu.Lock()
	defer x.mu.Unlock()
	if t, ok := x.lostAt[p.num]; ok {
		return now.Sub(t)
	}
	return 0
}

// peer is one remote node this node replicates to.
type peer struct {
	id   coordapi.NodeID
	num  uint64
	addr string
	rp   *repl.Peer
}

// peerFor returns the node's Peer to id at addr, starting it if needed. A
// Peer whose node moved to another address is replaced (its unfinished
// frames fail with repl.ErrClosed and are sent again on the new one).
func (x *replicator) peerFor(id coordapi.NodeID, addr string) *peer {
	x.mu.Lock()
	defer x.mu.Unlock()
	if p := x.peers[id]; p != nil {
		if p.addr == addr {
			return p
		}
		delete(x.peers, id)
		go p.rp.Close()
	}
	p := &peer{id: id, num: NodeNum(id), addr: addr, rp: x.newPeer(id, addr)}
	x.peers[id] = p
	return p
}

// moved reports whether an in-sync secondary of as has another
// replication address than v's Peer to it (the node restarted elsewhere):
// then the view is rebuilt at the same epoch with a new Peer.
func (x *replicator) moved(v *view, as coordapi.Assignment) bool {
	for _, p := range as.Peers {
		for _, q := range v.peers {
			if q.id == p.Node && q.addr != p.ReplAddr {
				return true
			}
		}
	}
	return false
}

// retirePeers closes the Peers to nodes that keep is false for.
func (x *replicator) retirePeers(keep func(coordapi.NodeID) bool) {
	x.mu.Lock()
	var gone []*peer
	for id, p := range x.peers {
		if !keep(id) {
			gone = append(gone, p)
			delete(x.peers, id)
		}
	}
	x.mu.Unlock()
	for _, p := range gone {
		x.log.Info("closing replication stream: no volume replicates there any more", "peer", p.id, "addr", p.addr)
		p.rp.Close()
	}
}

// closePeers closes every Peer (the node is stopping).
func (x *replicator) closePeers() {
	x.retirePeers(func(coordapi.NodeID) bool { return false })
}

// view is one configuration of a replica as this node acts on it: whether
// it is the primary, at which epoch, and the in-sync secondaries it
// replicates to. A view never changes once published: a replica's view is
// replaced as a whole, and the old view's next channel is closed then, so
// that requests waiting for a change of configuration wake up.
type view struct {
	primary bool
	epoch   uint64
	peers   []*peer // in-sync secondaries (primary only)
	// catching are out-of-sync members the sync engine is bringing back
	// (primary only): every live write goes to them too, but their answers
	// do not count towards an acknowledgement and their failure only stops
	// their sync.
	catching []*peer
	// degraded: a member of the volume is out of sync at this epoch, so
	// every write is recorded in the write-intent bitmap before it is
	// issued and its frames carry FlagDegraded (invariant 6).
	degraded bool
	next     chan struct{} // closed when a newer view replaces this one
}

func (v *view) has(num uint64) bool {
	for _, p := range v.peers {
		if p.num == num {
			return true
		}
	}
	return false
}

// with returns a copy of v (same epoch, a new next channel) whose catching
// peers are catching.
func (v *view) with(catching []*peer) *view {
	nv := *v
	nv.catching = catching
	nv.next = make(chan struct{})
	return &nv
}

func (v *view) peerIDs() []string {
	out := make([]string, len(v.peers))
	for i, p := range v.peers {
		out[i] = string(p.id)
	}
	return out
}

// replica is one volume replica open on this node: its local volume, and,
// while this node is its primary, the state of the replicated data path.
type replica struct {
	id   coordapi.VolumeID
	num  uint64 // the repl volume id: N of vol-N
	name string // the volume's name: its NBD export name
	path string
	vol  *volume.Volume
	x    *replicator

	// locks serialises overlapping writes, trims and zeroings from the
	// local write until the last in-sync secondary answered: so
	// overlapping operations reach every replica's stream in one order
	// (invariant 3) and a resend never overtakes a newer write.
	locks volume.RangeLock

	cur atomic.Pointer[view] // never nil

	setMu sync.Mutex // serialises view changes (becomePrimary, stepDown)

	// Progress, for the no-progress watchdog: inflight counts replicated
	// requests in progress; progress is the monotonic time (ns since
	// clockBase) of the last completion, or of the start of a busy period.
	inflight atomic.Int64
	progress atomic.Int64

	lossMu      sync.Mutex // guards following
	lossQueue   []lossItem // losses reported and not settled, oldest first
	lossRunning bool       // a runLoss goroutine owns the queue
	lossSince   time.Time
	lossWhy     string

	// The write-intent bitmap (nil when the volume has none: then nothing
	// is marked and every copy is a whole-volume copy). markMu orders
	// marks (shared) against clearing (exclusive), which would drop a
	// concurrent mark; marked says whether anything may be marked.
	bm     bitmap
	markMu sync.RWMutex
	marked atomic.Bool
	unfl   *unflushed // regions written since the last flush (nil without a bitmap)

	syncMu sync.Mutex                    // guards syncs
	syncs  map[coordapi.NodeID]*syncTask // the running copies, by target (primary only)
	copied atomic.Int64                  // bytes the sync engine sent, ever (tests, logs)
}

// bitmap is what the node needs of a volume's write-intent bitmap
// (datapath/volume: MarkDirty is durable before it returns).
type bitmap interface {
	RegionSize() int64
	MarkDirty(off, n int64) error
	DirtyRegions(fn func(off, n int64) bool)
	DirtyBytes() int64
	ClearDirty() error
}

// mark records [off, off+n) in the write-intent bitmap, durably, before
// the caller issues a write there.
func (r *replica) mark(off, n int64) error {
	if r.bm == nil || n <= 0 {
		return nil
	}
	r.markMu.RLock()
	defer r.markMu.RUnlock()
	if err := r.bm.MarkDirty(off, n); err != nil {
		return fmt.Errorf("volume %s: write-intent bitmap: %w", r.id, err)
	}
	r.marked.Store(true)
	return nil
}

// markUnflushed records in the bitmap every region written since the last
// flush every in-sync secondary acknowledged (a lost secondary may not
// hold those writes durably).
func (r *replica) markUnflushed() error {
	return r.unfl.pending(r.mark)
}

// clearMarks empties the write-intent bitmap: every replica of the volume
// holds the same data again.
func (r *replica) clearMarks(why string) {
	if r.bm == nil || !r.marked.Load() {
		return
	}
	r.markMu.Lock()
	defer r.markMu.Unlock()
	if !r.marked.Load() {
		return
	}
	dirty := r.bm.DirtyBytes()
	if err := r.bm.ClearDirty(); err != nil {
		r.x.log.Error("cannot clear the write-intent bitmap (a later catch-up copies more than it needs)", "volume", r.id, "err", err)
		return
	}
	r.marked.Store(false)
	r.x.log.Info("write-intent bitmap cleared", "volume", r.id, "why", why, "dirty_bytes", dirty)
}

var clockBase = time.Now()

func monoNow() int64 { return int64(time.Since(clockBase)) }

func newReplica(x *replicator, id coordapi.VolumeID, num uint64, name, path string, vol *volume.Volume) *replica {
	r := &replica{id: id, num: num, name: name, path: path, vol: vol, x: x, syncs: map[coordapi.NodeID]*syncTask{}}
	if bm, ok := any(vol).(bitmap); ok {
		r.bm = bm
		r.marked.Store(bm.DirtyBytes() > 0)
		r.unfl = newUnflushed(vol.Size(), bm.RegionSize())
	}
	r.cur.Store(&view{epoch: vol.Epoch(), next: make(chan struct{})})
	return r
}

// view returns the current view.
func (r *replica) view() *view { return r.cur.Load() }

// publishLocked installs v and wakes everything waiting on the old view.
// REQUIRES: r.setMu.
func (r *replica) publishLocked(v *view) {
	old := r.cur.Swap(v)
	close(old.next)
	if v.primary != old.primary || v.epoch != old.epoch || !slices.Equal(v.peerIDs(), old.peerIDs()) || v.degraded != old.degraded || len(v.catching) != len(old.catching) {
		var catching []string
		for _, p := range v.catching {
			catching = append(catching, string(p.id))
		}
		r.x.log.Info("replica configuration", "volume", r.id, "name", r.name, "primary", v.primary, "epoch", v.epoch,
			"in_sync_peers", v.peerIDs(), "degraded", v.degraded, "catching_up", catching)
	}
}

// becomePrimary makes this node act as the primary of r at as.Epoch with
// as's in-sync secondaries: the epoch is made durable first (in stream
// order: see replicator.raise), then the view is published. An assignment
// older than what r already acts on is ignored.
func (r *replica) becomePrimary(as coordapi.Assignment) error {
	r.setMu.Lock()
	defer r.setMu.Unlock()
	e := uint64(as.Epoch)
	cur := r.view()
	if cur.epoch > e || (cur.primary && cur.epoch == e && !r.x.moved(cur, as)) {
		return nil
	}
	if d := r.vol.Epoch(); d > e {
		return fmt.Errorf("volume %s: assigned primary at epoch %d but the replica has seen epoch %d", r.id, e, d)
	}
	if err := r.x.raise(r, e); err != nil {
		return fmt.Errorf("volume %s: persisting epoch %d: %w", r.id, e, err)
	}
	var peers []*peer
	degraded := false
	for _, p := range as.Peers {
		switch {
		case p.Node == r.x.self:
		case p.InSync && p.Role == coordapi.RoleSecondary:
			peers = append(peers, r.x.peerFor(p.Node, p.ReplAddr))
		case !p.InSync:
			degraded = true
		}
	}
	r.publishLocked(&view{primary: true, epoch: e, peers: peers, degraded: degraded, next: make(chan struct{})})
	if !degraded {
		// Every member is in sync at e, and no copy runs (a copy is for an
		// out-of-sync member): nothing recorded is needed any more.
		r.clearMarks(fmt.Sprintf("every member in sync at epoch %d", e))
	}
	return nil
}

// stepDown makes this node stop acting as r's primary (at once: every
// request checks the view before it is acknowledged) and records epoch e
// as the configuration it knows of.
func (r *replica) stepDown(e uint64) {
	r.setMu.Lock()
	defer r.setMu.Unlock()
	cur := r.view()
	if !cur.primary && cur.epoch >= e {
		return
	}
	r.publishLocked(&view{epoch: max(e, cur.epoch), next: make(chan struct{})})
	r.stopSyncs()
}

// apply acts on an assignment for r's volume: the coordinator's heartbeat
// answer or its answer to a replica-loss report or a rejoin. As primary it
// also starts (or stops) the copies to out-of-sync members.
func (r *replica) apply(as coordapi.Assignment) error {
	if as.Role == coordapi.RolePrimary && as.InSync {
		if err := r.becomePrimary(as); err != nil {
			return err
		}
		r.updateSyncs(as)
		return nil
	}
	r.stepDown(uint64(as.Epoch))
	return nil
}

// authorize says whether a request may be served (or acknowledged) under
// v at now: v is a primary view, no replica has fenced its epoch, and the
// agent's lease and assignment confirm it.
func (r *replica) authorize(v *view, now time.Time) error {
	switch {
	case !v.primary:
		return errNotPrimary
	case r.x.fence.Fenced(r.num, v.epoch):
		return errFenced
	case !r.x.auth.Authority(r.id, coordapi.Epoch(v.epoch), now):
		return errNoAuthority
	}
	return nil
}

// behind reports whether the agent already knows this node as r's primary
// at an epoch newer than v's: the view is about to catch up (an epoch is
// being persisted), so a request should wait for it rather than fail.
func (r *replica) behind(v *view, now time.Time) bool {
	as, ok := r.x.auth.Assignment(r.id)
	return ok && as.Role == coordapi.RolePrimary && as.InSync && uint64(as.Epoch) > v.epoch && r.x.auth.LeaseValid(now)
}

// authorized returns the view to serve a request under: the current one if
// it is authorized, or, when the agent is ahead of the view, the one that
// catches up, waiting for it until deadline.
func (r *replica) authorized(deadline time.Time) (*view, error) {
	for {
		v := r.view()
		now := time.Now()
		err := r.authorize(v, now)
		if err == nil {
			return v, nil
		}
		if !r.behind(v, now) || !now.Before(deadline) {
			r.x.m.refused.WithLabelValues(refusal(err)).Inc()
			return nil, err
		}
		r.waitChange(v, deadline)
	}
}

func refusal(err error) string {
	switch err {
	case errNotPrimary:
		return "not_primary"
	case errFenced:
		return "fenced"
	case errLossTimeout:
		return "loss_timeout"
	}
	return "no_authority"
}

// waitChange waits until v is replaced, deadline passes or the node stops.
// It reports whether v was replaced.
func (r *replica) waitChange(v *view, deadline time.Time) bool {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	r.x.m.waiting.Inc()
	defer r.x.m.waiting.Dec()
	select {
	case <-v.next:
		return true
	case <-t.C:
	case <-r.x.ctx.Done():
	}
	return false
}

func (r *replica) busy() {
	if r.inflight.Add(1) == 1 {
		r.progress.Store(monoNow())
	}
}

func (r *replica) idle() {
	r.progress.Store(monoNow())
	r.inflight.Add(-1)
}

// health is the replica's report to the coordinator: impaired while
// writes wait for the coordinator to settle a replica loss, or while
// requests are in flight and none has completed for Timing.ImpairedAfter.
func (r *replica) health(now time.Time) (coordapi.Health, string) {
	r.lossMu.Lock()
	pending, since, why := r.lossRunning, r.lossSince, r.lossWhy
	r.lossMu.Unlock()
	if pending {
		return coordapi.HealthImpaired, clip(fmt.Sprintf("writes wait for the coordinator since %s: %s",
			now.Sub(since).Round(time.Millisecond), why))
	}
	if r.inflight.Load() > 0 {
		if d := time.Duration(monoNow() - r.progress.Load()); d >= r.x.timing.ImpairedAfter {
			return coordapi.HealthImpaired, fmt.Sprintf("no I/O progress for %s", d.Round(100*time.Millisecond))
		}
	}
	return coordapi.HealthOK, ""
}

func clip(s string) string {
	if len(s) > coordapi.MaxReasonLen {
		return s[:coordapi.MaxReasonLen-3] + "..."
	}
	return s
}

// lossItem is a secondary this node, as primary, reported lost.
type lossItem struct {
	peer   coordapi.NodeID
	num    uint64
	reason string
	since  time.Time
}

// reportLoss asks the coordinator to take p out of r's in-sync set. One
// goroutine per replica reports, one loss at a time; concurrent requests
// that fail on the same peer share its report.
func (r *replica) reportLoss(p *peer, cause error) {
	r.lossMu.Lock()
	for _, it := range r.lossQueue {
		if it.peer == p.id {
			r.lossMu.Unlock()
			return
		}
	}
	now := time.Now()
	reason := clip(cause.Error())
	r.lossQueue = append(r.lossQueue, lossItem{peer: p.id, num: p.num, reason: reason, since: now})
	start := !r.lossRunning
	if start {
		r.lossRunning, r.lossSince = true, now
		r.lossWhy = clip(fmt.Sprintf("secondary %s lost (%s)", p.id, reason))
	}
	r.lossMu.Unlock()
	r.x.log.Warn("secondary lost: asking the coordinator to take it out of the in-sync set; writes wait", "volume", r.id, "peer", p.id, "err", cause)
	if start {
		go r.runLoss()
	}
}

// runLoss settles the queued losses one after the other.
func (r *replica) runLoss() {
	for {
		r.lossMu.Lock()
		if len(r.lossQueue) == 0 {
			r.lossRunning = false
			r.lossMu.Unlock()
			r.x.auth.Kick() // let the coordinator hear the replica is healthy again
			return
		}
		it := r.lossQueue[0]
		r.lossMu.Unlock()
		outcome := r.settleLoss(it)
		r.x.m.lossReports.WithLabelValues(outcome).Inc()
		r.lossMu.Lock()
		r.lossQueue = r.lossQueue[1:]
		r.lossMu.Unlock()
	}
}

// lossBackoff spaces a primary's repeated replica-loss reports.
var lossBackoff = coordclient.Backoff{Base: 100 * time.Millisecond, Max: time.Second}

// settleLoss reports one loss until the current view no longer has the
// peer in sync, this node is no longer primary, or Timing.LossWait has
// passed since the loss. It returns the outcome for the metrics.
func (r *replica) settleLoss(it lossItem) string {
	deadline := it.since.Add(r.x.timing.LossWait)
	attempt := 0
	for {
		v := r.view()
		switch {
		case !v.primary:
			return "deposed"
		case !v.has(it.num):
			return "gone"
		case !time.Now().Before(deadline) || r.x.ctx.Err() != nil:
			r.x.log.Error("replica loss not settled by the coordinator in time: writes fail with EIO", "volume", r.id, "peer", it.peer, "waited", r.x.timing.LossWait)
			return "timeout"
		}
		ctx, cancel := context.WithDeadline(r.x.ctx, deadline)
		as, err := r.x.auth.ReportReplicaLoss(ctx, r.id, coordapi.Epoch(v.epoch), it.peer, it.reason)
		cancel()
		if err == nil {
			if err := r.apply(as); err != nil {
				r.x.log.Error("cannot act on the coordinator's answer to a replica loss", "volume", r.id, "err", err)
			} else if !r.view().has(it.num) {
				r.x.log.Info("secondary out of the in-sync set: writes continue", "volume", r.id, "peer", it.peer, "epoch", as.Epoch, "in_sync_peers", r.view().peerIDs())
				return "resolved"
			}
			continue
		}
		var ae *coordapi.Error
		if errors.As(err, &ae) && (ae.Code == coordapi.CodeStaleEpoch || ae.Code == coordapi.CodeNotPrimary) {
			// The coordinator is at another epoch than this view: the next
			// heartbeat brings it.
			r.x.log.Info("replica loss report names an old epoch: waiting for the current assignment", "volume", r.id, "epoch", v.epoch, "err", err)
			r.x.auth.Kick()
			r.waitChange(v, deadline)
			continue
		}
		r.x.log.Warn("replica loss report failed; retrying", "volume", r.id, "peer", it.peer, "err", err)
		// Capped exponential backoff with jitter: primaries that lost
		// their secondaries together do not report again in lockstep.
		wait := min(lossBackoff.Wait(attempt, rand.Float64), time.Until(deadline))
		attempt++
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-v.next:
			t.Stop()
		case <-r.x.ctx.Done():
			t.Stop()
		}
	}
}
