package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
	"keel/datapath/volume"
	"keel/netpath/nbd"
	"keel/netpath/repl"
	"keel/netpath/sock"
)

// Config is what `keel node` runs.
type Config struct {
	// ID names the node in the cluster; Zone is its failure domain.
	ID   coordapi.NodeID
	Zone string
	// DataDir holds the replica files, <volume id>.vol.
	DataDir string
	// Coord lists the coordinator cell's member URLs.
	Coord []string
	// PrimaryListen is where NBD clients connect (the primary network);
	// ReplListen is where primaries' replication streams arrive (the
	// replication network). Port 0 picks one.
	PrimaryListen, ReplListen string
	// PrimaryAdvertise and ReplAdvertise are the addresses registered with
	// the coordinator; default the listeners' addresses.
	PrimaryAdvertise, ReplAdvertise string
	// PrimaryIface and ReplIface pin each network's sockets to an
	// interface (SO_BINDTODEVICE); "" leaves them unpinned. The coordinator
	// client's sockets belong to the primary network.
	PrimaryIface, ReplIface string
	// Capacity is the space offered for replicas; 0: the data directory's
	// file system size.
	Capacity int64
	// Metrics is the Prometheus endpoint's address; "" for none.
	Metrics string
	Timing  Timing
	// Throttle is the replication path's recovery throttle at start
	// (catch-up and re-mirror traffic; see netpath/sock.Throttle); the zero
	// value throttles nothing. `keel node` starts from DefaultThrottle and
	// its flags; it can be changed at run time through /v1/throttle on the
	// metrics address (keel node throttle).
	Throttle sock.ThrottleConfig
	// ShutdownTimeout bounds how long in-flight requests may take to finish
	// when the node stops (default 30 s).
	ShutdownTimeout time.Duration
	Logger          *slog.Logger
	// Registry receives the metrics; default a new one (with the Go and
	// process collectors).
	Registry *prometheus.Registry
}

// Node is a running storage node: it registers with the coordinator and
// keeps its lease (coordclient.Agent), opens the replicas assigned to it,
// serves the volumes it leads over NBD on the primary network through the
// replicated Backend, and applies other primaries' replication streams
// (repl.Server through applier) on the replication network.
type Node struct {
	cfg    Config
	log    *slog.Logger
	reg    *prometheus.Registry
	x      *replicator
	agent  *coordclient.Agent
	client *coordclient.Client
	nbd    *nbd.Server
	repl   *repl.Server
	app    *applier
	thr    *sock.Throttle

	primaryL, replL net.Listener
	metricsL        net.Listener
	metricsSrv      *http.Server
	primaryAddr     string // advertised
	replAddr        string

	stopX    context.CancelFunc // cancels replicator.ctx
	stopBG   context.CancelFunc // stops the agent and the reconciler
	bg       sync.WaitGroup
	serveErr chan error
	updates  chan struct{} // capacity 1: a new Update is in latest
	stopOnce sync.Once

	mu     sync.Mutex // guards following
	latest []coordapi.Assignment
	fresh  bool // latest not yet reconciled
	vols   map[coordapi.VolumeID]*replica
	// Reconciler goroutine only: replicas whose NBD exports are added,
	// whether the last pass left something to retry, and replica files no
	// longer assigned here that may still be needed (orphans: volume id to
	// path), checked again at most every orphanCheck.
	exported  map[coordapi.VolumeID]bool
	dirty     bool
	orphans   map[coordapi.VolumeID]string
	swept     time.Time
	scannedFS bool
}

// orphanCheck is how often the replica files no longer assigned here are
// checked for whether they may go.
const orphanCheck = 10 * time.Second

