package coord

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"keel/ctl/coordapi"
)

// Recovery: the storm control (see coordapi/recovery.go for the member
// cycle). The rules, all applied by this package deterministically:
//
//   - Out of sync: a member leaves the in-sync set (a loss the primary
//     reports, or a promotion that drops members whose lease lapsed) with
//     OutOfSyncSince = now. A former primary that lost its lease needs a
//     whole copy (FullCopy); so does every out-of-sync member when the
//     primary role moves to another node, since the new primary's bitmap
//     does not cover the writes made before it. Each in-sync removal counts
//     toward mass-failure detection.
//   - Slots: the primary asks for one per out-of-sync member (OpSync). A
//     re-mirror slot is granted under MaxRemirrors cluster-wide and
//     MaxRemirrorsPerNode on the primary's node and on the target's; a
//     catch-up slot under MaxCatchUpsPerNode on both. Otherwise, or when
//     the target's lease is not valid, or a re-mirror is asked for in
//     mass-failure mode, the answer is wait SlotRetry. A slot is released
//     when its volume's primary changes (an epoch change under the same
//     primary keeps it), when the target's lease lapses, when no heartbeat
//     of the primary reported it for SlotTTL, and by the rejoin.
//   - Rejoin (OpRejoin): the slot holder's member goes back in sync at
//     epoch + 1. A duplicate (in sync already) changes nothing.
//   - Gone (tick): an out-of-sync member without a slot whose node's lease
//     is not valid and whose OutOfSyncSince + Grace has passed is given up,
//     unless the cell is in mass-failure mode; so is, at once, every
//     out-of-sync member on a draining node. Its node keeps the volume's
//     size quarantined; a new member is placed (reserve usable) on a live,
//     non-draining node that is not a member and holds no quarantine of the
//     volume, zones spread as at creation, and starts needing a whole copy.
//     No node with room: retried every SlotRetry. A change of members takes
//     epoch + 1.
//   - Quarantine release: when the volume is fully in sync again (or
//     deleted).
//   - Mass-failure mode: MassFailureLosses in-sync removals within
//     MassFailureWindow enter it; it is left once MassFailureGrace has
//     passed since entering, or the removals within the window fall to at
//     most half the threshold. In the mode nothing is declared gone or
//     placed and re-mirror slots are refused; catch-ups go on.

// recovery is the cell-wide storm control state (in the snapshot).
type recovery struct {
	Mode       coordapi.ClusterMode `json:"mode"`
	ModeSince  time.Time            `json:"mode_since,omitzero"`
	ModeReason string               `json:"mode_reason,omitempty"`
	// Losses are the times of recent in-sync removals, oldest first,
	// pruned to MassFailureWindow.
	Losses []time.Time `json:"losses,omitempty"`
	// PlaceRetry: a volume short of members is not tried again before.
	PlaceRetry time.Time `json:"place_retry,omitzero"`

	SlotsGranted   int64 `json:"slots_granted"`
	SlotsRefused   int64 `json:"slots_refused"`
	Rejoins        int64 `json:"rejoins"`
	Placed         int64 `json:"placed"`
	Gone           int64 `json:"gone"`
	CopiedCatchUp  int64 `json:"copied_catch_up"`
	CopiedRemirror int64 `json:"copied_remirror"`
}

// slot is a copy the primary (Source) may run to the member holding it.
type slot struct {
	Kind    coordapi.SyncKind `json:"kind"`
	Source  coordapi.NodeID   `json:"source"`
	Granted time.Time         `json:"granted"`
	Renewed time.Time         `json:"renewed"` // grant, or last progress report
	Done    int64             `json:"done,omitempty"`
	Total   int64             `json:"total,omitempty"`
	Rate    int64             `json:"rate,omitempty"`
}

// rc is the recovery configuration in force (the defaults when the
// configuration predates it).
func (m *Machine) rc() coordapi.RecoveryConfig {
	if m.cfg.Recovery == (coordapi.RecoveryConfig{}) {
		return coordapi.DefaultRecovery()
	}
	return m.cfg.Recovery
}

