package coord

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"

	"keel/ctl/coordapi"
)

// EventKind names something the machine decided.
type EventKind string

const (
	EventNodeRegistered EventKind = "node_registered"
	EventNodeUp         EventKind = "node_up"       // a node whose lease had lapsed heartbeated again
	EventLeaseExpired   EventKind = "lease_expired" // a node's lease lapsed
	EventPrimaryLost    EventKind = "primary_lost"  // a volume's primary lost its authority
	EventPromoted       EventKind = "promoted"      // a new primary, at a new epoch
	EventHandover       EventKind = "handover"      // the primary was asked to step down (drain)
	EventInSyncRemoved  EventKind = "in_sync_removed"
	EventVolumeCreated  EventKind = "volume_created"
	EventVolumeDeleted  EventKind = "volume_deleted"
	EventStateChanged   EventKind = "state_changed" // a volume's state changed
	EventNodeDrain      EventKind = "node_drain"
	// Recovery (recovery.go).
	EventSlotGranted        EventKind = "slot_granted"  // Node is the target; Reason the kind
	EventSlotReleased       EventKind = "slot_released" // Reason says why
	EventRejoined           EventKind = "rejoined"      // Node is back in the in-sync set
	EventMemberGone         EventKind = "member_gone"   // Node's replica is given up; its space quarantined
	EventPlaced             EventKind = "placed"        // Node is a new member to re-mirror to
	EventModeChanged        EventKind = "mode_changed"  // Reason names the new mode and why
	EventQuarantineReleased EventKind = "quarantine_released"
)

// Event is one decision, for logs and metrics. Events are part of the
// deterministic result: every member applying a command gets the same.
type Event struct {
	Kind   EventKind
	Node   coordapi.NodeID
	Volume coordapi.VolumeID
	Epoch  coordapi.Epoch
	State  coordapi.VolumeState
	Reason string
}

func (e Event) String() string {
	var b strings.Builder
	b.WriteString(string(e.Kind))
	if e.Volume != "" {
		fmt.Fprintf(&b, " %s", e.Volume)
	}
	if e.Node != "" {
		fmt.Fprintf(&b, " node=%s", e.Node)
	}
	if e.Epoch != 0 {
		fmt.Fprintf(&b, " epoch=%d", e.Epoch)
	}
	if e.State != "" {
		fmt.Fprintf(&b, " state=%s", e.State)
	}
	if e.Reason != "" {
		fmt.Fprintf(&b, " (%s)", e.Reason)
	}
	return b.String()
}

// Result is what applying a command decided. Err set means the command was
// refused and nothing changed. The pointers are fresh copies the caller
// owns.
type Result struct {
	Err        *coordapi.Error
	Heartbeat  *coordapi.HeartbeatResponse
	Volume     *coordapi.Volume
	Node       *coordapi.Node
	Assignment *coordapi.Assignment
	Config     *coordapi.Config
	Grant      *coordapi.SyncGrant
	Events     []Event
}

// Machine is the coordinator's state. It is not safe for concurrent use:
// its owner serialises Apply and the read methods (ctl/coordsvc holds a
// RWMutex around it).
type Machine struct {
	cfg        coordapi.Config
	configured bool
	now        time.Time
	nextVolume uint64
	nodes      map[coordapi.NodeID]*node
	volumes    map[coordapi.VolumeID]*volume
	byName     map[string]coordapi.VolumeID // derived
	cell       map[string]coordapi.CellMember
	rec        recovery

	remirrors int     // derived: re-mirror slots held cluster-wide
	events    []Event // collected during one Apply
}