// Start opens the listeners, starts the agent, the NBD and replication
// servers, and returns the running node. Stop it with Close.
func Start(cfg Config) (*Node, error) {
	if err := cfg.ID.Validate(); err != nil {
		return nil, fmt.Errorf("node id: %w", err)
	}
	if cfg.DataDir == "" {
		return nil, errors.New("node: a data directory is required")
	}
	if len(cfg.Coord) == 0 {
		return nil, errors.New("node: at least one coordinator URL is required")
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 30 * time.Second
	}
	cfg.Timing = cfg.Timing.withDefaults()
	thr, err := sock.NewThrottle(cfg.Throttle)
	if err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("node", string(cfg.ID))
	if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
		return nil, fmt.Errorf("node: data directory: %w", err)
	}
	reg := cfg.Registry
	if reg == nil {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	n := &Node{
		cfg: cfg, log: log, reg: reg,
		serveErr: make(chan error, 3),
		updates:  make(chan struct{}, 1),
		vols:     map[coordapi.VolumeID]*replica{},
		exported: map[coordapi.VolumeID]bool{},
		orphans:  map[coordapi.VolumeID]string{},
		app:      &applier{vols: map[uint64]*replica{}},
		thr:      thr,
	}
	ok := false
	defer func() {
		if !ok {
			n.closeListeners()
		}
	}()

	sockM := sock.NewMetrics(reg)
	registerThrottleMetrics(reg, thr)
	pcfg := sock.Config{Class: sock.Primary, Iface: cfg.PrimaryIface, Source: sourceIP(cfg.PrimaryListen), Logger: log, Metrics: sockM}
	rcfg := sock.Config{Class: sock.Replication, Iface: cfg.ReplIface, Source: sourceIP(cfg.ReplListen), UserTimeout: cfg.Timing.FrameTimeout, Logger: log, Metrics: sockM}
	if n.primaryL, _, err = sock.Listen(context.Background(), pcfg, cfg.PrimaryListen); err != nil {
		return nil, fmt.Errorf("node: primary listener: %w", err)
	}
	if n.replL, _, err = sock.Listen(context.Background(), rcfg, cfg.ReplListen); err != nil {
		return nil, fmt.Errorf("node: replication listener: %w", err)
	}
	if n.primaryAddr, err = advertise(cfg.PrimaryAdvertise, n.primaryL, "--primary-advertise"); err != nil {
		return nil, err
	}
	if n.replAddr, err = advertise(cfg.ReplAdvertise, n.replL, "--repl-advertise"); err != nil {
		return nil, err
	}
	if cfg.Metrics != "" {
		if n.metricsL, err = net.Listen("tcp", cfg.Metrics); err != nil {
			return nil, fmt.Errorf("node: metrics listener: %w", err)
		}
	}
	pdial, err := sock.NewDialer(pcfg)
	if err != nil {
		return nil, fmt.Errorf("node: primary network dialer: %w", err)
	}
	rdial, err := sock.NewDialer(rcfg)
	if err != nil {
		return nil, fmt.Errorf("node: replication network dialer: %w", err)
	}
	n.client, err = coordclient.New(coordclient.Config{
		URLs:   cfg.Coord,
		HTTP:   &http.Client{Transport: &http.Transport{DialContext: pdial.DialContext, MaxIdleConnsPerHost: 4, IdleConnTimeout: time.Minute}},
		Logger: log,
	})
	if err != nil {
		return nil, err
	}

	xctx, stopX := context.WithCancel(context.Background())
	n.stopX = stopX
	replM := repl.NewMetrics(reg)
	fence := repl.NewFence(n.onFenced)
	self := NodeNum(cfg.ID)
	n.x = &replicator{
		self: cfg.ID, fence: fence, timing: cfg.Timing, m: newMetrics(reg), log: log, ctx: xctx,
		peers: map[coordapi.NodeID]*peer{},
		newPeer: func(id coordapi.NodeID, addr string) *repl.Peer {
			return repl.NewPeer(repl.PeerConfig{
				Self: self, Node: NodeNum(id), Addr: addr, Dial: rdial.DialContext,
				FrameTimeout: cfg.Timing.FrameTimeout, Fence: fence, OnPeerLost: n.onPeerLost,
				Metrics: replM, Logger: log.With("peer", string(id)),
			})
		},
		raise:    func(r *replica, e uint64) error { return n.repl.RaiseEpoch(r.num, e) },
		throttle: thr,
	}
	n.repl = repl.NewServer(repl.ServerConfig{Node: self, Applier: n.app, Metrics: replM, Logger: log})
	n.nbd = nbd.NewServer(nbd.Config{Logger: log, Metrics: nbd.NewMetrics(reg)})
	capacity, free := n.space()
	n.agent, err = coordclient.NewAgent(coordclient.AgentConfig{
		Client: n.client,
		Node: coordapi.RegisterRequest{
			Node: cfg.ID, Zone: cfg.Zone, PrimaryAddr: n.primaryAddr, ReplAddr: n.replAddr,
			Capacity: capacity, Free: free,
		},
		Space:    n.space,
		Reports:  n.reports,
		OnChange: n.onChange,
		Logger:   log,
	})
	if err != nil {
		stopX()
		n.repl.Close()
		return nil, err
	}
	n.x.auth = n.agent
	ok = true

	go func() { n.serveErr <- n.nbd.Serve(n.primaryL) }()
	go func() { n.serveErr <- n.repl.Serve(n.replL) }()
	if n.metricsL != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.Handle("/v1/throttle", ThrottleHandler(thr, log))
		n.metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go n.metricsSrv.Serve(n.metricsL)
	}
	bgctx, stopBG := context.WithCancel(context.Background())
	n.stopBG = stopBG
	n.bg.Add(3)
	go func() { defer n.bg.Done(); n.agent.Run(bgctx) }()
	go func() { defer n.bg.Done(); n.reconcileLoop(bgctx) }()
	go func() { defer n.bg.Done(); n.watchdog(bgctx) }()
	log.Info("node started", "primary", n.primaryAddr, "replication", n.replAddr,
		"primary_iface", cfg.PrimaryIface, "repl_iface", cfg.ReplIface, "coord", cfg.Coord, "data_dir", cfg.DataDir)
	return n, nil
}

