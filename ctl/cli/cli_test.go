package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
	"keel/ctl/coordsvc"
)

func startCell(t *testing.T) string {
	t.Helper()
	s, err := coordsvc.New(coordsvc.Config{
		ID: "c1", DataDir: t.TempDir(), Listen: "127.0.0.1:0", RaftAddr: "127.0.0.1:0",
		Raft: coordsvc.RaftTiming{HeartbeatTimeout: 300 * time.Millisecond, ElectionTimeout: 300 * time.Millisecond, LeaderLeaseTimeout: 150 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c, err := coordclient.New(coordclient.Config{URLs: []string{s.APIURL()}, Attempts: 50, Backoff: coordclient.Backoff{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i, z := range []string{"a", "b"} {
		// Registration waits out the election through the client's retries.
		if _, err := c.Register(ctx, coordapi.RegisterRequest{Node: coordapi.NodeID(fmt.Sprintf("n%d", i+1)), Zone: z,
			PrimaryAddr: "127.0.0.1:10809", ReplAddr: "127.0.0.1:10810", Capacity: 100 << 30, Free: 100 << 30}); err != nil {
			t.Fatalf("register: %v", err)
		}
	}
	return s.APIURL()
}

// run executes cmd with args and returns its output and error.
func run(t *testing.T, cmd *cobra.Command, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	cmd.SilenceUsage = true
	cmd.SilenceErrors = true
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

func nodeCmd() *cobra.Command {
	c := &cobra.Command{Use: "node"}
	c.AddCommand(NodeAdminCommands()...)
	return c
}

func TestVolumeAndNodeCommands(t *testing.T) {
	url := startCell(t)
	out, err := run(t, VolumeCommand(), "create", "data", "--size", "1G", "--replicas", "2", "--coord", url)
	if err != nil || !strings.Contains(out, "created data (vol-1), 1GiB, 2 replica(s)") {
		t.Fatalf("create: %q %v", out, err)
	}
	out, err = run(t, VolumeCommand(), "list", "--coord", url)
	if err != nil || !regexp.MustCompile(`data\s+vol-1\s+1GiB\s+2/2\s+1\s+n\d\s+ok`).MatchString(out) {
		t.Fatalf("list: %q %v", out, err)
	}
	out, err = run(t, VolumeCommand(), "status", "--coord", url)
	if err != nil || !regexp.MustCompile(`data\s+vol-1\s+ok\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+s ago\)\s+1\s+n\d\s+n\d,n\d\s+all 2 replica\(s\) in sync`).MatchString(out) {
		t.Fatalf("status: %q %v", out, err)
	}
	t.Logf("keel volume status:\n%s", out)
	out, err = run(t, VolumeCommand(), "status", "--impaired", "--coord", url)
	if err != nil || !strings.Contains(out, "no impaired volumes") {
		t.Fatalf("status --impaired: %q %v", out, err)
	}
	out, err = run(t, VolumeCommand(), "status", "data", "-o", "json", "--coord", url)
	var vl coordapi.VolumeList
	if err != nil || json.Unmarshal([]byte(out), &vl) != nil || len(vl.Volumes) != 1 || vl.Volumes[0].State != coordapi.StateOK {
		t.Fatalf("status json: %q %v", out, err)
	}
	primary := vl.Volumes[0].Primary

	out, err = run(t, nodeCmd(), "list", "--coord", url)
	if err != nil || !regexp.MustCompile(`n1\s+a\s+up`).MatchString(out) || !strings.Contains(out, "RESERVE") {
		t.Fatalf("node list: %q %v", out, err)
	}
	out, err = run(t, nodeCmd(), "drain", string(primary), "--coord", url)
	if err != nil || !strings.Contains(out, "draining") {
		t.Fatalf("node drain: %q %v", out, err)
	}
	out, err = run(t, VolumeCommand(), "status", "data", "--coord", url)
	if err != nil || !strings.Contains(out, "fenced") || !strings.Contains(out, "handing the primary role over") {
		t.Fatalf("status during handover: %q %v", out, err)
	}
	out, err = run(t, nodeCmd(), "drain", string(primary), "--undo", "--coord", url)
	if err != nil || !strings.Contains(out, "no longer draining") {
		t.Fatalf("node drain --undo: %q %v", out, err)
	}
	out, err = run(t, VolumeCommand(), "create", "big", "--size", "1T", "--coord", url)
	if err == nil || !strings.Contains(err.Error(), "re-mirror reserve") {
		t.Fatalf("create beyond the reserve: %q %v", out, err)
	}
	out, err = run(t, VolumeCommand(), "delete", "data", "--coord", url)
	if err != nil || !strings.Contains(out, "deleted data (vol-1)") {
		t.Fatalf("delete: %q %v", out, err)
	}
	if _, err = run(t, VolumeCommand(), "delete", "data", "--coord", url); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("second delete: %v", err)
	}
}

// Bad flags name the problem and the fix.
func TestBadFlags(t *testing.T) {
	for _, tc := range []struct {
		cmd  func() *cobra.Command
		args []string
		want string
	}{
		{VolumeCommand, []string{"create", "x"}, "--size is required"},
		{VolumeCommand, []string{"create", "x", "--size", "lots"}, "e.g. 4G"},
		{VolumeCommand, []string{"create", "x", "--size", "1000"}, "multiple of 4KiB"},
		{VolumeCommand, []string{"create", "x", "--size", "1G", "--replicas", "9"}, "give 1 to 5"},
		{VolumeCommand, []string{"create", "--size", "1G"}, "takes one argument"},
		{VolumeCommand, []string{"create", "vol-3", "--size", "1G"}, "looks like a volume ID"},
		{VolumeCommand, []string{"list", "-o", "yaml"}, "--output table or --output json"},
		{VolumeCommand, []string{"list", "--coord", "127.0.0.1:7400"}, "want http://host:port"},
		{VolumeCommand, []string{"status", "x", "--impaired"}, "not both"},
		{nodeCmd, []string{"drain"}, "the node's ID"},
	} {
		_, err := run(t, tc.cmd(), tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
}

func TestUnreachableCoordinator(t *testing.T) {
	_, err := run(t, VolumeCommand(), "list", "--coord", "http://127.0.0.1:1", "--timeout", "2s")
	if err == nil || !strings.Contains(err.Error(), "cannot reach the coordinator at http://127.0.0.1:1") {
		t.Fatalf("got %v", err)
	}
}

// Recovery shows in volume status (member states, copy progress), cluster
// status and node list.
func TestRecoveryStatus(t *testing.T) {
	url := startCell(t)
	c, err := coordclient.New(coordclient.Config{URLs: []string{url}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	v, err := c.CreateVolume(ctx, coordapi.CreateVolumeRequest{Name: "data", Size: 1 << 30, Replicas: 2})
	if err != nil {
		t.Fatal(err)
	}
	var other coordapi.NodeID
	for _, m := range v.Members {
		if m.Node != v.Primary {
			other = m.Node
		}
	}
	a, err := c.ReplicaLoss(ctx, "data", coordapi.ReplicaLossRequest{Node: v.Primary, Epoch: v.Epoch, Lost: other})
	if err != nil {
		t.Fatal(err)
	}
	if g, err := c.Sync(ctx, "data", coordapi.SyncRequest{Node: v.Primary, Epoch: a.Epoch, Target: other}); err != nil || !g.Granted {
		t.Fatalf("sync: %+v %v", g, err)
	}
	if _, err := c.Heartbeat(ctx, coordapi.HeartbeatRequest{Node: v.Primary, Capacity: 100 << 30, Free: 100 << 30, Replicas: []coordapi.ReplicaReport{{Volume: v.ID, Epoch: a.Epoch,
		Syncs: []coordapi.SyncReport{{Target: other, Kind: coordapi.SyncCatchUp, Done: 12 << 20, Total: 40 << 20, Rate: 5 << 20}}}}}); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, VolumeCommand(), "status", "data", "--coord", url)
	if err != nil || !strings.Contains(out, "MEMBERS") || !strings.Contains(out, string(other)+"[catching_up 12MiB/40MiB 30% ETA 6s]") || !strings.Contains(out, "degraded") ||
		!strings.Contains(out, "catching up 12MiB of 40MiB, 5MiB/s, ETA 6s") {
		t.Fatalf("volume status: %q %v", out, err)
	}
	t.Logf("keel volume status:\n%s", out)
	out, err = run(t, ClusterCommand(), "status", "--coord", url)
	if err != nil || !strings.Contains(out, "mode:        normal") || !strings.Contains(out, "catch-ups 1 (4 per node)") ||
		!strings.Contains(out, "degraded 1") || !regexp.MustCompile(`n1\s+up\s+100GiB\s+1GiB\s+0B\s+20GiB\s+0B`).MatchString(out) {
		t.Fatalf("cluster status: %q %v", out, err)
	}
	t.Logf("keel cluster status:\n%s", out)
	out, err = run(t, ClusterCommand(), "status", "-o", "json", "--coord", url)
	var cs ClusterStatus
	if err != nil || json.Unmarshal([]byte(out), &cs) != nil || cs.Cluster.CatchUps != 1 || len(cs.Nodes) != 2 {
		t.Fatalf("cluster status json: %q %v", out, err)
	}
	out, err = run(t, nodeCmd(), "list", "--coord", url)
	if err != nil || !strings.Contains(out, "QUARANTINED") || !strings.Contains(out, "RESERVE-USED") || !strings.Contains(out, "ALARM") {
		t.Fatalf("node list: %q %v", out, err)
	}
}

func TestMembersColumn(t *testing.T) {
	v := coordapi.Volume{Members: []coordapi.Member{
		{Node: "n1", InSync: true, Live: true, State: coordapi.MemberInSync},
		{Node: "n2", Live: false, State: coordapi.MemberOutOfSync},
		{Node: "n3", Live: true, State: coordapi.MemberRemirror, Sync: &coordapi.SyncProgress{Kind: coordapi.SyncRemirror, Done: 1 << 30, Total: 4 << 30, ETA: coordapi.Duration(90 * time.Second)}},
		{Node: "n4", InSync: true, Live: false},
	}}
	want := "n1,n2[out_of_sync down],n3[remirroring 1GiB/4GiB 25% ETA 1m30s],n4[in_sync down]"
	if got := members(v); got != want {
		t.Fatalf("members: %q, want %q", got, want)
	}
}
