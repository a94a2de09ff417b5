// Package sock owns the sockets of keel's two network paths: listeners and
// dialers for the primary network (NBD clients, coordinator API,
// heartbeats) and the replication network (replication, re-mirror,
// snapshot shards).
//
// Each socket of a path is pinned to the path's interface with
// SO_BINDTODEVICE in the net.ListenConfig/net.Dialer Control hook, that is
// before bind and connect, never after: a socket pinned late could already
// have sent its SYN out of the wrong interface. A dialer also binds the
// path's source address. Pinning keeps a path's traffic on its link even
// when routing would choose the other one, so a degraded replication link
// can never spill onto the primary network or the reverse (the 2011 EBS
// trigger).
//
// Where the process may not pin (SO_BINDTODEVICE answers EPERM or EACCES),
// the socket is created unpinned and usable, the returned Status says so
// with the reason, a warning is logged and keel_netpath_unpinned_sockets_total
// counts it, so that a node still starts. Any other pinning error (ENODEV:
// no such interface) fails the listen or dial with a *PinError naming the
// interface.
//
// Every TCP socket of a path gets TCP_NODELAY, the path's TCP_USER_TIMEOUT
// (how long sent data may stay unacknowledged before the kernel resets the
// connection: a cut link otherwise stalls a stream without an error) and its
// keepalive settings. Accepted connections get the same.
//
// Byte and frame counters per path are kept by the protocols that own the
// frames (netpath/repl per peer, netpath/nbd per export): wrapping a
// *net.TCPConn here would hide the vectored-write and raw-socket paths that
// zero-copy needs. This package counts pinning outcomes and socket errors.
package sock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Class is a traffic class: which network a socket belongs to.
type Class uint8

const (
	// Primary is the primary network: NBD clients, coordinator API, heartbeats.
	Primary Class = 1
	// Replication is the replication network: replication, re-mirror, snapshots.
	Replication Class = 2
)

func (c Class) String() string {
	switch c {
	case Primary:
		return "primary"
	case Replication:
		return "replication"
	}
	return fmt.Sprintf("Class(%d)", uint8(c))
}

// Config describes one path.
type Config struct {
	Class Class
	// Iface is the interface every socket of the path is pinned to; ""
	// leaves sockets unpinned on purpose (Status.Pinned false, Err nil).
	Iface string
	// Source is the local IP address a Dialer binds ("" lets the kernel
	// choose). A listener binds the address it is given.
	Source string
	// UserTimeout is TCP_USER_TIMEOUT: how long transmitted data may remain
	// unacknowledged before the kernel drops the connection. 0 keeps the
	// kernel default (about 15 minutes of retransmissions).
	UserTimeout time.Duration
	// KeepAlive configures TCP keepalive probes; the zero value keeps Go's
	// defaults (enabled, 15 s idle and interval).
	KeepAlive net.KeepAliveConfig
	// Logger receives the warning for an unpinned socket; nil discards.
	Logger *slog.Logger
	// Metrics counts pinning outcomes and socket errors; nil counts into an
	// unregistered set.
	Metrics *Metrics

	// pin replaces the SO_BINDTODEVICE call in tests (nil: the real one).
	pin func(fd int, iface string) error
}

// Status says whether a socket ended up pinned.
type Status struct {
	Class  Class
	Iface  string // the interface asked for
	Pinned bool
	// Err is why a socket with an Iface is not pinned (it wraps the errno,
	// e.g. unix.EPERM); nil when pinned or when no Iface was asked for.
	Err error
}

// PinError is a failure to pin a socket to its interface that stops the
// socket from being created.
type PinError struct {
	Class Class
	Iface string
	Err   error // the errno, e.g. unix.ENODEV
}

func (e *PinError) Error() string {
	return fmt.Sprintf("sock: pin %s socket to interface %q: %v", e.Class, e.Iface, e.Err)
}

func (e *PinError) Unwrap() error { return e.Err }