type node struct {
	ID          coordapi.NodeID `json:"id"`
	Zone        string          `json:"zone,omitempty"`
	PrimaryAddr string          `json:"primary_addr"`
	ReplAddr    string          `json:"repl_addr"`
	Capacity    int64           `json:"capacity"`
	Free        int64           `json:"free"`
	Up          bool            `json:"up"`
	Since       time.Time       `json:"since"` // when Up last changed
	LeaseExpiry time.Time       `json:"lease_expiry"`
	Draining    bool            `json:"draining,omitempty"`
	Registered  time.Time       `json:"registered"`

	allocated   int64                          // derived: sum of its replicas' sizes
	vols        map[coordapi.VolumeID]struct{} // derived: volumes it holds a replica of
	primaries   int                            // derived
	quarantined int64                          // derived: sizes of the volumes quarantining it
	remirrors   int                            // derived: re-mirror slots it sends or receives
	catchUps    int                            // derived: catch-up slots it sends or receives
}

type volume struct {
	ID       coordapi.VolumeID `json:"id"`
	Name     string            `json:"name"`
	Size     int64             `json:"size"`
	Replicas int               `json:"replicas"`
	Epoch    coordapi.Epoch    `json:"epoch"`
	// Primary is "" while no node holds the role.
	Primary coordapi.NodeID `json:"primary,omitempty"`
	// Releasing is the former primary of a handover that has not yet
	// confirmed stepping down; while set, nobody is promoted.
	Releasing coordapi.NodeID      `json:"releasing,omitempty"`
	Members   []*member            `json:"members"` // in placement order
	State     coordapi.VolumeState `json:"state"`
	Reason    string               `json:"reason"`
	Since     time.Time            `json:"since"`
	Created   time.Time            `json:"created"`
	RequestID string               `json:"request_id,omitempty"`
	// PrevPrimary is the last node that held the primary role while the
	// role is vacant (cleared at the next promotion); PrevLost says it lost
	// the role with its lease rather than by a handover.
	PrevPrimary coordapi.NodeID `json:"prev_primary,omitempty"`
	PrevLost    bool            `json:"prev_lost,omitempty"`
	// Quarantine lists the nodes whose replica of this volume was given up
	// (declared gone): the volume's size stays held on each, offered to no
	// placement, until the volume is fully in sync again. Sorted.
	Quarantine []coordapi.NodeID `json:"quarantine,omitempty"`
}

type member struct {
	Node          coordapi.NodeID `json:"node"`
	InSync        bool            `json:"in_sync"`
	ReportedEpoch coordapi.Epoch  `json:"reported_epoch,omitempty"`
	DurableSeq    coordapi.Seq    `json:"durable_seq,omitempty"`
	Health        coordapi.Health `json:"health,omitempty"`
	HealthReason  string          `json:"health_reason,omitempty"`
	// Recovery: since when the member is out of sync (zero while in
	// sync), whether it needs a whole copy, the gone member it replaces,
	// and the copy slot it holds.
	OutOfSyncSince time.Time       `json:"out_of_sync_since,omitzero"`
	FullCopy       bool            `json:"full_copy,omitempty"`
	Replaces       coordapi.NodeID `json:"replaces,omitempty"`
	Slot           *slot           `json:"slot,omitempty"`
}

func (v *volume) member(id coordapi.NodeID) *member {
	for _, m := range v.Members {
		if m.Node == id {
			return m
		}
	}
	return nil
}

// New returns an empty machine with cfg (DefaultConfig when zero).
func New(cfg coordapi.Config) *Machine {
	if cfg == (coordapi.Config{}) {
		cfg = coordapi.DefaultConfig()
	}
	return &Machine{
		cfg:        cfg,
		nextVolume: 1,
		nodes:      map[coordapi.NodeID]*node{},
		volumes:    map[coordapi.VolumeID]*volume{},
		byName:     map[string]coordapi.VolumeID{},
		cell:       map[string]coordapi.CellMember{},
		rec:        recovery{Mode: coordapi.ModeNormal},
	}
}

