package attach

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"keel/netpath/nbdkernel"
)

// Commands returns `keel attach` and `keel detach`.
func Commands() []*cobra.Command {
	return []*cobra.Command{attachCommand(), detachCommand()}
}

type attachFlags struct {
	coord         string
	addr          string
	export        string
	device        string
	connections   int
	timeout       int
	daemon        bool
	list          bool
	output        string
	stateDir      string
	checkInterval time.Duration
	notifyFD      int
}

func attachCommand() *cobra.Command {
	var f attachFlags
	cmd := &cobra.Command{
		Use:   "attach [VOLUME] (--coord URL | --addr HOST:PORT --export NAME) | --list",
		Short: "attach a keel volume as /dev/nbdX with the kernel NBD client, and keep it connected",
		Long: `attach connects the kernel's NBD client to a keel volume and supervises the
device: when a connection breaks (the server restarted, or the coordinator
promoted another primary), it dials the current server and hands the kernel
the new connection (NBD_CMD_RECONFIGURE); I/O waits meanwhile and completes
without the filesystem seeing an error. When no server answers within the
dead-connection timeout (--timeout), the kernel fails I/O with EIO instead of
hanging, and 'keel attach --list' says why.

With --coord, attach asks the coordinator which node is VOLUME's primary and
follows failovers. With --addr, it attaches a standalone 'keel serve' export
and reconnects to the same address.

attach stays in the foreground supervising the device; SIGINT or SIGTERM stops
the supervision and leaves the device attached. --daemon starts the supervisor
in the background (log: <state-dir>/attach.log) and returns once the device is
attached. 'keel detach /dev/nbdX' stops the supervisor and detaches.

Needs root and the nbd module (modprobe nbd).`,
		Example: `  modprobe nbd
  keel attach vol-data --coord http://10.0.0.5:7700 --connections 4 --daemon
  keel attach --addr 127.0.0.1:10809 --export default --device /dev/nbd0 --daemon
  mkfs.ext4 /dev/nbd0 && mount /dev/nbd0 /mnt
  keel attach --list
  umount /mnt && keel detach /dev/nbd0`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.list {
				return list(cmd.Context(), cmd.OutOrStdout(), f.stateDir, f.output)
			}
			return runAttach(cmd, args, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.coord, "coord", "", "coordinator URL: attach VOLUME's primary and follow failovers")
	fl.StringVar(&f.addr, "addr", "", "NBD server address (host:port or unix:/path), without a coordinator")
	fl.StringVar(&f.export, "export", "default", "export name with --addr")
	fl.StringVar(&f.device, "device", "", "device to use, e.g. /dev/nbd0 (default: the first free one)")
	fl.IntVar(&f.connections, "connections", 1, "connections to the server, one kernel queue each")
	fl.IntVar(&f.timeout, "timeout", 30, "dead-connection timeout in seconds: I/O fails with EIO when no server is reachable for this long")
	fl.BoolVar(&f.daemon, "daemon", false, "supervise in the background and return once attached")
	fl.BoolVar(&f.list, "list", false, "list attached devices: server, node, epoch, state and why")
	fl.StringVar(&f.output, "output", "table", "--list output: table or json")
	fl.StringVar(&f.stateDir, "state-dir", DefaultStateDir, "where attach records devices and logs")
	fl.DurationVar(&f.checkInterval, "check-interval", 10*time.Second, "with --coord: how often to ask the coordinator for the primary while connected (a backstop: a failover breaks the connections anyway)")
	fl.IntVar(&f.notifyFD, "notify-fd", -1, "descriptor on which a --daemon child reports the attach")
	_ = fl.MarkHidden("notify-fd")
	return cmd
}

// parseDevice accepts /dev/nbdN, nbdN or N; "" is -1 (any).
func parseDevice(s string) (int, error) {
	if s == "" {
		return -1, nil
	}
	t := strings.TrimPrefix(strings.TrimPrefix(s, "/dev/"), "nbd")
	n, err := strconv.Atoi(t)
	if err != nil || n < 0 || n > 1<<20 {
		return 0, fmt.Errorf("device %q: want /dev/nbdN", s)
	}
	return n, nil
}

func runAttach(cmd *cobra.Command, args []string, f attachFlags) error {
	index, err := parseDevice(f.device)
	if err != nil {
		return err
	}
	if f.timeout < 1 {
		return fmt.Errorf("--timeout %d: want at least 1 second", f.timeout)
	}
	var volume string
	if len(args) == 1 {
		volume = args[0]
	}
	switch {
	case f.coord != "" && f.addr != "":
		return errors.New("give --coord (with VOLUME) or --addr, not both")
	case f.coord != "" && volume == "":
		return errors.New("--coord needs the VOLUME to attach")
	case f.coord == "" && f.addr == "":
		return errors.New("give VOLUME --coord URL, or --addr HOST:PORT --export NAME (or --list)")
	case f.addr != "" && volume != "":
		return fmt.Errorf("VOLUME %q is looked up with --coord; with --addr name the export with --export", volume)
	}
	if f.daemon {
		return spawnDaemon(cmd, args, f)
	}

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cfg := Config{
		Device:      index,
		Connections: f.connections,
		Timeout:     time.Duration(f.timeout) * time.Second,
		StateDir:    f.stateDir,
		Logger:      log,
	}
	if f.coord != "" {
		loc, err := newCoordLocator(f.coord, volume)
		if err != nil {
			return err
		}
		cfg.Locator, cfg.CheckInterval = loc, f.checkInterval
		cfg.Volume, cfg.Coord = volume, f.coord
		cfg.Backend = "keel:volume/" + volume
	} else {
		cfg.Locator = StaticLocator{Addr: f.addr, Export: f.export}
		cfg.Backend = "keel:nbd/" + f.addr + "/" + f.export
	}

	ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	notify := notifier(f.notifyFD)
	nl, err := nbdkernel.OpenNetlink(ctx)
	if err != nil {
		notify.fail(err)
		return err
	}
	defer nl.Close()
	cfg.Kernel = nl
	if mon, err := nbdkernel.OpenMonitor(ctx); err != nil {
		log.Warn("no link-dead notifications; connections are polled", "err", err)
	} else {
		defer mon.Close()
		dead := make(chan int, 16)
		go watchLinkDead(ctx, mon, dead, log)
		cfg.LinkDead = dead
	}
	if index >= 0 {
		if st, err := readState(f.stateDir, index); err == nil && pidAlive(st.PID) {
			err := fmt.Errorf("%s is already attached and supervised by pid %d (keel detach %s first)", st.Device, st.PID, st.Device)
			notify.fail(err)
			return err
		}
	}
	sup, err := Attach(ctx, cfg)
	if err != nil {
		notify.fail(err)
		return err
	}
	st := sup.State()
	fmt.Fprintf(cmd.OutOrStdout(), "%s attached to %s export %q (%s, %d connection(s)); supervising until SIGINT/SIGTERM, then the device stays attached: keel detach %s\n",
		st.Device, st.Addr, st.Export, humanBytes(st.Size), st.Connections, st.Device)
	notify.ok(st.Device)
	return sup.Run(ctx)
}

func watchLinkDead(ctx context.Context, mon *nbdkernel.Monitor, out chan<- int, log *slog.Logger) {
	for ctx.Err() == nil {
		idx, err := mon.Next(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			// Lost notifications cost nothing but latency: the supervisor
			// polls its connections anyway.
			log.Warn("link-dead notifications", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
		for _, i := range idx {
			select {
			case out <- i:
			default:
			}
		}
	}
}

// notifier reports the outcome of the attach to the parent of a --daemon
// child, on a pipe: "ok /dev/nbdN\n" or "error MESSAGE\n".
type notifier int

func (n notifier) send(line string) {
	if n < 0 {
		return
	}
	f := os.NewFile(uintptr(n), "notify")
	_, _ = io.WriteString(f, line+"\n")
	f.Close()
}

func (n notifier) ok(device string) { n.send("ok " + device) }
func (n notifier) fail(err error) {
	n.send("error " + strings.ReplaceAll(err.Error(), "\n", " "))
}

// spawnDaemon starts this command again in the background, in its own
// session, without --daemon and with a notification pipe, and waits until
// it reports the attach.
func spawnDaemon(cmd *cobra.Command, args []string, f attachFlags) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("--daemon: %w", err)
	}
	argv := append(strings.Fields(cmd.CommandPath())[1:], args...)
	cmd.Flags().Visit(func(fl *pflag.Flag) {
		if fl.Name != "daemon" && fl.Name != "notify-fd" {
			argv = append(argv, "--"+fl.Name+"="+fl.Value.String())
		}
	})
	argv = append(argv, "--notify-fd=3")
	if err := os.MkdirAll(f.stateDir, 0o755); err != nil {
		return fmt.Errorf("--daemon: %w", err)
	}
	logPath := filepath.Join(f.stateDir, "attach.log")
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("--daemon: %w", err)
	}
	defer logf.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("--daemon: %w", err)
	}
	defer r.Close()
	child := exec.Command(exe, argv...)
	child.Stdout, child.Stderr = logf, logf
	child.ExtraFiles = []*os.File{w}
	child.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := child.Start(); err != nil {
		w.Close()
		return fmt.Errorf("--daemon: %w", err)
	}
	w.Close()
	line, _ := bufio.NewReader(r).ReadString('\n')
	line = strings.TrimSpace(line)
	switch {
	case strings.HasPrefix(line, "ok "):
		dev := strings.TrimPrefix(line, "ok ")
		fmt.Fprintf(cmd.OutOrStdout(), "%s attached; supervisor pid %d, log %s\n", dev, child.Process.Pid, logPath)
		return child.Process.Release()
	case strings.HasPrefix(line, "error "):
		_ = child.Wait()
		return errors.New(strings.TrimPrefix(line, "error "))
	default:
		_ = child.Wait()
		return fmt.Errorf("the supervisor exited before attaching (see %s)", logPath)
	}
}

