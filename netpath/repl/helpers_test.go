package repl_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"keel/netpath/repl"
	"keel/netpath/replproto"
)

// memApplier is a test double of repl.Applier: volumes are byte slices,
// with a second copy holding what would survive a crash (written by FUA
// and by Flush), in the manner of a crashable in-memory device.
type memApplier struct {
	mu   sync.Mutex // guards following
	vols map[uint64]*memVol
	log  []string // ApplyEpoch and apply events, in order, when recording

	record bool
	// holdAt: a WriteAt at one of these offsets sends its offset on entered
	// and waits for a value on release.
	holdAt  map[int64]bool
	release chan struct{}
	entered chan int64
}

type memVol struct {
	data, durable []byte
	epoch         uint64
	writes, fua   int
	flushes       int
	trims, zeroes int
	noHole        int
	degraded      int // frames applied with FlagDegraded
	synced        int // frames applied with FlagSync
	failWrite     error
	failEpoch     error
}

func newMemApplier() *memApplier {
	return &memApplier{vols: make(map[uint64]*memVol), holdAt: make(map[int64]bool),
		release: make(chan struct{}), entered: make(chan int64, 16)}
}

func (a *memApplier) addVolume(vol uint64, size int, epoch uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.vols[vol] = &memVol{data: make([]byte, size), durable: make([]byte, size), epoch: epoch}
}

func (a *memApplier) vol(vol uint64) (*memVol, error) {
	v, ok := a.vols[vol]
	if !ok {
		return nil, fmt.Errorf("volume %d: %w", vol, repl.ErrUnknownVolume)
	}
	return v, nil
}

func (a *memApplier) Epoch(vol uint64) (uint64, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	v, err := a.vol(vol)
	if err != nil {
		return 0, err
	}
	return v.epoch, nil
}

func (a *memApplier) ApplyEpoch(vol, e uint64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	v, err := a.vol(vol)
	if err != nil {
		return err
	}
	if v.failEpoch != nil {
		return v.failEpoch
	}
	if e > v.epoch {
		v.epoch = e
	}
	if a.record {
		a.log = append(a.log, fmt.Sprintf("epoch %d", e))
	}
	return nil
}

// classify counts a frame's degraded and sync flags. REQUIRES: a.mu.
func (v *memVol) classify(flags replproto.Flags) {
	if flags&replproto.FlagDegraded != 0 {
		v.degraded++
	}
	if flags&replproto.FlagSync != 0 {
		v.synced++
	}
}

func (a *memApplier) WriteAt(vol uint64, p []byte, off int64, flags replproto.Flags) error {
	fua := flags&replproto.FlagFUA != 0
	a.mu.Lock()
	hold := a.holdAt[off]
	a.mu.Unlock()
	if hold {
		a.entered <- off
		<-a.release
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	v, err := a.vol(vol)
	if err != nil {
		return err
	}
	if v.failWrite != nil {
		return v.failWrite
	}
	if off < 0 || off+int64(len(p)) > int64(len(v.data)) {
		return fmt.Errorf("write [%d,+%d) past the end: %w", off, len(p), syscall.EINVAL)
	}
	copy(v.data[off:], p)
	v.writes++
	v.classify(flags)
	if fua {
		v.fua++
		copy(v.durable[off:], p)
	}
	if a.record {
		a.log = append(a.log, fmt.Sprintf("write %d+%d", off, len(p)))
	}
	return nil
}

func (a *memApplier) zero(vol uint64, off, length int64, flags replproto.Flags) (*memVol, error) {
	fua := flags&replproto.FlagFUA != 0
	a.mu.Lock()
	defer a.mu.Unlock()
	v, err := a.vol(vol)
	if err != nil {
		return nil, err
	}
	if off < 0 || off+length > int64(len(v.data)) {
		return nil, syscall.EINVAL
	}
	clear(v.data[off : off+length])
	v.classify(flags)
	if fua {
		clear(v.durable[off : off+length])
	}
	return v, nil
}

func (a *memApplier) Trim(vol uint64, off, length int64, flags replproto.Flags) error {
	v, err := a.zero(vol, off, length, flags)
	if err == nil {
		a.mu.Lock()
		v.trims++
		a.mu.Unlock()
	}
	return err
}

func (a *memApplier) WriteZeroes(vol uint64, off, length int64, flags replproto.Flags) error {
	v, err := a.zero(vol, off, length, flags)
	if err == nil {
		a.mu.Lock()
		v.zeroes++
		if flags&replproto.FlagNoHole != 0 {
			v.noHole++
		}
		a.mu.Unlock()
	}
	return err
}

func (a *memApplier) Flush(vol uint64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	v, err := a.vol(vol)
	if err != nil {
		return err
	}
	copy(v.durable, v.data)
	v.flushes++
	return nil
}

func (a *memApplier) snapshot(vol uint64) (data, durable []byte, stats memVol) {
	a.mu.Lock()
	defer a.mu.Unlock()
	v := a.vols[vol]
	return append([]byte(nil), v.data...), append([]byte(nil), v.durable...), *v
}

// trackListener remembers the connections it accepted so a test can cut
// them.
type trackListener struct {
	net.Listener
	accepted chan struct{} // a value per accepted connection, dropped when full
	total    atomic.Int64
	mu       sync.Mutex
	conns    []net.Conn
}

func (l *trackListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.conns = append(l.conns, c)
		l.mu.Unlock()
		l.total.Add(1)
		select {
		case l.accepted <- struct{}{}:
		default:
		}
	}
	return c, err
}

// cut closes up to n of the accepted connections (all when n <= 0) and
// returns how many it closed.
func (l *trackListener) cut(n int) int {
	l.mu.Lock()
	cs := l.conns
	if n <= 0 || n > len(cs) {
		n = len(cs)
	}
	l.conns = append([]net.Conn(nil), cs[n:]...)
	l.mu.Unlock()
	for _, c := range cs[:n] {
		c.Close()
	}
	return n
}

// replica is a Server with its applier on a loopback listener.
type replica struct {
	node uint64
	app  *memApplier
	srv  *repl.Server
	l    *trackListener
	addr string
	done chan error
}

// startReplica serves app (or cfg.Applier, which must apply to app) as
// node on a loopback listener.
func startReplica(t *testing.T, node uint64, app *memApplier, cfg repl.ServerConfig) *replica {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Node = node
	if cfg.Applier == nil { // else a wrapper of app (a SyncApplier, say)
		cfg.Applier = app
	}
	r := &replica{node: node, app: app, srv: repl.NewServer(cfg), l: &trackListener{Listener: ln, accepted: make(chan struct{}, 1024)},
		addr: ln.Addr().String(), done: make(chan error, 1)}
	go func() { r.done <- r.srv.Serve(r.l) }()
	t.Cleanup(func() { r.srv.Close() })
	return r
}

// newPeer connects a Peer from node self to r and waits until it is up.
func newPeer(t *testing.T, self uint64, r *replica, cfg repl.PeerConfig) *repl.Peer {
	t.Helper()
	cfg.Self, cfg.Node, cfg.Addr = self, r.node, r.addr
	p := repl.NewPeer(cfg)
	t.Cleanup(func() { p.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.WaitUp(ctx); err != nil {
		t.Fatalf("peer %d -> %d not up: %v", self, r.node, err)
	}
	return p
}

func sum(b []byte) string { return fmt.Sprintf("%x", sha256.Sum256(b))[:16] }

// within waits for ch or fails the test after d: a guard against a hang,
// not a synchronisation.
func within[T any](t *testing.T, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("timed out after %v waiting for %s", d, what)
		panic("unreachable")
	}
}
