// Package coordsvc owns a running member of a coordinator cell: the
// ctl/coord state machine replicated with hashicorp/raft (log and stable
// store in raft-boltdb, snapshots in files, TCP transport), the leader's
// clock and ticker that feed lease expiry into the log, and the HTTP+JSON
// API of ctl/coordapi with per-class admission control, deadlines and
// load shedding, plus its Prometheus metrics.
//
// # Time
//
// Only the raft leader reads a clock. Every write it proposes is stamped
// with its clock (coord.Command.At); a follower never stamps, it forwards
// the call to the leader. The clock is the member's monotonic clock (a wall
// time taken once at start plus monotonic elapsed time), so it never steps.
// On becoming leader a member first waits until it has applied its whole
// log (a raft barrier), then commits a rebase at its own time, which gives
// every live node a fresh lease on this clock (see coordapi.Lease for why),
// and only then takes writes and runs its ticker: every TickInterval, if
// some lease is due, it commits a tick at its time, which expires leases
// and promotes primaries.
//
// # Admission
//
// Each call belongs to an operation class (coordapi.Class). A class has a
// fixed number of slots; a call waits at most Limit.Wait for one and is
// otherwise answered 503 with Retry-After at once, so a flood of slow calls
// in one class cannot hold the goroutines, memory or raft capacity that
// heartbeats need. The body is read (bounded by Limit.MaxBody, 413 beyond)
// before a slot is taken, so a slow sender holds no slot. Every admitted
// call has a deadline (Limit.Deadline); a write whose deadline passes
// before raft answers gets 504 (its outcome is unknown: it may still
// commit). Requests are checked before they are proposed; a refused call
// (4xx) changes no state.
//
// # Files in the data directory
//
//	raft.db          raft-boltdb: the raft log and stable store
//	snapshots/       raft file snapshots (coord snapshot format, JSON)
//
// # Recovery
//
// The leader ticks whenever the machine says something is due
// (coord.Machine.NextDue): a lease expiry, a slot's TTL, the end of an
// out-of-sync member's grace, the end of mass-failure mode, a placement
// retry. Slot requests and rejoins are heartbeat class, so that listings
// and administration never delay recovery. Every member logs mode changes
// (warn), members given up and replacements placed (info) as it applies
// them, and exports the storm control's state as metrics (metrics.go).
package coordsvc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/prometheus/client_golang/prometheus"

	"keel/ctl/coord"
	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
)

// RaftTiming tunes raft; zero fields take raft's defaults (1s heartbeat
// and election timeouts, 500ms leader lease, 50ms commit timeout), which
// suit a cell on one LAN. Tests shorten them.
type RaftTiming struct {
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	CommitTimeout      time.Duration
	SnapshotThreshold  uint64
}

// Config configures one member.
type Config struct {
	// ID names the member in the cell, e.g. c1. It must not change.
	ID string
	// DataDir holds the raft log and snapshots.
	DataDir string
	// Listen is the API address, e.g. 127.0.0.1:7400 (port 0: any).
	Listen string
	// AdvertiseURL is how others reach the API; default http://<listen
	// address>.
	AdvertiseURL string
	// RaftAddr is the raft transport's address, bound and advertised, e.g.
	// 127.0.0.1:7401 (port 0: any). It must be reachable by the other
	// members and must not change once the member is in a cell.
	RaftAddr string
	// Join lists API URLs of existing members. A member with no raft state
	// and no Join bootstraps a new one-member cell; with Join it asks the
	// cell's leader to add it. A member with state ignores Join.
	Join []string
	// Coord is the cell configuration the first leader commits when the
	// replicated state has none yet (zero: coordapi.DefaultConfig()).
	Coord coordapi.Config
	// Limits per class; missing classes take DefaultLimits.
	Limits map[coordapi.Class]Limit
	// TickInterval is how often the leader checks for due leases; default
	// 250ms.
	TickInterval time.Duration
	Raft         RaftTiming
	Logger       *slog.Logger
	// Registry receives the metrics and is served at /metrics; default a
	// new registry.
	Registry *prometheus.Registry
	// Inject, when set, is called inside every admitted call before it is
	// handled: a fault-injection point (tests make one class slow with it).
	Inject func(ctx context.Context, class coordapi.Class, op string)
}

// Server is a running member. Close stops it.
type Server struct {
	cfg     Config
	log     *slog.Logger
	fsm     *fsm
	raft    *raft.Raft
	trans   *raft.NetworkTransport
	store   *raftboltdb.BoltStore
	ln      net.Listener
	http    *http.Server
	reg     *prometheus.Registry
	metrics *metrics
	limits  map[coordapi.Class]*limiter
	fwd     *http.Client
	clock   clock
	apiURL  string

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex // guards ready
	ready bool       // leader, and this term's rebase is applied

	closeOnce sync.Once
	closeErr  error
}

