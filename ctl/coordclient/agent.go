package coordclient

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"keel/ctl/coordapi"
)

// AgentConfig configures a node's Agent.
type AgentConfig struct {
	Client *Client
	// Node is the node's registration: identity, zone, addresses, and its
	// capacity and free space at start.
	Node coordapi.RegisterRequest
	// Space, when set, is called before every heartbeat for the node's
	// current capacity and free bytes.
	Space func() (capacity, free int64)
	// Reports, when set, is called before every heartbeat for the health of
	// the node's replicas. Each report's Epoch must be the epoch the data
	// path has taken into account for that volume (the one it passes to
	// Authority): a former primary reporting the new epoch is how the
	// coordinator learns it has stepped down. When nil, the agent reports
	// the epochs of its own view, with no sequence.
	Reports func() []coordapi.ReplicaReport
	// OnChange, when set, is called whenever the assignments change or the
	// lease becomes valid or lapses. It is called from the agent's Run
	// goroutine, one call at a time, in order; it must not block for long
	// (heartbeats wait for it). The Update is the caller's.
	OnChange func(Update)
	Logger   *slog.Logger
}

// Update is what OnChange receives.
type Update struct {
	// Assignments is the full set, by volume ID.
	Assignments []coordapi.Assignment
	// LeaseDeadline is the local (monotonic) time until which the lease may
	// be used; zero when the node has never had one.
	LeaseDeadline time.Time
	// LeaseValid is whether the lease was valid when the update was made.
	LeaseValid bool
}

// Agent keeps a node registered and its lease alive. Create it with
// NewAgent, run it with Run; its query methods are safe for concurrent use
// from the data path at any time.
type Agent struct {
	cfg AgentConfig
	c   *Client
	log *slog.Logger

	kick    chan struct{} // asks Run for a heartbeat now
	changed chan struct{} // asks Run to deliver an Update

	mu       sync.Mutex // guards the fields below
	view     map[coordapi.VolumeID]coordapi.Assignment
	deadline time.Time // zero: no lease
	lease    coordapi.Lease
}

// NewAgent checks cfg and returns an agent.
func NewAgent(cfg AgentConfig) (*Agent, error) {
	if cfg.Client == nil {
		return nil, errors.New("coordclient: agent needs a Client")
	}
	if err := cfg.Node.Validate(); err != nil {
		return nil, fmt.Errorf("coordclient: node registration: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Agent{
		cfg:     cfg,
		c:       cfg.Client,
		log:     log.With("node", string(cfg.Node.Node)),
		kick:    make(chan struct{}, 1),
		changed: make(chan struct{}, 1),
		view:    map[coordapi.VolumeID]coordapi.Assignment{},
	}, nil
}

// LeaseValid reports whether the node may act on its lease at now. Pass
// time.Now() (with its monotonic reading): the deadline is on the monotonic
// clock.
func (a *Agent) LeaseValid(now time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return now.Before(a.deadline)
}

// LeaseDeadline is the local time the lease lapses unless renewed; zero
// when the node has none.
func (a *Agent) LeaseDeadline() time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.deadline
}

// Authority reports whether the node may acknowledge writes for vol as its
// primary at epoch, at now: its lease is valid and its current assignment
// for vol is primary at exactly that epoch. The data path calls it before
// every acknowledgement.
func (a *Agent) Authority(vol coordapi.VolumeID, epoch coordapi.Epoch, now time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	as, ok := a.view[vol]
	return ok && now.Before(a.deadline) && as.Role == coordapi.RolePrimary && as.Epoch == epoch
}

// Assignment returns the node's current assignment for vol.
func (a *Agent) Assignment(vol coordapi.VolumeID) (coordapi.Assignment, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	as, ok := a.view[vol]
	return cloneAssignment(as), ok
}

// Assignments returns all current assignments by volume ID.
func (a *Agent) Assignments() []coordapi.Assignment {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.assignmentsLocked()
}

// REQUIRES: a.mu.
func (a *Agent) assignmentsLocked() []coordapi.Assignment {
	out := make([]coordapi.Assignment, 0, len(a.view))
	for _, as := range a.view {
		out = append(out, cloneAssignment(as))
	}
	slices.SortFunc(out, func(x, y coordapi.Assignment) int {
		nx, _ := coordapi.ParseVolumeID(string(x.Volume))
		ny, _ := coordapi.ParseVolumeID(string(y.Volume))
		return cmp.Compare(nx, ny)
	})
	return out
}

func cloneAssignment(as coordapi.Assignment) coordapi.Assignment {
	as.Peers = slices.Clone(as.Peers)
	return as
}

