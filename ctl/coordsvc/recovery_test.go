package coordsvc

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"keel/ctl/coordapi"
)

// The recovery endpoints end to end through the client: a loss, a slot,
// progress in a heartbeat, the rejoin and its duplicate, the cluster view
// and the metrics.
func TestRecoveryAPI(t *testing.T) {
	s := oneMember(t, nil)
	c := client(t, s.APIURL())
	ctx := ctxT(t, time.Minute)
	v := volumeOn(t, ctx, c, "n1", "n2", "n3")
	p, o := v.Primary, otherMember(v)
	a, err := c.ReplicaLoss(ctx, "v", coordapi.ReplicaLossRequest{Node: p, Epoch: 1, Lost: o})
	if err != nil {
		t.Fatal(err)
	}
	if len(a.Peers) != 1 || a.Peers[0].State != coordapi.MemberOutOfSync || !a.Peers[0].Live {
		t.Fatalf("peer after the loss: %+v", a.Peers)
	}
	g, err := c.Sync(ctx, "v", coordapi.SyncRequest{Node: p, Epoch: a.Epoch, Target: o})
	if err != nil || !g.Granted || g.Kind != coordapi.SyncCatchUp {
		t.Fatalf("sync: %+v %v", g, err)
	}
	if g, err := c.Sync(ctx, string(v.ID), coordapi.SyncRequest{Node: p, Epoch: a.Epoch, Target: o}); err != nil || !g.Granted {
		t.Fatalf("repeated sync: %+v %v", g, err)
	}
	var ae *coordapi.Error
	if _, err := c.Sync(ctx, "v", coordapi.SyncRequest{Node: p, Epoch: 1, Target: o}); !errors.As(err, &ae) || ae.Code != coordapi.CodeStaleEpoch || ae.CurrentEpoch != a.Epoch {
		t.Fatalf("stale sync: %v", err)
	}
	hb := coordapi.HeartbeatRequest{Node: p, Capacity: 1 << 40, Free: 1 << 40, Replicas: []coordapi.ReplicaReport{{Volume: v.ID, Epoch: a.Epoch,
		Syncs: []coordapi.SyncReport{{Target: o, Kind: coordapi.SyncCatchUp, Done: 12 << 20, Total: 40 << 20, Rate: 5 << 20}}}}}
	if _, err := c.Heartbeat(ctx, hb); err != nil {
		t.Fatal(err)
	}
	got, err := c.Volume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(got.Reason, "catching up 12MiB of 40MiB, 5MiB/s, ETA 6s") {
		t.Fatalf("reason %q", got.Reason)
	}
	cl, err := c.Cluster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cl.Mode != coordapi.ModeNormal || cl.CatchUps != 1 || cl.SlotsGranted != 1 || cl.ByState[coordapi.StateDegraded] != 1 || cl.Recovery != coordapi.DefaultRecovery() {
		t.Fatalf("cluster: %+v", cl)
	}
	na, err := c.Rejoin(ctx, "v", coordapi.RejoinRequest{Node: p, Epoch: a.Epoch, Target: o, Kind: coordapi.SyncCatchUp, Copied: 40 << 20})
	if err != nil || na.Epoch != a.Epoch+1 || !na.Peers[0].InSync {
		t.Fatalf("rejoin: %+v %v", na, err)
	}
	before := stateOf(t, s)
	if dup, err := c.Rejoin(ctx, "v", coordapi.RejoinRequest{Node: p, Epoch: a.Epoch, Target: o, Kind: coordapi.SyncCatchUp, Copied: 40 << 20}); err != nil || dup.Epoch != na.Epoch {
		t.Fatalf("duplicate rejoin: %+v %v", dup, err)
	}
	if stateOf(t, s) != before {
		t.Fatal("a duplicate rejoin changed the state")
	}

	resp, err := http.Get(s.APIURL() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`keel_coord_slot_grants_total{kind="catch_up"} 1`,
		`keel_coord_rejoins_total{kind="catch_up"} 1`,
		`keel_coord_mass_failure_mode 0`,
		`keel_coord_slots_in_use{kind="remirror"} 0`,
		`keel_coord_node_reserve_bytes{node="n1"} 2.19902325555e+11`,
		`keel_coord_node_reserve_used_bytes{node="n1"} 0`,
		`keel_coord_node_quarantined_bytes{node="n1"} 0`,
		`keel_coord_members{state="in_sync"} 2`,
		`keel_coord_volumes{state="ok"} 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// Bad recovery requests get a 400 naming the problem and change nothing.
func TestRecoveryBadInput(t *testing.T) {
	s := oneMember(t, nil)
	c := client(t, s.APIURL())
	ctx := ctxT(t, time.Minute)
	volumeOn(t, ctx, c, "n1", "n2")
	before := stateOf(t, s)
	hc := &http.Client{Timeout: 10 * time.Second}
	for _, tc := range []struct {
		path, body string
		status     int
		msg        string
	}{
		{"/v1/volumes/v/sync", `{"node":"n1","epoch":1,"target":"n1"}`, 400, "to itself"},
		{"/v1/volumes/v/sync", `{"node":"n1","epoch":0,"target":"n2"}`, 400, "epoch is 0"},
		{"/v1/volumes/v/sync", `{"node":"n1","epoch":1}`, 400, "target"},
		{"/v1/volumes/v/sync", `{"node":"n1","epoch":1,"target":"n2"}`, 409, "in sync already"},
		{"/v1/volumes/nope/sync", `{"node":"n1","epoch":1,"target":"n2"}`, 404, "does not exist"},
		{"/v1/volumes/v/rejoin", `{"node":"n1","epoch":1,"target":"n2","kind":"magic"}`, 400, "kind"},
		{"/v1/volumes/v/rejoin", `{"node":"n1","epoch":1,"target":"n2","kind":"catch_up","copied":-1}`, 400, "copied"},
		{"/v1/volumes/v/rejoin", `{"node":"n1","epoch":7,"target":"n2","kind":"catch_up"}`, 200, `"epoch":1`}, // a duplicate: n2 is in sync
		{"/v1/volumes/v/rejoin", `{"node":"n2","epoch":1,"target":"n1","kind":"catch_up"}`, 409, "not the primary"},
		{"/v1/volumes/v/rejoin", `{"node":"n2","epoch":3,"target":"n1","kind":"catch_up"}`, 409, "stale_epoch"},
	} {
		code, _, b := post(t, hc, s.APIURL()+tc.path, []byte(tc.body))
		if code != tc.status || !strings.Contains(string(b), tc.msg) {
			t.Errorf("%s %s: %d %s, want %d and %q", tc.path, tc.body, code, b, tc.status, tc.msg)
		}
	}
	if _, err := c.SetConfig(ctx, coordapi.Config{Lease: coordapi.DefaultConfig().Lease, ReserveFraction: 0.2, Recovery: coordapi.RecoveryConfig{Grace: 1}}); err == nil || !strings.Contains(err.Error(), "grace 1ns: must be between") {
		t.Errorf("a grace of 1ns: %v", err)
	}
	if after := stateOf(t, s); after != before {
		t.Fatalf("bad requests changed the state:\n%s\n%s", before, after)
	}
}

// Slot requests are heartbeat class: a flood of slow reads does not hold
// them up.
func TestRecoveryNotStarvedByReads(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	s := oneMember(t, func(c *Config) {
		c.Limits = map[coordapi.Class]Limit{
			coordapi.ClassRead: {InFlight: 2, Wait: 10 * time.Millisecond, Deadline: 30 * time.Second, MaxBody: 1 << 20, RetryAfter: time.Second},
		}
		c.Inject = func(ctx context.Context, class coordapi.Class, op string) {
			if class == coordapi.ClassRead {
				select {
				case <-release:
				case <-ctx.Done():
				}
			}
		}
	})
	c := client(t, s.APIURL())
	ctx := ctxT(t, time.Minute)
	v := volumeOn(t, ctx, c, "n1", "n2")
	// Fill the read class with calls that block.
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(s.APIURL() + "/v1/cluster")
			if err == nil {
				resp.Body.Close()
			}
		}()
	}
	a, err := c.ReplicaLoss(ctx, "v", coordapi.ReplicaLossRequest{Node: v.Primary, Epoch: 1, Lost: otherMember(v)})
	if err != nil {
		t.Fatal(err)
	}
	g, err := c.Sync(ctx, "v", coordapi.SyncRequest{Node: v.Primary, Epoch: a.Epoch, Target: otherMember(v)})
	if err != nil || !g.Granted {
		t.Fatalf("sync while reads are stuck: %+v %v", g, err)
	}
	if _, err := c.Rejoin(ctx, "v", coordapi.RejoinRequest{Node: v.Primary, Epoch: a.Epoch, Target: otherMember(v), Kind: g.Kind}); err != nil {
		t.Fatalf("rejoin while reads are stuck: %v", err)
	}
	once.Do(func() { close(release) })
	wg.Wait()
}