// OptError is a failure to set a socket option.
type OptError struct {
	Class  Class
	Option string // e.g. "TCP_USER_TIMEOUT"
	Err    error  // the errno
}

func (e *OptError) Error() string {
	return fmt.Sprintf("sock: %s socket: set %s: %v", e.Class, e.Option, e.Err)
}

func (e *OptError) Unwrap() error { return e.Err }

func (cfg *Config) logger() *slog.Logger {
	if cfg.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return cfg.Logger
}

func (cfg *Config) metrics() *Metrics {
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	return cfg.Metrics
}

// control returns a Control hook that pins the socket and sets the options
// that must precede connect, recording the outcome in st.
func (cfg *Config) control(st *Status) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var opErr error
		err := c.Control(func(fd uintptr) {
			if cfg.Iface != "" {
				pin := cfg.pin
				if pin == nil {
					pin = bindToDevice
				}
				if err := pin(int(fd), cfg.Iface); err != nil {
					if !isPermission(err) {
						opErr = &PinError{Class: cfg.Class, Iface: cfg.Iface, Err: err}
						return
					}
					st.Err = err
				} else {
					st.Pinned = true
				}
			}
			if cfg.UserTimeout > 0 {
				if err := setUserTimeout(int(fd), cfg.UserTimeout); err != nil {
					opErr = &OptError{Class: cfg.Class, Option: "TCP_USER_TIMEOUT", Err: err}
				}
			}
		})
		if err != nil {
			return err
		}
		return opErr
	}
}

// record counts and logs the pinning outcome of a new socket.
func (cfg *Config) record(st *Status, what, addr string) {
	m := cfg.metrics()
	if cfg.Iface == "" {
		return
	}
	if st.Pinned {
		m.pinned.WithLabelValues(cfg.Class.String()).Set(1)
		return
	}
	m.pinned.WithLabelValues(cfg.Class.String()).Set(0)
	m.unpinned.WithLabelValues(cfg.Class.String()).Inc()
	cfg.logger().Warn("socket not pinned to its interface: traffic follows the routing table",
		"class", cfg.Class.String(), "iface", cfg.Iface, "socket", what, "addr", addr, "err", st.Err)
}

// Listen opens a TCP listener of the path on addr, pinned to the path's
// interface. Accepted connections carry the path's options. The listener
// is usable whenever err is nil, pinned or not: Status says which.
func Listen(ctx context.Context, cfg Config, addr string) (net.Listener, Status, error) {
	st := Status{Class: cfg.Class, Iface: cfg.Iface}
	lc := net.ListenConfig{Control: cfg.control(&st), KeepAliveConfig: cfg.KeepAlive}
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		cfg.metrics().errors.WithLabelValues(cfg.Class.String(), "listen").Inc()
		return nil, st, err
	}
	cfg.record(&st, "listener", l.Addr().String())
	return &listener{TCPListener: l.(*net.TCPListener), cfg: cfg}, st, nil
}

type listener struct {
	*net.TCPListener
	cfg Config
}

// Accept returns the next connection as a *net.TCPConn with the path's
// options set.
func (l *listener) Accept() (net.Conn, error) {
	c, err := l.AcceptTCP()
	if err != nil {
		return nil, err
	}
	if err := tune(c, &l.cfg); err != nil {
		l.cfg.metrics().errors.WithLabelValues(l.cfg.Class.String(), "accept").Inc()
		c.Close()
		return nil, err
	}
	return c, nil
}

// tune sets the per-connection options on c: TCP_NODELAY and, for
// accepted connections, TCP_USER_TIMEOUT (a dialed socket got it in the
// Control hook).
func tune(c *net.TCPConn, cfg *Config) error {
	if err := c.SetNoDelay(true); err != nil {
		return &OptError{Class: cfg.Class, Option: "TCP_NODELAY", Err: unwrapErrno(err)}
	}
	if cfg.UserTimeout <= 0 {
		return nil
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = setUserTimeout(int(fd), cfg.UserTimeout) }); err != nil {
		return err
	}
	if serr != nil {
		return &OptError{Class: cfg.Class, Option: "TCP_USER_TIMEOUT", Err: serr}
	}
	return nil
}

