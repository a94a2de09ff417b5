package attach

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pojntfx/go-nbd/pkg/backend"
	"github.com/pojntfx/go-nbd/pkg/protocol"
	"github.com/pojntfx/go-nbd/pkg/server"
	"golang.org/x/sys/unix"

	"keel/netpath/nbdkernel"
)

// twinKernel behaves like the kernel's NBD netlink interface where the
// supervisor depends on it: it holds its own reference to each socket it
// adopts and marks adopted sockets by setting their send timeout; a
// connection slot is dead when its socket is hung up or shut down;
// reconfigure fills dead slots and silently ignores sockets when none is
// dead. Through read it does I/O on a slot, as the kernel would.
type twinKernel struct {
	mu        sync.Mutex // guards following
	slots     []int
	index     int
	connected bool
	reconfigs int
}

var _ Kernel = (*twinKernel)(nil)

func (k *twinKernel) adopt(fd int) (int, error) {
	d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.SetsockoptTimeval(d, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 30}); err != nil {
		return -1, err
	}
	return d, nil
}

func (k *twinKernel) Connect(_ context.Context, r nbdkernel.ConnectRequest) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.connected {
		return 0, unix.EBUSY
	}
	if r.Timeout == 0 || r.DeadConnTimeout == 0 {
		return 0, errors.New("twin: the supervisor must set both timeouts")
	}
	for _, fd := range r.Sockets {
		d, err := k.adopt(fd)
		if err != nil {
			return 0, err
		}
		k.slots = append(k.slots, d)
	}
	k.index = max(r.Index, 0) + 3
	k.connected = true
	return k.index, nil
}

func (k *twinKernel) dead(slot int) bool {
	fds := []unix.PollFd{{Fd: int32(k.slots[slot]), Events: unix.POLLRDHUP}}
	if _, err := unix.Poll(fds, 0); err != nil {
		return true
	}
	return fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
}

func (k *twinKernel) Reconfigure(_ context.Context, r nbdkernel.ReconfigureRequest) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.connected || r.Index != k.index {
		return &nbdkernel.NetlinkError{Op: "twin reconfigure", Errno: unix.EINVAL}
	}
	k.reconfigs++
	for _, fd := range r.Sockets {
		slot := -1
		for i := range k.slots {
			if k.dead(i) {
				slot = i
				break
			}
		}
		if slot < 0 {
			return nil // like the kernel: -ENOSPC becomes success
		}
		d, err := k.adopt(fd)
		if err != nil {
			return err
		}
		unix.Close(k.slots[slot])
		k.slots[slot] = d
	}
	return nil
}

func (k *twinKernel) Status(_ context.Context, index int) ([]nbdkernel.DeviceStatus, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return []nbdkernel.DeviceStatus{{Index: k.index, Connected: k.connected}}, nil
}

func (k *twinKernel) disconnect() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.connected = false
	for _, fd := range k.slots {
		unix.Shutdown(fd, unix.SHUT_RDWR)
		unix.Close(fd)
	}
	k.slots = nil
}

// read sends NBD_CMD_READ on every slot and returns what each read.
func (k *twinKernel) read(t *testing.T, off uint64, n uint32) []string {
	t.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []string
	for i, fd := range k.slots {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 5}); err != nil {
			t.Fatal(err)
		}
		req := binary.BigEndian.AppendUint32(nil, protocol.TRANSMISSION_MAGIC_REQUEST)
		req = binary.BigEndian.AppendUint16(req, 0)
		req = binary.BigEndian.AppendUint16(req, protocol.TRANSMISSION_TYPE_REQUEST_READ)
		req = binary.BigEndian.AppendUint64(req, uint64(i))
		req = binary.BigEndian.AppendUint64(req, off)
		req = binary.BigEndian.AppendUint32(req, n)
		if _, err := unix.Write(fd, req); err != nil {
			t.Fatalf("slot %d: write: %v", i, err)
		}
		reply := make([]byte, 16+int(n))
		if _, err := io.ReadFull(fdReader(fd), reply); err != nil {
			t.Fatalf("slot %d: read: %v", i, err)
		}
		if binary.BigEndian.Uint32(reply[4:8]) != 0 {
			t.Fatalf("slot %d: error %d", i, binary.BigEndian.Uint32(reply[4:8]))
		}
		out = append(out, string(reply[16:]))
	}
	return out
}