// Kick asks for a heartbeat as soon as possible (e.g. the data path has
// applied a new epoch and wants the coordinator to know).
func (a *Agent) Kick() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// ReportReplicaLoss reports, as primary of vol at epoch, that lost no
// longer takes writes. On success the new assignment (a new epoch, lost out
// of the in-sync set) is merged into the agent's view, OnChange follows,
// and it is returned.
func (a *Agent) ReportReplicaLoss(ctx context.Context, vol coordapi.VolumeID, epoch coordapi.Epoch, lost coordapi.NodeID, reason string) (coordapi.Assignment, error) {
	return a.merge(a.c.ReplicaLoss(ctx, string(vol), coordapi.ReplicaLossRequest{Node: a.cfg.Node.Node, Epoch: epoch, Lost: lost, Reason: reason}))
}

// merge takes an assignment the coordinator answered a report with into
// the agent's view when it is newer (OnChange follows), and returns a copy.
func (a *Agent) merge(as *coordapi.Assignment, err error) (coordapi.Assignment, error) {
	if err != nil {
		return coordapi.Assignment{}, err
	}
	a.mu.Lock()
	if cur, ok := a.view[as.Volume]; ok && as.Epoch > cur.Epoch {
		a.view[as.Volume] = *as
		a.signalChanged()
	}
	a.mu.Unlock()
	return cloneAssignment(*as), nil
}

// RequestSync asks, as primary of vol at epoch, for a slot to copy the
// volume to target. A refused grant (Granted false) is returned without
// error; wait SyncRetryWait before asking again.
func (a *Agent) RequestSync(ctx context.Context, vol coordapi.VolumeID, epoch coordapi.Epoch, target coordapi.NodeID) (coordapi.SyncGrant, error) {
	g, err := a.c.Sync(ctx, string(vol), coordapi.SyncRequest{Node: a.cfg.Node.Node, Epoch: epoch, Target: target})
	if err != nil {
		return coordapi.SyncGrant{}, err
	}
	return *g, nil
}

// SyncRetryWait is how long to wait before the next slot request after
// refusals consecutive refusals (1 for the first): at least the grant's
// RetryAfter, raised by capped exponential backoff with equal jitter so
// that primaries refused together do not ask again together.
func (a *Agent) SyncRetryWait(refusals int, g coordapi.SyncGrant) time.Duration {
	return SlotBackoff.After(refusals-1, g.RetryAfter.D(), a.c.cfg.Rand)
}

// Rejoin reports, as primary of vol at epoch, that target's copy (of kind,
// copied bytes sent) is complete and it holds every write. On success the
// new assignment (a new epoch, target back in the in-sync set) is merged
// into the agent's view like ReportReplicaLoss does, OnChange follows, and
// it is returned.
func (a *Agent) Rejoin(ctx context.Context, vol coordapi.VolumeID, epoch coordapi.Epoch, target coordapi.NodeID, kind coordapi.SyncKind, copied int64) (coordapi.Assignment, error) {
	return a.merge(a.c.Rejoin(ctx, string(vol), coordapi.RejoinRequest{Node: a.cfg.Node.Node, Epoch: epoch, Target: target, Kind: kind, Copied: copied}))
}

func (a *Agent) signalChanged() {
	select {
	case a.changed <- struct{}{}:
	default:
	}
}

// Run registers the node and heartbeats until ctx is done. It returns
// ctx's error. Failed attempts are retried with capped, jittered backoff
// (never faster than every 50 ms, never slower than a quarter of the
// heartbeat interval, so a lease gets several tries) and honour
// Retry-After.
func (a *Agent) Run(ctx context.Context) error {
	registered := false
	failures := 0
	var lapse *time.Timer // fires at the lease deadline
	lapseC := func() <-chan time.Time {
		if lapse == nil {
			return nil
		}
		return lapse.C
	}
	wasValid := false
	next := time.NewTimer(0)
	defer next.Stop()
	for {
		select {
		case <-ctx.Done():
			if lapse != nil {
				lapse.Stop()
			}
			return ctx.Err()
		case <-a.kick:
			if !next.Stop() {
				select {
				case <-next.C:
				default:
				}
			}
			next.Reset(0)
			continue
		case <-a.changed:
			wasValid = a.deliver(time.Now())
			continue
		case <-lapseC():
			lapse = nil
			if wasValid && !a.LeaseValid(time.Now()) {
				a.log.Warn("lease lapsed: stop acknowledging writes until the coordinator answers again")
				wasValid = a.deliver(time.Now())
			}
			continue
		case <-next.C:
		}

		var resp *coordapi.HeartbeatResponse
		var sent time.Time
		var retryAfter time.Duration
		err := a.beat(ctx, registered, &resp, &sent, &retryAfter)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			var ae *coordapi.Error
			if errors.As(err, &ae) && ae.Code == coordapi.CodeNotFound {
				registered = false // the coordinator forgot us: register again
			}
			wait := a.retryWait(failures, retryAfter)
			failures++
			a.log.Warn("coordinator heartbeat failed", "err", err, "retry_in", wait, "lease_valid", a.LeaseValid(time.Now()))
			next.Reset(wait)
			continue
		}
		registered = true
		failures = 0
		changed := a.apply(resp, sent)
		if changed || !wasValid {
			wasValid = a.deliver(time.Now())
		}
		if lapse != nil {
			lapse.Stop()
		}
		lapse = time.NewTimer(time.Until(a.LeaseDeadline()))
		wait := resp.NextHeartbeat.D()
		if wait <= 0 {
			wait = resp.Lease.Interval.D()
		}
		if changed {
			// Let the coordinator hear soon that we saw the new epochs.
			wait = min(wait, 50*time.Millisecond)
		}
		next.Reset(wait)
	}
}

