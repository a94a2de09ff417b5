package coord_test

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"keel/ctl/coord"
	"keel/ctl/coordapi"
)

// The 2011 storm, driven against the state machine on a simulated clock:
// 12 nodes in 4 zones, 200 small volumes with 2 replicas. At +30s four
// nodes (all of zone z0 and one of z1) stop heartbeating: their leases
// lapse, promotions and the surviving primaries' loss reports take them
// out of the in-sync sets, and volumes with both replicas among them are
// impaired. At +90s two of them come back and are caught up (or, as
// former primaries, re-mirrored); the other two never return, so past
// the grace their replicas are given up and re-mirrored elsewhere.
//
// The simulated primaries behave as the contract says: each out-of-sync
// live peer gets a slot request, a refusal is retried after the grant's
// retry time raised by capped exponential backoff with jitter, a granted
// copy runs for a simulated time while progress goes out in heartbeats,
// then the primary asks for the rejoin. The test checks, after every
// command: the machine's invariants, slot limits (cluster-wide and per
// node, re-mirror and catch-up), no node's allocation plus quarantine past
// its capacity, the reserve used only once re-mirror placements exist;
// and at the end: mass-failure mode entered and left, every volume back
// to full redundancy with no quarantine left, slot requests per copy
// bounded by what the backoff allows.

const (
	stormNodes   = 12
	stormVolumes = 200
	stormVolSize = 1 << 30
	stormCap     = 48 << 30
	stormStep    = 2 * time.Second // = the heartbeat interval
	stormCutAt   = 30 * time.Second
	stormHealAt  = 90 * time.Second
	stormLimit   = 30 * time.Minute // simulated time to full redundancy, at most
	dirtyBytes   = 64 << 20         // what a catch-up copies
	copyRate     = 200 << 20        // bytes/s of every copy
)

type stormKey struct {
	vol    coordapi.VolumeID
	target coordapi.NodeID
}

type stormCopy struct {
	source      coordapi.NodeID
	kind        coordapi.SyncKind
	start, done time.Time
	total       int64
}

type storm struct {
	t      *testing.T
	m      *coord.Machine
	rc     coordapi.RecoveryConfig
	rng    *rand.Rand
	now    time.Time
	nodes  []coordapi.NodeID
	cut    map[coordapi.NodeID]bool
	copies map[stormKey]*stormCopy

	nextTry  map[stormKey]time.Time
	refusals map[stormKey]int
	requests map[stormKey]int
	waited   map[stormKey]time.Time // first request of the current wait

	// figures
	entered, left       bool
	affected            map[coordapi.VolumeID]bool
	peakRemirrors       int
	peakCatchUps        int
	peakImpaired        int
	peakDegraded        int
	copiedCatchUp       int64
	copiedRemirror      int64
	grants, refused     int
	reasons             map[string]int // refusals by cause
	reserveUsedAfterAll bool
}

