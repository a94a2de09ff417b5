//go:build linux

package sock

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

func boundDevice(t *testing.T, rc interface{ Control(func(uintptr)) error }) string {
	t.Helper()
	var dev string
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		dev, gerr = unix.GetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE)
	}); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatalf("getsockopt SO_BINDTODEVICE: %v", gerr)
	}
	return strings.TrimRight(dev, "\x00")
}

func getInt(t *testing.T, rc interface{ Control(func(uintptr)) error }, level, opt int) int {
	t.Helper()
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatalf("getsockopt %d/%d: %v", level, opt, gerr)
	}
	return v
}

// TestPinLoopback pins a listener and a dialer of the replication path to
// "lo", with a source address and a user timeout, and passes bytes.
func TestPinLoopback(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	cfg := Config{Class: Replication, Iface: "lo", Source: "127.0.0.1", UserTimeout: 1500 * time.Millisecond, Metrics: m}
	ctx := context.Background()
	l, st, err := Listen(ctx, cfg, "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer l.Close()
	if !st.Pinned || st.Err != nil {
		t.Fatalf("listener status %+v, want pinned", st)
	}
	lrc, err := l.(*listener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if dev := boundDevice(t, lrc); dev != "lo" {
		t.Fatalf("listener bound to %q, want lo", dev)
	}

	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			t.Errorf("Accept: %v", err)
			close(accepted)
			return
		}
		accepted <- c
	}()
	d, err := NewDialer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c, dst, err := d.Dial(ctx, l.Addr().String())
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer c.Close()
	if !dst.Pinned {
		t.Fatalf("dial status %+v, want pinned", dst)
	}
	rc, _ := c.SyscallConn()
	if dev := boundDevice(t, rc); dev != "lo" {
		t.Fatalf("dialed socket bound to %q, want lo", dev)
	}
	if ut := getInt(t, rc, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT); ut != 1500 {
		t.Fatalf("dialed TCP_USER_TIMEOUT %d ms, want 1500", ut)
	}
	if nd := getInt(t, rc, unix.IPPROTO_TCP, unix.TCP_NODELAY); nd == 0 {
		t.Fatal("dialed socket without TCP_NODELAY")
	}
	if la := c.LocalAddr().(*net.TCPAddr); !la.IP.Equal(net.IPv4(127, 0, 0, 1)) {
		t.Fatalf("local address %v, want 127.0.0.1", la)
	}
	s, ok := <-accepted
	if !ok {
		t.FailNow()
	}
	defer s.Close()
	src, _ := s.(*net.TCPConn).SyscallConn()
	if ut := getInt(t, src, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT); ut != 1500 {
		t.Fatalf("accepted TCP_USER_TIMEOUT %d ms, want 1500", ut)
	}
	if dev := boundDevice(t, src); dev != "lo" {
		t.Fatalf("accepted socket bound to %q, want lo", dev)
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if v := metricValue(t, reg, "keel_netpath_pinned", "replication"); v != 1 {
		t.Fatalf("pinned gauge %v, want 1", v)
	}
}

func TestPinNoSuchInterface(t *testing.T) {
	cfg := Config{Class: Replication, Iface: "keelnosuch0"}
	_, _, err := Listen(context.Background(), cfg, "127.0.0.1:0")
	if err == nil {
		t.Fatal("Listen pinned to a missing interface succeeded")
	}
	var pe *PinError
	if !errors.As(err, &pe) || pe.Iface != "keelnosuch0" || !errors.Is(err, unix.ENODEV) {
		t.Fatalf("Listen error %v (%T): want a PinError for keelnosuch0 wrapping ENODEV", err, err)
	}
	if !strings.Contains(err.Error(), `"keelnosuch0"`) {
		t.Fatalf("error %q does not name the interface", err)
	}
	d, err := NewDialer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = d.Dial(context.Background(), "127.0.0.1:9")
	if !errors.As(err, &pe) || !errors.Is(err, unix.ENODEV) {
		t.Fatalf("Dial error %v: want a PinError wrapping ENODEV", err)
	}
}

// TestUnprivilegedStartsUnpinned stands in for a process without the
// privilege to pin: the socket still works, Status and the metric say it is
// not pinned.
func TestUnprivilegedStartsUnpinned(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	cfg := Config{Class: Primary, Iface: "lo", Metrics: m,
		pin: func(int, string) error { return unix.EPERM }}
	l, st, err := Listen(context.Background(), cfg, "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer l.Close()
	if st.Pinned || !errors.Is(st.Err, unix.EPERM) {
		t.Fatalf("status %+v, want unpinned with EPERM", st)
	}
	d, _ := NewDialer(cfg)
	c, dst, err := d.Dial(context.Background(), l.Addr().String())
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	c.Close()
	if dst.Pinned || !errors.Is(dst.Err, unix.EPERM) {
		t.Fatalf("dial status %+v", dst)
	}
	if v := metricValue(t, reg, "keel_netpath_unpinned_sockets_total", "primary"); v != 2 {
		t.Fatalf("unpinned counter %v, want 2", v)
	}
	if v := metricValue(t, reg, "keel_netpath_pinned", "primary"); v != 0 {
		t.Fatalf("pinned gauge %v, want 0", v)
	}
}

func TestSetUserTimeout(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := SetUserTimeout(c, 2500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	rc, _ := c.(*net.TCPConn).SyscallConn()
	if ut := getInt(t, rc, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT); ut != 2500 {
		t.Fatalf("TCP_USER_TIMEOUT %d ms, want 2500", ut)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if err := SetUserTimeout(a, time.Second); err == nil {
		t.Fatal("SetUserTimeout on a pipe succeeded")
	}
}

func TestNoIfaceIsUnpinnedWithoutError(t *testing.T) {
	l, st, err := Listen(context.Background(), Config{Class: Primary}, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if st.Pinned || st.Err != nil {
		t.Fatalf("status %+v", st)
	}
}

func TestDialerChecks(t *testing.T) {
	if _, err := NewDialer(Config{Class: Replication, Source: "not-an-ip"}); err == nil || !strings.Contains(err.Error(), "not-an-ip") {
		t.Fatalf("bad source: %v", err)
	}
	d, _ := NewDialer(Config{Class: Replication})
	if _, err := d.DialContext(context.Background(), "udp", "127.0.0.1:1"); err == nil {
		t.Fatal("udp dial accepted")
	}
}

// metricValue reads the gauge or counter name{class=class} from reg.
func metricValue(t *testing.T, reg *prometheus.Registry, name, class string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "class" && lp.GetValue() == class {
					if g := m.GetGauge(); g != nil {
						return g.GetValue()
					}
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("metric %s{class=%q} not found", name, class)
	return 0
}
