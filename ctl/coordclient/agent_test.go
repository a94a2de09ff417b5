package coordclient_test

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
)

// fakeCoord answers registrations and heartbeats like a coordinator whose
// leader stamps each with its clock, and can be made to fail, stall or
// forget the node.
type fakeCoord struct {
	mu          sync.Mutex
	lease       coordapi.Lease
	assignments []coordapi.Assignment
	registers   int
	heartbeats  int
	lastStamp   time.Time // when the last renewal was processed
	down        bool      // answer 503 with Retry-After: 1
	stall       time.Duration
	forget      bool // answer heartbeats with 404 once
	attempts    int  // every request, answered or not
	reports     [][]coordapi.ReplicaReport
}

func (f *fakeCoord) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	stall, down := f.stall, f.down
	f.attempts++
	f.mu.Unlock()
	if stall > 0 {
		select {
		case <-time.After(stall):
		case <-r.Context().Done():
			return
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if down {
		w.Header().Set("Retry-After", "1")
		w.WriteHeader(503)
		json.NewEncoder(w).Encode(coordapi.Error{Code: coordapi.CodeNotLeader, Message: "electing"})
		return
	}
	switch r.URL.Path {
	case "/v1/nodes/register":
		f.registers++
	case "/v1/nodes/heartbeat":
		if f.forget {
			f.forget = false
			w.WriteHeader(404)
			json.NewEncoder(w).Encode(coordapi.Error{Code: coordapi.CodeNotFound, Message: "node n1 is not registered"})
			return
		}
		var req coordapi.HeartbeatRequest
		json.NewDecoder(r.Body).Decode(&req)
		f.reports = append(f.reports, req.Replicas)
		f.heartbeats++
	default:
		w.WriteHeader(404)
		return
	}
	f.lastStamp = time.Now()
	json.NewEncoder(w).Encode(coordapi.HeartbeatResponse{Node: "n1", Lease: f.lease, NextHeartbeat: f.lease.Interval, Assignments: f.assignments})
}

func (f *fakeCoord) set(fn func(*fakeCoord)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

type updates struct {
	mu  sync.Mutex
	all []coordclient.Update
}

func (u *updates) add(x coordclient.Update) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.all = append(u.all, x)
}

func (u *updates) last() coordclient.Update {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.all) == 0 {
		return coordclient.Update{}
	}
	return u.all[len(u.all)-1]
}

func startAgent(t *testing.T, f *fakeCoord) (*coordclient.Agent, *updates, context.CancelFunc) {
	t.Helper()
	c := newClient(t, inProcess{"c:1": f}, "http://c:1")
	u := &updates{}
	a, err := coordclient.NewAgent(coordclient.AgentConfig{
		Client:   c,
		Node:     coordapi.RegisterRequest{Node: "n1", PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1 << 30, Free: 1 << 30},
		OnChange: u.add,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return a, u, cancel
}

var primaryAt3 = coordapi.Assignment{Volume: "vol-1", Name: "v", Size: 4096, Epoch: 3, Role: coordapi.RolePrimary, InSync: true, Primary: "n1",
	Peers: []coordapi.Peer{{Node: "n2", ReplAddr: "h2:2", Role: coordapi.RoleSecondary, InSync: true}}}

// The agent registers, delivers its assignments, and grants the data path
// authority only for the assigned volume, role and epoch, while the lease
// is valid.
func TestAgentAssignmentsAndAuthority(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCoord{lease: coordapi.DefaultConfig().Lease, assignments: []coordapi.Assignment{primaryAt3}}
		a, u, _ := startAgent(t, f)
		synctest.Wait()
		if f.registers != 1 {
			t.Fatalf("%d registrations", f.registers)
		}
		up := u.last()
		if !up.LeaseValid || len(up.Assignments) != 1 || up.Assignments[0].Epoch != 3 {
			t.Fatalf("update %+v", up)
		}
		now := time.Now()
		if !a.Authority("vol-1", 3, now) {
			t.Error("no authority for the assigned epoch")
		}
		if a.Authority("vol-1", 2, now) || a.Authority("vol-2", 3, now) {
			t.Error("authority for an epoch or volume not assigned")
		}
		// The heartbeats go on at the interval, reporting the view's epochs.
		time.Sleep(5 * time.Second)
		synctest.Wait()
		f.mu.Lock()
		hb, reps := f.heartbeats, f.reports[len(f.reports)-1]
		f.mu.Unlock()
		if hb < 2 || len(reps) != 1 || reps[0].Volume != "vol-1" || reps[0].Epoch != 3 {
			t.Errorf("%d heartbeats, last reports %+v", hb, reps)
		}
		// The coordinator demotes the node: authority goes at once.
		demoted := primaryAt3
		demoted.Epoch, demoted.Role, demoted.Primary = 4, coordapi.RoleSecondary, ""
		f.set(func(f *fakeCoord) { f.assignments = []coordapi.Assignment{demoted} })
		a.Kick()
		synctest.Wait()
		if a.Authority("vol-1", 3, time.Now()) || a.Authority("vol-1", 4, time.Now()) {
			t.Error("authority after demotion")
		}
		if got := u.last().Assignments[0]; got.Epoch != 4 || got.Role != coordapi.RoleSecondary {
			t.Errorf("update after demotion: %+v", got)
		}
	})
}