func memberState(mem *member) coordapi.MemberState {
	switch {
	case mem.InSync:
		return coordapi.MemberInSync
	case mem.Slot != nil && mem.Slot.Kind == coordapi.SyncRemirror:
		return coordapi.MemberRemirror
	case mem.Slot != nil:
		return coordapi.MemberCatchingUp
	case mem.FullCopy:
		return coordapi.MemberNeedsCopy
	}
	return coordapi.MemberOutOfSync
}

func syncKind(mem *member) coordapi.SyncKind {
	if mem.FullCopy {
		return coordapi.SyncRemirror
	}
	return coordapi.SyncCatchUp
}

// markOutOfSync takes mem out of the in-sync set at at (the caller bumps
// the epoch and emits the event) and counts the loss.
func (m *Machine) markOutOfSync(at time.Time, v *volume, mem *member, fullCopy bool) {
	mem.InSync = false
	mem.OutOfSyncSince = at
	mem.FullCopy = mem.FullCopy || fullCopy
	m.recordLoss(at)
}

func (m *Machine) recordLoss(at time.Time) {
	r := m.rc()
	m.pruneLosses(at)
	if n := len(m.rec.Losses); n > 0 && at.Before(m.rec.Losses[n-1]) {
		at = m.rec.Losses[n-1] // a rebase moved the clock back: keep the order
	}
	m.rec.Losses = append(m.rec.Losses, at)
	if m.rec.Mode != coordapi.ModeMassFailure && len(m.rec.Losses) >= r.MassFailureLosses {
		m.setMode(at, coordapi.ModeMassFailure, fmt.Sprintf("%d replicas lost within %s (threshold %d): waiting for previous replicas to return; no new replicas placed",
			len(m.rec.Losses), r.MassFailureWindow, r.MassFailureLosses))
	}
}

// pruneLosses drops losses older than the window.
func (m *Machine) pruneLosses(at time.Time) {
	w := m.rc().MassFailureWindow.D()
	i := 0
	for i < len(m.rec.Losses) && !m.rec.Losses[i].After(at.Add(-w)) {
		i++
	}
	if i > 0 {
		m.rec.Losses = slices.Clone(m.rec.Losses[i:])
	}
	if len(m.rec.Losses) == 0 {
		m.rec.Losses = nil
	}
}

func (m *Machine) setMode(at time.Time, mode coordapi.ClusterMode, reason string) {
	m.rec.Mode, m.rec.ModeSince, m.rec.ModeReason = mode, at, reason
	m.emit(Event{Kind: EventModeChanged, Reason: string(mode) + ": " + reason})
	// Every degraded volume's reason mentions the mode.
	for _, id := range m.volumeIDsInOrder() {
		m.updateState(at, m.volumes[id])
	}
}

// checkMode leaves mass-failure mode when its time is up.
func (m *Machine) checkMode(at time.Time) {
	if m.rec.Mode != coordapi.ModeMassFailure {
		return
	}
	r := m.rc()
	m.pruneLosses(at)
	switch {
	case !at.Before(m.rec.ModeSince.Add(r.MassFailureGrace.D())):
		m.setMode(at, coordapi.ModeNormal, fmt.Sprintf("mass-failure grace of %s over: re-mirrors admitted at the limited rate", r.MassFailureGrace))
	case len(m.rec.Losses) <= r.MassFailureLosses/2:
		m.setMode(at, coordapi.ModeNormal, fmt.Sprintf("losses within %s down to %d: re-mirrors admitted at the limited rate", r.MassFailureWindow, len(m.rec.Losses)))
	}
}

// --- slots ---

func (m *Machine) grantSlot(at time.Time, v *volume, mem *member, kind coordapi.SyncKind, source coordapi.NodeID) {
	mem.Slot = &slot{Kind: kind, Source: source, Granted: at, Renewed: at}
	m.countSlot(mem, 1)
	m.rec.SlotsGranted++
	m.emit(Event{Kind: EventSlotGranted, Volume: v.ID, Node: mem.Node, Epoch: v.Epoch, Reason: string(kind) + " from " + string(source)})
}

