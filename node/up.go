package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
	"keel/ctl/coordclient"
	"keel/netpath/nbdkernel"
)

// UpConfig is what `keel up` runs: a whole cluster on one machine.
type UpConfig struct {
	Nodes    int
	Replicas int
	DataDir  string
	Size     int64
	Volume   string
	// Capacity is the space each node offers (keel node --capacity);
	// default 4 × Size. All nodes share one file system here: offering the
	// whole of it from each would make the re-mirror reserve (a share of
	// capacity) larger than what is free.
	Capacity int64
	// CoordListen and RaftListen are the coordinator's API and raft
	// addresses; node i (from 0) listens for NBD on NBDPort+i, for
	// replication on ReplPort+i and serves metrics on MetricsPort+i
	// (MetricsPort 0: none), all on 127.0.0.1.
	CoordListen, RaftListen        string
	NBDPort, ReplPort, MetricsPort int
	// Lease is the coordinator's node lease: about how long a failover
	// takes after a node dies. Heartbeats go every Lease/5.
	Lease time.Duration
	// Exe is the keel binary the processes run; default this process's.
	Exe string
	// Out receives the banner and the status line.
	Out io.Writer
}

// UpCommand is `keel up`.
func UpCommand() *cobra.Command {
	var cfg UpConfig
	var size, capacity string
	cmd := &cobra.Command{
		Use:   "up [--nodes 3] [--replicas 2] [--data-dir DIR] [--size 4G] [--volume default]",
		Short: "run a coordinator and several nodes on this machine, with one replicated volume to try",
		Long: `up starts a one-member coordinator and --nodes storage nodes on loopback, each
a child process of this binary (keel coord, keel node) with its own ports
and data directory under --data-dir, creates the volume --volume with
--replicas replicas (or finds it, when restarted on the same directory),
prints its NBD URI and how to attach it, and stays in the foreground with a
status line: the volume's state, epoch, primary and in-sync replicas.

The processes are real: kill -9 the primary's node and watch the
coordinator promote a secondary after about one --lease (the NBD URI moves
to the new primary's port; keel attach follows it). Logs are in
<data-dir>/logs. Ctrl-C (or SIGTERM) stops the nodes, then the coordinator;
the data stays for the next run.`,
		Example: `  keel up
  keel up --nodes 5 --replicas 3 --size 1G --data-dir /var/tmp/keel`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			n, err := coordapi.ParseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			cfg.Size = n
			if capacity != "" {
				if cfg.Capacity, err = coordapi.ParseSize(capacity); err != nil {
					return fmt.Errorf("--capacity: %w", err)
				}
			}
			cfg.Out = cmd.OutOrStdout()
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return Up(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.IntVar(&cfg.Nodes, "nodes", 3, "storage nodes to run")
	f.IntVar(&cfg.Replicas, "replicas", 2, "replicas of the volume (at most --nodes)")
	f.StringVar(&cfg.DataDir, "data-dir", filepath.Join("data", "up"), "directory for the coordinator's and nodes' data and logs")
	f.StringVar(&size, "size", "4G", "size of the volume when created")
	f.StringVar(&cfg.Volume, "volume", "default", "name of the volume (its NBD export name)")
	f.StringVar(&capacity, "capacity", "", "space each node offers for replicas (default 4 × --size; 20% of it is the re-mirror reserve)")
	f.StringVar(&cfg.CoordListen, "coord-listen", "127.0.0.1:7400", "coordinator API address")
	f.StringVar(&cfg.RaftListen, "raft-listen", "127.0.0.1:7401", "coordinator raft address")
	f.IntVar(&cfg.NBDPort, "nbd-port", 10809, "NBD port of the first node (the next nodes count up)")
	f.IntVar(&cfg.ReplPort, "repl-port", 10909, "replication port of the first node")
	f.IntVar(&cfg.MetricsPort, "metrics-port", 9401, "metrics port of the first node (0: no metrics endpoints)")
	f.DurationVar(&cfg.Lease, "lease", 5*time.Second, "node lease: roughly how long a failover takes")
	return cmd
}

// child is one process of the cluster.
type child struct {
	name string
	args []string
	log  string
	cmd  *exec.Cmd
	done chan struct{} // closed when it exited
	err  error         // its exit, once done is closed
}

func startChild(exe, name, logPath string, args ...string) (*child, error) {
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	c := &child{name: name, args: args, log: logPath, cmd: exec.Command(exe, args...), done: make(chan struct{})}
	c.cmd.Stdout, c.cmd.Stderr = lf, lf
	c.cmd.SysProcAttr = childAttr()
	err = c.cmd.Start()
	lf.Close() // the child has its own copy
	if err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	go func() {
		c.err = c.cmd.Wait()
		close(c.done)
	}()
	return c, nil
}

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop asks the child to stop (SIGTERM) and waits up to d before killing
// it.
func (c *child) stop(d time.Duration) {
	if c.exited() {
		return
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
		c.cmd.Process.Kill()
		<-c.done
	}
}

func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Up runs the cluster until ctx is done, then stops it.
func Up(ctx context.Context, cfg UpConfig) error {
	switch {
	case cfg.Nodes < 1 || cfg.Nodes > 50:
		return fmt.Errorf("--nodes %d: run 1 to 50 nodes", cfg.Nodes)
	case cfg.Replicas < 1 || cfg.Replicas > cfg.Nodes || cfg.Replicas > coordapi.MaxReplicas:
		return fmt.Errorf("--replicas %d: want 1 to %d (at most --nodes)", cfg.Replicas, min(cfg.Nodes, coordapi.MaxReplicas))
	case cfg.Size <= 0 || cfg.Size%coordapi.SizeAlign != 0:
		return fmt.Errorf("--size %d: want a positive multiple of 4 KiB", cfg.Size)
	}
	if err := coordapi.ValidateVolumeName(cfg.Volume); err != nil {
		return fmt.Errorf("--volume: %w", err)
	}
	if cfg.Lease <= 0 {
		cfg.Lease = 5 * time.Second
	}
	if cfg.Capacity == 0 {
		cfg.Capacity = 4 * cfg.Size
	}
	if cfg.Capacity < cfg.Size {
		return fmt.Errorf("--capacity %s: below the volume's --size %s", coordapi.FormatBytes(cfg.Capacity), coordapi.FormatBytes(cfg.Size))
	}
	if cfg.Out == nil {
		cfg.Out = os.Stdout
	}
	exe := cfg.Exe
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return fmt.Errorf("finding the keel binary: %w", err)
		}
	}
	dir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return err
	}
	logs := filepath.Join(dir, "logs")
	if err := os.MkdirAll(logs, 0o755); err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	}
	url := "http://" + cfg.CoordListen

	var children []*child
	defer func() {
		// Nodes first (their in-flight requests finish while the
		// coordinator still answers), then the coordinator.
		for _, c := range slices.Backward(children) {
			c.stop(30 * time.Second)
		}
	}()
	interval := cfg.Lease / 5
	coord, err := startChild(exe, "coord", filepath.Join(logs, "coord.log"), "coord", "--id", "c1",
		"--data-dir", filepath.Join(dir, "coord"), "--listen", cfg.CoordListen, "--raft-addr", cfg.RaftListen,
		"--lease", cfg.Lease.String(), "--heartbeat-interval", interval.String(), "--lease-margin", (interval / 2).String())
	if err != nil {
		return err
	}
	children = append(children, coord)
	type nodeInfo struct {
		id        coordapi.NodeID
		nbd, repl string
		c         *child
	}
	var nodes []*nodeInfo
	for i := range cfg.Nodes {
		ni := &nodeInfo{
			id:   coordapi.NodeID(fmt.Sprintf("n%d", i+1)),
			nbd:  fmt.Sprintf("127.0.0.1:%d", cfg.NBDPort+i),
			repl: fmt.Sprintf("127.0.0.1:%d", cfg.ReplPort+i),
		}
		args := []string{"node", "--id", string(ni.id), "--zone", fmt.Sprintf("z%d", i+1),
			"--data-dir", filepath.Join(dir, string(ni.id)), "--coord", url,
			"--primary-listen", ni.nbd, "--repl-listen", ni.repl, "--capacity", strconv.FormatInt(cfg.Capacity, 10)}
		if cfg.MetricsPort > 0 {
			args = append(args, "--metrics", fmt.Sprintf("127.0.0.1:%d", cfg.MetricsPort+i))
		}
		if ni.c, err = startChild(exe, string(ni.id), filepath.Join(logs, string(ni.id)+".log"), args...); err != nil {
			return err
		}
		children = append(children, ni.c)
		nodes = append(nodes, ni)
	}
	client, err := coordclient.New(coordclient.Config{URLs: []string{url}, AttemptTimeout: 3 * time.Second, Attempts: 3,
		Backoff: coordclient.Backoff{Base: 100 * time.Millisecond, Max: time.Second}})
	if err != nil {
		return err
	}
	// poll waits for cond, failing early when a process died.
	poll := func(what string, within time.Duration, cond func(context.Context) error) error {
		deadline := time.Now().Add(within)
		for {
			cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			err := cond(cctx)
			cancel()
			if err == nil {
				return nil
			}
			for _, c := range children {
				if c.exited() {
					return fmt.Errorf("%s exited (%v) before the cluster was up; its log %s ends:\n%s", c.name, c.err, c.log, logTail(c.log, 15))
				}
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: not within %v: %w (logs in %s)", what, within, err, logs)
			}
			t := time.NewTimer(100 * time.Millisecond)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
		}
	}
	fmt.Fprintf(cfg.Out, "keel up: starting a coordinator (%s) and %d nodes; data in %s, logs in %s\n", url, cfg.Nodes, dir, logs)
	if err := poll("every node registered", 60*time.Second, func(ctx context.Context) error {
		ns, err := client.Nodes(ctx)
		if err != nil {
			return err
		}
		up := 0
		for _, n := range ns {
			if n.State == coordapi.NodeUp {
				up++
			}
		}
		if up < cfg.Nodes {
			return fmt.Errorf("%d of %d nodes up", up, cfg.Nodes)
		}
		return nil
	}); err != nil {
		return err
	}
	var vol *coordapi.Volume
	if err := poll("volume "+cfg.Volume, 30*time.Second, func(ctx context.Context) error {
		v, err := client.Volume(ctx, cfg.Volume)
		var ae *coordapi.Error
		if errors.As(err, &ae) && ae.Code == coordapi.CodeNotFound {
			v, err = client.CreateVolume(ctx, coordapi.CreateVolumeRequest{Name: cfg.Volume, Size: cfg.Size, Replicas: cfg.Replicas, RequestID: "keel-up-" + cfg.Volume})
		}
		vol = v
		return err
	}); err != nil {
		return err
	}
	if vol.Size != cfg.Size || vol.Replicas != cfg.Replicas {
		fmt.Fprintf(cfg.Out, "keel up: volume %s exists already with %s and %d replicas; using it as it is\n", vol.Name, coordapi.FormatBytes(vol.Size), vol.Replicas)
	}
	addrOf := func(ns []coordapi.Node, id coordapi.NodeID) string {
		for _, n := range ns {
			if n.ID == id {
				return n.PrimaryAddr
			}
		}
		return ""
	}
	var addr string
	if err := poll("volume "+cfg.Volume+" served by its primary", 60*time.Second, func(ctx context.Context) error {
		v, err := client.Volume(ctx, string(vol.ID))
		if err != nil {
			return err
		}
		if v.Primary == "" {
			return fmt.Errorf("no primary yet: %s: %s", v.State, v.Reason)
		}
		ns, err := client.Nodes(ctx)
		if err != nil {
			return err
		}
		addr = addrOf(ns, v.Primary)
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		_, err = nbdkernel.Handshake(conn, vol.Name)
		return err
	}); err != nil {
		return err
	}

	uri := "nbd://" + addr + "/" + vol.Name
	w := cfg.Out
	fmt.Fprintf(w, "\nvolume %s (%s): %s, %d replicas\n  NBD URI: %s   (the primary's; it moves when another node is promoted)\n\n",
		vol.Name, vol.ID, coordapi.FormatBytes(vol.Size), vol.Replicas, uri)
	fmt.Fprintf(w, "try it:\n")
	fmt.Fprintf(w, "  nbdinfo %s\n", uri)
	fmt.Fprintf(w, "  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' %s\n", uri)
	fmt.Fprintf(w, "  fio --name=try --ioengine=nbd --uri=%s --rw=randwrite --bs=4k --iodepth=32 --size=256M --runtime=20 --time_based\n", uri)
	fmt.Fprintf(w, "  sudo modprobe nbd && sudo %s attach %s --coord %s    # /dev/nbdX, follows failovers\n", filepath.Base(exe), vol.Name, url)
	fmt.Fprintf(w, "  %s volume status %s --coord %s\n\n", filepath.Base(exe), vol.Name, url)
	fmt.Fprintf(w, "processes (kill -9 the primary's node to watch a failover):\n")
	fmt.Fprintf(w, "  coord  pid %-7d api %s\n", coord.cmd.Process.Pid, url)
	for _, ni := range nodes {
		fmt.Fprintf(w, "  %-6s pid %-7d nbd %s  repl %s\n", ni.id, ni.c.cmd.Process.Pid, ni.nbd, ni.repl)
	}
	fmt.Fprintf(w, "\nCtrl-C stops everything (the data stays in %s).\n\n", dir)

	tty := false
	if f, ok := w.(*os.File); ok && isTerminal(f.Fd()) {
		tty = true
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	last, lastPrimary := "", addr
	reported := map[*child]bool{}
	for {
		select {
		case <-ctx.Done():
			if tty {
				fmt.Fprintln(w)
			}
			fmt.Fprintln(w, "keel up: stopping the nodes, then the coordinator")
			return nil
		case <-tick.C:
		}
		for _, c := range children {
			if c.exited() && !reported[c] {
				reported[c] = true
				fmt.Fprintf(w, "%s%s (pid %d) exited: %v; restart it by hand with: %s %s\n", clearLine(tty), c.name, c.cmd.Process.Pid, c.err, exe, strings.Join(c.args, " "))
				last = ""
			}
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		line, primaryAddr := upStatus(cctx, client, string(vol.ID), cfg.Nodes)
		cancel()
		if primaryAddr != "" && primaryAddr != lastPrimary {
			fmt.Fprintf(w, "%sprimary moved: NBD URI now nbd://%s/%s\n", clearLine(tty), primaryAddr, vol.Name)
			lastPrimary = primaryAddr
			last = ""
		}
		switch {
		case tty:
			fmt.Fprintf(w, "\r\x1b[K%s %s", time.Now().Format("15:04:05"), line)
		case line != last:
			fmt.Fprintf(w, "%s %s\n", time.Now().Format("15:04:05"), line)
		}
		last = line
	}
}

func clearLine(tty bool) string {
	if tty {
		return "\r\x1b[K"
	}
	return ""
}

// upStatus is the status line: the volume's state, epoch, primary and
// in-sync set, and how many nodes are up. It also returns the primary's NBD
// address.
func upStatus(ctx context.Context, c *coordclient.Client, vol string, nodes int) (string, string) {
	v, err := c.Volume(ctx, vol)
	if err != nil {
		return fmt.Sprintf("coordinator unreachable: %v", err), ""
	}
	ns, err := c.Nodes(ctx)
	if err != nil {
		return fmt.Sprintf("coordinator unreachable: %v", err), ""
	}
	up, addr := 0, ""
	for _, n := range ns {
		if n.State == coordapi.NodeUp {
			up++
		}
		if n.ID == v.Primary {
			addr = n.PrimaryAddr
		}
	}
	var in []string
	for _, id := range v.InSync() {
		in = append(in, string(id))
	}
	slices.Sort(in)
	primary := string(v.Primary)
	if primary == "" {
		primary = "none"
	} else {
		primary += " (" + addr + ")"
	}
	line := fmt.Sprintf("%s: %s, epoch %d, primary %s, in sync %s; nodes up %d/%d", v.Name, v.State, v.Epoch, primary, strings.Join(in, ","), up, nodes)
	if v.State != coordapi.StateOK && v.Reason != "" {
		line += " — " + v.Reason
	}
	return line, addr
}
