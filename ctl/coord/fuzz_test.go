package coord_test

import (
	"testing"
	"time"

	"keel/ctl/coord"
	"keel/ctl/coordapi"
)

// seedMachine is a small cluster with a volume, for the fuzz targets to
// apply decoded commands to.
func seedMachine(t testing.TB) *coord.Machine {
	m := coord.New(coordapi.Config{})
	at := base
	for _, c := range []coord.Command{
		{Op: coord.OpRegister, At: at, Register: &coordapi.RegisterRequest{Node: "n1", Zone: "a", PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1 << 40, Free: 1 << 40}},
		{Op: coord.OpRegister, At: at, Register: &coordapi.RegisterRequest{Node: "n2", Zone: "b", PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1 << 40, Free: 1 << 40}},
		{Op: coord.OpCreateVolume, At: at, CreateVolume: &coordapi.CreateVolumeRequest{Name: "v", Size: 1 << 30, Replicas: 2}},
	} {
		if r := m.Apply(c); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	return m
}

func commandSeeds() [][]byte {
	var out [][]byte
	for _, c := range []coord.Command{
		{Op: coord.OpTick, At: base.Add(20 * time.Second)},
		{Op: coord.OpRebase, At: base},
		{Op: coord.OpHeartbeat, At: base, Heartbeat: &coordapi.HeartbeatRequest{Node: "n1", Capacity: 1 << 40, Free: 1 << 30,
			Replicas: []coordapi.ReplicaReport{{Volume: "vol-1", Epoch: 1, DurableSeq: 5, Health: coordapi.HealthImpaired, Reason: "slow"}}}},
		{Op: coord.OpReplicaLoss, At: base, ReplicaLoss: &coord.ReplicaLoss{Volume: "vol-1", ReplicaLossRequest: coordapi.ReplicaLossRequest{Node: "n1", Epoch: 1, Lost: "n2"}}},
		{Op: coord.OpDrain, At: base, Drain: &coord.Drain{Node: "n1"}},
		{Op: coord.OpDeleteVolume, At: base, DeleteVolume: &coord.VolumeRef{Volume: "v"}},
		{Op: coord.OpConfigure, At: base, Configure: &coordapi.Config{Lease: coordapi.DefaultConfig().Lease, ReserveFraction: 0.5}},
		{Op: coord.OpSetMember, At: base, SetMember: &coordapi.CellMember{ID: "c1", RaftAddr: "h:3", APIURL: "http://h:4"}},
		{Op: coord.OpSync, At: base, Sync: &coord.Sync{Volume: "vol-1", SyncRequest: coordapi.SyncRequest{Node: "n1", Epoch: 2, Target: "n2"}}},
		{Op: coord.OpRejoin, At: base, Rejoin: &coord.Rejoin{Volume: "vol-1", RejoinRequest: coordapi.RejoinRequest{Node: "n1", Epoch: 2, Target: "n2", Kind: coordapi.SyncCatchUp, Copied: 1 << 20}}},
		{Op: coord.OpRejoin, At: base, Rejoin: &coord.Rejoin{Volume: "v", RejoinRequest: coordapi.RejoinRequest{Node: "n1", Epoch: 1, Target: "n2", Kind: coordapi.SyncRemirror}}},
		{Op: coord.OpHeartbeat, At: base, Heartbeat: &coordapi.HeartbeatRequest{Node: "n1", Capacity: 1 << 40, Free: 1 << 30,
			Replicas: []coordapi.ReplicaReport{{Volume: "vol-1", Epoch: 2, Syncs: []coordapi.SyncReport{{Target: "n2", Kind: coordapi.SyncCatchUp, Done: 1, Total: 2, Rate: 3}}}}}},
		{Op: coord.OpConfigure, At: base, Configure: &coordapi.Config{Lease: coordapi.DefaultConfig().Lease, ReserveFraction: 0.2, Recovery: coordapi.DefaultRecovery()}},
	} {
		b, err := coord.EncodeCommand(c)
		if err != nil {
			panic(err)
		}
		out = append(out, b)
	}
	out = append(out, []byte(`{"v":1,"op":"sync","sync":{"volume":"vol-1","node":"n1","epoch":2,"target":"n2"}}`),
		[]byte(`{"v":2,"op":"sync","sync":{"volume":"vol-1","node":"n1","epoch":2,"target":"n2"}}`),
		[]byte(`{"v":2,"op":"rejoin","rejoin":{"volume":"vol-1","node":"n1","epoch":2,"target":"n2","kind":"catch_up","copied":-1}}`))
	return append(out, []byte(`{"v":1,"op":"tick"}`), []byte(`{"v":2,"op":"tick"}`), []byte(`{"v":1,"op":"drain"}`), []byte(`null`))
}

// FuzzDecodeCommand: log entries are bytes from disk and from peers. A
// decoded command, applied, never panics or breaks the invariants; a
// refused one changes nothing; decoding what EncodeCommand wrote gives the
// same command.
func FuzzDecodeCommand(f *testing.F) {
	for _, s := range commandSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := coord.DecodeCommand(data)
		if err != nil {
			return
		}
		m := seedMachine(t)
		before, _ := m.MarshalSnapshot()
		r := m.Apply(c)
		if err := m.CheckInvariants(); err != nil {
			t.Fatalf("invariants broken by %s: %v", data, err)
		}
		if r.Err != nil {
			after, _ := m.MarshalSnapshot()
			if string(before) != string(after) {
				t.Fatalf("refused command %s changed the state", data)
			}
		}
		enc, err := coord.EncodeCommand(c)
		if err != nil {
			t.Fatalf("re-encoding a decoded command: %v", err)
		}
		if _, err := coord.DecodeCommand(enc); err != nil {
			t.Fatalf("decoding an encoded command: %v", err)
		}
	})
}