// Apply applies one command and returns what it decided.
func (m *Machine) Apply(c Command) Result {
	m.events = nil
	at := c.At.UTC()
	if c.Op != OpRebase && at.Before(m.now) {
		// Within one leader's term, proposals carry its monotonic clock.
		// An older time can only come from a command proposed before a
		// rebase; it must not move time backwards.
		at = m.now
	}
	var r Result
	if _, ok := c.payloads(); !ok { // also refuses an unknown op
		return Result{Err: coordapi.Errorf(coordapi.CodeBadRequest, "command %q must carry exactly its own payload", c.Op)}
	}
	switch c.Op {
	case OpConfigure:
		r = m.configure(c.Configure)
	case OpRegister:
		r = m.register(at, c.Register)
	case OpHeartbeat:
		r = m.heartbeat(at, c.Heartbeat)
	case OpReplicaLoss:
		r = m.replicaLoss(at, c.ReplicaLoss)
	case OpCreateVolume:
		r = m.createVolume(at, c.CreateVolume)
	case OpDeleteVolume:
		r = m.deleteVolume(at, c.DeleteVolume)
	case OpDrain:
		r = m.drain(at, c.Drain)
	case OpTick:
		r = m.tick(at)
	case OpRebase:
		r = m.rebase(c.At.UTC())
	case OpSetMember:
		r = m.setMember(c.SetMember)
	case OpRemoveMember:
		r = m.removeMember(c.RemoveMember)
	case OpSync:
		r = m.sync(at, c.Sync)
	case OpRejoin:
		r = m.rejoin(at, c.Rejoin)
	}
	if r.Err == nil && c.Op != OpRebase {
		m.now = at
	}
	r.Events = m.events
	m.events = nil
	return r
}

func (m *Machine) emit(e Event) { m.events = append(m.events, e) }

func badRequest(err error) Result {
	return Result{Err: &coordapi.Error{Code: coordapi.CodeBadRequest, Message: err.Error()}}
}

func fail(code coordapi.Code, format string, args ...any) Result {
	return Result{Err: coordapi.Errorf(code, format, args...)}
}

func (m *Machine) configure(cfg *coordapi.Config) Result {
	if err := cfg.Validate(); err != nil {
		return badRequest(err)
	}
	m.cfg = *cfg
	m.configured = true
	c := m.cfg
	return Result{Config: &c}
}

func (m *Machine) register(at time.Time, req *coordapi.RegisterRequest) Result {
	if err := req.Validate(); err != nil {
		return badRequest(err)
	}
	n := m.nodes[req.Node]
	if n != nil && n.Zone != req.Zone && len(n.vols) > 0 {
		return fail(coordapi.CodeConflict, "node %s is registered in zone %q and holds %d replicas: its zone cannot change to %q", n.ID, n.Zone, len(n.vols), req.Zone)
	}
	if n == nil {
		// Up from the start: its first lease is granted below.
		n = &node{ID: req.Node, Registered: at, Since: at, Up: true, vols: map[coordapi.VolumeID]struct{}{}}
		m.nodes[n.ID] = n
		m.emit(Event{Kind: EventNodeRegistered, Node: n.ID, Reason: "zone " + zoneName(req.Zone)})
	}
	n.Zone = req.Zone
	n.PrimaryAddr = req.PrimaryAddr
	n.ReplAddr = req.ReplAddr
	return m.renew(at, n, req.Capacity, req.Free, nil)
}

func zoneName(z string) string {
	if z == "" {
		return `""`
	}
	return z
}

func (m *Machine) heartbeat(at time.Time, req *coordapi.HeartbeatRequest) Result {
	if err := req.Validate(); err != nil {
		return badRequest(err)
	}
	n := m.nodes[req.Node]
	if n == nil {
		return fail(coordapi.CodeNotFound, "node %s is not registered: register it first", req.Node)
	}
	return m.renew(at, n, req.Capacity, req.Free, req.Replicas)
}

