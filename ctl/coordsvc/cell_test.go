package coordsvc

import (
	"fmt"
	"testing"
	"time"

	"keel/ctl/coordapi"
)

// TestCellSurvivesLeaderLossAndCatchesUp: a three-member cell over real
// raft on loopback. Killing the leader leaves a cell that still answers,
// writes included, through a follower; the killed member restarted from
// its data directory catches up on what it missed.
func TestCellSurvivesLeaderLossAndCatchesUp(t *testing.T) {
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	s1 := member(t, "c1", dirs[0], "127.0.0.1:0", "127.0.0.1:0", nil, nil)
	s2 := member(t, "c2", dirs[1], "127.0.0.1:0", "127.0.0.1:0", []string{s1.APIURL()}, nil)
	s3 := member(t, "c3", dirs[2], "127.0.0.1:0", "127.0.0.1:0", []string{s1.APIURL()}, nil)
	servers := []*Server{s1, s2, s3}
	t.Cleanup(func() {
		for _, s := range servers {
			s.Close()
		}
	})
	eventually(t, "three voters, one leader, every API address known", 20*time.Second, func() error {
		for _, s := range servers {
			st, err := s.CellStatus()
			if err != nil {
				return err
			}
			if len(st.Members) != 3 || st.Leader == "" {
				return fmt.Errorf("%s sees %d members, leader %q", s.ID(), len(st.Members), st.Leader)
			}
			for _, m := range st.Members {
				if m.APIURL == "" {
					return fmt.Errorf("%s: no API URL for %s yet", s.ID(), m.ID)
				}
			}
		}
		return nil
	})

	urls := []string{s1.APIURL(), s2.APIURL(), s3.APIURL()}
	c := client(t, urls...)
	ctx := ctxT(t, time.Minute)
	for i, z := range []string{"a", "b", "c"} {
		if _, err := c.Register(ctx, reg(fmt.Sprintf("n%d", i+1), z)); err != nil {
			t.Fatalf("register: %v", err)
		}
	}
	if _, err := c.CreateVolume(ctx, coordapi.CreateVolumeRequest{Name: "before", Size: 1 << 30, Replicas: 3}); err != nil {
		t.Fatalf("create: %v", err)
	}

	// Kill the leader.
	var leader *Server
	eventually(t, "a ready leader", 10*time.Second, func() error {
		for _, s := range servers {
			if s.IsLeader() {
				leader = s
				return nil
			}
		}
		return fmt.Errorf("none yet")
	})
	killedID, killedDir, killedAPI, killedRaft := leader.ID(), dirs[indexOf(servers, leader)], leader.ln.Addr().String(), leader.RaftAddr()
	if err := leader.Close(); err != nil {
		t.Logf("closing the leader: %v", err)
	}
	var rest []*Server
	for _, s := range servers {
		if s != leader {
			rest = append(rest, s)
		}
	}
	eventually(t, "a new leader among the survivors", 20*time.Second, func() error {
		for _, s := range rest {
			if s.IsLeader() {
				return nil
			}
		}
		return fmt.Errorf("no leader yet")
	})
	// Write through a follower: it forwards to the new leader.
	var follower *Server
	for _, s := range rest {
		if !s.IsLeader() {
			follower = s
		}
	}
	if follower == nil {
		t.Fatal("no follower among the survivors")
	}
	fc := client(t, follower.APIURL())
	v, err := fc.CreateVolume(ctx, coordapi.CreateVolumeRequest{Name: "after", Size: 1 << 30, Replicas: 2})
	if err != nil {
		t.Fatalf("create through follower %s: %v", follower.ID(), err)
	}
	if _, err := fc.Heartbeat(ctx, coordapi.HeartbeatRequest{Node: "n1", Capacity: 1 << 40, Free: 1 << 40}); err != nil {
		t.Fatalf("heartbeat through follower: %v", err)
	}
	if got := follower.metrics; got == nil {
		t.Fatal("no metrics")
	}

	// Restart the killed member from its data directory, same addresses,
	// no --join: it catches up and serves the volume created without it.
	restarted := member(t, killedID, killedDir, killedAPI, killedRaft, nil, nil)
	servers = append(rest, restarted)
	rc := client(t, restarted.APIURL())
	eventually(t, "the restarted member sees the volume created while it was down", 20*time.Second, func() error {
		got, err := rc.Volume(ctx, "after")
		if err != nil {
			return err
		}
		if got.ID != v.ID {
			return fmt.Errorf("volume %s, want %s", got.ID, v.ID)
		}
		return nil
	})
	vols, err := rc.Volumes(ctx, false)
	if err != nil || len(vols) != 2 {
		t.Fatalf("restarted member lists %d volumes (%v)", len(vols), err)
	}
}

func indexOf(ss []*Server, s *Server) int {
	for i, x := range ss {
		if x == s {
			return i
		}
	}
	return -1
}