// clock is the member's monotonic clock as wall-clock-like times.
type clock struct{ start time.Time }

func newClock() clock { return clock{start: time.Now()} }

// Now is the start's wall time plus monotonic time elapsed since: it never
// steps, whatever the wall clock does.
func (c clock) Now() time.Time { return c.start.Round(0).Add(time.Since(c.start)).UTC() }

// New starts a member: raft, the leader loop and the API.
func New(cfg Config) (*Server, error) {
	if err := coordapi.ValidateMemberID(cfg.ID); err != nil {
		return nil, fmt.Errorf("coordsvc: --id: %w", err)
	}
	if cfg.DataDir == "" {
		return nil, errors.New("coordsvc: a data directory is required (--data-dir)")
	}
	if cfg.Coord == (coordapi.Config{}) {
		cfg.Coord = coordapi.DefaultConfig()
	}
	if err := cfg.Coord.Validate(); err != nil {
		return nil, fmt.Errorf("coordsvc: cell configuration: %w", err)
	}
	if cfg.TickInterval <= 0 {
		cfg.TickInterval = 250 * time.Millisecond
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("member", cfg.ID)
	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "snapshots"), 0o750); err != nil {
		return nil, fmt.Errorf("coordsvc: data directory: %w", err)
	}
	s := &Server{cfg: cfg, log: log, clock: newClock(), reg: cfg.Registry, limits: map[coordapi.Class]*limiter{}}
	if s.reg == nil {
		s.reg = prometheus.NewRegistry()
	}
	defaults := DefaultLimits()
	for _, c := range coordapi.Classes {
		l, ok := cfg.Limits[c]
		if !ok {
			l = defaults[c]
		}
		s.limits[c] = newLimiter(l)
	}
	s.fwd = &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 64, IdleConnTimeout: time.Minute}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.metrics = newMetrics(s.reg, s)
	// Every member's state machine starts from the same defaults, whatever
	// its flags: the flags reach the state only through the configure
	// command the first leader commits, so all members apply every entry
	// with the same configuration.
	s.fsm = newFSM(coordapi.DefaultConfig(), log, func(op coord.Op, r coord.Result) {
		s.metrics.observeApply(op, r)
		logRecovery(log, r)
	})

	var err error
	if s.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
		return nil, fmt.Errorf("coordsvc: API listen on %q: %w", cfg.Listen, err)
	}
	s.apiURL = cfg.AdvertiseURL
	if s.apiURL == "" {
		s.apiURL = "http://" + s.ln.Addr().String()
	}
	if err := s.startRaft(); err != nil {
		s.ln.Close()
		s.closeRaft()
		return nil, err
	}
	s.http = &http.Server{
		Handler:           s.routes(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.http.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("API server stopped", "err", err)
		}
	}()
	log.Info("coordinator member started", "api", s.apiURL, "raft", string(s.trans.LocalAddr()), "data_dir", cfg.DataDir)
	return s, nil
}

func (s *Server) startRaft() error {
	cfg := s.cfg
	hl := newHCLogger(s.log)
	store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(cfg.DataDir, "raft.db")})
	if err != nil {
		return fmt.Errorf("coordsvc: opening the raft log in %s: %w", cfg.DataDir, err)
	}
	s.store = store
	logs, err := raft.NewLogCache(512, store)
	if err != nil {
		return err
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(filepath.Join(cfg.DataDir, "snapshots"), 2, hl)
	if err != nil {
		return fmt.Errorf("coordsvc: snapshot store: %w", err)
	}
	addr, err := net.ResolveTCPAddr("tcp", cfg.RaftAddr)
	if err != nil {
		return fmt.Errorf("coordsvc: --raft-addr %q: %w", cfg.RaftAddr, err)
	}
	if s.trans, err = raft.NewTCPTransportWithLogger(cfg.RaftAddr, nil, 3, 10*time.Second, hl); err != nil {
		return fmt.Errorf("coordsvc: raft transport on %s (need a concrete address such as 127.0.0.1:7401, not %v): %w", cfg.RaftAddr, addr, err)
	}
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.Logger = hl
	rc.BatchApplyCh = true
	notify := make(chan bool, 16)
	rc.NotifyCh = notify
	t := cfg.Raft
	if t.HeartbeatTimeout > 0 {
		rc.HeartbeatTimeout = t.HeartbeatTimeout
	}
	if t.ElectionTimeout > 0 {
		rc.ElectionTimeout = t.ElectionTimeout
	}
	if t.LeaderLeaseTimeout > 0 {
		rc.LeaderLeaseTimeout = t.LeaderLeaseTimeout
	}
	if t.CommitTimeout > 0 {
		rc.CommitTimeout = t.CommitTimeout
	}
	if t.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = t.SnapshotThreshold
	}
	existing, err := raft.HasExistingState(logs, store, snaps)
	if err != nil {
		return fmt.Errorf("coordsvc: reading raft state: %w", err)
	}
	if s.raft, err = raft.NewRaft(rc, s.fsm, logs, store, snaps, s.trans); err != nil {
		return fmt.Errorf("coordsvc: starting raft: %w", err)
	}
	switch {
	case existing:
		s.log.Info("restarting from existing raft state", "data_dir", cfg.DataDir)
	case len(cfg.Join) == 0:
		s.log.Info("bootstrapping a new one-member cell")
		f := s.raft.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{Suffrage: raft.Voter, ID: rc.LocalID, Address: s.trans.LocalAddr()}}})
		if err := f.Error(); err != nil {
			return fmt.Errorf("coordsvc: bootstrapping: %w", err)
		}
	default:
		s.wg.Add(1)
		go func() { defer s.wg.Done(); s.joinLoop() }()
	}
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.leaderLoop(notify) }()
	return nil
}