func TestStorm(t *testing.T) {
	cfg := coordapi.DefaultConfig()
	cfg.Recovery = coordapi.RecoveryConfig{
		Grace:               coordapi.Duration(2 * time.Minute),
		MaxRemirrors:        3,
		MaxRemirrorsPerNode: 1,
		MaxCatchUpsPerNode:  4,
		SlotRetry:           coordapi.Duration(2 * time.Second),
		SlotTTL:             coordapi.Duration(30 * time.Second),
		MassFailureLosses:   8,
		MassFailureWindow:   coordapi.Duration(time.Minute),
		MassFailureGrace:    coordapi.Duration(10 * time.Minute),
	}
	s := &storm{
		t: t, m: coord.New(cfg), rc: cfg.Recovery, rng: rand.New(rand.NewPCG(2011, 4)), now: base,
		cut: map[coordapi.NodeID]bool{}, copies: map[stormKey]*stormCopy{},
		nextTry: map[stormKey]time.Time{}, refusals: map[stormKey]int{}, requests: map[stormKey]int{}, waited: map[stormKey]time.Time{},
		affected: map[coordapi.VolumeID]bool{}, reasons: map[string]int{},
	}
	for i := range stormNodes {
		id := coordapi.NodeID(fmt.Sprintf("n%02d", i))
		s.nodes = append(s.nodes, id)
		s.apply(coord.Command{Op: coord.OpRegister, Register: &coordapi.RegisterRequest{Node: id, Zone: fmt.Sprintf("z%d", i%4), PrimaryAddr: string(id) + ":1", ReplAddr: string(id) + ":2", Capacity: stormCap, Free: stormCap}})
	}
	for i := range stormVolumes {
		s.apply(coord.Command{Op: coord.OpCreateVolume, CreateVolume: &coordapi.CreateVolumeRequest{Name: fmt.Sprintf("v%03d", i), Size: stormVolSize, Replicas: 2}})
	}
	for _, n := range s.m.Nodes() {
		if n.ReserveUsed != 0 || n.Allocated > n.Capacity-n.Reserve {
			t.Fatalf("creation reached into %s's reserve: %+v", n.ID, n)
		}
	}
	never := map[coordapi.NodeID]bool{"n00": true, "n04": true}
	group := []coordapi.NodeID{"n00", "n04", "n08", "n01"}

	start := s.now
	var healed time.Duration
	for {
		el := s.now.Sub(start)
		if el == stormCutAt {
			for _, id := range group {
				s.cut[id] = true
			}
		}
		if el == stormHealAt {
			for _, id := range group {
				if !never[id] {
					delete(s.cut, id)
				}
			}
		}
		s.step()
		if el > stormHealAt && s.fullRedundancy() {
			healed = el
			break
		}
		if el > stormLimit {
			c := s.m.Cluster()
			t.Fatalf("no full redundancy after %s: %+v\n%v", el, c, s.m.Volumes(false)[:3])
		}
		s.now = s.now.Add(stormStep)
	}

	c := s.m.Cluster()
	if !s.entered || !s.left {
		t.Fatalf("mass-failure mode entered=%v left=%v", s.entered, s.left)
	}
	if c.Mode != coordapi.ModeNormal || c.Quarantined != 0 || c.Remirrors != 0 || c.CatchUps != 0 {
		t.Fatalf("after recovery: %+v", c)
	}
	if c.Gone == 0 || c.Placed != c.Gone || s.copiedCatchUp == 0 || s.copiedRemirror == 0 {
		t.Fatalf("the storm did not exercise both catch-up and re-mirror: %+v", c)
	}
	for _, cause := range []string{"cluster-wide", "per node", "mass-failure"} {
		if s.reasons[cause] == 0 {
			t.Errorf("no slot refused for %q: that limit went untested (refusals %v)", cause, s.reasons)
		}
	}
	if s.peakImpaired == 0 {
		t.Error("no volume was ever impaired: the cut group should hold both replicas of some")
	}
	if !s.reserveUsedAfterAll {
		t.Fatal("no node's reserve was used by re-mirrors: the capacity test has no teeth")
	}
	// Requests per copy: backoff doubles from 1s to a 2m cap, never below
	// half of it, so over the whole run a key asks at most
	// 8 (to reach the cap) + run/60s + 1 times.
	bound := 8 + int(healed/time.Minute) + 1
	maxReq, total := 0, 0
	for k, n := range s.requests {
		total += n
		if n > maxReq {
			maxReq = n
		}
		if n > bound {
			t.Errorf("%s -> %s: %d slot requests, bound %d", k.vol, k.target, n, bound)
		}
	}
	t.Logf("storm: %d of %d volumes affected; full redundancy %s after the cut (heal at %s); peak impaired %d (%.1f%%), peak degraded %d; peak concurrent re-mirrors %d (limit %d), catch-ups %d",
		len(s.affected), stormVolumes, healed-stormCutAt, stormHealAt-stormCutAt, s.peakImpaired, 100*float64(s.peakImpaired)/stormVolumes, s.peakDegraded, s.peakRemirrors, s.rc.MaxRemirrors, s.peakCatchUps)
	t.Logf("storm: copied %s by catch-up, %s by re-mirror; %d members given up, %d placed; slot requests %d (%d granted, %d refused %v; at most %d for one copy, bound %d)",
		coordapi.FormatBytes(s.copiedCatchUp), coordapi.FormatBytes(s.copiedRemirror), c.Gone, c.Placed, total, s.grants, s.refused, s.reasons, maxReq, bound)
}

func (s *storm) apply(c coord.Command) coord.Result {
	s.t.Helper()
	c.At = s.now
	b, err := coord.EncodeCommand(c)
	if err != nil {
		s.t.Fatal(err)
	}
	if c, err = coord.DecodeCommand(b); err != nil {
		s.t.Fatal(err)
	}
	r := s.m.Apply(c)
	refused := r.Grant != nil && !r.Grant.Granted
	if c.Op != coord.OpHeartbeat && !refused {
		// Heartbeats and refused slot requests are most of the commands;
		// the invariants are checked after every other command and at
		// the end of every step.
		s.checkInvariants(c.Op)
	}
	for _, e := range r.Events {
		switch {
		case e.Kind == coord.EventModeChanged && s.m.Cluster().Mode == coordapi.ModeMassFailure:
			s.entered = true
		case e.Kind == coord.EventModeChanged:
			s.left = true
		case e.Kind == coord.EventInSyncRemoved, e.Kind == coord.EventPrimaryLost:
			s.affected[e.Volume] = true
		}
	}
	if c.Op == coord.OpCreateVolume || c.Op == coord.OpRegister {
		if r.Err != nil {
			s.t.Fatalf("%s: %v", c.Op, r.Err)
		}
		return r
	}
	if c.Op == coord.OpSync && !refused || c.Op == coord.OpTick {
		// The only commands that grant slots or place members: the
		// limits are checked after each.
		s.checkLimits()
	}
	return r
}

