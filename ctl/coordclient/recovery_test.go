package coordclient_test

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"
	"testing/synctest"
	"time"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
)

// Backoff.After: the server's floor (plus up to a quarter of it), raised
// by the exponential wait; SlotBackoff caps at two minutes.
func TestBackoffAfter(t *testing.T) {
	b := coordclient.Backoff{Base: time.Second, Max: 8 * time.Second}
	lo, hi := func() float64 { return 0 }, func() float64 { return 0.999999 }
	if w := b.After(0, 2*time.Second, lo); w != 2*time.Second {
		t.Errorf("floor 2s, first retry, no jitter: %v", w)
	}
	if w := b.After(0, 2*time.Second, hi); w < 2400*time.Millisecond || w > 2500*time.Millisecond {
		t.Errorf("floor 2s with full jitter: %v, want about 2.5s", w)
	}
	if w := b.After(5, 2*time.Second, lo); w != 4*time.Second {
		t.Errorf("capped backoff above the floor: %v, want 4s (half of the 8s cap)", w)
	}
	if w := b.After(-1, 0, lo); w != 500*time.Millisecond {
		t.Errorf("negative attempt: %v", w)
	}
	for n := range 40 {
		if w := coordclient.SlotBackoff.After(n, 2*time.Second, hi); w > 2*time.Minute {
			t.Fatalf("slot backoff %d: %v past the 2m cap", n, w)
		}
	}
}

// The recovery calls go to the contract's endpoints with the node's ID,
// and the agent merges a rejoin's newer assignment like a loss's.
func TestAgentRecoveryCalls(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeCoord{lease: coordapi.DefaultConfig().Lease, assignments: []coordapi.Assignment{primaryAt3}}
		rejoined := primaryAt3
		rejoined.Epoch = 4
		var syncReq coordapi.SyncRequest
		var rejoinReq coordapi.RejoinRequest
		refuse := true
		mux := http.NewServeMux()
		mux.Handle("/v1/nodes/", f)
		mux.HandleFunc("POST /v1/volumes/vol-1/sync", func(w http.ResponseWriter, r *http.Request) {
			json.NewDecoder(r.Body).Decode(&syncReq)
			g := coordapi.SyncGrant{Granted: !refuse, Kind: coordapi.SyncCatchUp}
			if refuse {
				g.RetryAfter, g.Reason = coordapi.Duration(2*time.Second), "limit"
			}
			refuse = false
			json.NewEncoder(w).Encode(g)
		})
		mux.HandleFunc("POST /v1/volumes/vol-1/rejoin", func(w http.ResponseWriter, r *http.Request) {
			json.NewDecoder(r.Body).Decode(&rejoinReq)
			json.NewEncoder(w).Encode(rejoined)
		})
		mux.HandleFunc("GET /v1/cluster", func(w http.ResponseWriter, r *http.Request) {
			json.NewEncoder(w).Encode(coordapi.Cluster{Mode: coordapi.ModeMassFailure, Remirrors: 2})
		})
		c := newClient(t, inProcess{"c:1": mux}, "http://c:1")
		u := &updates{}
		a, _ := coordclient.NewAgent(coordclient.AgentConfig{Client: c, Node: coordapi.RegisterRequest{Node: "n1", PrimaryAddr: "h:1", ReplAddr: "h:2", Capacity: 1, Free: 1}, OnChange: u.add})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { a.Run(ctx); close(done) }()
		defer func() { cancel(); <-done }()
		synctest.Wait()

		g, err := a.RequestSync(ctx, "vol-1", 3, "n2")
		if err != nil || g.Granted || g.RetryAfter.D() != 2*time.Second {
			t.Fatalf("refused grant: %+v %v", g, err)
		}
		if syncReq != (coordapi.SyncRequest{Node: "n1", Epoch: 3, Target: "n2"}) {
			t.Fatalf("sync request %+v", syncReq)
		}
		if w := a.SyncRetryWait(1, g); w < 2*time.Second {
			t.Fatalf("retry wait %v below the grant's 2s", w)
		}
		if g, err = a.RequestSync(ctx, "vol-1", 3, "n2"); err != nil || !g.Granted {
			t.Fatalf("grant: %+v %v", g, err)
		}
		as, err := a.Rejoin(ctx, "vol-1", 3, "n2", coordapi.SyncCatchUp, 1<<20)
		if err != nil || as.Epoch != 4 {
			t.Fatalf("rejoin: %+v %v", as, err)
		}
		if rejoinReq != (coordapi.RejoinRequest{Node: "n1", Epoch: 3, Target: "n2", Kind: coordapi.SyncCatchUp, Copied: 1 << 20}) {
			t.Fatalf("rejoin request %+v", rejoinReq)
		}
		synctest.Wait()
		if !a.Authority("vol-1", 4, time.Now()) || u.last().Assignments[0].Epoch != 4 {
			t.Fatal("the rejoin's epoch not installed or not delivered")
		}
		cl, err := c.Cluster(ctx)
		if err != nil || cl.Mode != coordapi.ModeMassFailure || cl.Remirrors != 2 {
			t.Fatalf("cluster: %+v %v", cl, err)
		}
	})
}