// registerThrottleMetrics exports the recovery throttle's counters.
func registerThrottleMetrics(reg prometheus.Registerer, t *sock.Throttle) {
	gauge := func(name, help string, f func(sock.ThrottleStats) float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return f(t.Stats()) })
	}
	counter := func(name, help string, f func(sock.ThrottleStats) float64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return f(t.Stats()) })
	}
	reg.MustRegister(
		gauge("keel_node_recovery_rate_bytes_per_second", "Recovery (catch-up, re-mirror) rate the throttle allows now; 0: unlimited.",
			func(s sock.ThrottleStats) float64 { return float64(s.Effective) }),
		gauge("keel_node_foreground_rate_bytes_per_second", "Foreground replication rate the throttle last measured.",
			func(s sock.ThrottleStats) float64 { return float64(s.ForegroundRate) }),
		counter("keel_node_recovery_throttled_bytes_total", "Recovery bytes that went through the throttle.",
			func(s sock.ThrottleStats) float64 { return float64(s.RecoveryBytes) }),
		counter("keel_node_foreground_counted_bytes_total", "Foreground replication payload bytes the throttle counted.",
			func(s sock.ThrottleStats) float64 { return float64(s.ForegroundBytes) }),
		counter("keel_node_recovery_throttle_waits_total", "Recovery sends that had to wait for the throttle.",
			func(s sock.ThrottleStats) float64 { return float64(s.Waits) }),
		counter("keel_node_recovery_throttle_wait_seconds_total", "Time recovery sends spent waiting for the throttle.",
			func(s sock.ThrottleStats) float64 { return s.WaitTime.Seconds() }),
		gauge("keel_node_recovery_throttle_waiting", "Recovery sends waiting for the throttle now.",
			func(s sock.ThrottleStats) float64 { return float64(s.Waiting) }),
	)
}

// sourceIP is the IP of a listen address to bind dialers to: "" for an
// unspecified or missing host.
func sourceIP(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	ip := net.ParseIP(host)
	if ip == nil || ip.IsUnspecified() {
		return ""
	}
	return ip.String()
}