func (m *Machine) releaseSlot(v *volume, mem *member, why string) {
	if mem.Slot == nil {
		return
	}
	m.countSlot(mem, -1)
	m.emit(Event{Kind: EventSlotReleased, Volume: v.ID, Node: mem.Node, Epoch: v.Epoch, Reason: string(mem.Slot.Kind) + ": " + why})
	mem.Slot = nil
}

// countSlot adds d to the derived slot counts of mem's slot.
func (m *Machine) countSlot(mem *member, d int) {
	src, dst := m.nodes[mem.Slot.Source], m.nodes[mem.Node]
	if mem.Slot.Kind == coordapi.SyncRemirror {
		m.remirrors += d
		src.remirrors += d
		dst.remirrors += d
	} else {
		src.catchUps += d
		dst.catchUps += d
	}
}

// slotRefusal says why a slot of kind from src to dst cannot be granted
// now, or "" when it can.
func (m *Machine) slotRefusal(kind coordapi.SyncKind, src, dst *node) string {
	r := m.rc()
	if !dst.Up {
		return fmt.Sprintf("target %s has no valid lease: wait for it to return", dst.ID)
	}
	if dst.Draining {
		return fmt.Sprintf("target %s is draining: it will be replaced", dst.ID)
	}
	if kind == coordapi.SyncCatchUp {
		for _, n := range []*node{src, dst} {
			if n.catchUps >= r.MaxCatchUpsPerNode {
				return fmt.Sprintf("%s already takes part in %d catch-up(s) (limit %d per node)", n.ID, n.catchUps, r.MaxCatchUpsPerNode)
			}
		}
		return ""
	}
	if m.rec.Mode == coordapi.ModeMassFailure {
		return "mass-failure mode: waiting for previous replicas"
	}
	if m.remirrors >= r.MaxRemirrors {
		return fmt.Sprintf("cluster-wide re-mirror limit reached (%d running, limit %d)", m.remirrors, r.MaxRemirrors)
	}
	for _, n := range []*node{src, dst} {
		if n.remirrors >= r.MaxRemirrorsPerNode {
			return fmt.Sprintf("%s already sends or receives %d re-mirror(s) (limit %d per node)", n.ID, n.remirrors, r.MaxRemirrorsPerNode)
		}
	}
	return ""
}

// primaryCheck finds the volume and checks that node is its primary at
// epoch: the common preamble of sync and rejoin.
func (m *Machine) primaryCheck(ref string, node coordapi.NodeID, epoch coordapi.Epoch) (*volume, *coordapi.Error) {
	v := m.lookup(ref)
	if v == nil {
		return nil, coordapi.Errorf(coordapi.CodeNotFound, "volume %q does not exist", ref)
	}
	if m.nodes[node] == nil {
		return nil, coordapi.Errorf(coordapi.CodeNotFound, "node %s is not registered", node)
	}
	if epoch != v.Epoch {
		e := coordapi.Errorf(coordapi.CodeStaleEpoch, "%s is at epoch %d, the request names epoch %d: re-read the assignment from a heartbeat", v.ID, v.Epoch, epoch)
		e.CurrentEpoch = v.Epoch
		return nil, e
	}
	if v.Primary != node {
		return nil, coordapi.Errorf(coordapi.CodeNotPrimary, "node %s is not the primary of %s at epoch %d (the primary is %q)", node, v.ID, v.Epoch, v.Primary)
	}
	return v, nil
}

// copyTarget checks that node is ref's primary at epoch and that target
// is a member: the common ground of a slot request and a rejoin.
func (m *Machine) copyTarget(ref string, node coordapi.NodeID, epoch coordapi.Epoch, target coordapi.NodeID) (*volume, *member, *coordapi.Error) {
	v, e := m.primaryCheck(ref, node, epoch)
	if e != nil {
		return nil, nil, e
	}
	mem := v.member(target)
	if mem == nil {
		return nil, nil, coordapi.Errorf(coordapi.CodeNotFound, "node %s holds no replica of %s", target, v.ID)
	}
	return v, mem, nil
}

