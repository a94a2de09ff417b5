package coordapi

import (
	"fmt"
	"time"
)

// Class is an operation class: the unit of admission control.
type Class string

const (
	// ClassHeartbeat: node registration, heartbeats and replica reports;
	// what keeps leases and primaries alive. Never starved by the others.
	ClassHeartbeat Class = "heartbeat"
	// ClassNodeAdmin: draining nodes, cell membership, configuration.
	ClassNodeAdmin Class = "node-admin"
	// ClassVolumeAdmin: creating and deleting volumes.
	ClassVolumeAdmin Class = "volume-admin"
	// ClassRead: listings and status.
	ClassRead Class = "read"
)

// Classes lists every class.
var Classes = []Class{ClassHeartbeat, ClassNodeAdmin, ClassVolumeAdmin, ClassRead}

// RegisterRequest announces a node (or re-announces it after a restart or
// an address change). Registration also renews the node's lease.
type RegisterRequest struct {
	Node        NodeID `json:"node"`
	Zone        string `json:"zone,omitempty"`
	PrimaryAddr string `json:"primary_addr"` // NBD clients and coordinator traffic
	ReplAddr    string `json:"repl_addr"`    // replication network
	Capacity    int64  `json:"capacity"`     // bytes usable for replicas
	Free        int64  `json:"free"`         // bytes free now
}

// Validate checks the fields.
func (r *RegisterRequest) Validate() error {
	if err := r.Node.Validate(); err != nil {
		return err
	}
	if err := validZone(r.Zone); err != nil {
		return err
	}
	if err := validAddr("primary_addr", r.PrimaryAddr); err != nil {
		return err
	}
	if err := validAddr("repl_addr", r.ReplAddr); err != nil {
		return err
	}
	return validSpace(r.Capacity, r.Free)
}

func validSpace(capacity, free int64) error {
	if capacity <= 0 {
		return fmt.Errorf("capacity %d: must be positive", capacity)
	}
	if free < 0 || free > capacity {
		return fmt.Errorf("free %d: must be between 0 and capacity %d", free, capacity)
	}
	return nil
}

// HeartbeatRequest renews a node's lease and reports its space and the
// health of its replicas.
type HeartbeatRequest struct {
	Node     NodeID          `json:"node"`
	Capacity int64           `json:"capacity"`
	Free     int64           `json:"free"`
	Replicas []ReplicaReport `json:"replicas,omitempty"`
}

// MaxReports bounds the replica reports of one heartbeat.
const MaxReports = 100000

// Validate checks the fields.
func (r *HeartbeatRequest) Validate() error {
	if err := r.Node.Validate(); err != nil {
		return err
	}
	if err := validSpace(r.Capacity, r.Free); err != nil {
		return err
	}
	if len(r.Replicas) > MaxReports {
		return fmt.Errorf("%d replica reports: at most %d", len(r.Replicas), MaxReports)
	}
	seen := make(map[VolumeID]struct{}, len(r.Replicas))
	for i := range r.Replicas {
		rep := &r.Replicas[i]
		if _, ok := ParseVolumeID(string(rep.Volume)); !ok {
			return fmt.Errorf("replica report %d: volume %q is not a volume ID (vol-N)", i, rep.Volume)
		}
		if _, dup := seen[rep.Volume]; dup {
			return fmt.Errorf("replica report %d: volume %s reported twice", i, rep.Volume)
		}
		seen[rep.Volume] = struct{}{}
		if rep.Epoch == 0 {
			return fmt.Errorf("replica report %d (%s): epoch is 0", i, rep.Volume)
		}
		switch rep.Health {
		case "", HealthOK, HealthImpaired:
		default:
			return fmt.Errorf("replica report %d (%s): health %q: want ok or impaired", i, rep.Volume, rep.Health)
		}
		if len(rep.Reason) > MaxReasonLen {
			return fmt.Errorf("replica report %d (%s): reason longer than %d bytes", i, rep.Volume, MaxReasonLen)
		}
	}
	return nil
}

// ReplicaReport is a node's summary of one replica it holds.
type ReplicaReport struct {
	Volume VolumeID `json:"volume"`
	// Epoch is the highest epoch of the volume the node has seen; reports
	// older than the volume's current epoch are ignored.
	Epoch      Epoch  `json:"epoch"`
	DurableSeq Seq    `json:"durable_seq"`
	Health     Health `json:"health,omitempty"` // "" means ok
	Reason     string `json:"reason,omitempty"` // why impaired
	// Syncs: the copies this node runs as the volume's primary (catch-up
	// or re-mirror to out-of-sync members), with progress. Reporting one
	// keeps its slot; a slot not reported for SlotTTL is released.
	Syncs []SyncReport `json:"syncs,omitempty"`
}