// joinLoop asks the cell to add this member until it is added or the
// member stops, backing off between rounds.
func (s *Server) joinLoop() {
	c, err := coordclient.New(coordclient.Config{URLs: s.cfg.Join, Logger: s.log})
	if err != nil {
		s.log.Error("cannot join", "err", err)
		return
	}
	req := coordapi.JoinRequest{ID: s.cfg.ID, RaftAddr: string(s.trans.LocalAddr()), APIURL: s.apiURL}
	b := coordclient.Backoff{Base: 200 * time.Millisecond, Max: 10 * time.Second}
	for round := 0; ; round++ {
		ctx, cancel := context.WithTimeout(s.ctx, 30*time.Second)
		_, err := c.Join(ctx, req)
		cancel()
		if err == nil {
			s.log.Info("joined the cell", "via", s.cfg.Join)
			return
		}
		wait := b.Wait(round, randFloat)
		s.log.Warn("join failed; retrying", "err", err, "retry_in", wait)
		select {
		case <-s.ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// leaderLoop follows leadership changes: each term as leader runs
// leaderTerm until the term ends.
func (s *Server) leaderLoop(notify <-chan bool) {
	type term struct {
		stop context.CancelFunc
		done chan struct{}
	}
	var cur *term
	end := func() {
		if cur != nil {
			cur.stop()
			<-cur.done
			cur = nil
		}
		s.setReady(false)
	}
	defer end()
	for {
		select {
		case <-s.ctx.Done():
			return
		case leader := <-notify:
			end()
			if leader {
				s.metrics.leaderTerms.Inc()
				ctx, stop := context.WithCancel(s.ctx)
				cur = &term{stop: stop, done: make(chan struct{})}
				go func(done chan struct{}) { defer close(done); s.leaderTerm(ctx) }(cur.done)
			}
		}
	}
}

func (s *Server) setReady(v bool) {
	s.mu.Lock()
	s.ready = v
	s.mu.Unlock()
}

func (s *Server) isReady() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ready
}

// leaderTerm: barrier, initial configuration if the state has none,
// rebase, this member's API address; then take writes and tick until ctx
// ends.
func (s *Server) leaderTerm(ctx context.Context) {
	s.log.Info("became raft leader")
	b := coordclient.Backoff{Base: 50 * time.Millisecond, Max: time.Second}
	for round := 0; ; round++ {
		err := s.startTerm(ctx)
		if err == nil {
			break
		}
		s.log.Warn("leader start failed; retrying", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(b.Wait(round, randFloat)):
		}
	}
	s.setReady(true)
	s.log.Info("leader ready: leases rebased on this member's clock")
	t := time.NewTicker(s.cfg.TickInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			s.log.Info("leadership ended")
			return
		case <-t.C:
		}
		var due bool
		now := s.clock.Now()
		s.fsm.read(func(m *coord.Machine) {
			at, ok := m.NextDue() // a lease expiry, or recovery's next step
			due = ok && !now.Before(at)
		})
		if !due {
			continue
		}
		tctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if _, err := s.apply(tctx, coord.Command{Op: coord.OpTick}); err != nil {
			s.log.Warn("tick failed", "err", err)
		}
		cancel()
	}
}

// startTerm runs the steps before a new leader takes writes. Each is
// idempotent, so a failed start is simply run again.
func (s *Server) startTerm(ctx context.Context) error {
	if err := s.raft.Barrier(10 * time.Second).Error(); err != nil {
		return fmt.Errorf("barrier: %w", err)
	}
	var configured, known bool
	var self coordapi.CellMember
	s.fsm.read(func(m *coord.Machine) {
		_, configured = m.Config()
		self, known = m.CellMember(s.cfg.ID)
	})
	if !configured {
		c := s.cfg.Coord
		if _, err := s.apply(ctx, coord.Command{Op: coord.OpConfigure, Configure: &c}); err != nil {
			return fmt.Errorf("committing the initial cell configuration: %w", err)
		}
	}
	if _, err := s.apply(ctx, coord.Command{Op: coord.OpRebase}); err != nil {
		return fmt.Errorf("rebase: %w", err)
	}
	me := coordapi.CellMember{ID: s.cfg.ID, RaftAddr: string(s.trans.LocalAddr()), APIURL: s.apiURL, Voter: true}
	if !known || self != me {
		if _, err := s.apply(ctx, coord.Command{Op: coord.OpSetMember, SetMember: &me}); err != nil {
			return fmt.Errorf("recording this member's API URL: %w", err)
		}
	}
	return nil
}

var errNotLeader = errors.New("not the raft leader")

func randFloat() float64 { return rand.Float64() }

// apply stamps c with this member's clock, proposes it and waits for it to
// be applied or for ctx to end. It returns errNotLeader when this member
// cannot propose.
func (s *Server) apply(ctx context.Context, c coord.Command) (coord.Result, error) {
	c.At = s.clock.Now()
	b, err := coord.EncodeCommand(c)
	if err != nil {
		return coord.Result{}, err
	}
	timeout := 5 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = max(time.Until(dl), time.Millisecond)
	}
	f := s.raft.Apply(b, timeout)
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		return coord.Result{}, ctx.Err()
	}
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return coord.Result{}, errNotLeader
	case err != nil:
		return coord.Result{}, err
	}
	a, ok := f.Response().(applied)
	if !ok {
		return coord.Result{}, fmt.Errorf("coordsvc: unexpected apply response %T", f.Response())
	}
	return a.res, nil
}

