package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"strings"
	"sync"
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
	if err != nil || !strings.Contains(out, "created data (vol-1), 1GiB, 2 replicas") {
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
		{CoordCommand, nil, "--id is required"},
		{CoordCommand, []string{"--id", "c1"}, "--data-dir is required"},
		{CoordCommand, []string{"--id", "c 1"}, "--id"},
		{CoordCommand, []string{"--id", "c1", "--data-dir", "d", "--raft-addr", "0.0.0.0:7401"}, "concrete IP"},
		{CoordCommand, []string{"--id", "c1", "--data-dir", "d", "--raft-addr", "7401"}, "give host:port"},
		{CoordCommand, []string{"--id", "c1", "--data-dir", "d", "--join", "127.0.0.1:7400"}, "API URL"},
		{CoordCommand, []string{"--id", "c1", "--data-dir", "d", "--lease", "10s", "--heartbeat-interval", "9s"}, "at most a third"},
		{CoordCommand, []string{"--id", "c1", "--data-dir", "d", "--reserve", "1.5"}, "reserve_fraction"},
		{CoordCommand, []string{"--id", "c1", "--data-dir", "d", "--log-level", "loud"}, "--log-level"},
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

// syncBuffer lets the test read what the running command printed.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// keel coord runs a member until its context ends.
func TestCoordCommand(t *testing.T) {
	cmd := CoordCommand()
	out := &syncBuffer{}
	cmd.SetOut(out)
	cmd.SetErr(io.Discard)
	cmd.SetArgs([]string{"--id", "c1", "--data-dir", t.TempDir(), "--listen", "127.0.0.1:0", "--raft-addr", "127.0.0.1:0", "--log-level", "error", "--reserve", "0.3"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	re := regexp.MustCompile(`API (http://127\.0\.0\.1:\d+)`)
	var url string
	deadline := time.Now().Add(20 * time.Second)
	for url == "" {
		if m := re.FindStringSubmatch(out.String()); m != nil {
			url = m[1]
			break
		}
		select {
		case err := <-done:
			t.Fatalf("coord exited: %v (%s)", err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no API address printed: %q", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	c, _ := coordclient.New(coordclient.Config{URLs: []string{url}, Attempts: 50, Backoff: coordclient.Backoff{Base: 20 * time.Millisecond, Max: 200 * time.Millisecond}})
	rctx, rcancel := context.WithTimeout(ctx, 20*time.Second)
	defer rcancel()
	// The --reserve flag becomes the cell's configuration once a leader
	// commits it.
	for {
		cfg, err := c.Config(rctx)
		if err == nil && cfg.ReserveFraction == 0.3 {
			break
		}
		if rctx.Err() != nil {
			t.Fatalf("configuration from flags not committed: %v %v", cfg, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("coord stopped with %v", err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"4096": 4096, "4K": 4096, "4k": 4096, "1G": 1 << 30, "1GiB": 1 << 30, "1GB": 1 << 30, "2T": 2 << 40, "512M": 512 << 20} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("%s: %d %v, want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "-1G", "0", "1.5G", "1X", "99999999999P"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}