// renew grants n a lease from at, records its reports and re-evaluates its
// volumes.
func (m *Machine) renew(at time.Time, n *node, capacity, free int64, reports []coordapi.ReplicaReport) Result {
	n.Capacity, n.Free = capacity, free
	n.LeaseExpiry = m.cfg.Lease.CoordinatorExpiry(at)
	if !n.Up {
		n.Up = true
		n.Since = at
		m.emit(Event{Kind: EventNodeUp, Node: n.ID})
	}
	var ignored []coordapi.IgnoredReport
	for _, rep := range reports {
		ignored = append(ignored, m.syncReports(at, n, rep)...)
		v := m.volumes[rep.Volume]
		var mem *member
		if v != nil {
			mem = v.member(n.ID)
		}
		switch {
		case v != nil && mem == nil && slices.Contains(v.Quarantine, n.ID):
			ignored = append(ignored, coordapi.IgnoredReport{Volume: rep.Volume, Reason: "not a member: close this replica (given up; its space stays quarantined until the volume is fully in sync elsewhere)"})
		case v == nil || mem == nil:
			ignored = append(ignored, coordapi.IgnoredReport{Volume: rep.Volume, Reason: "not a member: close this replica"})
		case rep.Epoch < v.Epoch:
			ignored = append(ignored, coordapi.IgnoredReport{Volume: rep.Volume, Reason: fmt.Sprintf("stale epoch %d: current is %d", rep.Epoch, v.Epoch)})
		case rep.Epoch > v.Epoch:
			ignored = append(ignored, coordapi.IgnoredReport{Volume: rep.Volume, Reason: fmt.Sprintf("epoch %d is ahead of the coordinator's %d", rep.Epoch, v.Epoch)})
		default:
			mem.ReportedEpoch = rep.Epoch
			mem.DurableSeq = max(mem.DurableSeq, rep.DurableSeq)
			mem.Health = rep.Health
			if mem.Health == coordapi.HealthOK {
				mem.Health = ""
			}
			mem.HealthReason = rep.Reason
			if mem.Health == "" {
				mem.HealthReason = ""
			}
		}
	}
	for _, id := range sortedKeys(n.vols) {
		m.reevaluate(at, m.volumes[id])
	}
	resp := m.heartbeatResponse(n)
	resp.Ignored = ignored
	return Result{Heartbeat: resp}
}

func (m *Machine) heartbeatResponse(n *node) *coordapi.HeartbeatResponse {
	resp := &coordapi.HeartbeatResponse{
		Node:          n.ID,
		Lease:         m.cfg.Lease,
		NextHeartbeat: m.cfg.Lease.Interval,
		Assignments:   []coordapi.Assignment{},
	}
	for _, id := range sortedKeys(n.vols) {
		v := m.volumes[id]
		resp.Assignments = append(resp.Assignments, m.assignment(v, n.ID))
		if v.Primary == "" {
			// A change of primary is under way: come back soon, to confirm
			// stepping down or to take the role.
			resp.NextHeartbeat = max(m.cfg.Lease.Interval/10, coordapi.Duration(50*time.Millisecond))
		}
	}
	return resp
}

func (m *Machine) assignment(v *volume, id coordapi.NodeID) coordapi.Assignment {
	a := coordapi.Assignment{
		Volume:  v.ID,
		Name:    v.Name,
		Size:    v.Size,
		Epoch:   v.Epoch,
		Role:    coordapi.RoleSecondary,
		Primary: v.Primary,
	}
	if v.Primary == id {
		a.Role = coordapi.RolePrimary
	}
	for _, mem := range v.Members {
		if mem.Node == id {
			a.InSync = mem.InSync
			continue
		}
		pn := m.nodes[mem.Node]
		p := coordapi.Peer{Node: mem.Node, Zone: pn.Zone, PrimaryAddr: pn.PrimaryAddr, ReplAddr: pn.ReplAddr, Role: coordapi.RoleSecondary, InSync: mem.InSync,
			Live: pn.Up, State: memberState(mem)}
		if mem.Slot != nil {
			p.Sync = mem.Slot.Kind
		}
		if v.Primary == mem.Node {
			p.Role = coordapi.RolePrimary
		}
		a.Peers = append(a.Peers, p)
	}
	return a
}

func (m *Machine) up(id coordapi.NodeID) bool {
	n := m.nodes[id]
	return n != nil && n.Up
}