func (m *Machine) sync(at time.Time, req *Sync) Result {
	if err := req.Validate(); err != nil {
		return badRequest(err)
	}
	v, mem, e := m.copyTarget(req.Volume, req.Node, req.Epoch, req.Target)
	if e != nil {
		return Result{Err: e}
	}
	if mem.InSync {
		return fail(coordapi.CodeConflict, "%s on %s is in sync already: nothing to copy", v.ID, req.Target)
	}
	if mem.Slot != nil {
		// Held already (the primary is the only source): a retry.
		return Result{Grant: &coordapi.SyncGrant{Granted: true, Kind: mem.Slot.Kind}}
	}
	kind := syncKind(mem)
	if why := m.slotRefusal(kind, m.nodes[req.Node], m.nodes[req.Target]); why != "" {
		m.rec.SlotsRefused++
		return Result{Grant: &coordapi.SyncGrant{Kind: kind, RetryAfter: m.rc().SlotRetry, Reason: why}}
	}
	m.grantSlot(at, v, mem, kind, req.Node)
	m.updateState(at, v)
	return Result{Grant: &coordapi.SyncGrant{Granted: true, Kind: kind}}
}

func (m *Machine) rejoin(at time.Time, req *Rejoin) Result {
	if err := req.Validate(); err != nil {
		return badRequest(err)
	}
	if v := m.lookup(req.Volume); v != nil && v.Primary == req.Node {
		if mem := v.member(req.Target); mem != nil && mem.InSync {
			// A duplicate (the retry of a rejoin that took effect):
			// nothing changes.
			a := m.assignment(v, req.Node)
			return Result{Assignment: &a}
		}
	}
	v, mem, e := m.copyTarget(req.Volume, req.Node, req.Epoch, req.Target)
	if e != nil {
		return Result{Err: e}
	}
	if mem.InSync {
		a := m.assignment(v, req.Node)
		return Result{Assignment: &a}
	}
	if mem.Slot == nil || mem.Slot.Source != req.Node {
		return fail(coordapi.CodeConflict, "%s on %s holds no slot from %s: ask for one (sync) and copy first", v.ID, req.Target, req.Node)
	}
	if mem.Slot.Kind != req.Kind {
		return fail(coordapi.CodeConflict, "%s on %s holds a %s slot, the rejoin reports a %s", v.ID, req.Target, mem.Slot.Kind, req.Kind)
	}
	m.releaseSlot(v, mem, "copy done")
	mem.InSync = true
	mem.OutOfSyncSince = time.Time{}
	mem.FullCopy = false
	mem.Replaces = ""
	v.Epoch++
	m.rec.Rejoins++
	if req.Kind == coordapi.SyncRemirror {
		m.rec.CopiedRemirror += req.Copied
	} else {
		m.rec.CopiedCatchUp += req.Copied
	}
	m.emit(Event{Kind: EventRejoined, Volume: v.ID, Node: mem.Node, Epoch: v.Epoch, Reason: fmt.Sprintf("%s of %s", req.Kind, coordapi.FormatBytes(req.Copied))})
	if m.fullyInSync(v) {
		m.releaseQuarantine(v)
	}
	m.updateState(at, v)
	a := m.assignment(v, req.Node)
	return Result{Assignment: &a}
}

