package coord_test

import (
	"container/heap"
	"flag"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"keel/ctl/coord"
	"keel/ctl/coordapi"
)

// The property test simulates a cluster around the state machine: nodes
// with drifting clocks send heartbeats and replica-loss reports over a
// network that delays, loses and partitions; nodes crash and restart; the
// coordinator's leader changes (new clock offset and rate, then a rebase);
// operators create, delete and drain. After every event it checks, in
// real (simulated) time:
//
//   - at most one node believes it is a volume's primary while its own lease
//     check passes (the safety that invariant 2 of DESIGN.md needs);
//   - a volume's epoch never decreases, in the coordinator or in any node's
//     view, and no (volume, epoch) ever has two different primaries;
//   - the machine's internal invariants hold.

var (
	propSeed  = flag.Uint64("prop.seed", 0, "property test: run only this seed")
	propSteps = flag.Int("prop.steps", 3000, "property test: events per seed")
	propSeeds = flag.Int("prop.seeds", 4, "property test: number of seeds")
)

func TestPropertyOnePrimary(t *testing.T) {
	seeds := []uint64{}
	if *propSeed != 0 {
		seeds = append(seeds, *propSeed)
	} else {
		base := uint64(time.Now().UnixNano())
		for i := 0; i < *propSeeds; i++ {
			seeds = append(seeds, base+uint64(i))
		}
	}
	for _, seed := range seeds {
		t.Logf("seed %d (rerun with -prop.seed=%d)", seed, seed)
		s := newSim(seed, nil)
		if err := s.run(*propSteps); err != nil {
			t.Fatalf("seed %d: %v\nrerun: go test ./ctl/coord -run TestPropertyOnePrimary -prop.seed=%d -v", seed, err, seed)
		}
		t.Logf("seed %d: %s", seed, s.stats())
	}
}

// TestPropertyDetectsUnsafeLease shows the property test can fail: nodes
// that trust their lease for longer than the timing argument allows are
// caught holding the primary role beside the promoted one.
func TestPropertyDetectsUnsafeLease(t *testing.T) {
	unsafe := func(l coordapi.Lease, sent time.Time) time.Time {
		return sent.Add(time.Duration(float64(l.Duration) * 1.5))
	}
	for i := uint64(1); i <= 20; i++ {
		s := newSim(i, unsafe)
		if err := s.run(*propSteps); err != nil {
			t.Logf("seed %d: caught, as it should be: %v", i, err)
			return
		}
	}
	t.Fatal("20 seeds with an unsafe node-side lease found no double primary: the property test has lost its teeth")
}

const simNodes = 5

type simEvent struct {
	at  time.Duration // real time
	seq int           // tie-break: FIFO
	fn  func() error
}

type eventQueue []*simEvent

func (q eventQueue) Len() int { return len(q) }
func (q eventQueue) Less(i, j int) bool {
	if q[i].at != q[j].at {
		return q[i].at < q[j].at
	}
	return q[i].seq < q[j].seq
}
func (q eventQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *eventQueue) Push(x any)   { *q = append(*q, x.(*simEvent)) }
func (q *eventQueue) Pop() any {
	old := *q
	e := old[len(old)-1]
	*q = old[:len(old)-1]
	return e
}

// clock is a linear clock: off + rate·real.
type clock struct {
	off  time.Duration
	rate float64
}

func (c clock) at(rt time.Duration) time.Time {
	return base.Add(c.off + time.Duration(float64(rt)*c.rate))
}

type simNode struct {
	id         coordapi.NodeID
	clk        clock
	alive      bool
	partition  time.Duration // messages to and from it are lost until then
	registered bool          // it believes the coordinator knows it
	gen        int           // incarnation: bumped by a crash, so old timers die
	inflight   int           // id of the heartbeat in flight, 0 for none
	reqID      int
	deadline   time.Time // local clock; zero: no lease
	view       map[coordapi.VolumeID]coordapi.Assignment
	maxEpoch   map[coordapi.VolumeID]coordapi.Epoch // across restarts
	seq        map[coordapi.VolumeID]coordapi.Seq
}