// reevaluate applies the primary rules to v after something changed and
// recomputes its state.
func (m *Machine) reevaluate(at time.Time, v *volume) {
	if old := v.Primary; old != "" && !m.up(old) {
		m.setPrimary(v, "")
		v.PrevPrimary, v.PrevLost = old, true
		m.emit(Event{Kind: EventPrimaryLost, Volume: v.ID, Node: old, Epoch: v.Epoch, Reason: "lease expired"})
	}
	for _, mem := range v.Members {
		if mem.Slot != nil && !m.up(mem.Node) {
			m.releaseSlot(v, mem, "target "+string(mem.Node)+" lease expired")
		}
	}
	if v.Releasing != "" {
		rel := v.member(v.Releasing)
		if !m.up(v.Releasing) || rel == nil || rel.ReportedEpoch >= v.Epoch {
			v.Releasing = ""
		}
	}
	if v.Primary == "" && v.Releasing == "" {
		if cand := m.candidate(v); cand != "" {
			v.Epoch++
			// The new primary holds no write-intent bitmap for the writes
			// made before it took the role: members already out of sync
			// need a whole copy, unless it is the previous primary back.
			moved := v.PrevPrimary != "" && v.PrevPrimary != cand
			for _, mem := range v.Members {
				if !mem.InSync && moved && !mem.FullCopy {
					mem.FullCopy = true
				}
			}
			for _, mem := range v.Members {
				if mem.InSync && !m.up(mem.Node) {
					// A former primary that lost its lease may hold writes
					// nobody acknowledged: no bitmap covers them.
					full := mem.Node == v.PrevPrimary && v.PrevLost
					m.markOutOfSync(at, v, mem, full)
					m.emit(Event{Kind: EventInSyncRemoved, Volume: v.ID, Node: mem.Node, Epoch: v.Epoch, Reason: "lease expired"})
				}
			}
			m.setPrimary(v, cand)
			v.PrevPrimary, v.PrevLost = "", false
			m.emit(Event{Kind: EventPromoted, Volume: v.ID, Node: cand, Epoch: v.Epoch})
		}
	}
	m.updateState(at, v)
}

func (m *Machine) setPrimary(v *volume, id coordapi.NodeID) {
	if v.Primary != id {
		// Every slot is the primary's: a new one asks again.
		for _, mem := range v.Members {
			if mem.Slot != nil {
				m.releaseSlot(v, mem, "primary changed")
			}
		}
	}
	if v.Primary != "" {
		if n := m.nodes[v.Primary]; n != nil {
			n.primaries--
		}
	}
	v.Primary = id
	if id != "" {
		m.nodes[id].primaries++
	}
}

// candidate ranks the live in-sync members: not draining first, then the
// highest durable sequence reported, then the lowest node ID.
func (m *Machine) candidate(v *volume) coordapi.NodeID {
	var best *member
	better := func(a, b *member) bool {
		da, db := m.nodes[a.Node].Draining, m.nodes[b.Node].Draining
		if da != db {
			return !da
		}
		if a.DurableSeq != b.DurableSeq {
			return a.DurableSeq > b.DurableSeq
		}
		return a.Node < b.Node
	}
	for _, mem := range v.Members {
		if !mem.InSync || !m.up(mem.Node) {
			continue
		}
		if best == nil || better(mem, best) {
			best = mem
		}
	}
	if best == nil {
		return ""
	}
	return best.Node
}