// syncReports takes the progress the primary n reports in rep: each one
// renews the slot it names. It returns the reports it could not take.
func (m *Machine) syncReports(at time.Time, n *node, rep coordapi.ReplicaReport) []coordapi.IgnoredReport {
	if len(rep.Syncs) == 0 {
		return nil
	}
	v := m.volumes[rep.Volume]
	if v == nil || v.Primary != n.ID || rep.Epoch > v.Epoch {
		return nil // the report itself is ignored below, with why
	}
	var ignored []coordapi.IgnoredReport
	for _, s := range rep.Syncs {
		mem := v.member(s.Target)
		if mem == nil || mem.Slot == nil || mem.Slot.Source != n.ID || mem.Slot.Kind != s.Kind {
			ignored = append(ignored, coordapi.IgnoredReport{Volume: v.ID, Reason: fmt.Sprintf("sync to %s: no %s slot held: ask for one", s.Target, s.Kind)})
			continue
		}
		sl := mem.Slot
		sl.Renewed = at
		sl.Done, sl.Total, sl.Rate = max(s.Done, 0), max(s.Total, 0), max(s.Rate, 0)
	}
	return ignored
}

// --- gone, placement, quarantine ---

func (m *Machine) fullyInSync(v *volume) bool {
	if len(v.Members) < v.Replicas {
		return false
	}
	for _, mem := range v.Members {
		if !mem.InSync {
			return false
		}
	}
	return true
}

func (m *Machine) releaseQuarantine(v *volume) {
	for _, id := range v.Quarantine {
		if n := m.nodes[id]; n != nil {
			n.quarantined -= v.Size
		}
		m.emit(Event{Kind: EventQuarantineReleased, Volume: v.ID, Node: id, Reason: coordapi.FormatBytes(v.Size)})
	}
	v.Quarantine = nil
}

// declareGone gives mem up: it leaves v, its node keeps v's size
// quarantined. The caller bumps the epoch.
func (m *Machine) declareGone(v *volume, mem *member, why string) {
	m.releaseSlot(v, mem, "member gone")
	n := m.nodes[mem.Node]
	v.Members = slices.DeleteFunc(v.Members, func(x *member) bool { return x == mem })
	delete(n.vols, v.ID)
	n.allocated -= v.Size
	if !slices.Contains(v.Quarantine, n.ID) {
		v.Quarantine = append(v.Quarantine, n.ID)
		slices.Sort(v.Quarantine)
		n.quarantined += v.Size
	}
	m.rec.Gone++
	m.emit(Event{Kind: EventMemberGone, Volume: v.ID, Node: n.ID, Reason: why})
}

// placeReplacement adds a member to v on the best node with room (the
// reserve counts); it returns the node or nil.
func (m *Machine) placeReplacement(at time.Time, v *volume, replaces coordapi.NodeID) *node {
	zones := map[string]bool{}
	for _, mem := range v.Members {
		zones[m.nodes[mem.Node].Zone] = true
	}
	var best *node
	better := func(a, b *node) bool {
		if za, zb := !zones[a.Zone], !zones[b.Zone]; za != zb {
			return za // a zone the volume does not use yet
		}
		if ua, ub := m.usable(a), m.usable(b); ua != ub {
			return ua > ub // the reserve is touched last
		}
		return a.ID < b.ID
	}
	for _, id := range sortedKeys(m.nodes) {
		n := m.nodes[id]
		if !n.Up || n.Draining || v.member(id) != nil || slices.Contains(v.Quarantine, id) || m.room(n) < v.Size {
			continue
		}
		if best == nil || better(n, best) {
			best = n
		}
	}
	if best == nil {
		return nil
	}
	v.Members = append(v.Members, &member{Node: best.ID, OutOfSyncSince: at, FullCopy: true, Replaces: replaces})
	best.vols[v.ID] = struct{}{}
	best.allocated += v.Size
	m.rec.Placed++
	m.emit(Event{Kind: EventPlaced, Volume: v.ID, Node: best.ID, Reason: "re-mirror target, replacing " + orNone(replaces)})
	return best
}

func orNone(id coordapi.NodeID) string {
	if id == "" {
		return "a missing replica"
	}
	return string(id)
}

