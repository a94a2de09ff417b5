package attach

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"keel/netpath/nbdkernel"
)

// Target is the server a device's connections go to.
type Target struct {
	Addr   string // host:port, or unix:/path
	Export string
	Node   string // the coordinator's node id; "" without a coordinator
	Epoch  uint64 // the volume's epoch as the coordinator gave it; 0 without
}

// sameServer: connections to t can stay when the locator answers o.
func (t Target) sameServer(o Target) bool {
	return t.Addr == o.Addr && t.Export == o.Export && t.Node == o.Node
}

// Locator says where a device's connections go now: a fixed address
// (StaticLocator), or the primary the coordinator names.
type Locator interface {
	Locate(ctx context.Context) (Target, error)
}

// StaticLocator always answers the same target (`keel attach --addr`).
type StaticLocator Target

// Locate returns the target.
func (l StaticLocator) Locate(context.Context) (Target, error) { return Target(l), nil }

// Kernel is what the supervisor needs of the kernel NBD client;
// *nbdkernel.Netlink implements it, tests use a twin.
type Kernel interface {
	Connect(ctx context.Context, r nbdkernel.ConnectRequest) (int, error)
	Reconfigure(ctx context.Context, r nbdkernel.ReconfigureRequest) error
	Status(ctx context.Context, index int) ([]nbdkernel.DeviceStatus, error)
}

var _ Kernel = (*nbdkernel.Netlink)(nil)

// Config is one device to attach and supervise.
type Config struct {
	// Device is the index N of /dev/nbdN to use; -1 lets the kernel pick.
	Device int
	// Connections is the number of connections (kernel queues); default 1.
	Connections int
	// Timeout is the dead-connection timeout: how long I/O waits in the
	// kernel for a connection to come back before it fails with EIO. It is
	// also the kernel's per-request timeout, after which a request on an
	// unresponsive connection marks it dead and is retried on a new one:
	// I/O that cannot be served fails after at most twice Timeout, and
	// never hangs. Whole seconds, at least 1; default 30 s.
	Timeout time.Duration
	// Locator says where connections go.
	Locator Locator
	// CheckInterval is how often the locator is asked while all
	// connections are up, to follow a primary that moved while the old one
	// still answers; 0 asks only when a connection breaks. It is a
	// backstop (a deposed primary stops answering, and the request timeout
	// then breaks the connection), so it can be long; each wait is
	// jittered by ±20% so that many hosts do not ask in step.
	CheckInterval time.Duration
	// Backend identifies the device's data to the kernel
	// (/sys/block/nbdN/backend); every reconfigure must present it.
	Backend string
	// Volume and Coord are recorded in the state file.
	Volume, Coord string
	// StateDir receives nbdN.json; "" keeps no state file.
	StateDir string
	Kernel   Kernel
	// LinkDead, if set, carries device indexes of the kernel's
	// NBD_CMD_LINK_DEAD notifications (nbdkernel.Monitor): the supervisor
	// reacts at once instead of at its next poll.
	LinkDead <-chan int
	// Poll is how often the connections are checked; default 250 ms.
	Poll   time.Duration
	Logger *slog.Logger
	// OnState, if set, is called with each state the supervisor records,
	// from the supervising goroutine.
	OnState func(State)
	// SysBlock is the sysfs block directory (default /sys/block), where
	// the device's request size limit is set.
	SysBlock string
}