// computeState derives a volume's state and reason.
func (m *Machine) computeState(v *volume) (coordapi.VolumeState, string) {
	if v.Releasing != "" {
		return coordapi.StateFenced, fmt.Sprintf("handing the primary role over from %s (draining): waiting for %s to step down", v.Releasing, v.Releasing)
	}
	if v.Primary == "" {
		var waiting []string
		for _, mem := range v.Members {
			if mem.InSync {
				waiting = append(waiting, string(mem.Node))
			}
		}
		return coordapi.StateImpaired, fmt.Sprintf("no primary: no in-sync replica has a valid lease; waiting for one of %s to return", strings.Join(waiting, ", "))
	}
	if pm := v.member(v.Primary); pm.Health == coordapi.HealthImpaired {
		return coordapi.StateImpaired, fmt.Sprintf("primary %s reports: %s", v.Primary, orUnknown(pm.HealthReason))
	}
	live := 0
	var missing []string
	for _, mem := range v.Members {
		switch {
		case mem.InSync && m.up(mem.Node):
			live++
		case mem.InSync:
			missing = append(missing, string(mem.Node)+" lease expired")
		default:
			missing = append(missing, m.recoveryReason(v, mem))
		}
	}
	if len(v.Members) < v.Replicas {
		missing = append(missing, m.unplacedReason(v))
	}
	if live < v.Replicas {
		return coordapi.StateDegraded, fmt.Sprintf("%d of %d replicas live and in sync (%s)", live, v.Replicas, strings.Join(missing, "; "))
	}
	return coordapi.StateOK, fmt.Sprintf("all %d replica(s) in sync", v.Replicas)
}

func orUnknown(s string) string {
	if s == "" {
		return "impaired (no reason given)"
	}
	return s
}

func (m *Machine) updateState(at time.Time, v *volume) {
	st, reason := m.computeState(v)
	if st != v.State {
		v.State = st
		v.Since = at
		m.emit(Event{Kind: EventStateChanged, Volume: v.ID, Epoch: v.Epoch, State: st, Reason: reason})
	}
	v.Reason = reason
}

func (m *Machine) tick(at time.Time) Result {
	var expired []*node
	for _, id := range sortedKeys(m.nodes) {
		n := m.nodes[id]
		if n.Up && !at.Before(n.LeaseExpiry) {
			n.Up = false
			n.Since = at
			expired = append(expired, n)
			m.emit(Event{Kind: EventLeaseExpired, Node: n.ID})
		}
	}
	affected := map[coordapi.VolumeID]struct{}{}
	for _, n := range expired {
		for id := range n.vols {
			affected[id] = struct{}{}
		}
	}
	for _, id := range sortedKeys(affected) {
		m.reevaluate(at, m.volumes[id])
	}
	m.recover(at)
	return Result{}
}

func (m *Machine) rebase(at time.Time) Result {
	for _, id := range sortedKeys(m.nodes) {
		if n := m.nodes[id]; n.Up {
			n.LeaseExpiry = m.cfg.Lease.CoordinatorExpiry(at)
		}
	}
	m.now = at
	return Result{}
}

// lookup finds a volume by ID or name.
func (m *Machine) lookup(ref string) *volume {
	if v := m.volumes[coordapi.VolumeID(ref)]; v != nil {
		return v
	}
	if id, ok := m.byName[ref]; ok {
		return m.volumes[id]
	}
	return nil
}

func (m *Machine) replicaLoss(at time.Time, req *ReplicaLoss) Result {
	if err := req.Validate(); err != nil {
		return badRequest(err)
	}
	v := m.lookup(req.Volume)
	if v == nil {
		return fail(coordapi.CodeNotFound, "volume %q does not exist", req.Volume)
	}
	if m.nodes[req.Node] == nil {
		return fail(coordapi.CodeNotFound, "node %s is not registered", req.Node)
	}
	lost := v.member(req.Lost)
	if lost == nil {
		return fail(coordapi.CodeNotFound, "node %s holds no replica of %s", req.Lost, v.ID)
	}
	if v.Primary == req.Node && !lost.InSync {
		// Already done (a retry of a call that succeeded, or a report the
		// coordinator anticipated): nothing to change.
		a := m.assignment(v, req.Node)
		return Result{Assignment: &a}
	}
	if req.Epoch != v.Epoch {
		e := coordapi.Errorf(coordapi.CodeStaleEpoch, "%s is at epoch %d, the report names epoch %d: re-read the assignment from a heartbeat", v.ID, v.Epoch, req.Epoch)
		e.CurrentEpoch = v.Epoch
		return Result{Err: e}
	}
	if v.Primary != req.Node {
		return fail(coordapi.CodeNotPrimary, "node %s is not the primary of %s at epoch %d (the primary is %q)", req.Node, v.ID, v.Epoch, v.Primary)
	}
	// A primary's node is always up: reevaluate clears the role on expiry.
	v.Epoch++
	m.markOutOfSync(at, v, lost, false)
	m.emit(Event{Kind: EventInSyncRemoved, Volume: v.ID, Node: lost.Node, Epoch: v.Epoch, Reason: "reported by primary " + string(req.Node) + reasonSuffix(req.Reason)})
	m.updateState(at, v)
	a := m.assignment(v, req.Node)
	return Result{Assignment: &a}
}

