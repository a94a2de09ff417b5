package coord

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	"keel/ctl/coordapi"
)

// The read methods return fresh copies the caller owns.

// Now is the time of the last command applied.
func (m *Machine) Now() time.Time { return m.now }

// Config is the cell configuration and whether it was ever set by a
// configure command (otherwise it is what New was given).
func (m *Machine) Config() (coordapi.Config, bool) { return m.cfg, m.configured }

// Volumes lists every volume by ID order; with impairedOnly, only those in
// state impaired.
func (m *Machine) Volumes(impairedOnly bool) []coordapi.Volume {
	out := []coordapi.Volume{}
	for _, id := range m.volumeIDsInOrder() {
		v := m.volumes[id]
		if impairedOnly && v.State != coordapi.StateImpaired {
			continue
		}
		out = append(out, m.volumeView(v))
	}
	return out
}

// volumeIDsInOrder sorts IDs by their number, so vol-10 follows vol-9.
func (m *Machine) volumeIDsInOrder() []coordapi.VolumeID {
	ids := sortedKeys(m.volumes)
	sortVolumeIDs(ids)
	return ids
}

func sortVolumeIDs(ids []coordapi.VolumeID) {
	num := func(id coordapi.VolumeID) uint64 { n, _ := coordapi.ParseVolumeID(string(id)); return n }
	slices.SortFunc(ids, func(a, b coordapi.VolumeID) int { return cmp.Compare(num(a), num(b)) })
}

// Volume finds a volume by ID or name.
func (m *Machine) Volume(ref string) (coordapi.Volume, bool) {
	v := m.lookup(ref)
	if v == nil {
		return coordapi.Volume{}, false
	}
	return m.volumeView(v), true
}

func (m *Machine) volumeView(v *volume) coordapi.Volume {
	out := coordapi.Volume{
		ID:       v.ID,
		Name:     v.Name,
		Size:     v.Size,
		Replicas: v.Replicas,
		Epoch:    v.Epoch,
		Primary:  v.Primary,
		State:    v.State,
		Reason:   v.Reason,
		Since:    v.Since,
		Created:  v.Created,
		Members:  make([]coordapi.Member, 0, len(v.Members)),
	}
	for _, mem := range v.Members {
		n := m.nodes[mem.Node]
		om := coordapi.Member{
			Node:           mem.Node,
			Zone:           n.Zone,
			InSync:         mem.InSync,
			Live:           n.Up,
			ReportedEpoch:  mem.ReportedEpoch,
			DurableSeq:     mem.DurableSeq,
			Health:         mem.Health,
			HealthReason:   mem.HealthReason,
			State:          memberState(mem),
			OutOfSyncSince: mem.OutOfSyncSince,
			FullCopy:       mem.FullCopy,
		}
		if sl := mem.Slot; sl != nil {
			p := &coordapi.SyncProgress{Kind: sl.Kind, Done: sl.Done, Total: sl.Total, Rate: sl.Rate, Started: sl.Granted, Updated: sl.Renewed}
			if sl.Rate > 0 {
				p.ETA = coordapi.Duration(time.Duration(float64(max(sl.Total-sl.Done, 0)) / float64(sl.Rate) * float64(time.Second)))
			}
			om.Sync = p
		}
		out.Members = append(out.Members, om)
	}
	return out
}

// Nodes lists every node by ID.
func (m *Machine) Nodes() []coordapi.Node {
	out := []coordapi.Node{}
	for _, id := range sortedKeys(m.nodes) {
		out = append(out, m.nodeView(m.nodes[id]))
	}
	return out
}

// Node finds one node.
func (m *Machine) Node(id coordapi.NodeID) (coordapi.Node, bool) {
	n := m.nodes[id]
	if n == nil {
		return coordapi.Node{}, false
	}
	return m.nodeView(n), true
}

func (m *Machine) nodeView(n *node) coordapi.Node {
	st := coordapi.NodeExpired
	if n.Up {
		st = coordapi.NodeUp
	}
	reserve := m.reserve(n)
	used := max(0, n.allocated+n.quarantined-(n.Capacity-reserve))
	var alarm string
	switch {
	case used > 0:
		alarm = fmt.Sprintf("re-mirrors use %s of the %s reserve", coordapi.FormatBytes(used), coordapi.FormatBytes(reserve))
	case n.Free < reserve:
		alarm = fmt.Sprintf("free space %s is below the %s reserve", coordapi.FormatBytes(n.Free), coordapi.FormatBytes(reserve))
	}
	return coordapi.Node{
		ReserveUsed:  used,
		ReserveAlarm: alarm,
		Quarantined:  n.quarantined,
		ID:           n.ID,
		Zone:         n.Zone,
		PrimaryAddr:  n.PrimaryAddr,
		ReplAddr:     n.ReplAddr,
		Capacity:     n.Capacity,
		Free:         n.Free,
		Allocated:    n.allocated,
		Reserve:      reserve,
		Available:    max(m.usable(n), 0),
		State:        st,
		Since:        n.Since,
		LeaseExpiry:  n.LeaseExpiry,
		Draining:     n.Draining,
		Primaries:    n.primaries,
		Replicas:     len(n.vols),
	}
}