// When the coordinator stops answering, the node's lease lapses at
// NodeDeadline(send time of the last good heartbeat): strictly before the
// coordinator could expire it, by the margin at least.
func TestAgentLeaseLapsesBeforeCoordinatorExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := coordapi.DefaultConfig().Lease
		f := &fakeCoord{lease: l, assignments: []coordapi.Assignment{primaryAt3}}
		a, u, _ := startAgent(t, f)
		synctest.Wait()
		time.Sleep(3 * time.Second) // a few heartbeats
		synctest.Wait()
		f.set(func(f *fakeCoord) { f.down = true })
		f.mu.Lock()
		stamp, before := f.lastStamp, f.attempts
		f.mu.Unlock()
		coordExpiry := l.CoordinatorExpiry(stamp)
		deadline := a.LeaseDeadline()
		if !deadline.Before(coordExpiry) || coordExpiry.Sub(deadline) < l.Margin.D() {
			t.Fatalf("node deadline %v, coordinator expiry %v: want the node first by the margin", deadline, coordExpiry)
		}
		for a.LeaseValid(time.Now()) {
			time.Sleep(10 * time.Millisecond)
		}
		lapsed := time.Now()
		if lapsed.Before(deadline) || lapsed.After(deadline.Add(10*time.Millisecond)) {
			t.Errorf("lease seen lapsing at %v, deadline %v", lapsed, deadline)
		}
		synctest.Wait()
		if up := u.last(); up.LeaseValid {
			t.Error("no update when the lease lapsed")
		}
		if a.Authority("vol-1", 3, time.Now()) {
			t.Error("authority without a lease")
		}
		// Retries went on, spaced by the Retry-After (1s), not in a loop.
		f.mu.Lock()
		tries := f.attempts - before
		f.mu.Unlock()
		if tries < 3 || tries > 9 {
			t.Errorf("%d attempts in the %v the coordinator was down, with Retry-After: 1", tries, time.Since(stamp))
		}
		f.set(func(f *fakeCoord) { f.down = false })
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if !a.LeaseValid(time.Now()) {
			t.Error("lease not regained once the coordinator answers")
		}
		if up := u.last(); !up.LeaseValid {
			t.Error("no update when the lease came back")
		}
	})
}