func reasonSuffix(s string) string {
	if s == "" {
		return ""
	}
	return ": " + s
}

// reserve is the part of n's capacity kept for re-mirroring.
func (m *Machine) reserve(n *node) int64 {
	return int64(float64(n.Capacity) * m.cfg.ReserveFraction)
}

// usable is the space n can give before touching its reserve.
func (m *Machine) usable(n *node) int64 {
	return m.room(n) - m.reserve(n)
}

// room is the space n can give a re-mirror, reserve included: what is
// neither allocated nor quarantined, bounded by what it reports free.
func (m *Machine) room(n *node) int64 {
	return min(n.Capacity-n.allocated-n.quarantined, n.Free)
}

func (m *Machine) createVolume(at time.Time, req *coordapi.CreateVolumeRequest) Result {
	if err := req.Validate(); err != nil {
		return badRequest(err)
	}
	if id, ok := m.byName[req.Name]; ok {
		v := m.volumes[id]
		if req.RequestID != "" && v.RequestID == req.RequestID {
			out := m.volumeView(v)
			return Result{Volume: &out}
		}
		return fail(coordapi.CodeConflict, "volume %q exists already (%s)", req.Name, id)
	}
	chosen, err := m.place(req.Size, req.Replicas)
	if err != nil {
		return Result{Err: err}
	}
	v := &volume{
		ID:        coordapi.MakeVolumeID(m.nextVolume),
		Name:      req.Name,
		Size:      req.Size,
		Replicas:  req.Replicas,
		Epoch:     1,
		Created:   at,
		Since:     at,
		RequestID: req.RequestID,
	}
	m.nextVolume++
	for _, n := range chosen {
		v.Members = append(v.Members, &member{Node: n.ID, InSync: true})
		n.vols[v.ID] = struct{}{}
		n.allocated += v.Size
	}
	// The primary: the chosen node leading the fewest volumes.
	p := chosen[0]
	for _, n := range chosen[1:] {
		if n.primaries < p.primaries {
			p = n
		}
	}
	m.setPrimary(v, p.ID)
	m.volumes[v.ID] = v
	m.byName[v.Name] = v.ID
	st, reason := m.computeState(v)
	v.State, v.Reason = st, reason
	m.emit(Event{Kind: EventVolumeCreated, Volume: v.ID, Node: p.ID, Epoch: v.Epoch, State: st, Reason: v.Name})
	out := m.volumeView(v)
	return Result{Volume: &out}
}