// checkLimits: slots within every limit, space within capacity, the
// reserve only under re-mirror placements.
func (s *storm) checkLimits() {
	s.t.Helper()
	remirrors, catchUps := 0, 0
	perRemirror := map[coordapi.NodeID]int{}
	perCatchUp := map[coordapi.NodeID]int{}
	impaired, degraded := 0, 0
	for _, v := range s.m.Volumes(false) {
		switch v.State {
		case coordapi.StateImpaired:
			impaired++
		case coordapi.StateDegraded:
			degraded++
		}
		for _, mem := range v.Members {
			if mem.Sync == nil {
				continue
			}
			if mem.Sync.Kind == coordapi.SyncRemirror {
				remirrors++
				perRemirror[mem.Node]++
				perRemirror[v.Primary]++
			} else {
				catchUps++
				perCatchUp[mem.Node]++
				perCatchUp[v.Primary]++
			}
		}
	}
	if listed := len(s.m.Volumes(true)); listed != impaired {
		s.t.Fatalf("%s: %d volumes impaired, the impaired listing shows %d", s.now.Sub(base), impaired, listed)
	}
	if remirrors > s.rc.MaxRemirrors {
		s.t.Fatalf("%s: %d re-mirrors, limit %d", s.now.Sub(base), remirrors, s.rc.MaxRemirrors)
	}
	for id, n := range perRemirror {
		if n > s.rc.MaxRemirrorsPerNode {
			s.t.Fatalf("%s: node %s in %d re-mirrors, limit %d", s.now.Sub(base), id, n, s.rc.MaxRemirrorsPerNode)
		}
	}
	for id, n := range perCatchUp {
		if n > s.rc.MaxCatchUpsPerNode {
			s.t.Fatalf("%s: node %s in %d catch-ups, limit %d", s.now.Sub(base), id, n, s.rc.MaxCatchUpsPerNode)
		}
	}
	placed := s.m.Cluster().Placed
	for _, n := range s.m.Nodes() {
		if n.Allocated+n.Quarantined > n.Capacity {
			s.t.Fatalf("%s: node %s allocated %d + quarantined %d past capacity %d", s.now.Sub(base), n.ID, n.Allocated, n.Quarantined, n.Capacity)
		}
		if n.ReserveUsed > 0 {
			if placed == 0 {
				s.t.Fatalf("%s: node %s uses %d of its reserve with no re-mirror placed", s.now.Sub(base), n.ID, n.ReserveUsed)
			}
			s.reserveUsedAfterAll = true
		}
	}
	s.peakRemirrors = max(s.peakRemirrors, remirrors)
	s.peakCatchUps = max(s.peakCatchUps, catchUps)
	s.peakImpaired = max(s.peakImpaired, impaired)
	s.peakDegraded = max(s.peakDegraded, degraded)
}

func (s *storm) checkInvariants(after coord.Op) {
	s.t.Helper()
	if err := s.m.CheckInvariants(); err != nil {
		s.t.Fatalf("%s after %s: %v", s.now.Sub(base), after, err)
	}
}

func (s *storm) fullRedundancy() bool {
	c := s.m.Cluster()
	return c.ByState[coordapi.StateOK] == stormVolumes && c.Quarantined == 0 && c.Mode == coordapi.ModeNormal
}

// slotWait: the grant's retry time (plus up to a quarter of jitter),
// raised by exponential backoff from 1s, doubling per refusal, capped at
// 2m, equal jitter (as coordclient.SlotBackoff).
func (s *storm) slotWait(refusals int, retryAfter time.Duration) time.Duration {
	d := 2 * time.Minute
	if refusals-1 < 8 {
		d = min(d, time.Second<<(refusals-1))
	}
	w := d/2 + time.Duration(s.rng.Float64()*float64(d/2))
	return max(w, retryAfter+time.Duration(s.rng.Float64()*float64(retryAfter/4)))
}

func (s *storm) step() {
	for _, id := range s.nodes {
		if !s.cut[id] {
			s.heartbeat(id)
		}
	}
	s.apply(coord.Command{Op: coord.OpTick})
	for _, id := range s.nodes {
		if !s.cut[id] {
			s.primary(id)
		}
	}
	// Copies whose slot went away (the primary changed, the target's
	// lease lapsed, the TTL) are abandoned by their primary.
	for k, c := range s.copies {
		v, ok := s.m.Volume(string(k.vol))
		held := false
		if ok && v.Primary == c.source {
			for _, mem := range v.Members {
				held = held || mem.Node == k.target && mem.Sync != nil
			}
		}
		if !held || s.cut[c.source] {
			delete(s.copies, k)
		}
	}
	s.checkInvariants("step")
}