// goneDue says whether mem is to be given up at at, and why.
func (m *Machine) goneDue(at time.Time, mem *member) (bool, string) {
	if mem.InSync || mem.Slot != nil {
		return false, ""
	}
	n := m.nodes[mem.Node]
	if n.Draining {
		return true, "out of sync on a draining node"
	}
	if m.rec.Mode == coordapi.ModeMassFailure || n.Up {
		return false, ""
	}
	if grace := m.rc().Grace.D(); !at.Before(mem.OutOfSyncSince.Add(grace)) {
		return true, fmt.Sprintf("out of sync and without a lease for the %s grace", grace)
	}
	return false, ""
}

// recover runs the time-driven recovery rules (from tick).
func (m *Machine) recover(at time.Time) {
	r := m.rc()
	m.checkMode(at)
	if m.rec.Mode != coordapi.ModeMassFailure {
		m.pruneLosses(at)
	}
	tryPlace := !at.Before(m.rec.PlaceRetry)
	failed := false
	for _, id := range m.volumeIDsInOrder() {
		v := m.volumes[id]
		for _, mem := range v.Members {
			if sl := mem.Slot; sl != nil && !at.Before(sl.Renewed.Add(r.SlotTTL.D())) {
				m.releaseSlot(v, mem, fmt.Sprintf("no progress reported for %s", r.SlotTTL))
			}
		}
		var gone []coordapi.NodeID
		for _, mem := range slices.Clone(v.Members) {
			if due, why := m.goneDue(at, mem); due {
				m.declareGone(v, mem, why)
				gone = append(gone, mem.Node)
			}
		}
		if m.resettle(at, v, gone, tryPlace) {
			failed = true
		}
	}
	if failed {
		m.rec.PlaceRetry = at.Add(r.SlotRetry.D())
	}
}

// resettle places replacements for v's missing members (after gone were
// given up, or when a retry is due with try), bumps the epoch when the
// members changed, releases the quarantine once v is fully in sync and
// recomputes v's state. It reports whether a placement found no node.
func (m *Machine) resettle(at time.Time, v *volume, gone []coordapi.NodeID, try bool) (failed bool) {
	changed := len(gone) > 0
	if m.rec.Mode != coordapi.ModeMassFailure && len(v.Members) < v.Replicas && (try || len(gone) > 0) {
		for len(v.Members) < v.Replicas {
			var replaces coordapi.NodeID
			if len(gone) > 0 {
				replaces, gone = gone[0], gone[1:]
			} else if len(v.Quarantine) > 0 {
				replaces = v.Quarantine[0]
			}
			if m.placeReplacement(at, v, replaces) == nil {
				failed = true
				break
			}
			changed = true
		}
	}
	if changed {
		v.Epoch++
	}
	if len(v.Quarantine) > 0 && m.fullyInSync(v) {
		m.releaseQuarantine(v)
	}
	m.updateState(at, v)
	return failed
}

// drainOutOfSync gives up, at once, every out-of-sync member on the
// draining node n: its data is not worth catching up.
func (m *Machine) drainOutOfSync(at time.Time, n *node) {
	failed := false
	for _, id := range sortedKeys(n.vols) {
		v := m.volumes[id]
		mem := v.member(n.ID)
		if mem == nil || mem.InSync {
			continue
		}
		m.releaseSlot(v, mem, "target draining")
		m.declareGone(v, mem, "out of sync on a draining node")
		if m.resettle(at, v, []coordapi.NodeID{n.ID}, true) {
			failed = true
		}
	}
	if failed {
		m.rec.PlaceRetry = at.Add(m.rc().SlotRetry.D())
	}
}