func advertise(given string, l net.Listener, flag string) (string, error) {
	if given != "" {
		return given, nil
	}
	a := l.Addr().(*net.TCPAddr)
	if a.IP.IsUnspecified() {
		return "", fmt.Errorf("node: listening on %s, which other nodes cannot dial: give %s HOST:PORT", a, flag)
	}
	return a.String(), nil
}

// PrimaryAddr is the address NBD clients reach this node at.
func (n *Node) PrimaryAddr() string { return n.primaryAddr }

// ReplAddr is the address primaries replicate to.
func (n *Node) ReplAddr() string { return n.replAddr }

// ID is the node's id.
func (n *Node) ID() coordapi.NodeID { return n.cfg.ID }

// Err returns a channel that receives the error of a listener that failed.
func (n *Node) Err() <-chan error { return n.serveErr }

// Run starts a node and runs it until ctx is done or a listener fails,
// then stops it in order.
func Run(ctx context.Context, cfg Config) error {
	n, err := Start(cfg)
	if err != nil {
		return err
	}
	var runErr error
	select {
	case <-ctx.Done():
		n.log.Info("stopping: finishing in-flight requests")
	case runErr = <-n.serveErr:
		n.log.Error("listener failed", "err", runErr)
	}
	if err := n.Close(); err != nil && runErr == nil {
		runErr = err
	}
	return runErr
}

// Close stops the node in order: no new NBD requests, in-flight ones
// finish (bounded by ShutdownTimeout), heartbeats stop, replication
// streams close, and every replica is flushed and marked clean. The
// coordinator notices through the lease.
func (n *Node) Close() error {
	var err error
	n.stopOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), n.cfg.ShutdownTimeout)
		defer cancel()
		if e := n.nbd.Shutdown(ctx); e != nil {
			n.log.Error("NBD shutdown did not finish cleanly", "err", e)
		}
		n.stopBG()
		n.bg.Wait()
		n.stopX()
		n.mu.Lock()
		vols := make([]*replica, 0, len(n.vols))
		for _, r := range n.vols {
			vols = append(vols, r)
		}
		n.mu.Unlock()
		for _, r := range vols {
			r.stepDown(r.view().epoch)
		}
		n.repl.Close()
		n.x.closePeers()
		n.x.syncWG.Wait() // stopped above; their frames failed with the Peers
		for _, r := range vols {
			n.app.remove(r)
			if e := r.vol.Close(); e != nil {
				n.log.Error("closing replica", "volume", r.id, "err", e)
				err = errors.Join(err, fmt.Errorf("closing %s: %w", r.path, e))
			}
		}
		n.closeListeners()
		n.log.Info("node stopped: replicas flushed and marked clean", "replicas", len(vols))
	})
	return err
}

func (n *Node) closeListeners() {
	for _, l := range []net.Listener{n.primaryL, n.replL} {
		if l != nil {
			l.Close()
		}
	}
	if n.metricsSrv != nil {
		n.metricsSrv.Close()
	} else if n.metricsL != nil {
		n.metricsL.Close()
	}
}

// space is the capacity and free space the node reports.
func (n *Node) space() (capacity, free int64) {
	capacity, free, err := dirSpace(n.cfg.DataDir)
	if err != nil {
		n.log.Warn("cannot measure the data directory", "err", err)
	}
	if n.cfg.Capacity > 0 {
		capacity = n.cfg.Capacity
		var used int64
		n.mu.Lock()
		for _, r := range n.vols {
			used += r.vol.Size()
		}
		n.mu.Unlock()
		free = max(0, min(free, capacity-used))
	}
	return capacity, free
}