// fdReader reads a descriptor without taking ownership of it (an
// *os.File would close it when collected).
type fdReader int

func (r fdReader) Read(p []byte) (int, error) {
	n, err := unix.Read(int(r), p)
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}

// nbdServer is go-nbd's server on a loopback address, which can be killed
// (listener and connections closed, like a SIGKILL) and started again on
// the same address.
type nbdServer struct {
	t    *testing.T
	addr string
	mem  *backend.MemoryBackend

	mu    sync.Mutex // guards following
	l     net.Listener
	conns []net.Conn
}

func newServer(t *testing.T, content string, size int) *nbdServer {
	mem := make([]byte, size)
	copy(mem, content)
	s := &nbdServer{t: t, mem: backend.NewMemoryBackend(mem)}
	s.start("127.0.0.1:0")
	t.Cleanup(s.kill)
	return s
}

func (s *nbdServer) start(addr string) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		s.t.Fatal(err)
	}
	s.mu.Lock()
	s.l, s.addr = l, l.Addr().String()
	s.mu.Unlock()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			go func() {
				_ = server.Handle(c, []*server.Export{{Name: "v1", Backend: s.mem}}, &server.Options{SupportsMultiConn: true})
				c.Close()
			}()
		}
	}()
}

func (s *nbdServer) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.l != nil {
		s.l.Close()
		s.l = nil
	}
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}

func (s *nbdServer) restart() { s.start(s.addr) }

// states collects OnState calls.
type states chan State

func (c states) hook(st State) {
	select {
	case c <- st:
	default:
	}
}

// wait returns the first recorded state that satisfies ok.
func (c states) wait(t *testing.T, what string, ok func(State) bool) State {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case st := <-c:
			if ok(st) {
				return st
			}
		case <-deadline:
			t.Fatalf("no state %s within 20s", what)
		}
	}
}

func phase(p Phase) func(State) bool { return func(st State) bool { return st.Phase == p } }

type mutableLocator struct {
	asked chan struct{} // a token per call, dropped when full

	mu sync.Mutex // guards following
	t  Target
	n  int
}

func (l *mutableLocator) Locate(context.Context) (Target, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n++
	select {
	case l.asked <- struct{}{}:
	default:
	}
	return l.t, nil
}

func (l *mutableLocator) calls() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

func (l *mutableLocator) set(t Target) {
	l.mu.Lock()
	l.t = t
	l.mu.Unlock()
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func runSupervisor(t *testing.T, sup *Supervisor) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); sup.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

// The server dies (like keel under SIGKILL) and comes back on the same
// address: every connection is repaired with a reconfigure and the data
// path works again.
func TestReconnectSameServer(t *testing.T) {
	srv := newServer(t, "hello keel", 1<<20)
	k := &twinKernel{}
	dir := t.TempDir()
	ch := make(states, 256)
	sup, err := Attach(context.Background(), Config{
		Device: 0, Connections: 3, Timeout: 30 * time.Second,
		Locator: StaticLocator{Addr: srv.addr, Export: "v1"},
		Backend: "keel:test", StateDir: dir, Kernel: k, Poll: 20 * time.Millisecond,
		Logger: testLogger(t), OnState: ch.hook,
	})
	if err != nil {
		t.Fatal(err)
	}
	if sup.Device() != "/dev/nbd3" {
		t.Fatalf("device %s", sup.Device())
	}
	for _, got := range k.read(t, 0, 10) {
		if got != "hello keel" {
			t.Fatalf("read %q", got)
		}
	}
	st, err := readState(dir, 3)
	if err != nil || st.Phase != PhaseConnected || st.Connections != 3 || st.Addr != srv.addr || st.Size != 1<<20 || st.BlockSize != 4096 {
		t.Fatalf("state %+v, %v", st, err)
	}
	runSupervisor(t, sup)

	srv.kill()
	ch.wait(t, "reconnecting", phase(PhaseReconnecting))
	srv.restart()
	ch.wait(t, "connected", phase(PhaseConnected))
	for _, got := range k.read(t, 0, 10) {
		if got != "hello keel" {
			t.Fatalf("after reconnect read %q", got)
		}
	}
	if st, _ := readState(dir, 3); st.Phase != PhaseConnected || st.Live != 3 {
		t.Fatalf("state after reconnect %+v", st)
	}
}

