package coordsvc

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"keel/ctl/coord"
	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
)

// stateOf is everything a client can observe of the replicated state.
func stateOf(t *testing.T, s *Server) string {
	t.Helper()
	var out struct {
		Volumes []coordapi.Volume
		Nodes   []coordapi.Node
		Config  coordapi.Config
		Cell    []coordapi.CellMember
	}
	s.fsm.read(func(m *coord.Machine) {
		out.Volumes, out.Nodes, out.Cell = m.Volumes(false), m.Nodes(), m.Cell()
		out.Config, _ = m.Config()
	})
	b, _ := json.Marshal(out)
	return string(b)
}

// TestBadInput: malformed JSON, invalid values, unknown volumes and nodes,
// stale epochs, oversized bodies and unknown endpoints get a 4xx with a
// message, and the state does not change.
func TestBadInput(t *testing.T) {
	s := oneMember(t, func(c *Config) {
		c.Limits = map[coordapi.Class]Limit{
			coordapi.ClassVolumeAdmin: {InFlight: 4, Wait: 50 * time.Millisecond, Deadline: 10 * time.Second, MaxBody: 1024, RetryAfter: time.Second},
		}
	})
	c := client(t, s.APIURL())
	ctx := ctxT(t, time.Minute)
	v := volumeOn(t, ctx, c, "n1", "n2")
	// Move the volume to epoch 2 so that epoch 1 is stale.
	if _, err := c.ReplicaLoss(ctx, "v", coordapi.ReplicaLossRequest{Node: v.Primary, Epoch: 1, Lost: otherMember(v)}); err != nil {
		t.Fatal(err)
	}
	before := stateOf(t, s)

	hc := &http.Client{Timeout: 10 * time.Second}
	for _, tc := range []struct {
		method, path, body string
		status             int
		code               coordapi.Code
		msg                string
	}{
		{"POST", "/v1/volumes", `{"name":"x","size":`, 400, coordapi.CodeBadRequest, "malformed JSON"},
		{"POST", "/v1/volumes", ``, 400, coordapi.CodeBadRequest, "empty body"},
		{"POST", "/v1/volumes", `{"name":"x","size":4096,"replicas":1} {"again":1}`, 400, coordapi.CodeBadRequest, "trailing data"},
		{"POST", "/v1/volumes", `{"name":"x","size":"4k","replicas":1}`, 400, coordapi.CodeBadRequest, `field "size"`},
		{"POST", "/v1/volumes", `{"name":"x","size":1000,"replicas":1}`, 400, coordapi.CodeBadRequest, "multiple of 4096"},
		{"POST", "/v1/volumes", `{"name":"v","size":4096,"replicas":1}`, 409, coordapi.CodeConflict, "exists already"},
		{"POST", "/v1/volumes", `{"name":"huge","size":1099511627776,"replicas":2}`, 507, coordapi.CodeNoCapacity, "reserve"},
		{"POST", "/v1/volumes", `{"name":"` + strings.Repeat("x", 2000) + `","size":4096,"replicas":1}`, 413, coordapi.CodeTooLarge, "1024-byte limit"},
		{"POST", "/v1/nodes/heartbeat", `{"node":"ghost","capacity":10,"free":1}`, 404, coordapi.CodeNotFound, "not registered"},
		{"POST", "/v1/nodes/heartbeat", `{"node":"n1","capacity":10,"free":11}`, 400, coordapi.CodeBadRequest, "free 11"},
		{"POST", "/v1/nodes/heartbeat", `{"node":"n1","capacity":10,"free":1,"replicas":[{"volume":"v","epoch":1}]}`, 400, coordapi.CodeBadRequest, "not a volume ID"},
		{"POST", "/v1/nodes/register", `{"node":"n3"}`, 400, coordapi.CodeBadRequest, "primary_addr"},
		{"POST", "/v1/nodes/ghost/drain", `{}`, 404, coordapi.CodeNotFound, "ghost is not registered"},
		{"POST", "/v1/nodes/n1/drain", `{"undo":"yes"}`, 400, coordapi.CodeBadRequest, `field "undo"`},
		{"GET", "/v1/volumes/nope", ``, 404, coordapi.CodeNotFound, `"nope" does not exist`},
		{"GET", "/v1/volumes?impaired=maybe", ``, 400, coordapi.CodeBadRequest, "impaired=1"},
		{"DELETE", "/v1/volumes/nope", ``, 404, coordapi.CodeNotFound, "does not exist"},
		{"POST", "/v1/volumes/nope/replica-loss", `{"node":"n1","epoch":1,"lost":"n2"}`, 404, coordapi.CodeNotFound, "does not exist"},
		{"POST", "/v1/volumes/v/replica-loss", `{"node":"` + string(v.Primary) + `","epoch":1,"lost":"` + string(v.Primary) + `"}`, 400, coordapi.CodeBadRequest, "losing itself"},
		{"POST", "/v1/volumes/v/replica-loss", `{"node":"` + string(v.Primary) + `","epoch":1,"lost":"n9"}`, 404, coordapi.CodeNotFound, "holds no replica"},
		{"POST", "/v1/volumes/v/replica-loss", `{"node":"` + string(otherMember(v)) + `","epoch":2,"lost":"` + string(v.Primary) + `"}`, 409, coordapi.CodeNotPrimary, "not the primary"},
		{"PUT", "/v1/config", `{"lease":{"duration":"1ms"}}`, 400, coordapi.CodeBadRequest, "lease duration"},
		{"POST", "/v1/cell/join", `{"id":"c9"}`, 400, coordapi.CodeBadRequest, "raft_addr"},
		{"GET", "/v1/nothing", ``, 404, coordapi.CodeNotFound, "no such endpoint"},
	} {
		req, _ := http.NewRequest(tc.method, s.APIURL()+tc.path, strings.NewReader(tc.body))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", tc.method, tc.path, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var e coordapi.Error
		json.Unmarshal(b, &e)
		if resp.StatusCode != tc.status || e.Code != tc.code || !strings.Contains(e.Message, tc.msg) {
			t.Errorf("%s %s %.60s: got %d %s, want %d %s containing %q", tc.method, tc.path, tc.body, resp.StatusCode, b, tc.status, tc.code, tc.msg)
		}
	}

	if after := stateOf(t, s); after != before {
		t.Errorf("refused calls changed the state:\nbefore %s\nafter  %s", before, after)
	}

	// A stale epoch that would change something: a second volume, moved to
	// epoch 2 by a drain, and a loss report at its epoch 1.
	w, err := c.CreateVolume(ctx, coordapi.CreateVolumeRequest{Name: "w", Size: 1 << 30, Replicas: 2})
	if err != nil {
		t.Fatal(err)
	}
	drained, err := c.Drain(ctx, w.Primary, false)
	if err != nil || !drained.Draining {
		t.Fatal(drained, err)
	}
	before = stateOf(t, s)
	_, err = c.ReplicaLoss(ctx, "w", coordapi.ReplicaLossRequest{Node: w.Primary, Epoch: 1, Lost: otherMember(w)})
	var ae *coordapi.Error
	if !errorsAs(err, &ae) || ae.HTTPStatus != 409 || ae.Code != coordapi.CodeStaleEpoch || ae.CurrentEpoch < 2 {
		t.Fatalf("stale-epoch report: %v", err)
	}
	if after := stateOf(t, s); after != before {
		t.Errorf("a refused call changed the state:\nbefore %s\nafter  %s", before, after)
	}
	if after := stateOf(t, s); !strings.Contains(after, `"name":"v"`) {
		t.Errorf("state lost the volume: %s", after)
	}

	// The refusals are counted by class and outcome.
	resp, err := hc.Get(s.APIURL() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`keel_coord_calls_total{class="volume-admin",outcome="client_error"}`,
		`keel_coord_raft_state{state="Leader"} 1`,
		`keel_coord_volumes{state="degraded"} 1`,
		`keel_coord_primary_elections_total`,
	} {
		if !strings.Contains(string(b), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

func otherMember(v *coordapi.Volume) coordapi.NodeID {
	for _, m := range v.Members {
		if m.Node != v.Primary {
			return m.Node
		}
	}
	return ""
}

func errorsAs(err error, target **coordapi.Error) bool {
	e, ok := err.(*coordapi.Error)
	if ok {
		*target = e
	}
	return ok
}

// TestStateUnchangedByRejectedCalls compares the state before and after
// the table of bad calls above on a fresh member.
func TestStateUnchangedByRejectedCalls(t *testing.T) {
	s := oneMember(t, nil)
	c := client(t, s.APIURL())
	ctx := ctxT(t, time.Minute)
	if _, err := c.Register(ctx, reg("n1", "a")); err != nil {
		t.Fatal(err)
	}
	before := stateOf(t, s)
	hc := &http.Client{Timeout: 10 * time.Second}
	for _, call := range []struct{ method, path, body string }{
		{"POST", "/v1/volumes", `{"name":"x","size":`},
		{"POST", "/v1/volumes", `{"name":"big","size":1099511627776,"replicas":1}`},
		{"POST", "/v1/volumes", `{"name":"two","size":4096,"replicas":2}`},
		{"POST", "/v1/nodes/ghost/drain", `{}`},
		{"DELETE", "/v1/volumes/nope", ``},
		{"POST", "/v1/nodes/register", `{"node":"n1","zone":"b","primary_addr":"h:1","repl_addr":"h:2","capacity":1,"free":2}`},
		{"PUT", "/v1/config", `{"reserve_fraction":2}`},
		{"POST", "/v1/volumes", string(bytes.Repeat([]byte(" "), 70<<10))},
	} {
		req, _ := http.NewRequest(call.method, s.APIURL()+call.path, strings.NewReader(call.body))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode < 400 || resp.StatusCode == 503 {
			t.Errorf("%s %s: %d, want a refusal", call.method, call.path, resp.StatusCode)
		}
	}
	if after := stateOf(t, s); after != before {
		t.Errorf("refused calls changed the state:\nbefore %s\nafter  %s", before, after)
	}
}

// TestFailoverThroughService: two nodes run coordclient Agents against a
// member with a short lease; when the primary's agent stops, the leader's
// ticker expires its lease and the other node's agent sees itself promoted
// at a new epoch, while the stopped node's own lease check had already
// failed.
func TestFailoverThroughService(t *testing.T) {
	cfg := coordapi.Config{
		Lease:           coordapi.Lease{Duration: coordapi.Duration(time.Second), MaxDrift: 0.01, Margin: coordapi.Duration(100 * time.Millisecond), Interval: coordapi.Duration(200 * time.Millisecond)},
		ReserveFraction: 0.2,
	}
	s := oneMember(t, func(c *Config) { c.Coord = cfg })
	eventually(t, "the initial configuration committed", 5*time.Second, func() error {
		var got coordapi.Config
		s.fsm.read(func(m *coord.Machine) { got, _ = m.Config() })
		if got != cfg {
			return errf("config", "not", "yet")
		}
		return nil
	})
	type nodeRun struct {
		agent  *coordclient.Agent
		cancel context.CancelFunc
		done   chan struct{}
		mu     sync.Mutex
		ups    []coordclient.Update
	}
	start := func(id, zone string) *nodeRun {
		nr := &nodeRun{done: make(chan struct{})}
		a, err := coordclient.NewAgent(coordclient.AgentConfig{
			Client: client(t, s.APIURL()), Node: reg(id, zone),
			OnChange: func(u coordclient.Update) { nr.mu.Lock(); nr.ups = append(nr.ups, u); nr.mu.Unlock() },
		})
		if err != nil {
			t.Fatal(err)
		}
		nr.agent = a
		ctx, cancel := context.WithCancel(context.Background())
		nr.cancel = cancel
		go func() { a.Run(ctx); close(nr.done) }()
		t.Cleanup(func() { cancel(); <-nr.done })
		return nr
	}
	n1, n2 := start("n1", "a"), start("n2", "b")
	c := client(t, s.APIURL())
	ctx := ctxT(t, time.Minute)
	eventually(t, "both nodes registered", 5*time.Second, func() error {
		nodes, err := c.Nodes(ctx)
		if err != nil || len(nodes) != 2 {
			return errf("nodes", "not", "yet")
		}
		return nil
	})
	v, err := c.CreateVolume(ctx, coordapi.CreateVolumeRequest{Name: "v", Size: 1 << 30, Replicas: 2})
	if err != nil {
		t.Fatal(err)
	}
	byID := map[coordapi.NodeID]*nodeRun{"n1": n1, "n2": n2}
	prim, sec := byID[v.Primary], byID[otherMember(v)]
	eventually(t, "the primary's agent holds authority at epoch 1", 5*time.Second, func() error {
		if !prim.agent.Authority(v.ID, 1, time.Now()) {
			return errf("no", "authority")
		}
		return nil
	})
	prim.cancel()
	<-prim.done
	stoppedDeadline := prim.agent.LeaseDeadline()
	eventually(t, "the secondary promoted at epoch 2", 10*time.Second, func() error {
		if !sec.agent.Authority(v.ID, 2, time.Now()) {
			return errf("not", "yet")
		}
		return nil
	})
	promotedSeen := time.Now()
	if !stoppedDeadline.Before(promotedSeen) {
		t.Errorf("the old primary's lease ran to %v, after the promotion was seen at %v", stoppedDeadline, promotedSeen)
	}
	got, err := c.Volume(ctx, "v")
	if err != nil || got.Epoch != 2 || got.Primary != otherMember(v) || got.State != coordapi.StateDegraded {
		t.Fatalf("volume after failover: %+v %v", got, err)
	}
}