type sim struct {
	rng       *rand.Rand
	m         *coord.Machine
	cfg       coordapi.Config
	leader    clock
	now       time.Duration
	q         eventQueue
	qseq      int
	nodes     []*simNode
	nodeLease func(coordapi.Lease, time.Time) time.Time

	volEpoch   map[coordapi.VolumeID]coordapi.Epoch
	epochPrim  map[string]coordapi.NodeID
	nextName   int
	promotions int
	leaderChgs int
	syncs      int // slots granted
	rejoins    int
	gone       int // members given up
	expiries   int
	maxPrims   int
}

func newSim(seed uint64, nodeLease func(coordapi.Lease, time.Time) time.Time) *sim {
	cfg := coordapi.DefaultConfig()
	s := &sim{
		rng:       rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		m:         coord.New(cfg),
		cfg:       cfg,
		volEpoch:  map[coordapi.VolumeID]coordapi.Epoch{},
		epochPrim: map[string]coordapi.NodeID{},
		nodeLease: nodeLease,
	}
	if s.nodeLease == nil {
		s.nodeLease = func(l coordapi.Lease, sent time.Time) time.Time { return l.NodeDeadline(sent) }
	}
	s.leader = s.randClock()
	for i := 0; i < simNodes; i++ {
		n := &simNode{
			id:       coordapi.NodeID(fmt.Sprintf("n%d", i+1)),
			clk:      s.randClock(),
			alive:    true,
			view:     map[coordapi.VolumeID]coordapi.Assignment{},
			maxEpoch: map[coordapi.VolumeID]coordapi.Epoch{},
			seq:      map[coordapi.VolumeID]coordapi.Seq{},
		}
		s.nodes = append(s.nodes, n)
		s.sendLater(n, time.Duration(s.rng.Int64N(int64(time.Second))))
	}
	s.at(250*time.Millisecond, s.tick)
	return s
}

// randClock: any offset, a rate at or inside the drift bound (often at
// its edges, where the margins are thinnest).
func (s *sim) randClock() clock {
	rho := s.cfg.Lease.MaxDrift
	rate := 1 - rho + 2*rho*s.rng.Float64()
	switch s.rng.IntN(4) {
	case 0:
		rate = 1 - rho
	case 1:
		rate = 1 + rho
	}
	return clock{off: time.Duration(s.rng.Int64N(int64(time.Hour))) - 30*time.Minute, rate: rate}
}

func (s *sim) at(d time.Duration, fn func() error) {
	s.qseq++
	heap.Push(&s.q, &simEvent{at: s.now + d, seq: s.qseq, fn: fn})
}

func (s *sim) apply(c coord.Command) (coord.Result, error) {
	c.At = s.leader.at(s.now)
	b, err := coord.EncodeCommand(c)
	if err != nil {
		return coord.Result{}, err
	}
	c, err = coord.DecodeCommand(b)
	if err != nil {
		return coord.Result{}, err
	}
	r := s.m.Apply(c)
	for _, e := range r.Events {
		switch e.Kind {
		case coord.EventPromoted:
			s.promotions++
		case coord.EventLeaseExpired:
			s.expiries++
		case coord.EventMemberGone:
			s.gone++
		}
	}
	if err := s.m.CheckInvariants(); err != nil {
		return r, fmt.Errorf("after %s: %w", c.Op, err)
	}
	return r, nil
}

func (s *sim) delay() time.Duration {
	if s.rng.IntN(20) == 0 {
		return time.Duration(s.rng.Int64N(int64(3 * time.Second))) // tail
	}
	return time.Duration(s.rng.Int64N(int64(300 * time.Millisecond)))
}

// lost decides whether a message to or from n is lost now.
func (s *sim) lost(n *simNode) bool {
	return s.now < n.partition || s.rng.IntN(20) == 0
}