// The coordinator names a new primary while the old one still answers:
// the supervisor leaves the old server and moves every connection.
func TestFailoverToNewPrimary(t *testing.T) {
	a := newServer(t, "node A....", 1<<20)
	b := newServer(t, "node B....", 1<<20)
	loc := &mutableLocator{asked: make(chan struct{}, 1), t: Target{Addr: a.addr, Export: "v1", Node: "node-a", Epoch: 4}}
	k := &twinKernel{}
	ch := make(states, 256)
	sup, err := Attach(context.Background(), Config{
		Device: -1, Connections: 2, Timeout: 30 * time.Second, Locator: loc, CheckInterval: 20 * time.Millisecond,
		Backend: "keel:vol/v1", Kernel: k, Poll: 20 * time.Millisecond, Logger: testLogger(t), OnState: ch.hook,
	})
	if err != nil {
		t.Fatal(err)
	}
	runSupervisor(t, sup)

	// Same node, new epoch (say the in-sync set changed): no reconnect.
	loc.set(Target{Addr: a.addr, Export: "v1", Node: "node-a", Epoch: 5})
	ch.wait(t, "epoch 5", func(st State) bool { return st.Epoch == 5 })
	k.mu.Lock()
	if k.reconfigs != 0 {
		t.Fatalf("%d reconfigures for an epoch change on the same primary", k.reconfigs)
	}
	k.mu.Unlock()

	loc.set(Target{Addr: b.addr, Export: "v1", Node: "node-b", Epoch: 6})
	st := ch.wait(t, "connected to node-b", func(st State) bool { return st.Node == "node-b" && st.Phase == PhaseConnected && st.Live == 2 })
	if st.Epoch != 6 || st.Addr != b.addr {
		t.Fatalf("state %+v", st)
	}
	for _, got := range k.read(t, 0, 10) {
		if got != "node B...." {
			t.Fatalf("after failover read %q", got)
		}
	}
	// An older epoch from a lagging coordinator member is ignored.
	loc.set(Target{Addr: a.addr, Export: "v1", Node: "node-a", Epoch: 5})
	asked := loc.calls()
	for loc.calls() < asked+3 {
		<-loc.asked
	}
	for _, got := range k.read(t, 0, 10) {
		if got != "node B...." {
			t.Fatalf("went back to node A on an older epoch: read %q", got)
		}
	}
}

// No server for longer than the timeout: the state says failed and why;
// when the server returns, the device is repaired.
func TestNoServerWithinTimeout(t *testing.T) {
	srv := newServer(t, "x", 1<<20)
	k := &twinKernel{}
	dir := t.TempDir()
	ch := make(states, 1024)
	sup, err := Attach(context.Background(), Config{
		Device: 1, Timeout: time.Second, Locator: StaticLocator{Addr: srv.addr, Export: "v1"},
		Kernel: k, StateDir: dir, Poll: 20 * time.Millisecond, Logger: testLogger(t), OnState: ch.hook,
	})
	if err != nil {
		t.Fatal(err)
	}
	runSupervisor(t, sup)
	srv.kill()
	st := ch.wait(t, "failed", phase(PhaseFailed))
	if !strings.Contains(st.Why, "fails I/O") || !strings.Contains(st.Why, "connection refused") {
		t.Fatalf("why %q", st.Why)
	}
	if onDisk, err := readState(dir, 4); err != nil || onDisk.Phase != PhaseFailed {
		t.Fatalf("state file %+v, %v", onDisk, err)
	}
	srv.restart()
	ch.wait(t, "connected", phase(PhaseConnected))
}

// A server that comes back with another size is not reconnected to.
func TestRefuseDifferentSize(t *testing.T) {
	srv := newServer(t, "x", 1<<20)
	k := &twinKernel{}
	ch := make(states, 1024)
	sup, err := Attach(context.Background(), Config{
		Device: 0, Locator: StaticLocator{Addr: srv.addr, Export: "v1"}, Kernel: k,
		Poll: 20 * time.Millisecond, Logger: testLogger(t), OnState: ch.hook,
	})
	if err != nil {
		t.Fatal(err)
	}
	runSupervisor(t, sup)
	srv.kill()
	other := newServer(t, "y", 2<<20)
	other.kill()
	other.addr = srv.addr
	other.restart()
	st := ch.wait(t, "refusal", func(st State) bool { return strings.Contains(st.Why, "refusing to reconnect") })
	if st.Phase != PhaseReconnecting {
		t.Fatalf("state %+v", st)
	}
}

