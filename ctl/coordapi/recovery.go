package coordapi

import (
	"fmt"
	"time"
)

// Recovery: how a volume that lost a replica gets back to full redundancy
// without a re-mirroring storm (the April 2011 lesson).
//
//	in sync ──loss reported──▶ out of sync ──node back, slot granted──▶ catching up ──rejoin──▶ in sync
//	                              │                                     (dirty regions only)
//	                              │ grace over and no sync running,
//	                              │ not in mass-failure mode
//	                              ▼
//	                       gone: a new member is placed (reserve usable), the old node's
//	                       space stays quarantined; slot granted ──▶ re-mirroring (whole
//	                       volume) ──rejoin──▶ in sync; then the quarantine is released
//
// The primary drives every copy: it asks for a slot (SyncRequest), the
// coordinator grants one under its limits or answers wait with a retry
// time; the primary streams the copy, reports progress in its heartbeats
// (ReplicaReport.Syncs) and, when the member holds every write, asks for
// it to rejoin the in-sync set (RejoinRequest) under a new epoch.

// SyncKind says how much a member must copy.
type SyncKind string

const (
	// SyncCatchUp copies the regions the primary's write-intent bitmap
	// marks: the member holds the volume as of when it fell out of sync.
	SyncCatchUp SyncKind = "catch_up"
	// SyncRemirror copies the whole volume: a new member, or one whose
	// data no bitmap covers (a former primary that may hold writes nobody
	// acknowledged).
	SyncRemirror SyncKind = "remirror"
)

// MemberState is where one member of a volume is in the recovery cycle.
type MemberState string

const (
	MemberInSync     MemberState = "in_sync"
	MemberOutOfSync  MemberState = "out_of_sync"    // waiting: node down, or no slot yet
	MemberCatchingUp MemberState = "catching_up"    // a catch-up slot is held
	MemberRemirror   MemberState = "remirroring"    // a re-mirror slot is held
	MemberNeedsCopy  MemberState = "needs_remirror" // placed or flagged for a full copy, no slot yet
)

// RecoveryConfig is the storm control's knobs (part of Config).
type RecoveryConfig struct {
	// Grace is how long an out-of-sync member may stay away before it is
	// declared gone and a new member is placed (default 5 min).
	Grace Duration `json:"grace"`
	// MaxRemirrors bounds concurrent re-mirrors cluster-wide (default 4);
	// MaxRemirrorsPerNode bounds those one node sends or receives
	// (default 1).
	MaxRemirrors        int `json:"max_remirrors"`
	MaxRemirrorsPerNode int `json:"max_remirrors_per_node"`
	// MaxCatchUpsPerNode bounds concurrent catch-ups one node sends or
	// receives (default 4). Catch-ups copy little; they have no
	// cluster-wide limit.
	MaxCatchUpsPerNode int `json:"max_catch_ups_per_node"`
	// SlotRetry is the base retry time a refused slot request is told to
	// wait (default 2 s); the client adds backoff and jitter.
	SlotRetry Duration `json:"slot_retry"`
	// SlotTTL: a granted slot whose primary has not reported progress
	// for this long is released (default 30 s).
	SlotTTL Duration `json:"slot_ttl"`
	// MassFailureLosses replicas lost within MassFailureWindow put the
	// cell in mass-failure mode (defaults 8 in 60 s); it stays there for
	// at least MassFailureGrace (default 10 min) unless losses in the
	// window fall to half the threshold, and it places no new replicas
	// meanwhile: catch-up from the previous members does the work.
	MassFailureLosses int      `json:"mass_failure_losses"`
	MassFailureWindow Duration `json:"mass_failure_window"`
	MassFailureGrace  Duration `json:"mass_failure_grace"`
}

