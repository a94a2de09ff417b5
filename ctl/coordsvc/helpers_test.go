package coordsvc

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
)

// testRaft shortens raft's timers so elections take a fraction of a
// second; still generous for two contended cores under -race.
var testRaft = RaftTiming{
	HeartbeatTimeout:   400 * time.Millisecond,
	ElectionTimeout:    400 * time.Millisecond,
	LeaderLeaseTimeout: 200 * time.Millisecond,
	CommitTimeout:      10 * time.Millisecond,
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("KEEL_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// member starts one member with test timings; listen and raftAddr may be
// 127.0.0.1:0.
func member(t testing.TB, id, dir, listen, raftAddr string, join []string, mod func(*Config)) *Server {
	t.Helper()
	cfg := Config{
		ID: id, DataDir: dir, Listen: listen, RaftAddr: raftAddr, Join: join,
		Raft: testRaft, TickInterval: 50 * time.Millisecond, Logger: testLogger(t),
	}
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("starting member %s: %v", id, err)
	}
	return s
}

// eventually polls cond until it holds or the deadline passes. Raft runs
// on real timers and sockets here, so polling with a deadline is the
// honest way to wait for an election or a catch-up.
func eventually(t testing.TB, what string, within time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	var err error
	for {
		if err = cond(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, within, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func client(t testing.TB, urls ...string) *coordclient.Client {
	t.Helper()
	c, err := coordclient.New(coordclient.Config{URLs: urls, AttemptTimeout: 5 * time.Second, Attempts: 10,
		Backoff: coordclient.Backoff{Base: 50 * time.Millisecond, Max: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func reg(id string, zone string) coordapi.RegisterRequest {
	return coordapi.RegisterRequest{Node: coordapi.NodeID(id), Zone: zone, PrimaryAddr: "127.0.0.1:10809", ReplAddr: "127.0.0.1:10810", Capacity: 1 << 40, Free: 1 << 40}
}

type errString string

func (e errString) Error() string { return string(e) }

func errf(parts ...string) error { return errString(strings.Join(parts, " ")) }

// volumeOn registers the nodes named (each its own zone) and creates the
// 1 GiB volume "v" with 2 replicas.
func volumeOn(t testing.TB, ctx context.Context, c *coordclient.Client, nodes ...string) *coordapi.Volume {
	t.Helper()
	for _, n := range nodes {
		if _, err := c.Register(ctx, reg(n, n)); err != nil {
			t.Fatal(err)
		}
	}
	v, err := c.CreateVolume(ctx, coordapi.CreateVolumeRequest{Name: "v", Size: 1 << 30, Replicas: 2})
	if err != nil {
		t.Fatal(err)
	}
	return v
}
