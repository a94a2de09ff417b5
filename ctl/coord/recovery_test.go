package coord_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"keel/ctl/coord"
	"keel/ctl/coordapi"
)

func mustApply(t *testing.T, m *coord.Machine, c coord.Command) coord.Result {
	t.Helper()
	r := m.Apply(c)
	if r.Err != nil {
		t.Fatalf("%s: %v", c.Op, r.Err)
	}
	if err := m.CheckInvariants(); err != nil {
		t.Fatalf("after %s: %v", c.Op, err)
	}
	return r
}

func snap(t *testing.T, m *coord.Machine) string {
	t.Helper()
	b, err := m.MarshalSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func syncCmd(at time.Time, vol string, node coordapi.NodeID, epoch coordapi.Epoch, target coordapi.NodeID) coord.Command {
	return coord.Command{Op: coord.OpSync, At: at, Sync: &coord.Sync{Volume: vol, SyncRequest: coordapi.SyncRequest{Node: node, Epoch: epoch, Target: target}}}
}

func rejoinCmd(at time.Time, vol string, node coordapi.NodeID, epoch coordapi.Epoch, target coordapi.NodeID, kind coordapi.SyncKind) coord.Command {
	return coord.Command{Op: coord.OpRejoin, At: at, Rejoin: &coord.Rejoin{Volume: vol, RejoinRequest: coordapi.RejoinRequest{Node: node, Epoch: epoch, Target: target, Kind: kind, Copied: 1 << 20}}}
}

// Stale and duplicate sync and rejoin requests change nothing: the
// snapshot bytes before and after are equal.
func TestStaleAndDuplicateChangeNothing(t *testing.T) {
	m := seedMachine(t) // vol-1 on n1 (primary) and n2, epoch 1
	mustApply(t, m, coord.Command{Op: coord.OpReplicaLoss, At: base, ReplicaLoss: &coord.ReplicaLoss{Volume: "vol-1", ReplicaLossRequest: coordapi.ReplicaLossRequest{Node: "n1", Epoch: 1, Lost: "n2"}}})
	if r := mustApply(t, m, syncCmd(base, "vol-1", "n1", 2, "n2")); !r.Grant.Granted || r.Grant.Kind != coordapi.SyncCatchUp {
		t.Fatalf("grant: %+v", r.Grant)
	}
	unchanged := func(what string, c coord.Command, wantErr coordapi.Code) coord.Result {
		t.Helper()
		before := snap(t, m)
		r := m.Apply(c)
		if wantErr != "" && (r.Err == nil || r.Err.Code != wantErr) {
			t.Fatalf("%s: error %v, want %s", what, r.Err, wantErr)
		}
		if wantErr == "" && r.Err != nil {
			t.Fatalf("%s: %v", what, r.Err)
		}
		if after := snap(t, m); after != before {
			t.Fatalf("%s changed the state:\n%s\n%s", what, before, after)
		}
		if len(r.Events) != 0 {
			t.Fatalf("%s emitted %v", what, r.Events)
		}
		return r
	}
	unchanged("stale sync", syncCmd(base, "vol-1", "n1", 1, "n2"), coordapi.CodeStaleEpoch)
	unchanged("sync from a secondary", syncCmd(base, "vol-1", "n2", 2, "n1"), coordapi.CodeNotPrimary)
	unchanged("sync to an in-sync member", syncCmd(base, "vol-1", "n1", 2, "n1"), coordapi.CodeBadRequest)
	if r := unchanged("duplicate sync", syncCmd(base, "vol-1", "n1", 2, "n2"), ""); !r.Grant.Granted {
		t.Fatalf("duplicate sync not granted: %+v", r.Grant)
	}
	unchanged("stale rejoin", rejoinCmd(base, "vol-1", "n1", 1, "n2", coordapi.SyncCatchUp), coordapi.CodeStaleEpoch)
	unchanged("rejoin of the wrong kind", rejoinCmd(base, "vol-1", "n1", 2, "n2", coordapi.SyncRemirror), coordapi.CodeConflict)
	unchanged("rejoin of a stranger", rejoinCmd(base, "vol-1", "n1", 2, "n9", coordapi.SyncCatchUp), coordapi.CodeNotFound)
	unchanged("bad rejoin", rejoinCmd(base, "vol-1", "n1", 0, "n2", coordapi.SyncCatchUp), coordapi.CodeBadRequest)

	r := mustApply(t, m, rejoinCmd(base, "vol-1", "n1", 2, "n2", coordapi.SyncCatchUp))
	if r.Assignment.Epoch != 3 || !r.Assignment.Peers[0].InSync {
		t.Fatalf("rejoin: %+v", r.Assignment)
	}
	d := unchanged("duplicate rejoin", rejoinCmd(base, "vol-1", "n1", 2, "n2", coordapi.SyncCatchUp), "")
	if d.Assignment.Epoch != 3 {
		t.Fatalf("duplicate rejoin answered epoch %d, want the current 3", d.Assignment.Epoch)
	}
	unchanged("duplicate rejoin at the new epoch", rejoinCmd(base, "vol-1", "n1", 3, "n2", coordapi.SyncCatchUp), "")
	unchanged("sync after rejoin", syncCmd(base, "vol-1", "n1", 3, "n2"), coordapi.CodeConflict)
	c := m.Cluster()
	if c.Rejoins != 1 || c.SlotsGranted != 1 || c.CopiedCatchUp != 1<<20 {
		t.Fatalf("counters: %+v", c)
	}
}

// Every recovery knob out of range is refused, the message naming it.
func TestRecoveryConfigRefused(t *testing.T) {
	cases := []struct {
		field string
		mut   func(*coordapi.RecoveryConfig)
	}{
		{"grace", func(r *coordapi.RecoveryConfig) { r.Grace = coordapi.Duration(time.Millisecond) }},
		{"grace", func(r *coordapi.RecoveryConfig) { r.Grace = coordapi.Duration(8 * 24 * time.Hour) }},
		{"max_remirrors", func(r *coordapi.RecoveryConfig) { r.MaxRemirrors = 0 }},
		{"max_remirrors_per_node", func(r *coordapi.RecoveryConfig) { r.MaxRemirrorsPerNode = -1 }},
		{"max_remirrors_per_node", func(r *coordapi.RecoveryConfig) { r.MaxRemirrors, r.MaxRemirrorsPerNode = 2, 3 }},
		{"max_catch_ups_per_node", func(r *coordapi.RecoveryConfig) { r.MaxCatchUpsPerNode = 1000 }},
		{"slot_retry", func(r *coordapi.RecoveryConfig) { r.SlotRetry = 1 }},
		{"slot_ttl", func(r *coordapi.RecoveryConfig) { r.SlotTTL = coordapi.Duration(2 * time.Hour) }},
		{"mass_failure_losses", func(r *coordapi.RecoveryConfig) { r.MassFailureLosses = 0 }},
		{"mass_failure_window", func(r *coordapi.RecoveryConfig) { r.MassFailureWindow = 0 }},
		{"mass_failure_grace", func(r *coordapi.RecoveryConfig) { r.MassFailureGrace = coordapi.Duration(time.Millisecond) }},
	}
	m := seedMachine(t)
	for _, tc := range cases {
		cfg := coordapi.DefaultConfig()
		tc.mut(&cfg.Recovery)
		before := snap(t, m)
		r := m.Apply(coord.Command{Op: coord.OpConfigure, At: base, Configure: &cfg})
		if r.Err == nil || r.Err.Code != coordapi.CodeBadRequest || !strings.Contains(r.Err.Message, tc.field+" ") || !strings.Contains(r.Err.Message, "must") {
			t.Errorf("%s: %v", tc.field, r.Err)
		}
		if snap(t, m) != before {
			t.Errorf("%s: a refused configuration changed the state", tc.field)
		}
	}
	// A configuration from before recovery existed (zero) means the
	// defaults.
	cfg := coordapi.DefaultConfig()
	cfg.Recovery = coordapi.RecoveryConfig{}
	mustApply(t, m, coord.Command{Op: coord.OpConfigure, At: base, Configure: &cfg})
	if got := m.Cluster().Recovery; got != coordapi.DefaultRecovery() {
		t.Fatalf("zero recovery config in force as %+v", got)
	}
}

// Version 1 log entries and snapshots, written before recovery existed,
// still decode; a version 1 entry cannot carry the new operations.
func TestVersion1StillRead(t *testing.T) {
	c, err := coord.DecodeCommand([]byte(`{"v":1,"op":"tick","at":"2026-01-01T00:00:00Z"}`))
	if err != nil || c.Op != coord.OpTick {
		t.Fatalf("v1 tick: %v", err)
	}
	if _, err := coord.DecodeCommand([]byte(`{"v":1,"op":"sync","sync":{"volume":"vol-1","node":"n1","epoch":1,"target":"n2"}}`)); err == nil {
		t.Fatal("a v1 sync entry decoded")
	}
	if _, err := coord.DecodeCommand([]byte(`{"v":3,"op":"tick"}`)); err == nil {
		t.Fatal("a v3 entry decoded")
	}

	// A v1 snapshot: no recovery section, members without recovery
	// fields; one member out of sync.
	m := seedMachine(t)
	mustApply(t, m, coord.Command{Op: coord.OpReplicaLoss, At: base.Add(time.Second), ReplicaLoss: &coord.ReplicaLoss{Volume: "vol-1", ReplicaLossRequest: coordapi.ReplicaLossRequest{Node: "n1", Epoch: 1, Lost: "n2"}}})
	var s map[string]any
	if err := json.Unmarshal([]byte(snap(t, m)), &s); err != nil {
		t.Fatal(err)
	}
	s["version"] = 1
	delete(s, "recovery")
	for _, v := range s["volumes"].([]any) {
		for _, mem := range v.(map[string]any)["members"].([]any) {
			delete(mem.(map[string]any), "out_of_sync_since")
		}
	}
	b, _ := json.Marshal(s)
	m1, err := coord.RestoreSnapshot(b)
	if err != nil {
		t.Fatalf("v1 snapshot: %v", err)
	}
	v, _ := m1.Volume("vol-1")
	for _, mem := range v.Members {
		if mem.Node == "n2" && (mem.State != coordapi.MemberOutOfSync || !mem.OutOfSyncSince.Equal(m1.Now())) {
			t.Fatalf("v1 out-of-sync member restored as %+v", mem)
		}
	}
	if m1.Cluster().Mode != coordapi.ModeNormal {
		t.Fatal("v1 snapshot not in normal mode")
	}
	// And it carries on: a slot, a rejoin.
	mustApply(t, m1, syncCmd(m1.Now(), "vol-1", "n1", 2, "n2"))
	mustApply(t, m1, rejoinCmd(m1.Now(), "vol-1", "n1", 2, "n2", coordapi.SyncCatchUp))
	if v, _ := m1.Volume("vol-1"); v.State != coordapi.StateOK {
		t.Fatalf("after rejoin: %s %s", v.State, v.Reason)
	}
}

// NextDue names the slot TTL and the end of the grace, so that the leader
// ticks when recovery needs it and not otherwise.
func TestNextDue(t *testing.T) {
	cfg := coordapi.DefaultConfig()
	cfg.Lease.Duration = coordapi.Duration(time.Hour)
	cfg.Lease.Interval = coordapi.Duration(10 * time.Minute)
	m := coord.New(cfg)
	for _, id := range []coordapi.NodeID{"n1", "n2", "n3"} {
		mustApply(t, m, coord.Command{Op: coord.OpRegister, At: base, Register: &coordapi.RegisterRequest{Node: id, Zone: string(id), PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1 << 40, Free: 1 << 40}})
	}
	mustApply(t, m, coord.Command{Op: coord.OpCreateVolume, At: base, CreateVolume: &coordapi.CreateVolumeRequest{Name: "v", Size: 1 << 30, Replicas: 2}})
	v, _ := m.Volume("v")
	p, s := v.Primary, v.Members[0].Node
	if s == p {
		s = v.Members[1].Node
	}
	due, _ := m.NextDue()
	if lease, _ := m.NextExpiry(); !due.Equal(lease) {
		t.Fatalf("due %v, want the lease expiry %v", due, lease)
	}
	mustApply(t, m, coord.Command{Op: coord.OpReplicaLoss, At: base, ReplicaLoss: &coord.ReplicaLoss{Volume: "v", ReplicaLossRequest: coordapi.ReplicaLossRequest{Node: p, Epoch: 1, Lost: s}}})
	mustApply(t, m, syncCmd(base.Add(time.Second), "v", p, 2, s))
	rc := coordapi.DefaultRecovery()
	if due, _ := m.NextDue(); !due.Equal(base.Add(time.Second + rc.SlotTTL.D())) {
		t.Fatalf("due %v, want the slot TTL", due.Sub(base))
	}
	r := mustApply(t, m, coord.Command{Op: coord.OpTick, At: base.Add(time.Second + rc.SlotTTL.D())})
	if len(r.Events) != 1 || r.Events[0].Kind != coord.EventSlotReleased {
		t.Fatalf("tick at the TTL: %v", r.Events)
	}
	// The secondary's node goes down (the others heartbeat): the grace
	// (5m from the loss at base) is long over, so the tick that expires
	// its lease also replaces it.
	for _, id := range []coordapi.NodeID{"n1", "n2", "n3"} {
		if id != s {
			mustApply(t, m, coord.Command{Op: coord.OpHeartbeat, At: base.Add(time.Hour - time.Minute), Heartbeat: &coordapi.HeartbeatRequest{Node: id, Capacity: 1 << 40, Free: 1 << 40}})
		}
	}
	due, _ = m.NextDue()
	if lease, _ := m.NextExpiry(); !due.Equal(lease) {
		t.Fatalf("due %v, want %s's lease expiry %v", due, s, lease)
	}
	r = mustApply(t, m, coord.Command{Op: coord.OpTick, At: due})
	var gone, placed bool
	for _, e := range r.Events {
		gone = gone || e.Kind == coord.EventMemberGone && e.Node == s
		placed = placed || e.Kind == coord.EventPlaced
	}
	if !gone || !placed {
		t.Fatalf("tick after the grace: %v", r.Events)
	}
	if due, _ := m.NextDue(); !due.After(m.Now()) {
		t.Fatalf("still due at %v after the tick", due)
	}
}