// APIURL is the URL others reach this member's API at.
func (s *Server) APIURL() string { return s.apiURL }

// RaftAddr is the raft transport's address.
func (s *Server) RaftAddr() string { return string(s.trans.LocalAddr()) }

// ID is the member's ID.
func (s *Server) ID() string { return s.cfg.ID }

// IsLeader reports whether this member is the raft leader and ready for
// writes.
func (s *Server) IsLeader() bool { return s.isReady() && s.raft.State() == raft.Leader }

// Close stops the member: the API first (in-flight calls get a few
// seconds), then the leader loop and raft, then the stores. It does not
// leave the cell: a member closed this way is down, not removed.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if s.http != nil {
			s.http.Shutdown(sctx)
		}
		s.cancel()
		s.closeErr = s.closeRaft()
		s.wg.Wait()
		s.fwd.CloseIdleConnections()
	})
	return s.closeErr
}

func (s *Server) closeRaft() error {
	var errs []error
	if s.raft != nil {
		errs = append(errs, s.raft.Shutdown().Error())
	}
	if s.trans != nil {
		errs = append(errs, s.trans.Close())
	}
	if s.store != nil {
		errs = append(errs, s.store.Close())
	}
	return errors.Join(errs...)
}

// newHCLogger adapts raft's hclog output to slog: one record per line at
// the level hclog printed.
func newHCLogger(log *slog.Logger) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:   "raft",
		Level:  hclog.Info,
		Output: &slogWriter{log: log},
	})
}

type slogWriter struct{ log *slog.Logger }

func (w *slogWriter) Write(p []byte) (int, error) {
	line := string(p)
	level := slog.LevelInfo
	for tag, l := range map[string]slog.Level{"[ERROR]": slog.LevelError, "[WARN]": slog.LevelWarn, "[DEBUG]": slog.LevelDebug, "[TRACE]": slog.LevelDebug} {
		if i := strings.Index(line, tag); i >= 0 {
			level = l
			line = line[i+len(tag):]
			break
		}
	}
	if i := strings.Index(line, "[INFO]"); i >= 0 {
		line = line[i+len("[INFO]"):]
	}
	w.log.Log(context.Background(), level, strings.TrimSpace(line), "component", "raft")
	return len(p), nil
}

var _ io.Writer = (*slogWriter)(nil)