// Retries while the coordinator sheds honour Retry-After.
func TestAgentRetryAfter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCoord{lease: coordapi.DefaultConfig().Lease, down: true}
		var calls []time.Time
		var mu sync.Mutex
		counting := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			calls = append(calls, time.Now())
			mu.Unlock()
			f.ServeHTTP(w, r)
		})
		c := newClient(t, inProcess{"c:1": counting}, "http://c:1")
		a, err := coordclient.NewAgent(coordclient.AgentConfig{Client: c, Node: coordapi.RegisterRequest{Node: "n1", PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1, Free: 1}})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		a.Run(ctx)
		mu.Lock()
		defer mu.Unlock()
		if len(calls) < 5 || len(calls) > 11 {
			t.Errorf("%d attempts in 10s with Retry-After: 1", len(calls))
		}
		for i := 1; i < len(calls); i++ {
			if gap := calls[i].Sub(calls[i-1]); gap < time.Second {
				t.Errorf("attempt %d came %v after the previous, before Retry-After", i, gap)
			}
		}
	})
}

// A coordinator that lost the node (404) gets a new registration.
func TestAgentReRegisters(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCoord{lease: coordapi.DefaultConfig().Lease}
		_, _, _ = startAgent(t, f)
		synctest.Wait()
		f.set(func(f *fakeCoord) { f.forget = true })
		time.Sleep(5 * time.Second)
		synctest.Wait()
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.registers != 2 {
			t.Errorf("%d registrations, want 2", f.registers)
		}
	})
}

// An answer that comes after the attempt's deadline is dropped: its
// assignments are never installed and it extends nothing.
func TestAgentDropsLateAnswers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCoord{lease: coordapi.DefaultConfig().Lease}
		a, _, _ := startAgent(t, f)
		synctest.Wait()
		deadline := a.LeaseDeadline()
		// From now on every answer takes longer than the attempt timeout
		// (the 2s interval) and would make the node primary.
		f.set(func(f *fakeCoord) { f.stall = 3 * time.Second; f.assignments = []coordapi.Assignment{primaryAt3} })
		time.Sleep(20 * time.Second)
		synctest.Wait()
		if _, ok := a.Assignment("vol-1"); ok {
			t.Error("a late answer's assignment was installed")
		}
		if !a.LeaseDeadline().Equal(deadline) {
			t.Error("a late answer extended the lease")
		}
		if a.LeaseValid(time.Now()) {
			t.Error("lease still valid 20s after the last answer in time")
		}
	})
}

// ReportReplicaLoss merges the newer epoch it gets back, and a heartbeat
// answer committed before it cannot roll the view back.
func TestAgentReplicaLossMerge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCoord{lease: coordapi.DefaultConfig().Lease, assignments: []coordapi.Assignment{primaryAt3}}
		newer := primaryAt3
		newer.Epoch = 4
		newer.Peers = []coordapi.Peer{{Node: "n2", ReplAddr: "h2:2", Role: coordapi.RoleSecondary, InSync: false}}
		mux := http.NewServeMux()
		mux.Handle("/v1/nodes/", f)
		mux.HandleFunc("POST /v1/volumes/vol-1/replica-loss", func(w http.ResponseWriter, r *http.Request) {
			json.NewEncoder(w).Encode(newer)
		})
		c := newClient(t, inProcess{"c:1": mux}, "http://c:1")
		u := &updates{}
		a, _ := coordclient.NewAgent(coordclient.AgentConfig{Client: c, Node: coordapi.RegisterRequest{Node: "n1", PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1, Free: 1}, OnChange: u.add})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { a.Run(ctx); close(done) }()
		defer func() { cancel(); <-done }()
		synctest.Wait()
		got, err := a.ReportReplicaLoss(ctx, "vol-1", 3, "n2", "timeout")
		if err != nil || got.Epoch != 4 {
			t.Fatal(got, err)
		}
		synctest.Wait()
		if !a.Authority("vol-1", 4, time.Now()) || u.last().Assignments[0].Epoch != 4 {
			t.Fatal("new epoch not installed or not delivered")
		}
		// The fake still answers heartbeats with epoch 3.
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if as, _ := a.Assignment("vol-1"); as.Epoch != 4 {
			t.Errorf("heartbeat answer rolled vol-1 back to epoch %d", as.Epoch)
		}
	})
}