// send: node n sends its next heartbeat (or registration).
func (s *sim) send(n *simNode) error {
	if !n.alive {
		return nil
	}
	if n.inflight != 0 {
		return nil // one at a time; the timeout below frees the slot
	}
	n.reqID++
	id := n.reqID
	n.inflight = id
	sent := n.clk.at(s.now)
	reg := !n.registered
	var reports []coordapi.ReplicaReport
	for vid, a := range n.view {
		n.seq[vid] += coordapi.Seq(s.rng.IntN(5))
		reports = append(reports, coordapi.ReplicaReport{Volume: vid, Epoch: a.Epoch, DurableSeq: n.seq[vid]})
	}
	// Timeout: the node gives up after 2 s of its own clock and moves on.
	s.at(time.Duration(float64(2*time.Second)/n.clk.rate), func() error {
		if n.inflight == id {
			n.inflight = 0
			s.sendLater(n, s.backoff())
		}
		return nil
	})
	if s.lost(n) {
		return nil
	}
	s.at(s.delay(), func() error {
		var r coord.Result
		var err error
		if reg {
			r, err = s.apply(coord.Command{Op: coord.OpRegister, Register: &coordapi.RegisterRequest{
				Node: n.id, Zone: fmt.Sprintf("z%d", s.nodeIndex(n)%3), PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1 << 40, Free: 1 << 40,
			}})
		} else {
			r, err = s.apply(coord.Command{Op: coord.OpHeartbeat, Heartbeat: &coordapi.HeartbeatRequest{
				Node: n.id, Capacity: 1 << 40, Free: 1 << 40, Replicas: reports,
			}})
		}
		if err != nil {
			return err
		}
		if s.lost(n) {
			return nil
		}
		s.at(s.delay(), func() error { return s.receive(n, id, sent, r) })
		return nil
	})
	return nil
}

// sendLater schedules n's next heartbeat after d of real time, for its
// current incarnation only.
func (s *sim) sendLater(n *simNode, d time.Duration) {
	gen := n.gen
	s.at(d, func() error {
		if n.gen != gen {
			return nil
		}
		return s.send(n)
	})
}

func (s *sim) backoff() time.Duration {
	return 100*time.Millisecond + time.Duration(s.rng.Int64N(int64(400*time.Millisecond)))
}

func (s *sim) nodeIndex(n *simNode) int {
	for i, x := range s.nodes {
		if x == n {
			return i
		}
	}
	return -1
}

// receive: the answer to heartbeat id reaches n.
func (s *sim) receive(n *simNode, id int, sent time.Time, r coord.Result) error {
	if !n.alive || n.inflight != id {
		return nil // it gave up on this request, or restarted
	}
	n.inflight = 0
	if r.Err != nil {
		if r.Err.Code == coordapi.CodeNotFound {
			n.registered = false
		}
		s.sendLater(n, s.backoff())
		return nil
	}
	n.registered = true
	h := r.Heartbeat
	next := map[coordapi.VolumeID]coordapi.Assignment{}
	for _, a := range h.Assignments {
		// A replica-loss answer may have brought a newer epoch than this
		// heartbeat answer, committed earlier, carries: keep the newer.
		if cur, ok := n.view[a.Volume]; ok && cur.Epoch > a.Epoch {
			a = cur
		}
		if a.Epoch < n.maxEpoch[a.Volume] {
			return fmt.Errorf("%s: %s went back from epoch %d to %d", n.id, a.Volume, n.maxEpoch[a.Volume], a.Epoch)
		}
		n.maxEpoch[a.Volume] = a.Epoch
		next[a.Volume] = a
	}
	n.view = next
	n.deadline = s.nodeLease(h.Lease, sent)
	d := h.NextHeartbeat.D()
	s.sendLater(n, time.Duration(float64(d)/n.clk.rate))
	return nil
}

func (s *sim) tick() error {
	if _, err := s.apply(coord.Command{Op: coord.OpTick}); err != nil {
		return err
	}
	s.at(250*time.Millisecond, s.tick)
	return nil
}