// DefaultRecovery is RecoveryConfig's defaults.
func DefaultRecovery() RecoveryConfig {
	return RecoveryConfig{
		Grace:               Duration(5 * time.Minute),
		MaxRemirrors:        4,
		MaxRemirrorsPerNode: 1,
		MaxCatchUpsPerNode:  4,
		SlotRetry:           Duration(2 * time.Second),
		SlotTTL:             Duration(30 * time.Second),
		MassFailureLosses:   8,
		MassFailureWindow:   Duration(time.Minute),
		MassFailureGrace:    Duration(10 * time.Minute),
	}
}

// FieldError is a configuration value out of range: Field is its JSON
// name, Value the value given, Range what it must be. Callers that set the
// field from a flag map Field to the flag's name.
type FieldError struct {
	Field string
	Value string
	Range string
}

func (e *FieldError) Error() string { return e.Field + " " + e.Value + ": " + e.Range }

// Validate checks every field; the error (a *FieldError) names the field,
// the value and the range.
func (r RecoveryConfig) Validate() error {
	dur := func(name string, d Duration, lo, hi time.Duration) error {
		if time.Duration(d) < lo || time.Duration(d) > hi {
			return &FieldError{Field: name, Value: time.Duration(d).String(), Range: fmt.Sprintf("must be between %s and %s", lo, hi)}
		}
		return nil
	}
	num := func(name string, n, lo, hi int) error {
		if n < lo || n > hi {
			return &FieldError{Field: name, Value: fmt.Sprint(n), Range: fmt.Sprintf("must be between %d and %d", lo, hi)}
		}
		return nil
	}
	for _, err := range []error{
		dur("grace", r.Grace, time.Second, 7*24*time.Hour),
		num("max_remirrors", r.MaxRemirrors, 1, 10000),
		num("max_remirrors_per_node", r.MaxRemirrorsPerNode, 1, 64),
		num("max_catch_ups_per_node", r.MaxCatchUpsPerNode, 1, 256),
		dur("slot_retry", r.SlotRetry, 10*time.Millisecond, 10*time.Minute),
		dur("slot_ttl", r.SlotTTL, time.Second, time.Hour),
		num("mass_failure_losses", r.MassFailureLosses, 1, 1000000),
		dur("mass_failure_window", r.MassFailureWindow, time.Second, 24*time.Hour),
		dur("mass_failure_grace", r.MassFailureGrace, time.Second, 7*24*time.Hour),
	} {
		if err != nil {
			return err
		}
	}
	if r.MaxRemirrorsPerNode > r.MaxRemirrors {
		return &FieldError{Field: "max_remirrors_per_node", Value: fmt.Sprint(r.MaxRemirrorsPerNode), Range: fmt.Sprintf("must not exceed max_remirrors %d", r.MaxRemirrors)}
	}
	return nil
}

// SyncRequest is a primary asking for a slot to copy a volume to one of
// its out-of-sync members (POST /v1/volumes/{volume}/sync).
type SyncRequest struct {
	Node   NodeID `json:"node"`   // the primary
	Epoch  Epoch  `json:"epoch"`  // the epoch it writes at
	Target NodeID `json:"target"` // the out-of-sync member
}

// Validate checks the fields.
func (r *SyncRequest) Validate() error {
	if err := r.Node.Validate(); err != nil {
		return err
	}
	if err := r.Target.Validate(); err != nil {
		return fmt.Errorf("target: %w", err)
	}
	if r.Target == r.Node {
		return fmt.Errorf("node %s asks to copy the volume to itself", r.Node)
	}
	if r.Epoch == 0 {
		return fmt.Errorf("epoch is 0")
	}
	return nil
}

// SyncGrant answers a SyncRequest. Granted false means wait RetryAfter
// (plus the caller's backoff and jitter) and ask again; Reason says why
// (limit reached, mass-failure mode, target node not up).
type SyncGrant struct {
	Granted    bool     `json:"granted"`
	Kind       SyncKind `json:"kind"`
	RetryAfter Duration `json:"retry_after,omitempty"`
	Reason     string   `json:"reason,omitempty"`
}

