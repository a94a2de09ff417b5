package nbdkernel

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/pojntfx/go-nbd/pkg/backend"
	"github.com/pojntfx/go-nbd/pkg/server"
)

// listenGoNBD serves a 1 MiB go-nbd export named "disk" on l until the
// test ends; each accepted connection is sent on conns so the test can cut
// it.
func listenGoNBD(t *testing.T, l net.Listener) <-chan net.Conn {
	t.Helper()
	conns := make(chan net.Conn, 16)
	mem := backend.NewMemoryBackend(make([]byte, 1<<20))
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns <- c
			go func() {
				_ = server.Handle(c, []*server.Export{{Name: "disk", Backend: mem}}, &server.Options{SupportsMultiConn: true})
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return conns
}

func TestDialTCPAndWatch(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns := listenGoNBD(t, l)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Dial(ctx, l.Addr().String(), "disk", DialOptions{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Export.Size != 1<<20 || s.Export.Flags&FlagCanMultiConn == 0 {
		t.Fatalf("export %+v", s.Export)
	}
	if b, err := s.Broken(); err != nil || b {
		t.Fatalf("fresh connection broken=%v err=%v", b, err)
	}
	if a, err := s.Adopted(); err != nil || a {
		t.Fatalf("adopted=%v err=%v before any kernel took it", a, err)
	}
	// The server hangs up: Broken must say so once the FIN arrives.
	(<-conns).Close()
	b, err := Broken([]*Socket{s}, 5*time.Second)
	if err != nil || !b[0] {
		t.Fatalf("after the server hung up: broken=%v err=%v", b, err)
	}
}

func TestDialUnixShutdown(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	listenGoNBD(t, l)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, addr := range []string{"unix:" + path, path} {
		s, err := Dial(ctx, addr, "disk", DialOptions{})
		if err != nil {
			t.Fatalf("%s: %v", addr, err)
		}
		if b, _ := s.Broken(); b {
			t.Fatalf("%s: broken before shutdown", addr)
		}
		if err := s.Shutdown(); err != nil {
			t.Fatal(err)
		}
		if b, _ := s.Broken(); !b {
			t.Fatalf("%s: not broken after shutdown", addr)
		}
		s.Close()
		if b, _ := Broken([]*Socket{s, nil}, 0); !b[0] || !b[1] {
			t.Fatalf("closed and nil sockets must count as broken: %v", b)
		}
	}
}

func TestDialUnknownExport(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listenGoNBD(t, l)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := Dial(ctx, l.Addr().String(), "other", DialOptions{}); err == nil {
		t.Fatal("unknown export accepted")
	}
}