func (c *Config) defaults() error {
	if c.Connections == 0 {
		c.Connections = 1
	}
	if c.Connections < 1 || c.Connections > 64 {
		return fmt.Errorf("connections %d: want 1 to 64", c.Connections)
	}
	if c.Timeout == 0 {
		c.Timeout = 30 * time.Second
	}
	if c.Timeout < time.Second {
		return fmt.Errorf("timeout %v: want at least 1s (the kernel counts whole seconds)", c.Timeout)
	}
	if c.Locator == nil || c.Kernel == nil {
		return errors.New("attach: a locator and a kernel are required")
	}
	if c.Poll <= 0 {
		c.Poll = 250 * time.Millisecond
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.SysBlock == "" {
		c.SysBlock = "/sys/block"
	}
	return nil
}

// Supervisor keeps one attached device connected: it watches the
// device's connections and, when one breaks, dials the current target
// (asking the locator again, which follows a failover) and gives the
// kernel the new connection with NBD_CMD_RECONFIGURE.
//
// A Supervisor is driven by one goroutine: Attach, then Run. Its fields
// are owned by that goroutine; nothing else reads or writes them.
type Supervisor struct {
	cfg Config
	log *slog.Logger

	target Target
	// links are this process's references to the sockets the kernel
	// holds, one per connection slot (not in the kernel's slot order:
	// the kernel puts a new socket in any dead slot).
	links []*nbdkernel.Socket
	st    State

	brokenSince time.Time // when a connection was first seen broken; zero while all are up
	nextTry     time.Time // no repair attempt before this
	backoff     time.Duration
	nextCheck   time.Time // next locator check while healthy
	// ignoredEpoch is the last stale epoch logged, to log it once.
	ignoredEpoch uint64
	// lastErr is why the last repair failed; lastLocateErr the last
	// locator failure logged (each is logged when it changes).
	lastErr, lastLocateErr string
	gone                   bool // the device was disconnected under us
}

func (s *Supervisor) dialOptions() nbdkernel.DialOptions {
	return nbdkernel.DialOptions{Timeout: min(s.cfg.Timeout, 10*time.Second), UserTimeout: s.cfg.Timeout}
}

// Attach locates the target, opens Connections connections, has the
// kernel start the device with them, and records the state. On error
// nothing is attached.
func Attach(ctx context.Context, cfg Config) (*Supervisor, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	s := &Supervisor{cfg: cfg, log: cfg.Logger}
	// A volume just created, or in the middle of a failover, may not be
	// served yet: keep trying for up to Timeout.
	deadline := time.Now().Add(cfg.Timeout)
	wait := 100 * time.Millisecond
	for {
		err := s.connectAll(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil || time.Now().Add(wait).After(deadline) {
			return nil, fmt.Errorf("attach: %w", err)
		}
		s.log.Info("not attached yet; retrying", "err", err, "in", wait)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("attach: %w (%w)", err, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, time.Second)
	}
	t := s.target
	e := s.links[0].Export
	for _, l := range s.links[1:] {
		if l.Export.Size != e.Size || l.Export.Flags != e.Flags {
			s.closeLinks()
			return nil, fmt.Errorf("attach: the connections to %s disagree on export %q (size %d flags %#x, then %d %#x)", t.Addr, t.Export, e.Size, e.Flags, l.Export.Size, l.Export.Flags)
		}
	}
	bs, err := e.KernelBlockSize()
	if err != nil {
		s.closeLinks()
		return nil, fmt.Errorf("attach: %w", err)
	}
	size := e.Size / uint64(bs) * uint64(bs)
	if size == 0 {
		s.closeLinks()
		return nil, fmt.Errorf("attach: export %q of %d bytes is smaller than one block of %d", t.Export, e.Size, bs)
	}
	if e.Flags&nbdkernel.FlagSendFlush == 0 && e.Flags&nbdkernel.FlagReadOnly == 0 {
		s.log.Warn("the server does not advertise flush: the kernel will not send FLUSH, fsync does not reach its disk", "addr", t.Addr, "export", t.Export)
	}
	fds := make([]int, len(s.links))
	for i, l := range s.links {
		fds[i] = l.Fd()
	}
	index, err := cfg.Kernel.Connect(ctx, nbdkernel.ConnectRequest{
		Index:           cfg.Device,
		Size:            size,
		BlockSize:       bs,
		Timeout:         cfg.Timeout,
		DeadConnTimeout: cfg.Timeout,
		ServerFlags:     e.Flags,
		Sockets:         fds,
		Backend:         cfg.Backend,
	})
	if err != nil {
		s.closeLinks()
		return nil, fmt.Errorf("attach: %w", err)
	}
	now := time.Now()
	s.st = State{
		Device:         fmt.Sprintf("/dev/nbd%d", index),
		Index:          index,
		Backend:        cfg.Backend,
		Volume:         cfg.Volume,
		Coord:          cfg.Coord,
		Connections:    cfg.Connections,
		Live:           cfg.Connections,
		TimeoutSeconds: int(cfg.Timeout / time.Second),
		Size:           size,
		BlockSize:      bs,
		Flags:          e.Flags,
		PID:            os.Getpid(),
		Phase:          PhaseConnected,
		Since:          now,
	}
	s.setTarget(t)
	s.limitRequestSize(e.MaxBlock)
	s.log.Info("attached", "device", s.st.Device, "addr", t.Addr, "export", t.Export, "node", t.Node, "epoch", t.Epoch,
		"connections", cfg.Connections, "size", size, "block_size", bs, "flags", fmt.Sprintf("%#x", e.Flags))
	s.record()
	return s, nil
}

// connectAll locates the target and dials every connection; on error it
// leaves no connection open.
func (s *Supervisor) connectAll(ctx context.Context) error {
	lctx, cancel := context.WithTimeout(ctx, min(s.cfg.Timeout, 10*time.Second))
	t, err := s.cfg.Locator.Locate(lctx)
	cancel()
	if err != nil {
		return fmt.Errorf("locating the server: %w", err)
	}
	s.target = t
	for range s.cfg.Connections {
		sock, err := nbdkernel.Dial(ctx, t.Addr, t.Export, s.dialOptions())
		if err != nil {
			s.closeLinks()
			return err
		}
		s.links = append(s.links, sock)
	}
	return nil
}

// Device is the attached device's path, /dev/nbdN.
func (s *Supervisor) Device() string { return s.st.Device }

// State is the current record.
func (s *Supervisor) State() State { return s.st }

func (s *Supervisor) setTarget(t Target) {
	s.target = t
	s.st.Addr, s.st.Export, s.st.Node, s.st.Epoch = t.Addr, t.Export, t.Node, t.Epoch
}

// limitRequestSize lets the kernel send requests as large as the server
// accepts (its default is 128 KiB) but no larger.
func (s *Supervisor) limitRequestSize(serverMax uint32) {
	q := filepath.Join(s.cfg.SysBlock, fmt.Sprintf("nbd%d", s.st.Index), "queue")
	hw, err := readInt(filepath.Join(q, "max_hw_sectors_kb"))
	if err != nil {
		s.log.Debug("request size left alone", "err", err)
		return
	}
	want := hw
	if serverMax >= 4096 {
		want = min(want, int64(serverMax/1024))
	}
	if cur, err := readInt(filepath.Join(q, "max_sectors_kb")); err == nil && cur == want {
		return
	}
	if err := os.WriteFile(filepath.Join(q, "max_sectors_kb"), []byte(strconv.FormatInt(want, 10)), 0o644); err != nil {
		s.log.Warn("could not set the largest request size", "device", s.st.Device, "max_sectors_kb", want, "err", err)
	}
}

func readInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

// Run supervises the device until ctx ends (the device stays attached,
// recorded as unsupervised) or the device is disconnected by someone else.
func (s *Supervisor) Run(ctx context.Context) error {
	tick := time.NewTicker(s.cfg.Poll)
	defer tick.Stop()
	defer s.closeLinks()
	for {
		s.step(ctx)
		if s.gone {
			return nil
		}
		select {
		case <-ctx.Done():
			s.setPhase(PhaseUnsupervised, "the supervisor stopped: "+context.Cause(ctx).Error())
			return nil
		case <-tick.C:
		case idx := <-s.cfg.LinkDead:
			if idx == s.st.Index {
				s.log.Info("the kernel reports a dead connection", "device", s.st.Device)
			}
		}
	}
}

// step is one round: follow the locator, check the connections, repair
// the broken ones.
func (s *Supervisor) step(ctx context.Context) {
	now := time.Now()
	broken, err := nbdkernel.Broken(s.links, 0)
	if err != nil {
		s.log.Error("checking connections", "err", err)
		return
	}
	n := count(broken)
	healthyCheck := n == 0 && s.cfg.CheckInterval > 0 && !now.Before(s.nextCheck)
	retry := n > 0 && !now.Before(s.nextTry)
	var locErr error
	if healthyCheck || retry {
		moved, err := s.relocate(ctx)
		locErr = err
		if moved {
			if broken, err = nbdkernel.Broken(s.links, 0); err != nil {
				s.log.Error("checking connections", "err", err)
				return
			}
			n = count(broken)
		}
	}
	s.st.Live = len(s.links) - n
	if n == 0 {
		if s.st.Phase != PhaseConnected {
			s.log.Info("connected", "device", s.st.Device, "addr", s.target.Addr, "node", s.target.Node, "epoch", s.target.Epoch, "after", now.Sub(s.brokenSince).Round(time.Millisecond))
			s.brokenSince, s.backoff, s.nextTry = time.Time{}, 0, time.Time{}
			s.setPhase(PhaseConnected, "")
		}
		return
	}
	if s.brokenSince.IsZero() {
		s.brokenSince = now
		s.log.Warn("connection lost", "device", s.st.Device, "broken", n, "of", len(s.links), "addr", s.target.Addr)
	}
	if now.Before(s.nextTry) {
		s.checkDeadline(now, s.lastErr)
		return
	}
	err = s.repair(ctx, broken)
	s.st.Live = len(s.links) - s.countBroken()
	if s.gone {
		return
	}
	if err == nil && s.st.Live == len(s.links) {
		s.log.Info("reconnected", "device", s.st.Device, "addr", s.target.Addr, "node", s.target.Node, "epoch", s.target.Epoch, "after", time.Since(s.brokenSince).Round(time.Millisecond))
		s.brokenSince, s.backoff, s.nextTry = time.Time{}, 0, time.Time{}
		s.setPhase(PhaseConnected, "")
		return
	}
	why := "waiting for the kernel to drop the dead connection"
	if errors.Is(err, errNotAdopted) {
		s.nextTry = time.Now().Add(50 * time.Millisecond)
	} else {
		if err != nil {
			why = err.Error()
		}
		if locErr != nil {
			why = fmt.Sprintf("locating the server: %v; the last known server %s: %s", locErr, s.target.Addr, why)
		}
		s.backoff = min(max(2*s.backoff, 100*time.Millisecond), 2*time.Second)
		s.nextTry = time.Now().Add(jitter(s.backoff))
	}
	s.lastErr = why
	s.checkDeadline(time.Now(), why)
}

// checkDeadline records reconnecting, or failed once the connections have
// been down for longer than the dead-connection timeout.
func (s *Supervisor) checkDeadline(now time.Time, why string) {
	if now.Sub(s.brokenSince) >= s.cfg.Timeout {
		s.setPhase(PhaseFailed, fmt.Sprintf("no server reachable within the dead-connection timeout of %v, so the kernel fails I/O with EIO until a connection comes back; last error: %s",
			s.cfg.Timeout, why))
		return
	}
	s.setPhase(PhaseReconnecting, why)
}

// relocate asks the locator where connections go now. When it names
// another server, the connections to the old one are shut down (the
// kernel marks them dead and holds their I/O) so that they are repaired
// towards the new one. It reports whether it shut them down, and the
// locator's error (the target is then unchanged).
func (s *Supervisor) relocate(ctx context.Context) (bool, error) {
	if s.cfg.CheckInterval > 0 {
		s.nextCheck = time.Now().Add(jitter(s.cfg.CheckInterval))
	}
	lctx, cancel := context.WithTimeout(ctx, min(s.cfg.Timeout, 5*time.Second))
	t, err := s.cfg.Locator.Locate(lctx)
	cancel()
	if err != nil {
		if err.Error() != s.lastLocateErr {
			s.lastLocateErr = err.Error()
			s.log.Warn("locating the server", "device", s.st.Device, "err", err)
		}
		return false, err
	}
	s.lastLocateErr = ""
	if t.Epoch < s.target.Epoch {
		if t.Epoch != s.ignoredEpoch {
			s.ignoredEpoch = t.Epoch
			s.log.Warn("the locator answered an older epoch; ignored", "device", s.st.Device, "epoch", t.Epoch, "have", s.target.Epoch)
		}
		return false, nil
	}
	if s.target.sameServer(t) {
		if t.Epoch != s.target.Epoch {
			s.setTarget(t)
			s.record()
		}
		return false, nil
	}
	s.log.Warn("the primary moved: leaving the old server", "device", s.st.Device,
		"from_node", s.target.Node, "from_addr", s.target.Addr, "from_epoch", s.target.Epoch,
		"to_node", t.Node, "to_addr", t.Addr, "to_epoch", t.Epoch)
	s.setTarget(t)
	for _, l := range s.links {
		if err := l.Shutdown(); err != nil {
			s.log.Warn("shutting down a connection to the old server", "err", err)
		}
	}
	s.st.Live = 0
	s.setPhase(PhaseReconnecting, fmt.Sprintf("the primary moved to node %s at %s (epoch %d)", t.Node, t.Addr, t.Epoch))
	return true, nil
}

// jitter returns d ± 20%.
func jitter(d time.Duration) time.Duration {
	return d - d/5 + time.Duration(rand.Int64N(int64(d)*2/5+1))
}

var errNotAdopted = errors.New("the kernel has not released the dead connection yet")

// repair replaces broken links with new connections to the target, one
// NBD_CMD_RECONFIGURE each, keeping only sockets the kernel adopted.
func (s *Supervisor) repair(ctx context.Context, broken []bool) error {
	for i, b := range broken {
		if !b {
			continue
		}
		sock, err := nbdkernel.Dial(ctx, s.target.Addr, s.target.Export, s.dialOptions())
		if err != nil {
			return err
		}
		if got := sock.Export.Size / uint64(s.st.BlockSize) * uint64(s.st.BlockSize); got != s.st.Size {
			sock.Close()
			return fmt.Errorf("export %q at %s has %d bytes, the device has %d: refusing to reconnect to different data", s.target.Export, s.target.Addr, sock.Export.Size, s.st.Size)
		}
		if sock.Export.Flags != s.st.Flags {
			s.log.Warn("the server's transmission flags changed; the kernel keeps the old ones", "device", s.st.Device, "was", fmt.Sprintf("%#x", s.st.Flags), "now", fmt.Sprintf("%#x", sock.Export.Flags))
		}
		err = s.cfg.Kernel.Reconfigure(ctx, nbdkernel.ReconfigureRequest{Index: s.st.Index, Sockets: []int{sock.Fd()}, Backend: s.cfg.Backend})
		if err != nil {
			sock.Close()
			s.checkGone(ctx)
			return err
		}
		adopted, err := sock.Adopted()
		if err != nil || !adopted {
			sock.Close()
			if err != nil {
				return err
			}
			return errNotAdopted
		}
		s.links[i].Close()
		s.links[i] = sock
	}
	return nil
}

// checkGone notices a device that was disconnected under the supervisor
// (keel detach, or another tool): supervision ends.
func (s *Supervisor) checkGone(ctx context.Context) {
	st, err := s.cfg.Kernel.Status(ctx, s.st.Index)
	if err != nil {
		return
	}
	for _, d := range st {
		if d.Index == s.st.Index && d.Connected {
			return
		}
	}
	s.gone = true
	s.log.Warn("the device was disconnected; supervision ends", "device", s.st.Device)
	s.setPhase(PhaseUnsupervised, "the device was disconnected")
}

func (s *Supervisor) countBroken() int {
	b, err := nbdkernel.Broken(s.links, 0)
	if err != nil {
		return len(s.links)
	}
	return count(b)
}

func count(b []bool) int {
	n := 0
	for _, x := range b {
		if x {
			n++
		}
	}
	return n
}

func (s *Supervisor) setPhase(p Phase, why string) {
	if s.st.Phase == p && s.st.Why == why {
		return
	}
	if s.st.Phase != p {
		s.st.Since = time.Now()
	}
	s.st.Phase, s.st.Why = p, why
	s.record()
}

// record writes the state file and tells OnState.
func (s *Supervisor) record() {
	s.st.Updated = time.Now()
	if s.cfg.StateDir != "" {
		if err := writeState(s.cfg.StateDir, s.st); err != nil {
			s.log.Error("recording the attach state", "err", err)
		}
	}
	if s.cfg.OnState != nil {
		s.cfg.OnState(s.st)
	}
}

func (s *Supervisor) closeLinks() {
	for _, l := range s.links {
		l.Close()
	}
	s.links = nil
}