// place chooses replicas nodes for a volume of size bytes.
func (m *Machine) place(size int64, replicas int) ([]*node, *coordapi.Error) {
	var eligible []*node
	var refused []string
	for _, id := range sortedKeys(m.nodes) {
		n := m.nodes[id]
		switch {
		case !n.Up:
			refused = append(refused, fmt.Sprintf("%s: lease expired", n.ID))
		case n.Draining:
			refused = append(refused, fmt.Sprintf("%s: draining", n.ID))
		case m.usable(n) < size:
			refused = append(refused, fmt.Sprintf("%s: %s usable above its %s reserve", n.ID, coordapi.FormatBytes(max(m.usable(n), 0)), coordapi.FormatBytes(m.reserve(n))))
		default:
			eligible = append(eligible, n)
		}
	}
	slices.SortStableFunc(eligible, func(a, b *node) int {
		if c := cmp.Compare(m.usable(b), m.usable(a)); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	var chosen []*node
	taken := map[coordapi.NodeID]bool{}
	zones := map[string]bool{}
	for _, n := range eligible { // first pass: one per zone
		if len(chosen) < replicas && !zones[n.Zone] {
			chosen = append(chosen, n)
			taken[n.ID] = true
			zones[n.Zone] = true
		}
	}
	for _, n := range eligible { // then any distinct node
		if len(chosen) < replicas && !taken[n.ID] {
			chosen = append(chosen, n)
			taken[n.ID] = true
		}
	}
	if len(chosen) < replicas {
		const show = 6
		more := ""
		if len(refused) > show {
			more = fmt.Sprintf("; and %d more", len(refused)-show)
			refused = refused[:show]
		}
		detail := ""
		if len(refused) > 0 {
			detail = ": " + strings.Join(refused, "; ") + more
		}
		return nil, coordapi.Errorf(coordapi.CodeNoCapacity,
			"need %d distinct node(s) with %s usable outside the %.0f%% re-mirror reserve; only %d qualify%s",
			replicas, coordapi.FormatBytes(size), m.cfg.ReserveFraction*100, len(chosen), detail)
	}
	return chosen, nil
}

func (m *Machine) deleteVolume(at time.Time, ref *VolumeRef) Result {
	v := m.lookup(ref.Volume)
	if v == nil {
		return fail(coordapi.CodeNotFound, "volume %q does not exist", ref.Volume)
	}
	out := m.volumeView(v)
	m.setPrimary(v, "")
	m.releaseQuarantine(v)
	for _, mem := range v.Members {
		if mem.Slot != nil {
			m.releaseSlot(v, mem, "volume deleted")
		}
		n := m.nodes[mem.Node]
		delete(n.vols, v.ID)
		n.allocated -= v.Size
	}
	delete(m.volumes, v.ID)
	delete(m.byName, v.Name)
	m.emit(Event{Kind: EventVolumeDeleted, Volume: v.ID, Epoch: v.Epoch, Reason: v.Name})
	return Result{Volume: &out}
}

func (m *Machine) drain(at time.Time, d *Drain) Result {
	if err := d.Node.Validate(); err != nil {
		return badRequest(err)
	}
	n := m.nodes[d.Node]
	if n == nil {
		return fail(coordapi.CodeNotFound, "node %s is not registered", d.Node)
	}
	if d.Undo {
		if n.Draining {
			n.Draining = false
			m.emit(Event{Kind: EventNodeDrain, Node: n.ID, Reason: "drain cancelled"})
		}
		out := m.nodeView(n)
		return Result{Node: &out}
	}
	if !n.Draining {
		n.Draining = true
		m.emit(Event{Kind: EventNodeDrain, Node: n.ID, Reason: "draining"})
	}
	for _, id := range sortedKeys(n.vols) {
		v := m.volumes[id]
		if v.Primary != n.ID {
			continue
		}
		other := false
		for _, mem := range v.Members {
			if mem.Node != n.ID && mem.InSync && m.up(mem.Node) && !m.nodes[mem.Node].Draining {
				other = true
			}
		}
		if !other {
			continue // stays primary: nobody to hand over to yet
		}
		v.Epoch++
		m.setPrimary(v, "")
		v.Releasing = n.ID
		m.emit(Event{Kind: EventHandover, Volume: v.ID, Node: n.ID, Epoch: v.Epoch, Reason: "drain"})
		v.PrevPrimary, v.PrevLost = n.ID, false
		m.reevaluate(at, v)
	}
	m.drainOutOfSync(at, n)
	out := m.nodeView(n)
	return Result{Node: &out}
}

func (m *Machine) setMember(c *coordapi.CellMember) Result {
	if err := coordapi.ValidateMemberID(c.ID); err != nil {
		return badRequest(err)
	}
	m.cell[c.ID] = *c
	return Result{}
}

func (m *Machine) removeMember(r *coordapi.RemoveRequest) Result {
	delete(m.cell, r.ID)
	return Result{}
}

func sortedKeys[K cmp.Ordered, V any](mp map[K]V) []K {
	keys := make([]K, 0, len(mp))
	for k := range mp {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