// recoveryReason says what recovery is doing for the out-of-sync mem.
func (m *Machine) recoveryReason(v *volume, mem *member) string {
	n := m.nodes[mem.Node]
	mass := m.rec.Mode == coordapi.ModeMassFailure
	if sl := mem.Slot; sl != nil {
		verb := "catching up"
		if sl.Kind == coordapi.SyncRemirror {
			verb = "re-mirroring"
		}
		prog := "(no progress reported yet)"
		if sl.Total > 0 {
			prog = fmt.Sprintf("%s of %s", coordapi.FormatBytes(sl.Done), coordapi.FormatBytes(sl.Total))
			if sl.Rate > 0 {
				eta := time.Duration(float64(max(sl.Total-sl.Done, 0)) / float64(sl.Rate) * float64(time.Second)).Round(time.Second)
				prog += fmt.Sprintf(", %s/s, ETA %s", coordapi.FormatBytes(sl.Rate), eta)
			}
		}
		if mem.Replaces != "" {
			return fmt.Sprintf("%s gone: re-mirroring to %s %s", mem.Replaces, mem.Node, prog)
		}
		return fmt.Sprintf("%s %s %s", mem.Node, verb, prog)
	}
	switch {
	case n.Draining:
		return fmt.Sprintf("%s out of sync on a draining node: to be replaced", mem.Node)
	case !n.Up && mass:
		return fmt.Sprintf("mass-failure mode: waiting for %s to return", mem.Node)
	case !n.Up:
		end := mem.OutOfSyncSince.Add(m.rc().Grace.D())
		return fmt.Sprintf("%s out of sync and down: replaced after %s unless it returns", mem.Node, end.UTC().Format("2006-01-02 15:04:05Z"))
	case mem.FullCopy && mass:
		return fmt.Sprintf("%s needs a whole copy: held back by mass-failure mode", mem.Node)
	case mem.FullCopy && mem.Replaces != "":
		return fmt.Sprintf("%s gone: %s waiting for a re-mirror slot", mem.Replaces, mem.Node)
	case mem.FullCopy:
		return fmt.Sprintf("%s needs a whole copy: waiting for a re-mirror slot", mem.Node)
	}
	return fmt.Sprintf("%s out of sync: waiting for a catch-up slot", mem.Node)
}

// unplacedReason says why v has fewer members than replicas.
func (m *Machine) unplacedReason(v *volume) string {
	short := v.Replicas - len(v.Members)
	gone := ""
	if len(v.Quarantine) > 0 {
		ids := make([]string, len(v.Quarantine))
		for i, id := range v.Quarantine {
			ids[i] = string(id)
		}
		gone = strings.Join(ids, ", ") + " gone: "
	}
	if m.rec.Mode == coordapi.ModeMassFailure {
		return fmt.Sprintf("%smass-failure mode: %d replica(s) placed once it ends", gone, short)
	}
	return fmt.Sprintf("%s%d replica(s) not placed: no live node has %s of room; retrying", gone, short, coordapi.FormatBytes(v.Size))
}

// NextDue is the earliest time a tick would change something: a lease
// expiry, a slot's TTL, a grace ending, the end of mass-failure mode, a
// placement retry. ok is false when nothing is pending.
func (m *Machine) NextDue() (t time.Time, ok bool) {
	take := func(x time.Time) {
		if !ok || x.Before(t) {
			t, ok = x, true
		}
	}
	if x, ok2 := m.NextExpiry(); ok2 {
		take(x)
	}
	r := m.rc()
	mass := m.rec.Mode == coordapi.ModeMassFailure
	if mass {
		take(m.rec.ModeSince.Add(r.MassFailureGrace.D()))
		if keep := r.MassFailureLosses / 2; len(m.rec.Losses) > keep {
			take(m.rec.Losses[len(m.rec.Losses)-keep-1].Add(r.MassFailureWindow.D()))
		}
	}
	for _, v := range m.volumes {
		if !mass && len(v.Members) < v.Replicas {
			take(m.rec.PlaceRetry)
		}
		for _, mem := range v.Members {
			if mem.Slot != nil {
				take(mem.Slot.Renewed.Add(r.SlotTTL.D()))
				continue
			}
			if mem.InSync {
				continue
			}
			n := m.nodes[mem.Node]
			switch {
			case n.Draining:
				take(m.now)
			case !mass && !n.Up:
				take(mem.OutOfSyncSince.Add(r.Grace.D()))
			}
		}
	}
	return t, ok
}