// HeartbeatResponse answers a registration or heartbeat: the lease
// parameters and everything the node should be doing.
type HeartbeatResponse struct {
	Node  NodeID `json:"node"`
	Lease Lease  `json:"lease"`
	// NextHeartbeat is when the coordinator wants to hear from the node
	// again: Lease.Interval normally, sooner while the node takes part in a
	// change of primary.
	NextHeartbeat Duration `json:"next_heartbeat"`
	// Assignments lists every volume the node holds a replica of; a volume
	// not listed is one the node must close.
	Assignments []Assignment `json:"assignments"`
	// Ignored lists reports that changed nothing, with why.
	Ignored []IgnoredReport `json:"ignored,omitempty"`
}

// IgnoredReport says why a replica report was not taken.
type IgnoredReport struct {
	Volume VolumeID `json:"volume"`
	Reason string   `json:"reason"`
}

// Assignment is one node's part in one volume at one epoch.
type Assignment struct {
	Volume VolumeID `json:"volume"`
	Name   string   `json:"name"`
	Size   int64    `json:"size"`
	Epoch  Epoch    `json:"epoch"`
	Role   Role     `json:"role"`
	// InSync: this node's replica is in the epoch's in-sync set, so it
	// holds every acknowledged write.
	InSync bool `json:"in_sync"`
	// Primary is the epoch's primary, "" while none holds the role (a
	// handover, or no live in-sync replica).
	Primary NodeID `json:"primary,omitempty"`
	// Peers are the other members.
	Peers []Peer `json:"peers,omitempty"`
}

// Peer is another member of a volume.
type Peer struct {
	Node        NodeID `json:"node"`
	Zone        string `json:"zone,omitempty"`
	PrimaryAddr string `json:"primary_addr"`
	ReplAddr    string `json:"repl_addr"`
	Role        Role   `json:"role"`
	InSync      bool   `json:"in_sync"`
	// Live: the peer's node holds a valid lease (a returning member can
	// be caught up).
	Live bool `json:"live"`
	// State is the member's place in the recovery cycle; Sync names the
	// copy its slot allows (set while a slot is held).
	State MemberState `json:"state,omitempty"`
	Sync  SyncKind    `json:"sync,omitempty"`
}

// ReplicaLossRequest is a primary reporting that a secondary no longer
// takes its writes. The coordinator removes it from the in-sync set under a
// new epoch and answers with the primary's new assignment.
type ReplicaLossRequest struct {
	Node   NodeID `json:"node"`  // the reporting primary
	Epoch  Epoch  `json:"epoch"` // the epoch the primary writes at
	Lost   NodeID `json:"lost"`
	Reason string `json:"reason,omitempty"`
}

// Validate checks the fields.
func (r *ReplicaLossRequest) Validate() error {
	if err := r.Node.Validate(); err != nil {
		return err
	}
	if err := r.Lost.Validate(); err != nil {
		return fmt.Errorf("lost: %w", err)
	}
	if r.Lost == r.Node {
		return fmt.Errorf("node %s reports losing itself", r.Node)
	}
	if r.Epoch == 0 {
		return fmt.Errorf("epoch is 0")
	}
	if len(r.Reason) > MaxReasonLen {
		return fmt.Errorf("reason longer than %d bytes", MaxReasonLen)
	}
	return nil
}

// CreateVolumeRequest asks for a new volume.
type CreateVolumeRequest struct {
	Name     string `json:"name"`
	Size     int64  `json:"size"`     // bytes, a multiple of 4096
	Replicas int    `json:"replicas"` // 1..MaxReplicas
	// RequestID, when set, makes the call idempotent: a retry with the same
	// name and RequestID returns the volume the first call created.
	RequestID string `json:"request_id,omitempty"`
}

// Validate checks the fields.
func (r *CreateVolumeRequest) Validate() error {
	if err := ValidateVolumeName(r.Name); err != nil {
		return err
	}
	if r.Size <= 0 || r.Size%SizeAlign != 0 || r.Size > MaxVolumeSize {
		return fmt.Errorf("size %d: must be a positive multiple of %d up to %d", r.Size, SizeAlign, int64(MaxVolumeSize))
	}
	if r.Replicas < 1 || r.Replicas > MaxReplicas {
		return fmt.Errorf("replicas %d: must be 1 to %d", r.Replicas, MaxReplicas)
	}
	if len(r.RequestID) > MaxIDLen {
		return fmt.Errorf("request_id longer than %d bytes", MaxIDLen)
	}
	return nil
}