// reports is the health of every open replica, for the heartbeat.
func (n *Node) reports() []coordapi.ReplicaReport {
	now := time.Now()
	n.mu.Lock()
	out := make([]coordapi.ReplicaReport, 0, len(n.vols))
	var dirty int64
	for _, r := range n.vols {
		h, why := r.health(now)
		out = append(out, coordapi.ReplicaReport{Volume: r.id, Epoch: coordapi.Epoch(r.vol.Epoch()), Health: h, Reason: why, Syncs: r.syncReports(now)})
		if r.bm != nil && r.marked.Load() {
			dirty += r.bm.DirtyBytes()
		}
	}
	n.mu.Unlock()
	n.x.m.dirtyBytes.Set(float64(dirty))
	return out
}

func (n *Node) onFenced(vol, epoch uint64) {
	n.log.Warn("a replica reports a newer epoch: this node stops acknowledging writes for the volume below it", "volume", coordapi.MakeVolumeID(vol), "epoch", epoch)
	if n.agent != nil {
		n.agent.Kick()
	}
}

func (n *Node) onPeerLost(l repl.Loss) {
	n.x.peerLost(l)
	if l.Volume != 0 {
		n.log.Info("peer refused a frame", "peer_num", l.Peer, "volume", coordapi.MakeVolumeID(l.Volume), "err", l.Err)
	}
}

// onChange runs on the agent's goroutine: it hands the update to the
// reconciler and returns at once (heartbeats wait for it).
func (n *Node) onChange(u coordclient.Update) {
	n.mu.Lock()
	n.latest, n.fresh = u.Assignments, true
	n.mu.Unlock()
	select {
	case n.updates <- struct{}{}:
	default:
	}
}

// reconcileLoop applies the latest assignments, one pass at a time; a pass
// that failed somewhere is retried every 2 s.
func (n *Node) reconcileLoop(ctx context.Context) {
	retry := time.NewTicker(2 * time.Second)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.updates:
		case <-retry.C:
			if !n.dirty && (len(n.orphans) == 0 || time.Since(n.swept) < orphanCheck) {
				continue
			}
		}
		n.mu.Lock()
		as := n.latest
		if !n.fresh {
			as = n.agent.Assignments()
		}
		n.fresh = false
		n.mu.Unlock()
		n.reconcile(ctx, as)
	}
}

// reconcile makes the node match the assignments: open what is assigned,
// act as primary or secondary at the assigned epoch, close what is not
// assigned any more.
func (n *Node) reconcile(ctx context.Context, assignments []coordapi.Assignment) {
	n.dirty = false
	seen := make(map[coordapi.VolumeID]bool, len(assignments))
	for _, as := range assignments {
		seen[as.Volume] = true
		r, err := n.open(as)
		if err != nil {
			n.log.Error("cannot open an assigned replica", "volume", as.Volume, "err", err)
			n.dirty = true
			continue
		}
		if err := r.apply(as); err != nil {
			n.log.Error("cannot act on an assignment", "volume", as.Volume, "role", as.Role, "epoch", as.Epoch, "err", err)
			n.dirty = true
			continue
		}
		if as.Role == coordapi.RolePrimary && as.InSync {
			if !n.exported[as.Volume] {
				if err := n.export(ctx, r); err != nil {
					n.log.Error("cannot serve the volume over NBD", "volume", as.Volume, "err", err)
					n.dirty = true
				}
			}
			continue
		}
		if n.exported[as.Volume] {
			n.unexport(r)
		}
		if e := uint64(as.Epoch); e > r.vol.Epoch() {
			// A secondary persists the new epoch in stream order: from then
			// on a primary of an older epoch is refused (fenced).
			if err := n.repl.RaiseEpoch(r.num, e); err != nil {
				n.log.Error("cannot persist the assigned epoch", "volume", as.Volume, "epoch", e, "err", err)
				n.dirty = true
			}
		}
	}
	n.mu.Lock()
	var gone []*replica
	for id, r := range n.vols {
		if !seen[id] {
			gone = append(gone, r)
		}
	}
	n.mu.Unlock()
	for _, r := range gone {
		n.drop(ctx, r)
	}
	n.retirePeers()
	if !n.scannedFS {
		// Replica files of volumes assigned elsewhere while this node was
		// away: the same rules as for a replica dropped now.
		n.scannedFS = true
		if files, err := filepath.Glob(filepath.Join(n.cfg.DataDir, "vol-*.vol")); err == nil {
			for _, f := range files {
				id := coordapi.VolumeID(strings.TrimSuffix(filepath.Base(f), ".vol"))
				if _, err := volumeNum(id); err == nil && !seen[id] {
					n.orphans[id] = f
				}
			}
		}
	}
	for id := range n.orphans {
		if seen[id] {
			delete(n.orphans, id) // assigned here again: open uses the file
		}
	}
	if len(n.orphans) > 0 && time.Since(n.swept) >= orphanCheck {
		n.swept = time.Now()
		for id, path := range n.orphans {
			if n.removeIfGarbage(ctx, id, path) {
				delete(n.orphans, id)
			}
		}
	}
}

