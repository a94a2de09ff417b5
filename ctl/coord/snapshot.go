package coord

import (
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"keel/ctl/coordapi"
)

// SnapshotVersion is the snapshot format version this package writes (see
// the package doc). RestoreSnapshot also reads version 1, which predates
// recovery: its out-of-sync members are taken as out of sync since the
// snapshot's time, needing a catch-up.
const SnapshotVersion = 2

type snapshot struct {
	Version    int                   `json:"version"`
	Now        time.Time             `json:"now"`
	Config     coordapi.Config       `json:"config"`
	Configured bool                  `json:"configured"`
	NextVolume uint64                `json:"next_volume"`
	Cell       []coordapi.CellMember `json:"cell"`
	Nodes      []*node               `json:"nodes"`
	Volumes    []*volume             `json:"volumes"`
	Recovery   *recovery             `json:"recovery,omitempty"` // version 2
}

// MarshalSnapshot encodes the whole state. Equal states encode to equal
// bytes.
func (m *Machine) MarshalSnapshot() ([]byte, error) {
	s := snapshot{
		Version:    SnapshotVersion,
		Now:        m.now,
		Config:     m.cfg,
		Configured: m.configured,
		NextVolume: m.nextVolume,
		Cell:       m.Cell(),
		Nodes:      []*node{},
		Volumes:    []*volume{},
		Recovery:   &m.rec,
	}
	for _, id := range sortedKeys(m.nodes) {
		s.Nodes = append(s.Nodes, m.nodes[id])
	}
	for _, id := range m.volumeIDsInOrder() {
		s.Volumes = append(s.Volumes, m.volumes[id])
	}
	return json.Marshal(&s)
}

// RestoreSnapshot decodes a snapshot written by MarshalSnapshot into a new
// machine, checking it as it goes: a snapshot that would violate the
// machine's invariants is refused, not half-loaded.
func RestoreSnapshot(b []byte) (*Machine, error) {
	var s snapshot
	if err := coordapi.Decode(b, &s); err != nil {
		return nil, fmt.Errorf("coord: decoding snapshot: %w", err)
	}
	if s.Version < 1 || s.Version > SnapshotVersion {
		return nil, fmt.Errorf("coord: snapshot version %d: this build reads versions 1 to %d", s.Version, SnapshotVersion)
	}
	if err := s.Config.Validate(); err != nil {
		return nil, fmt.Errorf("coord: snapshot config: %w", err)
	}
	m := New(s.Config)
	m.now = s.Now
	m.configured = s.Configured
	m.nextVolume = s.NextVolume
	if s.Recovery != nil {
		m.rec = *s.Recovery
	}
	switch m.rec.Mode {
	case "":
		m.rec.Mode = coordapi.ModeNormal
	case coordapi.ModeNormal, coordapi.ModeMassFailure:
	default:
		return nil, fmt.Errorf("coord: snapshot: unknown cluster mode %q", m.rec.Mode)
	}
	if !slices.IsSortedFunc(m.rec.Losses, func(a, b time.Time) int { return a.Compare(b) }) {
		return nil, fmt.Errorf("coord: snapshot: loss times not in order")
	}
	for _, c := range s.Cell {
		m.cell[c.ID] = c
	}
	for _, n := range s.Nodes {
		if n == nil || n.ID.Validate() != nil || m.nodes[n.ID] != nil {
			return nil, fmt.Errorf("coord: snapshot: bad or duplicate node")
		}
		n.vols = map[coordapi.VolumeID]struct{}{}
		n.allocated, n.primaries, n.quarantined, n.remirrors, n.catchUps = 0, 0, 0, 0, 0
		m.nodes[n.ID] = n
	}
	for _, v := range s.Volumes {
		if v == nil || m.volumes[v.ID] != nil || m.byName[v.Name] != "" {
			return nil, fmt.Errorf("coord: snapshot: bad or duplicate volume")
		}
		num, ok := coordapi.ParseVolumeID(string(v.ID))
		if !ok || num >= m.nextVolume {
			return nil, fmt.Errorf("coord: snapshot: volume ID %q not below next_volume %d", v.ID, m.nextVolume)
		}
		for _, mem := range v.Members {
			if mem == nil {
				return nil, fmt.Errorf("coord: snapshot: volume %s: null member", v.ID)
			}
			n := m.nodes[mem.Node]
			if n == nil {
				return nil, fmt.Errorf("coord: snapshot: volume %s: member %s is not a node", v.ID, mem.Node)
			}
			if _, dup := n.vols[v.ID]; dup {
				return nil, fmt.Errorf("coord: snapshot: volume %s: member %s twice", v.ID, mem.Node)
			}
			n.vols[v.ID] = struct{}{}
			n.allocated += v.Size
			if !mem.InSync && mem.OutOfSyncSince.IsZero() {
				mem.OutOfSyncSince = s.Now // version 1: from now
			}
		}
		for _, mem := range v.Members {
			sl := mem.Slot
			if sl == nil {
				continue
			}
			if sl.Kind != coordapi.SyncCatchUp && sl.Kind != coordapi.SyncRemirror || m.nodes[sl.Source] == nil {
				return nil, fmt.Errorf("coord: snapshot: volume %s: bad slot on %s", v.ID, mem.Node)
			}
			m.countSlot(mem, 1)
		}
		for _, q := range v.Quarantine {
			n := m.nodes[q]
			if n == nil {
				return nil, fmt.Errorf("coord: snapshot: volume %s: quarantined node %s is not a node", v.ID, q)
			}
			n.quarantined += v.Size
		}
		if v.Primary != "" {
			n := m.nodes[v.Primary]
			if n == nil {
				return nil, fmt.Errorf("coord: snapshot: volume %s: primary %s is not a node", v.ID, v.Primary)
			}
			n.primaries++
		}
		m.volumes[v.ID] = v
		m.byName[v.Name] = v.ID
	}
	if err := m.CheckInvariants(); err != nil {
		return nil, fmt.Errorf("coord: snapshot inconsistent: %w", err)
	}
	return m, nil
}