// chaos: one random disturbance or operator action.
func (s *sim) chaos() error {
	n := s.nodes[s.rng.IntN(len(s.nodes))]
	switch k := s.rng.IntN(100); {
	case k < 10: // partition
		n.partition = s.now + time.Duration(s.rng.Int64N(int64(30*time.Second)))
	case k < 15: // crash, restart later
		if n.alive {
			n.alive = false
			n.gen++
			n.view = map[coordapi.VolumeID]coordapi.Assignment{}
			n.deadline = time.Time{}
			n.inflight = 0
			s.at(time.Duration(s.rng.Int64N(int64(40*time.Second))), func() error {
				n.alive, n.registered = true, false
				return s.send(n)
			})
		}
	case k < 17: // leader change: a new clock, then the rebase
		s.leader = s.randClock()
		s.leaderChgs++
		if _, err := s.apply(coord.Command{Op: coord.OpRebase}); err != nil {
			return err
		}
	case k < 45: // create
		s.nextName++
		_, err := s.apply(coord.Command{Op: coord.OpCreateVolume, CreateVolume: &coordapi.CreateVolumeRequest{
			Name: fmt.Sprintf("v%d", s.nextName), Size: 1 << 30, Replicas: 1 + s.rng.IntN(3),
		}})
		return err
	case k < 50: // delete
		vols := s.m.Volumes(false)
		if len(vols) > 0 {
			_, err := s.apply(coord.Command{Op: coord.OpDeleteVolume, DeleteVolume: &coord.VolumeRef{Volume: string(vols[s.rng.IntN(len(vols))].ID)}})
			return err
		}
	case k < 58: // drain or undo
		_, err := s.apply(coord.Command{Op: coord.OpDrain, Drain: &coord.Drain{Node: n.id, Undo: s.rng.IntN(2) == 0}})
		return err
	case k < 68: // a primary (as it believes) copies to an out-of-sync peer: a slot, then the rejoin, either possibly stale
		if !n.alive {
			return nil
		}
		for _, a := range n.view {
			if a.Role != coordapi.RolePrimary {
				continue
			}
			for _, p := range a.Peers {
				if p.InSync {
					continue
				}
				vol, target, epoch := a.Volume, p.Node, a.Epoch
				if s.rng.IntN(4) == 0 && epoch > 1 {
					epoch--
				}
				if s.lost(n) {
					return nil
				}
				s.at(s.delay(), func() error {
					r, err := s.apply(coord.Command{Op: coord.OpSync, Sync: &coord.Sync{Volume: string(vol), SyncRequest: coordapi.SyncRequest{Node: n.id, Epoch: epoch, Target: target}}})
					if err != nil || r.Err != nil || !r.Grant.Granted || s.lost(n) {
						return err
					}
					s.syncs++
					kind := r.Grant.Kind
					copyTime := time.Duration(s.rng.Int64N(int64(20 * time.Second)))
					return s.rejoinLater(n, vol, target, epoch, kind, copyTime)
				})
				return nil
			}
		}
	default: // a primary (as it believes) reports a lost secondary, possibly stale
		if !n.alive {
			return nil
		}
		for _, a := range n.view {
			if a.Role != coordapi.RolePrimary || len(a.Peers) == 0 {
				continue
			}
			lostPeer := a.Peers[s.rng.IntN(len(a.Peers))].Node
			epoch := a.Epoch
			if s.rng.IntN(4) == 0 && epoch > 1 {
				epoch--
			}
			req := &coord.ReplicaLoss{Volume: string(a.Volume), ReplicaLossRequest: coordapi.ReplicaLossRequest{Node: n.id, Epoch: epoch, Lost: lostPeer}}
			if s.lost(n) {
				return nil
			}
			s.at(s.delay(), func() error {
				r, err := s.apply(coord.Command{Op: coord.OpReplicaLoss, ReplicaLoss: req})
				if err != nil || r.Err != nil || s.lost(n) {
					return err
				}
				s.deliver(n, *r.Assignment)
				return nil
			})
			return nil
		}
	}
	return nil
}

// rejoinLater: n asks for target's rejoin after the copy's time, and
// merges the answer into its view like a loss report's.
func (s *sim) rejoinLater(n *simNode, vol coordapi.VolumeID, target coordapi.NodeID, epoch coordapi.Epoch, kind coordapi.SyncKind, d time.Duration) error {
	gen := n.gen
	s.at(d, func() error {
		if n.gen != gen || !n.alive || s.lost(n) {
			return nil
		}
		r, err := s.apply(coord.Command{Op: coord.OpRejoin, Rejoin: &coord.Rejoin{Volume: string(vol), RejoinRequest: coordapi.RejoinRequest{Node: n.id, Epoch: epoch, Target: target, Kind: kind}}})
		if err != nil || r.Err != nil || s.lost(n) {
			return err
		}
		s.rejoins++
		s.deliver(n, *r.Assignment)
		return nil
	})
	return nil
}

