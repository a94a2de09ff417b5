package coord

import (
	"encoding/json"
	"fmt"
	"time"

	"keel/ctl/coordapi"
)

// CommandVersion is the log entry format version this package writes.
// It reads this version and every older one (MinCommandVersion on):
// version 2 added the sync and rejoin operations, which a version 1 entry
// cannot carry.
const CommandVersion = 2

// MinCommandVersion is the oldest log entry format DecodeCommand reads.
const MinCommandVersion = 1

// Op names a command.
type Op string

const (
	OpConfigure    Op = "configure"
	OpRegister     Op = "register"
	OpHeartbeat    Op = "heartbeat"
	OpReplicaLoss  Op = "replica_loss"
	OpCreateVolume Op = "create_volume"
	OpDeleteVolume Op = "delete_volume"
	OpDrain        Op = "drain"
	// OpTick expires every lease whose expiry is at or before At.
	OpTick Op = "tick"
	// OpRebase gives every live node a fresh lease from At: the first
	// command of a new leader, whose clock may be offset from the previous
	// one's (see coordapi.Lease).
	OpRebase       Op = "rebase"
	OpSetMember    Op = "set_member"
	OpRemoveMember Op = "remove_member"
	// OpSync is a primary asking for a catch-up or re-mirror slot
	// (version 2).
	OpSync Op = "sync"
	// OpRejoin is a primary reporting that an out-of-sync member holds
	// every write again (version 2).
	OpRejoin Op = "rejoin"
)

// Command is one state change, one raft log entry. Exactly the payload
// field named by Op is set.
type Command struct {
	Version int       `json:"v"`
	Op      Op        `json:"op"`
	At      time.Time `json:"at"`

	Configure    *coordapi.Config              `json:"configure,omitempty"`
	Register     *coordapi.RegisterRequest     `json:"register,omitempty"`
	Heartbeat    *coordapi.HeartbeatRequest    `json:"heartbeat,omitempty"`
	ReplicaLoss  *ReplicaLoss                  `json:"replica_loss,omitempty"`
	CreateVolume *coordapi.CreateVolumeRequest `json:"create_volume,omitempty"`
	DeleteVolume *VolumeRef                    `json:"delete_volume,omitempty"`
	Drain        *Drain                        `json:"drain,omitempty"`
	SetMember    *coordapi.CellMember          `json:"set_member,omitempty"`
	RemoveMember *coordapi.RemoveRequest       `json:"remove_member,omitempty"`
	Sync         *Sync                         `json:"sync,omitempty"`
	Rejoin       *Rejoin                       `json:"rejoin,omitempty"`
}

// Sync is the sync payload: the API request plus the volume from the path.
type Sync struct {
	Volume string `json:"volume"` // ID or name
	coordapi.SyncRequest
}

// Rejoin is the rejoin payload: the API request plus the volume from the
// path.
type Rejoin struct {
	Volume string `json:"volume"` // ID or name
	coordapi.RejoinRequest
}

// ReplicaLoss is the replica_loss payload: the API request plus the volume
// from the path.
type ReplicaLoss struct {
	Volume string `json:"volume"` // ID or name
	coordapi.ReplicaLossRequest
}

// VolumeRef names a volume by ID or name.
type VolumeRef struct {
	Volume string `json:"volume"`
}

// Drain is the drain payload.
type Drain struct {
	Node coordapi.NodeID `json:"node"`
	Undo bool            `json:"undo,omitempty"`
}

// payloads returns how many payload fields are set and whether the one Op
// names is among them.
func (c *Command) payloads() (n int, ok bool) {
	set := map[Op]bool{
		OpConfigure:    c.Configure != nil,
		OpRegister:     c.Register != nil,
		OpHeartbeat:    c.Heartbeat != nil,
		OpReplicaLoss:  c.ReplicaLoss != nil,
		OpCreateVolume: c.CreateVolume != nil,
		OpDeleteVolume: c.DeleteVolume != nil,
		OpDrain:        c.Drain != nil,
		OpSetMember:    c.SetMember != nil,
		OpRemoveMember: c.RemoveMember != nil,
		OpSync:         c.Sync != nil,
		OpRejoin:       c.Rejoin != nil,
	}
	for _, v := range set {
		if v {
			n++
		}
	}
	switch c.Op {
	case OpTick, OpRebase:
		return n, n == 0
	}
	has, known := set[c.Op]
	return n, known && has && n == 1
}

// EncodeCommand encodes c as a log entry, setting its version.
func EncodeCommand(c Command) ([]byte, error) {
	c.Version = CommandVersion
	c.At = c.At.UTC()
	if _, ok := c.payloads(); !ok {
		return nil, fmt.Errorf("coord: command %q must carry exactly its own payload", c.Op)
	}
	return json.Marshal(&c)
}

// DecodeCommand decodes a log entry. It refuses an unknown version, an
// unknown op, and an op without exactly its payload.
func DecodeCommand(b []byte) (Command, error) {
	var c Command
	if err := coordapi.Decode(b, &c); err != nil {
		return Command{}, fmt.Errorf("coord: decoding command: %w", err)
	}
	if c.Version < MinCommandVersion || c.Version > CommandVersion {
		return Command{}, fmt.Errorf("coord: command version %d: this build reads versions %d to %d", c.Version, MinCommandVersion, CommandVersion)
	}
	if _, ok := c.payloads(); !ok {
		return Command{}, fmt.Errorf("coord: command %q must carry exactly its own payload", c.Op)
	}
	if c.Version < 2 && (c.Op == OpSync || c.Op == OpRejoin) {
		return Command{}, fmt.Errorf("coord: command %q needs version 2, the entry is version %d", c.Op, c.Version)
	}
	return c, nil
}