// heartbeat from id, with progress of the copies it runs.
func (s *storm) heartbeat(id coordapi.NodeID) {
	as, _ := s.m.Assignments(id)
	req := coordapi.HeartbeatRequest{Node: id, Capacity: stormCap, Free: stormCap}
	for _, a := range as {
		rep := coordapi.ReplicaReport{Volume: a.Volume, Epoch: a.Epoch}
		if a.Role == coordapi.RolePrimary {
			for _, p := range a.Peers {
				if c := s.copies[stormKey{a.Volume, p.Node}]; c != nil && c.source == id {
					done := min(c.total, int64(s.now.Sub(c.start).Seconds()*copyRate))
					rep.Syncs = append(rep.Syncs, coordapi.SyncReport{Target: p.Node, Kind: c.kind, Done: done, Total: c.total, Rate: copyRate})
				}
			}
		}
		req.Replicas = append(req.Replicas, rep)
	}
	if r := s.apply(coord.Command{Op: coord.OpHeartbeat, Heartbeat: &req}); r.Err != nil {
		s.t.Fatalf("heartbeat %s: %v", id, r.Err)
	}
}

// primary runs id's side of recovery for the volumes it leads.
func (s *storm) primary(id coordapi.NodeID) {
	as, _ := s.m.Assignments(id)
	for _, a := range as {
		if a.Role != coordapi.RolePrimary {
			continue
		}
		epoch := a.Epoch
		for _, p := range a.Peers {
			k := stormKey{a.Volume, p.Node}
			switch {
			case p.InSync && s.cut[p.Node]:
				// A write to it fails: report the loss.
				r := s.apply(coord.Command{Op: coord.OpReplicaLoss, ReplicaLoss: &coord.ReplicaLoss{Volume: string(a.Volume), ReplicaLossRequest: coordapi.ReplicaLossRequest{Node: id, Epoch: epoch, Lost: p.Node, Reason: "write timed out"}}})
				if r.Err != nil {
					s.t.Fatalf("loss %s: %v", a.Volume, r.Err)
				}
				epoch = r.Assignment.Epoch
			case p.InSync:
			case s.copies[k] != nil:
				c := s.copies[k]
				if s.now.Before(c.done) || s.cut[p.Node] {
					continue
				}
				r := s.apply(coord.Command{Op: coord.OpRejoin, Rejoin: &coord.Rejoin{Volume: string(a.Volume), RejoinRequest: coordapi.RejoinRequest{Node: id, Epoch: epoch, Target: p.Node, Kind: c.kind, Copied: c.total}}})
				switch {
				case r.Err == nil:
					epoch = r.Assignment.Epoch
					delete(s.copies, k)
					if c.kind == coordapi.SyncRemirror {
						s.copiedRemirror += c.total
					} else {
						s.copiedCatchUp += c.total
					}
				case r.Err.Code == coordapi.CodeConflict:
					delete(s.copies, k) // the slot went away meanwhile
				default:
					s.t.Fatalf("rejoin %s -> %s: %v", a.Volume, p.Node, r.Err)
				}
			case p.Live && !s.cut[p.Node] && !s.now.Before(s.nextTry[k]):
				s.requests[k]++
				r := s.apply(coord.Command{Op: coord.OpSync, Sync: &coord.Sync{Volume: string(a.Volume), SyncRequest: coordapi.SyncRequest{Node: id, Epoch: epoch, Target: p.Node}}})
				if r.Err != nil {
					s.t.Fatalf("sync %s -> %s at epoch %d: %v", a.Volume, p.Node, epoch, r.Err)
				}
				g := r.Grant
				if !g.Granted {
					s.refused++
					for _, cause := range []string{"cluster-wide", "per node", "mass-failure", "no valid lease"} {
						if strings.Contains(g.Reason, cause) {
							s.reasons[cause]++
						}
					}
					s.refusals[k]++
					s.nextTry[k] = s.now.Add(s.slotWait(s.refusals[k], g.RetryAfter.D()))
					continue
				}
				s.grants++
				s.refusals[k] = 0
				total := int64(dirtyBytes)
				if g.Kind == coordapi.SyncRemirror {
					total = a.Size
				}
				dur := time.Duration(float64(total) / copyRate * float64(time.Second))
				s.copies[k] = &stormCopy{source: id, kind: g.Kind, start: s.now, done: s.now.Add(dur), total: total}
			}
		}
	}
}