// deliver merges as, the coordinator's answer to n, into n's view after a
// network delay, unless n died meanwhile or knows a newer epoch already.
func (s *sim) deliver(n *simNode, as coordapi.Assignment) {
	s.at(s.delay(), func() error {
		if cur, ok := n.view[as.Volume]; n.alive && ok && as.Epoch > cur.Epoch {
			n.view[as.Volume] = as
			n.maxEpoch[as.Volume] = max(n.maxEpoch[as.Volume], as.Epoch)
		}
		return nil
	})
}

func (s *sim) run(steps int) error {
	s.at(0, s.chaosLoop)
	for i := 0; i < steps && s.q.Len() > 0; i++ {
		e := heap.Pop(&s.q).(*simEvent)
		s.now = e.at
		if err := e.fn(); err != nil {
			return fmt.Errorf("t=%v: %w", s.now, err)
		}
		if err := s.check(); err != nil {
			return fmt.Errorf("t=%v: %w", s.now, err)
		}
		if i%500 == 499 {
			// Carry on from a snapshot: it must hold everything the
			// machine's future behaviour depends on.
			if err := s.reload(); err != nil {
				return fmt.Errorf("t=%v: %w", s.now, err)
			}
		}
	}
	return nil
}

func (s *sim) reload() error {
	b, err := s.m.MarshalSnapshot()
	if err != nil {
		return err
	}
	m, err := coord.RestoreSnapshot(b)
	if err != nil {
		return fmt.Errorf("restoring a snapshot: %w", err)
	}
	b2, err := m.MarshalSnapshot()
	if err != nil {
		return err
	}
	if string(b) != string(b2) {
		return fmt.Errorf("snapshot changed across restore:\n%s\n%s", b, b2)
	}
	s.m = m
	return nil
}

func (s *sim) chaosLoop() error {
	if err := s.chaos(); err != nil {
		return err
	}
	s.at(time.Duration(s.rng.Int64N(int64(2*time.Second))), s.chaosLoop)
	return nil
}

func (s *sim) check() error {
	primaries := map[coordapi.VolumeID][]coordapi.NodeID{}
	for _, n := range s.nodes {
		if !n.alive || !n.clk.at(s.now).Before(n.deadline) {
			continue
		}
		for vid, a := range n.view {
			if a.Role == coordapi.RolePrimary {
				primaries[vid] = append(primaries[vid], n.id)
			}
		}
	}
	for vid, ps := range primaries {
		s.maxPrims = max(s.maxPrims, len(ps))
		if len(ps) > 1 {
			v, _ := s.m.Volume(string(vid))
			return fmt.Errorf("volume %s: %v all believe they are primary with a valid lease (coordinator: epoch %d primary %q)", vid, ps, v.Epoch, v.Primary)
		}
	}
	for _, v := range s.m.Volumes(false) {
		if v.Epoch < s.volEpoch[v.ID] {
			return fmt.Errorf("volume %s: epoch went from %d to %d", v.ID, s.volEpoch[v.ID], v.Epoch)
		}
		s.volEpoch[v.ID] = v.Epoch
		if v.Primary != "" {
			k := fmt.Sprintf("%s/%d", v.ID, v.Epoch)
			if p, ok := s.epochPrim[k]; ok && p != v.Primary {
				return fmt.Errorf("volume %s epoch %d: primary %s, earlier %s", v.ID, v.Epoch, v.Primary, p)
			}
			s.epochPrim[k] = v.Primary
		}
	}
	return nil
}

func (s *sim) stats() string {
	return fmt.Sprintf("simulated %v, %d volumes live, %d promotions, %d lease expiries, %d leader changes, %d slots, %d rejoins, %d members given up",
		s.now.Round(time.Second), len(s.m.Volumes(false)), s.promotions, s.expiries, s.leaderChgs, s.syncs, s.rejoins, s.gone)
}