// beat sends one registration or heartbeat, a single attempt bounded by
// the heartbeat interval.
func (a *Agent) beat(ctx context.Context, registered bool, resp **coordapi.HeartbeatResponse, sent *time.Time, retryAfter *time.Duration) error {
	a.mu.Lock()
	timeout := a.lease.Interval.D()
	a.mu.Unlock()
	if timeout <= 0 {
		timeout = coordapi.DefaultConfig().Lease.Interval.D()
	}
	o := callOpts{attempts: 1, timeout: timeout, sent: func(t time.Time) { *sent = t }}
	capacity, free := a.cfg.Node.Capacity, a.cfg.Node.Free
	if a.cfg.Space != nil {
		capacity, free = a.cfg.Space()
	}
	var out coordapi.HeartbeatResponse
	var err error
	if !registered {
		req := a.cfg.Node
		req.Capacity, req.Free = capacity, free
		err = a.c.do(ctx, "POST", "/v1/nodes/register", &req, &out, o)
	} else {
		req := coordapi.HeartbeatRequest{Node: a.cfg.Node.Node, Capacity: capacity, Free: free, Replicas: a.reports()}
		err = a.c.do(ctx, "POST", "/v1/nodes/heartbeat", &req, &out, o)
	}
	var ae *coordapi.Error
	if errors.As(err, &ae) {
		*retryAfter = ae.RetryAfter.D()
	}
	if err == nil {
		*resp = &out
	}
	return err
}

func (a *Agent) reports() []coordapi.ReplicaReport {
	if a.cfg.Reports != nil {
		return a.cfg.Reports()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]coordapi.ReplicaReport, 0, len(a.view))
	for _, as := range a.view {
		out = append(out, coordapi.ReplicaReport{Volume: as.Volume, Epoch: as.Epoch})
	}
	return out
}

// retryWait: capped exponential backoff with equal jitter, at least the
// server's Retry-After, at most a quarter of the interval unless the
// server asked for longer.
func (a *Agent) retryWait(failures int, retryAfter time.Duration) time.Duration {
	a.mu.Lock()
	interval := a.lease.Interval.D()
	a.mu.Unlock()
	if interval <= 0 {
		interval = coordapi.DefaultConfig().Lease.Interval.D()
	}
	b := Backoff{Base: 50 * time.Millisecond, Max: max(interval/4, 100*time.Millisecond)}
	return b.After(failures, min(retryAfter, a.c.cfg.MaxRetryAfter), a.c.cfg.Rand)
}

// apply installs a heartbeat answer: the new view (keeping, per volume, a
// newer epoch a replica-loss answer may have brought) and the deadline from
// the send time. It reports whether any assignment changed.
func (a *Agent) apply(resp *coordapi.HeartbeatResponse, sent time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	next := make(map[coordapi.VolumeID]coordapi.Assignment, len(resp.Assignments))
	changed := len(resp.Assignments) != len(a.view)
	for _, as := range resp.Assignments {
		cur, ok := a.view[as.Volume]
		if ok && cur.Epoch > as.Epoch {
			as = cur
		}
		if !ok || !sameAssignment(cur, as) {
			changed = true
		}
		next[as.Volume] = as
	}
	a.view = next
	a.lease = resp.Lease
	a.deadline = resp.Lease.NodeDeadline(sent)
	return changed
}

func sameAssignment(x, y coordapi.Assignment) bool {
	return x.Volume == y.Volume && x.Epoch == y.Epoch && x.Role == y.Role && x.InSync == y.InSync &&
		x.Primary == y.Primary && x.Size == y.Size && slices.Equal(x.Peers, y.Peers)
}

// deliver calls OnChange with the current view; it returns whether the
// lease was valid.
func (a *Agent) deliver(now time.Time) bool {
	a.mu.Lock()
	u := Update{Assignments: a.assignmentsLocked(), LeaseDeadline: a.deadline, LeaseValid: now.Before(a.deadline)}
	a.mu.Unlock()
	if a.cfg.OnChange != nil {
		a.cfg.OnChange(u)
	}
	return u.LeaseValid
}