func detachCommand() *cobra.Command {
	var (
		force    bool
		stateDir string
	)
	cmd := &cobra.Command{
		Use:   "detach /dev/nbdX",
		Short: "stop supervising and detach an NBD device",
		Long: `detach stops the device's supervisor (if keel attach runs one), then
has the kernel disconnect the device (NBD_CMD_DISCONNECT) and forgets it.
It refuses while the device or one of its partitions is mounted, unless
--force: I/O of a mounted filesystem would then fail.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			index, err := parseDevice(args[0])
			if err != nil {
				return err
			}
			if !force {
				if mnt, err := mountedAt(index); err != nil {
					return err
				} else if mnt != "" {
					return fmt.Errorf("/dev/nbd%d is mounted on %s: unmount it first (or --force)", index, mnt)
				}
			}
			ctx := cmd.Context()
			if st, err := readState(stateDir, index); err == nil && pidAlive(st.PID) {
				if err := stopSupervisor(ctx, st.PID); err != nil {
					return err
				}
			}
			nl, err := nbdkernel.OpenNetlink(ctx)
			if err != nil {
				return err
			}
			defer nl.Close()
			if err := nl.Disconnect(ctx, index); err != nil {
				return err
			}
			if err := removeState(stateDir, index); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "/dev/nbd%d detached\n", index)
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "detach even when mounted")
	cmd.Flags().StringVar(&stateDir, "state-dir", DefaultStateDir, "where attach records devices")
	return cmd
}

// pidAlive reports whether pid is a running keel attach supervisor (not a
// recycled pid).
func pidAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	for _, a := range strings.Split(string(b), "\x00") {
		if a == "attach" {
			return true
		}
	}
	return false
}

// stopSupervisor sends SIGTERM and waits (up to 10 s) for the process to
// exit.
func stopSupervisor(ctx context.Context, pid int) error {
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return fmt.Errorf("stopping supervisor pid %d: %w", pid, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for pidAlive(pid) {
		if time.Now().After(deadline) {
			return fmt.Errorf("supervisor pid %d did not exit within 10s of SIGTERM", pid)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// mountedAt returns a mount point of /dev/nbdN or of one of its
// partitions, or "" when none is mounted. Devices are matched by number
// (major:minor in /proc/self/mountinfo).
func mountedAt(index int) (string, error) {
	name := fmt.Sprintf("nbd%d", index)
	devs := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join("/sys/block", name, "dev")); err == nil {
		devs[strings.TrimSpace(string(b))] = true
	}
	parts, _ := filepath.Glob(filepath.Join("/sys/block", name, name+"p*", "dev"))
	for _, p := range parts {
		if b, err := os.ReadFile(p); err == nil {
			devs[strings.TrimSpace(string(b))] = true
		}
	}
	if len(devs) == 0 {
		return "", nil
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("checking mounts: %w", err)
	}
	for _, line := range strings.Split(string(mi), "\n") {
		fields := strings.Fields(line)
		if len(fields) > 4 && devs[fields[2]] {
			return fields[4], nil
		}
	}
	return "", nil
}

func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
