package coordapi

import (
	"fmt"
	"strconv"
	"strings"
)

// NodeID names a storage node, chosen by its operator (`keel node --id`).
type NodeID string

// VolumeID is the coordinator's name for a volume, "vol-N", assigned at
// creation and never reused: a volume deleted and created again under the
// same name gets a new ID, so a node cannot mistake old replica files for
// the new volume.
type VolumeID string

// Epoch numbers one configuration (primary and in-sync set) of a volume.
// Epochs of a volume only grow; 0 means "none".
type Epoch uint64

// Seq is a volume's write sequence number as a replica reports it: the
// highest sequence it holds durably.
type Seq uint64

// Role is what a node does for one volume.
type Role string

const (
	// RolePrimary serves the volume's clients and replicates every write to
	// the in-sync secondaries.
	RolePrimary Role = "primary"
	// RoleSecondary applies the primary's frames; it is in the in-sync set
	// or catching up.
	RoleSecondary Role = "secondary"
)

// VolumeState is the EBS-like status of a volume.
type VolumeState string

const (
	// StateOK: a primary with a valid lease and every replica in sync.
	StateOK VolumeState = "ok"
	// StateDegraded: I/O works but fewer replicas than asked for are live
	// and in sync.
	StateDegraded VolumeState = "degraded"
	// StateImpaired: I/O cannot make progress: no primary holds a valid
	// lease and none can be promoted yet, or the primary reports that
	// requests are not completing.
	StateImpaired VolumeState = "impaired"
	// StateFenced: the coordinator has withdrawn write authority on
	// purpose, e.g. while the primary role is handed to another node.
	StateFenced VolumeState = "fenced"
)

// NodeState is a node's liveness as the coordinator sees it.
type NodeState string

const (
	// NodeUp: the node's lease is valid.
	NodeUp NodeState = "up"
	// NodeExpired: the node's lease lapsed; it holds no authority until it
	// heartbeats again.
	NodeExpired NodeState = "expired"
)

// Health is a replica's own view of its I/O, reported in heartbeats.
type Health string

const (
	HealthOK       Health = "ok"
	HealthImpaired Health = "impaired"
)

// Limits on identifiers and sizes the API accepts.
const (
	MaxIDLen     = 64
	MaxZoneLen   = 64
	MaxAddrLen   = 256
	MaxReasonLen = 512
	MaxReplicas  = 5
	// SizeAlign: a volume's size must be a multiple of it.
	SizeAlign = 4096
	// MaxVolumeSize is the largest volume the API accepts (64 TiB).
	MaxVolumeSize = 64 << 40
)

// validName checks node IDs, volume names and cell member IDs: 1 to MaxIDLen
// of [A-Za-z0-9._-], starting with a letter or digit.
func validName(kind, s string) error {
	if s == "" {
		return fmt.Errorf("%s is empty", kind)
	}
	if len(s) > MaxIDLen {
		return fmt.Errorf("%s %.16q... is longer than %d bytes", kind, s, MaxIDLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || i > 0 && (c == '.' || c == '_' || c == '-')
		if !ok {
			return fmt.Errorf("%s %q: use letters, digits, '.', '_' and '-', starting with a letter or digit", kind, s)
		}
	}
	return nil
}

// Validate reports whether id is a well-formed node ID.
func (id NodeID) Validate() error { return validName("node id", string(id)) }

// ValidateVolumeName reports whether name is a well-formed volume name.
// Names that look like volume IDs ("vol-N") are refused so that a path
// segment naming a volume is never ambiguous.
func ValidateVolumeName(name string) error {
	if err := validName("volume name", name); err != nil {
		return err
	}
	if _, ok := ParseVolumeID(name); ok {
		return fmt.Errorf("volume name %q looks like a volume ID: choose a name not of the form vol-N", name)
	}
	return nil
}

// ValidateMemberID reports whether id is a well-formed cell member ID.
func ValidateMemberID(id string) error { return validName("member id", id) }

// MakeVolumeID is the ID of the n-th volume created in a cell.
func MakeVolumeID(n uint64) VolumeID { return VolumeID("vol-" + strconv.FormatUint(n, 10)) }

// ParseVolumeID returns n for "vol-N" (N > 0, no leading zero).
func ParseVolumeID(s string) (uint64, bool) {
	rest, ok := strings.CutPrefix(s, "vol-")
	if !ok || rest == "" || rest[0] == '0' {
		return 0, false
	}
	n, err := strconv.ParseUint(rest, 10, 64)
	return n, err == nil
}

// validAddr checks a host:port address.
func validAddr(kind, a string) error {
	if a == "" {
		return fmt.Errorf("%s is empty: give host:port", kind)
	}
	if len(a) > MaxAddrLen {
		return fmt.Errorf("%s is longer than %d bytes", kind, MaxAddrLen)
	}
	i := strings.LastIndexByte(a, ':')
	if i < 0 {
		return fmt.Errorf("%s %q has no port: give host:port", kind, a)
	}
	p, err := strconv.ParseUint(a[i+1:], 10, 16)
	if err != nil || p == 0 {
		return fmt.Errorf("%s %q: port must be 1-65535", kind, a)
	}
	return nil
}

func validZone(z string) error {
	if z == "" {
		return nil
	}
	return validName("zone", z)
}
