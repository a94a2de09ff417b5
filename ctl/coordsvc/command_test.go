package coordsvc

import (
	"bytes"
	"context"
	"io"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"keel/ctl/coordclient"
)

// Bad flags name the problem and the fix.
func TestCoordCommandBadFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "--id is required"},
		{[]string{"--id", "c1"}, "--data-dir is required"},
		{[]string{"--id", "c 1"}, "--id"},
		{[]string{"--id", "c1", "--data-dir", "d", "--raft-addr", "0.0.0.0:7401"}, "concrete IP"},
		{[]string{"--id", "c1", "--data-dir", "d", "--raft-addr", "7401"}, "give host:port"},
		{[]string{"--id", "c1", "--data-dir", "d", "--join", "127.0.0.1:7400"}, "API URL"},
		{[]string{"--id", "c1", "--data-dir", "d", "--lease", "10s", "--heartbeat-interval", "9s"}, "at most a third"},
		{[]string{"--id", "c1", "--data-dir", "d", "--reserve", "1.5"}, "reserve_fraction"},
		{[]string{"--id", "c1", "--data-dir", "d", "--log-level", "loud"}, "--log-level"},
		{[]string{"--id", "c1", "--data-dir", "d", "--recovery-grace", "0s"}, "--recovery-grace 0s: must be between 1s and 168h0m0s; give a value in that range, or leave the flag out for the default (--recovery-grace 5m0s)"},
		{[]string{"--id", "c1", "--data-dir", "d", "--max-remirrors", "0"}, "--max-remirrors 0: must be between 1 and 10000"},
		{[]string{"--id", "c1", "--data-dir", "d", "--max-remirrors", "2", "--max-remirrors-per-node", "3"}, "--max-remirrors-per-node 3: must not exceed max_remirrors 2"},
		{[]string{"--id", "c1", "--data-dir", "d", "--max-catch-ups-per-node", "0"}, "--max-catch-ups-per-node 0"},
		{[]string{"--id", "c1", "--data-dir", "d", "--slot-retry", "1ms"}, "--slot-retry 1ms: must be between 10ms and 10m0s"},
		{[]string{"--id", "c1", "--data-dir", "d", "--slot-ttl", "2h"}, "--slot-ttl 2h0m0s"},
		{[]string{"--id", "c1", "--data-dir", "d", "--mass-failure-losses", "0"}, "--mass-failure-losses 0"},
		{[]string{"--id", "c1", "--data-dir", "d", "--mass-failure-window", "0s"}, "--mass-failure-window 0s"},
		{[]string{"--id", "c1", "--data-dir", "d", "--mass-failure-grace", "8000h"}, "--mass-failure-grace 8000h0m0s"},
		{[]string{"--id", "c1", "--data-dir", "d", "--recovery-grace", "soon"}, "want a duration"},
	} {
		cmd := CoordCommand()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs(tc.args)
		cmd.SilenceUsage, cmd.SilenceErrors = true, true
		err := cmd.ExecuteContext(context.Background())
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want an error containing %q", tc.args, err, tc.want)
		}
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