// Assignments is what a heartbeat from id would be answered with now,
// without renewing anything.
func (m *Machine) Assignments(id coordapi.NodeID) ([]coordapi.Assignment, bool) {
	n := m.nodes[id]
	if n == nil {
		return nil, false
	}
	return m.heartbeatResponse(n).Assignments, true
}

// NextExpiry is the earliest lease expiry among live nodes: a tick at or
// after it will expire something. ok is false when no node is live.
func (m *Machine) NextExpiry() (t time.Time, ok bool) {
	for _, n := range m.nodes {
		if n.Up && (!ok || n.LeaseExpiry.Before(t)) {
			t, ok = n.LeaseExpiry, true
		}
	}
	return t, ok
}

// Cell lists the cell members recorded by set_member, by ID.
func (m *Machine) Cell() []coordapi.CellMember {
	out := []coordapi.CellMember{}
	for _, id := range sortedKeys(m.cell) {
		out = append(out, m.cell[id])
	}
	return out
}

// CellMember finds one recorded cell member.
func (m *Machine) CellMember(id string) (coordapi.CellMember, bool) {
	c, ok := m.cell[id]
	return c, ok
}

// CheckInvariants verifies the machine's internal consistency: derived
// indexes match, every volume's primary is a live in-sync member, every
// in-sync set is non-empty, a volume with a releasing node has no primary,
// and no node's allocation count is off. Tests and the storm simulator call
// it after every command.
func (m *Machine) CheckInvariants() error {
	alloc := map[coordapi.NodeID]int64{}
	prim := map[coordapi.NodeID]int{}
	vols := map[coordapi.NodeID]int{}
	quar := map[coordapi.NodeID]int64{}
	remir := map[coordapi.NodeID]int{}
	catch := map[coordapi.NodeID]int{}
	remirrors := 0
	for _, id := range sortedKeys(m.volumes) {
		v := m.volumes[id]
		if v.ID != id {
			return fmt.Errorf("volume %s indexed as %s", v.ID, id)
		}
		if m.byName[v.Name] != id {
			return fmt.Errorf("volume %s: name %q not indexed", id, v.Name)
		}
		if v.Epoch == 0 {
			return fmt.Errorf("volume %s: epoch 0", id)
		}
		inSync := 0
		seen := map[coordapi.NodeID]bool{}
		for _, mem := range v.Members {
			if seen[mem.Node] {
				return fmt.Errorf("volume %s: node %s is a member twice", id, mem.Node)
			}
			seen[mem.Node] = true
			n := m.nodes[mem.Node]
			if n == nil {
				return fmt.Errorf("volume %s: member %s is not a node", id, mem.Node)
			}
			if _, ok := n.vols[id]; !ok {
				return fmt.Errorf("volume %s: node %s does not index it", id, mem.Node)
			}
			alloc[mem.Node] += v.Size
			vols[mem.Node]++
			if mem.InSync {
				inSync++
				if mem.Slot != nil || !mem.OutOfSyncSince.IsZero() || mem.FullCopy {
					return fmt.Errorf("volume %s: in-sync member %s carries recovery state", id, mem.Node)
				}
			}
			if sl := mem.Slot; sl != nil {
				if sl.Source != v.Primary || v.Primary == "" {
					return fmt.Errorf("volume %s: slot of %s from %s, primary is %q", id, mem.Node, sl.Source, v.Primary)
				}
				if !n.Up {
					return fmt.Errorf("volume %s: slot held by %s without a lease", id, mem.Node)
				}
				if sl.Kind == coordapi.SyncRemirror {
					remirrors++
					remir[mem.Node]++
					remir[sl.Source]++
				} else {
					catch[mem.Node]++
					catch[sl.Source]++
				}
			}
			if slices.Contains(v.Quarantine, mem.Node) {
				return fmt.Errorf("volume %s: node %s is a member and quarantined", id, mem.Node)
			}
		}
		if inSync == 0 {
			return fmt.Errorf("volume %s: empty in-sync set", id)
		}
		if v.Primary != "" {
			pm := v.member(v.Primary)
			if pm == nil || !pm.InSync {
				return fmt.Errorf("volume %s: primary %s is not an in-sync member", id, v.Primary)
			}
			if !m.up(v.Primary) {
				return fmt.Errorf("volume %s: primary %s has no valid lease", id, v.Primary)
			}
			if v.Releasing != "" {
				return fmt.Errorf("volume %s: primary %s while %s is releasing", id, v.Primary, v.Releasing)
			}
			prim[v.Primary]++
		}
		if !slices.IsSorted(v.Quarantine) || len(slices.Compact(slices.Clone(v.Quarantine))) != len(v.Quarantine) {
			return fmt.Errorf("volume %s: quarantine list %v not sorted and unique", id, v.Quarantine)
		}
		for _, q := range v.Quarantine {
			if m.nodes[q] == nil {
				return fmt.Errorf("volume %s: quarantined node %s is not a node", id, q)
			}
			quar[q] += v.Size
		}
		if st, _ := m.computeState(v); st != v.State {
			return fmt.Errorf("volume %s: state %s, computed %s", id, v.State, st)
		}
	}
	for _, id := range sortedKeys(m.nodes) {
		n := m.nodes[id]
		if n.allocated != alloc[id] || n.primaries != prim[id] || len(n.vols) != vols[id] {
			return fmt.Errorf("node %s: derived allocated=%d primaries=%d vols=%d, recomputed %d %d %d",
				id, n.allocated, n.primaries, len(n.vols), alloc[id], prim[id], vols[id])
		}
		if n.quarantined != quar[id] || n.remirrors != remir[id] || n.catchUps != catch[id] {
			return fmt.Errorf("node %s: derived quarantined=%d remirrors=%d catch-ups=%d, recomputed %d %d %d",
				id, n.quarantined, n.remirrors, n.catchUps, quar[id], remir[id], catch[id])
		}
	}
	if m.remirrors != remirrors {
		return fmt.Errorf("derived re-mirrors %d, recomputed %d", m.remirrors, remirrors)
	}
	if len(m.byName) != len(m.volumes) {
		return fmt.Errorf("%d names indexed for %d volumes", len(m.byName), len(m.volumes))
	}
	return nil
}