// Volume is a volume's full status.
type Volume struct {
	ID       VolumeID    `json:"id"`
	Name     string      `json:"name"`
	Size     int64       `json:"size"`
	Replicas int         `json:"replicas"`
	Epoch    Epoch       `json:"epoch"`
	Primary  NodeID      `json:"primary,omitempty"`
	Members  []Member    `json:"members"`
	State    VolumeState `json:"state"`
	Reason   string      `json:"reason"`
	Since    time.Time   `json:"since"` // when State was entered
	Created  time.Time   `json:"created"`
}

// InSync lists the members of the in-sync set.
func (v *Volume) InSync() []NodeID {
	var out []NodeID
	for _, m := range v.Members {
		if m.InSync {
			out = append(out, m.Node)
		}
	}
	return out
}

// Member is one replica of a volume.
type Member struct {
	Node          NodeID `json:"node"`
	Zone          string `json:"zone,omitempty"`
	InSync        bool   `json:"in_sync"`
	Live          bool   `json:"live"` // the node's lease is valid
	ReportedEpoch Epoch  `json:"reported_epoch,omitempty"`
	DurableSeq    Seq    `json:"durable_seq"`
	Health        Health `json:"health,omitempty"`
	HealthReason  string `json:"health_reason,omitempty"`
	// Recovery (see recovery.go): State, since when the member is out of
	// sync, whether it needs a whole copy, and the copy under way.
	State          MemberState   `json:"state"`
	OutOfSyncSince time.Time     `json:"out_of_sync_since,omitzero"`
	FullCopy       bool          `json:"full_copy,omitempty"`
	Sync           *SyncProgress `json:"sync,omitempty"`
}

// VolumeList is GET /v1/volumes.
type VolumeList struct {
	Volumes []Volume `json:"volumes"`
}

// Node is a node's status.
type Node struct {
	ID          NodeID `json:"id"`
	Zone        string `json:"zone,omitempty"`
	PrimaryAddr string `json:"primary_addr"`
	ReplAddr    string `json:"repl_addr"`
	Capacity    int64  `json:"capacity"`
	Free        int64  `json:"free"`      // as last reported
	Allocated   int64  `json:"allocated"` // sum of the sizes of its replicas
	Reserve     int64  `json:"reserve"`   // kept for re-mirroring
	// ReserveUsed is how much of the reserve re-mirrors have taken;
	// above 0 is an alarm (ReserveAlarm).
	ReserveUsed  int64  `json:"reserve_used"`
	ReserveAlarm string `json:"reserve_alarm,omitempty"`
	// Quarantined is space held by replicas of a failed (or declared
	// gone) node that are not yet re-mirrored elsewhere: not offered to
	// placement until then.
	Quarantined int64 `json:"quarantined"`
	// Available is what new volumes may still use:
	// min(capacity-allocated, free) - reserve, never below 0.
	Available   int64     `json:"available"`
	State       NodeState `json:"state"`
	Since       time.Time `json:"since"`
	LeaseExpiry time.Time `json:"lease_expiry"` // coordinator side
	Draining    bool      `json:"draining"`
	Primaries   int       `json:"primaries"`
	Replicas    int       `json:"replicas"`
}

// NodeList is GET /v1/nodes.
type NodeList struct {
	Nodes []Node `json:"nodes"`
}

// DrainRequest marks a node draining (or, with Undo, no longer): it gets no
// new replicas, and the primary role of each volume it leads is handed to
// another in-sync replica.
type DrainRequest struct {
	Undo bool `json:"undo,omitempty"`
}

// JoinRequest adds a member to a coordinator cell.
type JoinRequest struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	APIURL   string `json:"api_url"`
}

// Validate checks the fields.
func (r *JoinRequest) Validate() error {
	if err := ValidateMemberID(r.ID); err != nil {
		return err
	}
	if err := validAddr("raft_addr", r.RaftAddr); err != nil {
		return err
	}
	if r.APIURL == "" || len(r.APIURL) > MaxAddrLen {
		return fmt.Errorf("api_url: give the member's API URL, e.g. http://10.0.0.2:7400")
	}
	return nil
}

// RemoveRequest removes a member from a coordinator cell.
type RemoveRequest struct {
	ID string `json:"id"`
}

// CellMember is one member of a coordinator cell.
type CellMember struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	APIURL   string `json:"api_url,omitempty"`
	Voter    bool   `json:"voter"`
}

// CellStatus describes a coordinator cell as one member sees it.
type CellStatus struct {
	ID        string       `json:"id"`    // the answering member
	State     string       `json:"state"` // Leader, Follower, Candidate, Shutdown
	Leader    string       `json:"leader,omitempty"`
	LeaderURL string       `json:"leader_url,omitempty"`
	Members   []CellMember `json:"members"`
	Applied   uint64       `json:"applied_index"`
}
