package nbdkernel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pojntfx/go-nbd/pkg/backend"
	"github.com/pojntfx/go-nbd/pkg/server"
	"golang.org/x/sys/unix"

	"keel/datapath/iobuf"
)

// These tests drive the real kernel NBD client. They need root and the nbd
// module, which the build machines lack: they skip there and run inside
// the qemu guest of scripts/kernel-test (which runs this test binary).

func kernelOrSkip(t *testing.T) *Netlink {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := OpenNetlink(ctx)
	if errors.Is(err, ErrNoNetlink) {
		t.Skip("no kernel NBD netlink interface here (run inside scripts/kernel-test)")
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// goNBDListener serves a go-nbd memory export "disk" of size bytes; kill
// closes every connection (the listener stays).
type goNBDListener struct {
	l     net.Listener
	conns chan net.Conn
}

func serveKernel(t *testing.T, size int) *goNBDListener {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &goNBDListener{l: l, conns: make(chan net.Conn, 64)}
	mem := backend.NewMemoryBackend(make([]byte, size))
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.conns <- c
			go func() {
				_ = server.Handle(c, []*server.Export{{Name: "disk", Backend: mem}}, &server.Options{SupportsMultiConn: true})
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return s
}

func (s *goNBDListener) kill() {
	for {
		select {
		case c := <-s.conns:
			c.Close()
		default:
			return
		}
	}
}

func sysInt(t *testing.T, index int, file string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/%s", index, file))
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// directIO writes a block with O_DIRECT at off and reads it back.
func directIO(t *testing.T, index int, off int64, fill byte) {
	t.Helper()
	f, err := os.OpenFile(fmt.Sprintf("/dev/nbd%d", index), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := iobuf.Get(4096)
	defer w.Release()
	copy(w.Bytes(), bytes.Repeat([]byte{fill}, 4096))
	if _, err := f.WriteAt(w.Bytes(), off); err != nil {
		t.Fatalf("O_DIRECT write at %d: %v", off, err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync: %v", err)
	}
	r := iobuf.Get(4096)
	defer r.Release()
	if _, err := f.ReadAt(r.Bytes(), off); err != nil {
		t.Fatalf("O_DIRECT read at %d: %v", off, err)
	}
	if !bytes.Equal(r.Bytes(), w.Bytes()) {
		t.Fatalf("read back at %d differs", off)
	}
}

func dialN(t *testing.T, s *goNBDListener, n int) []*Socket {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out []*Socket
	for range n {
		sock, err := Dial(ctx, s.l.Addr().String(), "disk", DialOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sock.Close() })
		out = append(out, sock)
	}
	return out
}

func fds(socks []*Socket) []int {
	var out []int
	for _, s := range socks {
		out = append(out, s.Fd())
	}
	return out
}

// TestKernelLifecycle: connect with two sockets, I/O, the server drops
// both connections (link-dead notifications, broken sockets), reconfigure
// with new sockets (adopted; a surplus one is not), I/O again, disconnect.
func TestKernelLifecycle(t *testing.T) {
	n := kernelOrSkip(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	srv := serveKernel(t, 16<<20)
	mon, err := OpenMonitor(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()

	socks := dialN(t, srv, 2)
	e := socks[0].Export
	bs, err := e.KernelBlockSize()
	if err != nil {
		t.Fatal(err)
	}
	index, err := n.Connect(ctx, ConnectRequest{
		Index: -1, Size: e.Size, BlockSize: bs, Timeout: 5 * time.Second, DeadConnTimeout: 10 * time.Second,
		ServerFlags: e.Flags, Sockets: fds(socks), Backend: "keel-test",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("connected /dev/nbd%d", index)
	defer n.Disconnect(context.Background(), index)
	if got := sysInt(t, index, "size") * 512; got != 16<<20 {
		t.Fatalf("size %d", got)
	}
	if got := sysInt(t, index, "queue/logical_block_size"); got != int64(bs) {
		t.Fatalf("logical block size %d, want %d", got, bs)
	}
	if b, _ := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/backend", index)); strings.TrimSpace(string(b)) != "keel-test" {
		t.Fatalf("backend %q", b)
	}
	st, err := n.Status(ctx, index)
	if err != nil || len(st) != 1 || st[0].Index != index || !st[0].Connected {
		t.Fatalf("status %+v, %v", st, err)
	}
	all, err := n.Status(ctx, -1)
	if err != nil || len(all) < 2 {
		t.Fatalf("status of all devices %+v, %v", all, err)
	}
	for _, s := range socks {
		if a, err := s.Adopted(); err != nil || !a {
			t.Fatalf("a socket of the connect is not adopted: %v %v", a, err)
		}
	}
	directIO(t, index, 8192, 0xa5)

	srv.kill()
	dead := 0
	for dead < 2 {
		idx, err := mon.Next(ctx)
		if err != nil {
			t.Fatalf("link-dead notifications: %v (have %d)", err, dead)
		}
		for _, i := range idx {
			if i == index {
				dead++
			}
		}
	}
	b, err := Broken(socks, 5*time.Second)
	if err != nil || !b[0] || !b[1] {
		t.Fatalf("after the server hung up: broken %v, %v", b, err)
	}

	// A reconfigure with a wrong backend identifier is refused.
	fresh := dialN(t, srv, 3)
	if err := n.Reconfigure(ctx, ReconfigureRequest{Index: index, Sockets: fds(fresh[:1]), Backend: "other"}); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("reconfigure with another backend: %v, want EINVAL", err)
	}
	for i, s := range fresh {
		if err := n.Reconfigure(ctx, ReconfigureRequest{Index: index, Sockets: []int{s.Fd()}, Backend: "keel-test"}); err != nil {
			t.Fatalf("reconfigure %d: %v", i, err)
		}
		a, err := s.Adopted()
		if err != nil {
			t.Fatal(err)
		}
		if want := i < 2; a != want {
			t.Fatalf("socket %d adopted %v, want %v (two dead slots)", i, a, want)
		}
	}
	directIO(t, index, 4096*100, 0x5a)

	if err := n.Disconnect(ctx, index); err != nil {
		t.Fatal(err)
	}
	st, err = n.Status(ctx, index)
	if err != nil || len(st) != 1 || st[0].Connected {
		t.Fatalf("status after disconnect %+v, %v", st, err)
	}
	if got := sysInt(t, index, "size"); got != 0 {
		t.Fatalf("size after disconnect %d", got)
	}
}

// TestKernelDeadConnTimeout: with no connection back within the
// dead-connection timeout, I/O fails with an error instead of hanging.
func TestKernelDeadConnTimeout(t *testing.T) {
	n := kernelOrSkip(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	srv := serveKernel(t, 4<<20)
	socks := dialN(t, srv, 1)
	e := socks[0].Export
	index, err := n.Connect(ctx, ConnectRequest{Index: -1, Size: e.Size, BlockSize: 4096, Timeout: 2 * time.Second, DeadConnTimeout: 2 * time.Second, ServerFlags: e.Flags, Sockets: fds(socks)})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Disconnect(context.Background(), index)
	srv.kill()
	if b, err := Broken(socks, 5*time.Second); err != nil || !b[0] {
		t.Fatalf("broken %v, %v", b, err)
	}
	// Opening the device rescans its partitions: that read already waits
	// for the dead-connection timeout and fails; either way our read
	// must fail, not hang (the test's own timeout bounds it).
	start := time.Now()
	f, err := os.OpenFile(fmt.Sprintf("/dev/nbd%d", index), os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Logf("open failed after %v: %v", time.Since(start).Round(time.Millisecond), err)
		return
	}
	defer f.Close()
	r := iobuf.Get(4096)
	defer r.Release()
	_, err = f.ReadAt(r.Bytes(), 0)
	if err == nil {
		t.Fatal("a read with every connection dead succeeded")
	}
	t.Logf("I/O failed %v after the connection died: %v", time.Since(start).Round(time.Millisecond), err)
}
