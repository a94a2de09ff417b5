//go:build linux

package repl_test

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"keel/netpath/repl"
)

// TestStreamSocketsHaveUserTimeout: every replication socket gets
// TCP_USER_TIMEOUT, whatever dialer or listener made it, so that a cut link
// resets the connection instead of stalling it.
func TestStreamSocketsHaveUserTimeout(t *testing.T) {
	app := newMemApplier()
	app.addVolume(1, 4096, 1)
	r := startReplica(t, 2, app, repl.ServerConfig{WriteTimeout: 1500 * time.Millisecond})
	var mu sync.Mutex
	var dialed []net.Conn
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			mu.Lock()
			dialed = append(dialed, c)
			mu.Unlock()
		}
		return c, err
	}
	newPeer(t, 1, r, repl.PeerConfig{FrameTimeout: 2500 * time.Millisecond, Dial: dial})
	mu.Lock()
	for _, c := range dialed {
		if ut := userTimeout(t, c); ut != 2500 {
			t.Fatalf("primary socket TCP_USER_TIMEOUT %d ms, want 2500", ut)
		}
	}
	mu.Unlock()
	r.l.mu.Lock()
	conns := append([]net.Conn(nil), r.l.conns...)
	r.l.mu.Unlock()
	if len(conns) == 0 || len(dialed) == 0 {
		t.Fatal("no stream")
	}
	for _, c := range conns {
		if ut := userTimeout(t, c); ut != 1500 {
			t.Fatalf("replica socket TCP_USER_TIMEOUT %d ms, want 1500", ut)
		}
	}
}

func userTimeout(t *testing.T, c net.Conn) int {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ut int
	var gerr error
	if err := rc.Control(func(fd uintptr) { ut, gerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return ut
}
