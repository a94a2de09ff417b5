package node

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
	"keel/netpath/sock"
)

// NodeCommand is `keel node`: the storage node daemon. Its operator
// subcommands (list, drain) are attached by the keel binary; the daemon's
// flags are local to this command, so they do not reach them.
func NodeCommand() *cobra.Command {
	var cfg Config
	var id, coord, capacity, logLevel string
	var throttle func() (sock.ThrottleConfig, error)
	cmd := &cobra.Command{
		Use:   "node --id ID --data-dir DIR --coord URL --primary-listen ADDR --repl-listen ADDR",
		Short: "the storage node daemon, and node administration (list, drain)",
		Long: `node runs a storage node: it registers with the coordinator and keeps its
lease with heartbeats, opens (or creates) the replica files the coordinator
assigns to it in --data-dir, serves the volumes it leads over NBD on the
primary network (export name: the volume's name, or its id) and replicates
their writes synchronously to the in-sync secondaries over the replication
network; as a secondary it applies the primaries' replication streams.

Each network's sockets can be pinned to an interface (--primary-iface,
--repl-iface; SO_BINDTODEVICE, needs CAP_NET_RAW, else the node starts
unpinned with a warning). Coordinator traffic uses the primary network.
SIGINT or SIGTERM stops it: in-flight requests finish, replicas are flushed
and marked clean.`,
		Example: `  keel node --id n1 --zone a --data-dir data/n1 --coord http://127.0.0.1:7400 \
    --primary-listen 127.0.0.1:10809 --repl-listen 127.0.0.1:10909 --metrics 127.0.0.1:9401
  keel node list                     # operator view of the nodes`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if id == "" {
				return errors.New("--id is required: this node's name in the cluster, e.g. --id n1")
			}
			cfg.ID = coordapi.NodeID(id)
			if err := cfg.ID.Validate(); err != nil {
				return fmt.Errorf("--id: %w", err)
			}
			if cfg.DataDir == "" {
				return errors.New("--data-dir is required: where the replica files live, e.g. --data-dir data/" + id)
			}
			for _, u := range strings.Split(coord, ",") {
				if u = strings.TrimSpace(u); u != "" {
					if !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
						return fmt.Errorf("--coord %q: give coordinator API URLs, e.g. --coord http://127.0.0.1:7400", u)
					}
					cfg.Coord = append(cfg.Coord, u)
				}
			}
			if len(cfg.Coord) == 0 {
				return errors.New("--coord is required: the coordinator cell's API URL(s), e.g. --coord http://127.0.0.1:7400")
			}
			if cfg.PrimaryListen == "" || cfg.ReplListen == "" {
				return errors.New("--primary-listen and --repl-listen are required: NBD clients' and replication streams' addresses, e.g. --primary-listen 127.0.0.1:10809 --repl-listen 127.0.0.1:10909")
			}
			if capacity != "" {
				n, err := coordapi.ParseSize(capacity)
				if err != nil {
					return fmt.Errorf("--capacity: %w", err)
				}
				cfg.Capacity = n
			}
			var err error
			if cfg.Throttle, err = throttle(); err != nil {
				return err
			}
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: use debug, info, warn or error", logLevel)
			}
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return Run(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&id, "id", "", "this node's name in the cluster, e.g. n1 (must not change)")
	f.StringVar(&cfg.Zone, "zone", "", "failure domain: replicas of a volume go to distinct zones where possible")
	f.StringVar(&cfg.DataDir, "data-dir", "", "directory of the replica files (<volume id>.vol)")
	f.StringVar(&coord, "coord", "", "coordinator API URL(s), comma separated")
	f.StringVar(&cfg.PrimaryListen, "primary-listen", "", "NBD address on the primary network, e.g. 127.0.0.1:10809")
	f.StringVar(&cfg.ReplListen, "repl-listen", "", "replication address on the replication network, e.g. 127.0.0.1:10909")
	f.StringVar(&cfg.PrimaryAdvertise, "primary-advertise", "", "NBD address registered with the coordinator (default: the listener's)")
	f.StringVar(&cfg.ReplAdvertise, "repl-advertise", "", "replication address registered with the coordinator (default: the listener's)")
	f.StringVar(&cfg.PrimaryIface, "primary-iface", "", "pin primary-network sockets (NBD, coordinator) to this interface")
	f.StringVar(&cfg.ReplIface, "repl-iface", "", "pin replication sockets to this interface")
	f.StringVar(&capacity, "capacity", "", "space offered for replicas, e.g. 500G (default: the data directory's file system size)")
	f.StringVar(&cfg.Metrics, "metrics", "", "serve Prometheus metrics on this address, e.g. 127.0.0.1:9401")
	f.DurationVar(&cfg.Timing.LossWait, "loss-wait", 30*time.Second, "how long writes wait for the coordinator to drop a failed secondary before failing with EIO")
	f.DurationVar(&cfg.Timing.PeerWait, "peer-wait", 5*time.Second, "how long writes wait for a secondary's stream to come up (or its replica to open) before reporting it lost")
	f.DurationVar(&cfg.Timing.FrameTimeout, "repl-timeout", 5*time.Second, "replication frame deadline: a frame unanswered this long fails the stream")
	f.DurationVar(&cfg.Timing.ImpairedAfter, "impaired-after", 5*time.Second, "report a replica impaired when requests make no progress for this long")
	f.DurationVar(&cfg.ShutdownTimeout, "shutdown-timeout", 30*time.Second, "how long in-flight requests may take to finish after SIGINT/SIGTERM")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	throttle = ThrottleFlags(cmd)
	return cmd
}