// retirePeers closes the replication streams no primary view uses.
func (n *Node) retirePeers() {
	used := map[coordapi.NodeID]bool{}
	primaries, secondaries := 0, 0
	n.mu.Lock()
	for _, r := range n.vols {
		v := r.view()
		if v.primary {
			primaries++
		} else {
			secondaries++
		}
		for _, p := range v.peers {
			used[p.id] = true
		}
		for _, p := range v.catching {
			used[p.id] = true
		}
		for _, id := range r.syncTargets() {
			used[id] = true
		}
	}
	n.mu.Unlock()
	n.x.m.replicas.WithLabelValues("primary").Set(float64(primaries))
	n.x.m.replicas.WithLabelValues("secondary").Set(float64(secondaries))
	n.x.retirePeers(func(id coordapi.NodeID) bool { return used[id] })
}

// open returns the open replica of as.Volume, opening (or creating and
// preallocating) its file on first use.
func (n *Node) open(as coordapi.Assignment) (*replica, error) {
	n.mu.Lock()
	r := n.vols[as.Volume]
	n.mu.Unlock()
	if r != nil {
		return r, nil
	}
	num, err := volumeNum(as.Volume)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(n.cfg.DataDir, string(as.Volume)+".vol")
	vol, err := volume.Open(path, volume.Options{Size: as.Size, Create: true, Logger: n.log})
	if err != nil {
		return nil, err
	}
	r = newReplica(n.x, as.Volume, num, as.Name, path, vol)
	n.repl.Forget(num) // no ordering state left from an earlier open
	n.app.add(r)
	n.mu.Lock()
	n.vols[as.Volume] = r
	n.mu.Unlock()
	n.log.Info("replica open", "volume", as.Volume, "name", as.Name, "size", vol.Size(), "epoch", vol.Epoch(), "file", path, "was_clean", vol.WasClean())
	return r, nil
}

// export serves r over NBD under the volume's name and its id, once the
// streams to its in-sync secondaries are up (or PeerWait has passed: then
// the first writes find them down and report them).
func (n *Node) export(ctx context.Context, r *replica) error {
	v := r.view()
	wctx, cancel := context.WithTimeout(ctx, n.cfg.Timing.PeerWait)
	for _, p := range v.peers {
		if err := p.rp.WaitUp(wctx); err != nil {
			n.log.Warn("replication stream to an in-sync secondary not up: serving anyway", "volume", r.id, "peer", p.id, "err", err)
			break
		}
	}
	cancel()
	b := &Backend{r: r}
	desc := fmt.Sprintf("keel volume %s (%s)", r.name, r.id)
	names := []string{string(r.id)}
	if r.name != "" {
		names = []string{r.name, string(r.id)}
	}
	for i, name := range names {
		if err := n.nbd.AddExport(nbd.Export{Name: name, Description: desc, Backend: b}); err != nil {
			for _, added := range names[:i] {
				n.nbd.RemoveExport(ctx, added)
			}
			return err
		}
	}
	n.exported[r.id] = true
	n.log.Info("serving volume over NBD as its primary", "volume", r.id, "export", names[0], "addr", n.primaryAddr, "epoch", v.epoch, "in_sync_peers", v.peerIDs())
	return nil
}