// The device is disconnected under the supervisor: it stops.
func TestDeviceDisconnectedUnderSupervisor(t *testing.T) {
	srv := newServer(t, "x", 1<<20)
	k := &twinKernel{}
	ch := make(states, 256)
	sup, err := Attach(context.Background(), Config{
		Device: 0, Locator: StaticLocator{Addr: srv.addr, Export: "v1"}, Kernel: k,
		Poll: 20 * time.Millisecond, Logger: testLogger(t), OnState: ch.hook,
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); sup.Run(context.Background()) }()
	k.disconnect()
	srv.kill() // the kernel's disconnect hangs up; so does the server side here
	srv.restart()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the supervisor did not notice the disconnect")
	}
	if st := sup.State(); st.Phase != PhaseUnsupervised || !strings.Contains(st.Why, "disconnected") {
		t.Fatalf("state %+v", st)
	}
}

func TestAttachUnknownExport(t *testing.T) {
	srv := newServer(t, "x", 1<<20)
	k := &twinKernel{}
	_, err := Attach(context.Background(), Config{Device: 0, Timeout: time.Second, Locator: StaticLocator{Addr: srv.addr, Export: "nope"}, Kernel: k})
	if err == nil || !strings.Contains(err.Error(), "NBD_REP_ERR_UNKNOWN") {
		t.Fatalf("attached an unknown export, or said something vague: %v", err)
	}
	if k.connected {
		t.Fatal("the kernel was configured although the handshake failed")
	}
}

// A volume that is not served yet (just created, or mid-failover): attach
// waits for it within the timeout.
func TestAttachWaitsForServer(t *testing.T) {
	srv := newServer(t, "late", 1<<20)
	srv.kill()
	k := &twinKernel{}
	done := make(chan error, 1)
	loc := StaticLocator{Addr: srv.addr, Export: "v1"}
	go func() {
		_, err := Attach(context.Background(), Config{Device: 0, Timeout: 20 * time.Second, Locator: loc, Kernel: k, Logger: testLogger(t)})
		done <- err
	}()
	srv.restart()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := k.read(t, 0, 4); got[0] != "late" {
		t.Fatalf("read %q", got)
	}
}

func TestConfigValidation(t *testing.T) {
	for name, c := range map[string]Config{
		"timeout below 1s": {Timeout: time.Millisecond, Locator: StaticLocator{}, Kernel: &twinKernel{}},
		"too many conns":   {Connections: 65, Locator: StaticLocator{}, Kernel: &twinKernel{}},
		"negative conns":   {Connections: -1, Locator: StaticLocator{}, Kernel: &twinKernel{}},
		"no kernel":        {Locator: StaticLocator{}},
		"no locator":       {Kernel: &twinKernel{}},
	} {
		if _, err := Attach(context.Background(), c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestStateFiles(t *testing.T) {
	dir := t.TempDir()
	for _, i := range []int{2, 0, 11} {
		if err := writeState(dir, State{Index: i, Device: fmt.Sprintf("/dev/nbd%d", i), Phase: PhaseConnected}); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(dir+"/nbd5.json", []byte("{not json"), 0o644)
	os.WriteFile(dir+"/attach.log", []byte("log"), 0o644)
	sts, errs := readStates(dir)
	if len(sts) != 3 || sts[0].Index != 0 || sts[1].Index != 2 || sts[2].Index != 11 {
		t.Fatalf("states %+v", sts)
	}
	if len(errs) != 1 {
		t.Fatalf("errors %v: want the broken nbd5.json reported", errs)
	}
	if err := removeState(dir, 2); err != nil {
		t.Fatal(err)
	}
	if err := removeState(dir, 2); err != nil {
		t.Fatalf("removing a missing state: %v", err)
	}
	if sts, _ := readStates(t.TempDir() + "/missing"); sts != nil {
		t.Fatal("states from a missing directory")
	}
}