// SetUserTimeout sets TCP_USER_TIMEOUT on an established connection: how
// long sent data may stay unacknowledged before the kernel resets it. For
// consumers that must guarantee it on every stream whatever dialer made
// it (netpath/repl). c must be a *net.TCPConn or have SyscallConn.
func SetUserTimeout(c net.Conn, d time.Duration) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("sock: set TCP_USER_TIMEOUT: %T has no socket", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = setUserTimeout(int(fd), d) }); err != nil {
		return err
	}
	if serr != nil {
		return os.NewSyscallError("setsockopt TCP_USER_TIMEOUT", serr)
	}
	return nil
}

// Dialer opens TCP connections on a path. It is safe for concurrent use.
type Dialer struct {
	cfg   Config
	local *net.TCPAddr // nil: any
	// Timeout bounds a dial in addition to the context; 0: no extra bound.
	Timeout time.Duration
}

// NewDialer returns a Dialer for the path cfg. It fails when cfg.Source is
// not an IP address.
func NewDialer(cfg Config) (*Dialer, error) {
	d := &Dialer{cfg: cfg}
	d.cfg.metrics()
	if cfg.Source != "" {
		ip := net.ParseIP(cfg.Source)
		if ip == nil {
			return nil, fmt.Errorf("sock: %s path: source address %q is not an IP address", cfg.Class, cfg.Source)
		}
		d.local = &net.TCPAddr{IP: ip}
	}
	return d, nil
}

// Dial connects to addr over the path: pinned, bound to the source
// address, with the path's options. The connection is usable whenever err
// is nil; Status says whether it is pinned.
func (d *Dialer) Dial(ctx context.Context, addr string) (*net.TCPConn, Status, error) {
	st := Status{Class: d.cfg.Class, Iface: d.cfg.Iface}
	nd := net.Dialer{
		Timeout:         d.Timeout,
		KeepAliveConfig: d.cfg.KeepAlive,
		Control:         d.cfg.control(&st),
	}
	if d.local != nil { // a typed nil would be a non-nil net.Addr
		nd.LocalAddr = d.local
	}
	c, err := nd.DialContext(ctx, "tcp", addr)
	if err != nil {
		d.cfg.metrics().errors.WithLabelValues(d.cfg.Class.String(), "dial").Inc()
		return nil, st, err
	}
	tc := c.(*net.TCPConn)
	if err := tune(tc, &d.cfg); err != nil {
		d.cfg.metrics().errors.WithLabelValues(d.cfg.Class.String(), "dial").Inc()
		tc.Close()
		return nil, st, err
	}
	d.cfg.record(&st, "dial", addr)
	return tc, st, nil
}

// DialContext is Dial in net.Dialer's shape, for consumers that take a dial
// function; network must be "tcp", "tcp4" or "tcp6".
func (d *Dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("sock: %s path: network %q not supported (tcp only)", d.cfg.Class, network)
	}
	c, _, err := d.Dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// Metrics are the path counters, labelled by class.
type Metrics struct {
	pinned   *prometheus.GaugeVec
	unpinned *prometheus.CounterVec
	errors   *prometheus.CounterVec
}

// NewMetrics creates the path metrics and registers them with reg (nil:
// not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		pinned: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keel_netpath_pinned",
			Help: "1 when the newest socket of the class is pinned to its interface, 0 when it could not be.",
		}, []string{"class"}),
		unpinned: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_netpath_unpinned_sockets_total",
			Help: "Sockets created without the interface pin they asked for (no privilege).",
		}, []string{"class"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_netpath_socket_errors_total",
			Help: "Socket errors by class and operation (listen, dial, accept).",
		}, []string{"class", "op"}),
	}
	if reg != nil {
		reg.MustRegister(m.pinned, m.unpinned, m.errors)
	}
	return m
}

// unwrapErrno returns the errno inside err when there is one, so that
// OptError carries it directly.
func unwrapErrno(err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return err
}