// SyncReport is a primary's progress on one copy, sent in its heartbeat's
// ReplicaReport; it also keeps the slot's lease (RecoveryConfig.SlotTTL).
type SyncReport struct {
	Target NodeID   `json:"target"`
	Kind   SyncKind `json:"kind"`
	Done   int64    `json:"done"`  // bytes copied
	Total  int64    `json:"total"` // bytes to copy
	Rate   int64    `json:"rate"`  // bytes/s, recent
}

// SyncProgress is a member's copy as the coordinator shows it.
type SyncProgress struct {
	Kind    SyncKind  `json:"kind"`
	Done    int64     `json:"done"`
	Total   int64     `json:"total"`
	Rate    int64     `json:"rate"`
	ETA     Duration  `json:"eta,omitempty"`
	Started time.Time `json:"started"`
	Updated time.Time `json:"updated"`
}

// RejoinRequest is a primary reporting that an out-of-sync member now
// holds every write (its copy finished while live writes flowed to it):
// the coordinator puts it back in the in-sync set under a new epoch and
// answers with the primary's new assignment
// (POST /v1/volumes/{volume}/rejoin). A stale one (another epoch) is
// refused with stale_epoch; a duplicate (the member is in sync already)
// changes nothing and returns the current assignment.
type RejoinRequest struct {
	Node   NodeID   `json:"node"`
	Epoch  Epoch    `json:"epoch"`
	Target NodeID   `json:"target"`
	Kind   SyncKind `json:"kind"`
	Copied int64    `json:"copied"` // bytes the copy sent
}

// Validate checks the fields.
func (r *RejoinRequest) Validate() error {
	s := SyncRequest{Node: r.Node, Epoch: r.Epoch, Target: r.Target}
	if err := s.Validate(); err != nil {
		return err
	}
	switch r.Kind {
	case SyncCatchUp, SyncRemirror:
	default:
		return fmt.Errorf("kind %q: want %s or %s", r.Kind, SyncCatchUp, SyncRemirror)
	}
	if r.Copied < 0 {
		return fmt.Errorf("copied %d: must not be negative", r.Copied)
	}
	return nil
}

// ClusterMode is the cell's storm-control mode.
type ClusterMode string

const (
	ModeNormal      ClusterMode = "normal"
	ModeMassFailure ClusterMode = "mass_failure"
)

// Cluster is GET /v1/cluster: the storm control's view.
type Cluster struct {
	Mode        ClusterMode         `json:"mode"`
	ModeSince   time.Time           `json:"mode_since"`
	ModeReason  string              `json:"mode_reason,omitempty"`
	RecentLoss  int                 `json:"recent_losses"` // in-sync removals within MassFailureWindow
	Remirrors   int                 `json:"remirrors"`     // slots held now
	CatchUps    int                 `json:"catch_ups"`
	Volumes     int                 `json:"volumes"`
	ByState     map[VolumeState]int `json:"by_state"`
	Quarantined int64               `json:"quarantined"` // bytes held on failed capacity
	// Alarms: nodes whose allocation reaches into their reserve, and the
	// like; empty when all is well.
	Alarms   []string       `json:"alarms,omitempty"`
	Recovery RecoveryConfig `json:"recovery"`
	// Counters since the cell started (not reset by mode changes).
	SlotsGranted int64 `json:"slots_granted"`
	SlotsRefused int64 `json:"slots_refused"`
	Rejoins      int64 `json:"rejoins"`
	Placed       int64 `json:"placed"` // replacement members placed
	Gone         int64 `json:"gone"`   // members given up
	// Bytes copied by finished catch-ups and re-mirrors (as their rejoins
	// reported).
	CopiedCatchUp  int64 `json:"copied_catch_up"`
	CopiedRemirror int64 `json:"copied_remirror"`
	// MembersByState counts every volume's members by recovery state.
	MembersByState map[MemberState]int `json:"members_by_state,omitempty"`
}