// Cluster is the storm control's view (GET /v1/cluster).
func (m *Machine) Cluster() coordapi.Cluster {
	r := m.rc()
	out := coordapi.Cluster{
		Mode:           m.rec.Mode,
		ModeSince:      m.rec.ModeSince,
		ModeReason:     m.rec.ModeReason,
		Remirrors:      m.remirrors,
		Volumes:        len(m.volumes),
		ByState:        map[coordapi.VolumeState]int{coordapi.StateOK: 0, coordapi.StateDegraded: 0, coordapi.StateImpaired: 0, coordapi.StateFenced: 0},
		Recovery:       r,
		SlotsGranted:   m.rec.SlotsGranted,
		SlotsRefused:   m.rec.SlotsRefused,
		Rejoins:        m.rec.Rejoins,
		Placed:         m.rec.Placed,
		Gone:           m.rec.Gone,
		CopiedCatchUp:  m.rec.CopiedCatchUp,
		CopiedRemirror: m.rec.CopiedRemirror,
		MembersByState: map[coordapi.MemberState]int{},
	}
	if out.Mode == "" {
		out.Mode = coordapi.ModeNormal
	}
	w := r.MassFailureWindow.D()
	for _, t := range m.rec.Losses {
		if t.After(m.now.Add(-w)) {
			out.RecentLoss++
		}
	}
	if out.Mode == coordapi.ModeMassFailure {
		out.Alarms = append(out.Alarms, fmt.Sprintf("mass-failure mode since %s: %s", out.ModeSince.UTC().Format(time.RFC3339), out.ModeReason))
	}
	for _, id := range m.volumeIDsInOrder() {
		v := m.volumes[id]
		out.ByState[v.State]++
		for _, mem := range v.Members {
			out.MembersByState[memberState(mem)]++
			if mem.Slot != nil && mem.Slot.Kind == coordapi.SyncCatchUp {
				out.CatchUps++
			}
		}
		if len(v.Members) < v.Replicas && out.Mode == coordapi.ModeNormal {
			out.Alarms = append(out.Alarms, fmt.Sprintf("%s (%s): %s", v.ID, v.Name, m.unplacedReason(v)))
		}
	}
	for _, id := range sortedKeys(m.nodes) {
		n := m.nodeView(m.nodes[id])
		out.Quarantined += n.Quarantined
		if n.ReserveAlarm != "" {
			out.Alarms = append(out.Alarms, fmt.Sprintf("node %s: %s", n.ID, n.ReserveAlarm))
		}
	}
	return out
}