// FuzzRestoreSnapshot: snapshots are bytes from disk and from peers. A
// snapshot that restores is consistent and round-trips byte for byte.
func FuzzRestoreSnapshot(f *testing.F) {
	m := seedMachine(f)
	b, _ := m.MarshalSnapshot()
	f.Add(b)
	f.Add(recoverySnapshot(f))
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":9,"nodes":[]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := coord.RestoreSnapshot(data)
		if err != nil {
			return
		}
		if err := m.CheckInvariants(); err != nil {
			t.Fatalf("restored an inconsistent snapshot: %v", err)
		}
		b1, err := m.MarshalSnapshot()
		if err != nil {
			t.Fatal(err)
		}
		m2, err := coord.RestoreSnapshot(b1)
		if err != nil {
			t.Fatalf("re-restoring: %v", err)
		}
		b2, _ := m2.MarshalSnapshot()
		if string(b1) != string(b2) {
			t.Fatal("snapshot does not round-trip")
		}
		m2.Apply(coord.Command{Op: coord.OpTick, At: m2.Now().Add(time.Minute)})
		if err := m2.CheckInvariants(); err != nil {
			t.Fatalf("tick after restore: %v", err)
		}
	})
}

// recoverySnapshot is seedMachine after a loss and a granted slot.
func recoverySnapshot(t testing.TB) []byte {
	m := seedMachine(t)
	for _, c := range []coord.Command{
		{Op: coord.OpReplicaLoss, At: base, ReplicaLoss: &coord.ReplicaLoss{Volume: "vol-1", ReplicaLossRequest: coordapi.ReplicaLossRequest{Node: "n1", Epoch: 1, Lost: "n2"}}},
		{Op: coord.OpSync, At: base, Sync: &coord.Sync{Volume: "vol-1", SyncRequest: coordapi.SyncRequest{Node: "n1", Epoch: 2, Target: "n2"}}},
	} {
		if r := m.Apply(c); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	b, err := m.MarshalSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	return b
}