// unexport stops serving r: new connections no longer find it; its
// sessions finish their in-flight requests (refused: r's view is no
// longer primary) and close.
func (n *Node) unexport(r *replica) {
	ctx, cancel := context.WithTimeout(context.Background(), n.cfg.ShutdownTimeout)
	defer cancel()
	for _, name := range []string{r.name, string(r.id)} {
		if name == "" {
			continue
		}
		if err := n.nbd.RemoveExport(ctx, name); err != nil {
			n.log.Warn("removing NBD export", "export", name, "err", err)
		}
	}
	delete(n.exported, r.id)
	n.log.Info("no longer serving the volume", "volume", r.id, "epoch", r.view().epoch)
}

// drop closes a replica that is no longer assigned here, and deletes its
// file when the coordinator no longer knows the volume.
func (n *Node) drop(ctx context.Context, r *replica) {
	r.stepDown(r.view().epoch)
	if n.exported[r.id] {
		n.unexport(r)
	}
	n.app.remove(r)
	n.mu.Lock()
	delete(n.vols, r.id)
	n.mu.Unlock()
	if err := r.vol.Close(); err != nil {
		n.log.Error("closing a replica no longer assigned here", "volume", r.id, "err", err)
	}
	for range 10 {
		if n.repl.Forget(r.num) == nil {
			break
		}
		t := time.NewTimer(50 * time.Millisecond) // frames of it are still being answered
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}
	if !n.removeIfGarbage(ctx, r.id, r.path) {
		n.orphans[r.id] = r.path
	}
}

// removeIfGarbage removes the replica file of a volume not assigned here
// when nothing can need it any more: the coordinator no longer knows the
// volume, or this node is not a member and every member is in sync (the
// volume was re-mirrored elsewhere, so the coordinator has released the
// space it kept quarantined here). It reports whether the file is gone
// (or was never there).
func (n *Node) removeIfGarbage(ctx context.Context, id coordapi.VolumeID, path string) bool {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := n.client.Volume(cctx, string(id))
	var why string
	var ae *coordapi.Error
	switch {
	case errors.As(err, &ae) && ae.Code == coordapi.CodeNotFound:
		why = "volume deleted"
	case err != nil:
		n.log.Warn("cannot ask the coordinator about a replica no longer assigned here: file kept for now", "volume", id, "file", path, "err", err)
		return false
	case slices.ContainsFunc(v.Members, func(m coordapi.Member) bool { return m.Node == n.cfg.ID }):
		n.log.Info("replica not assigned here but this node is still a member: file kept", "volume", id, "file", path)
		return false
	case len(v.InSync()) < len(v.Members):
		n.log.Info("replica no longer a member here; the volume is not fully in sync yet: file kept for now", "volume", id, "file", path, "state", v.State)
		return false
	default:
		why = "volume re-mirrored elsewhere"
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		n.log.Error("removing a replica file no longer needed", "volume", id, "file", path, "err", err)
		return false
	}
	n.log.Info(why+": replica file removed", "volume", id, "file", path)
	return true
}

// watchdog recomputes the replicas' health twice per ImpairedAfter (at
// least every second, so that the coordinator hears soon that a volume
// recovered) and asks
// for a heartbeat when it changed, so the coordinator's status follows.
func (n *Node) watchdog(ctx context.Context) {
	t := time.NewTicker(min(n.cfg.Timing.ImpairedAfter/2, time.Second))
	defer t.Stop()
	var last []coordapi.VolumeID
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		var impaired []coordapi.VolumeID
		n.mu.Lock()
		for id, r := range n.vols {
			if h, _ := r.health(now); h == coordapi.HealthImpaired {
				impaired = append(impaired, id)
			}
		}
		n.mu.Unlock()
		slices.Sort(impaired)
		n.x.m.impaired.Set(float64(len(impaired)))
		if !slices.Equal(impaired, last) {
			n.log.Info("replica health changed", "impaired", impaired)
			n.agent.Kick()
			last = impaired
		}
	}
}
