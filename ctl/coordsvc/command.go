package coordsvc

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"keel/ctl/coordapi"
)

// CoordCommand is `keel coord`: one member of a coordinator cell. It lives
// here rather than in ctl/cli because it runs a Server, and ctl/cli, a
// service like this package, may not import it.
func CoordCommand() *cobra.Command {
	var cfg Config
	cell := coordapi.DefaultConfig()
	var logLevel string
	cmd := &cobra.Command{
		Use:   "coord --id ID --data-dir DIR [--listen ADDR] [--raft-addr ADDR] [--join URL...]",
		Short: "run one member of a coordinator cell (one alone, or three or five together)",
		Long: `coord runs one member of a coordinator cell: the authority on which node is
each volume's primary, replicated with raft. A member with no state and no
--join starts a new one-member cell; further members start with --join
pointing at any existing member and are added as voters. A member restarted
with its --data-dir rejoins on its own (keep --id and --raft-addr).

The lease and reserve flags set the cell's configuration once, when its
first leader finds none in the replicated state.`,
		Example: `  # one member
  keel coord --id c1 --data-dir data/c1
  # three members on one machine
  keel coord --id c1 --data-dir data/c1 --listen 127.0.0.1:7400 --raft-addr 127.0.0.1:7401
  keel coord --id c2 --data-dir data/c2 --listen 127.0.0.1:7410 --raft-addr 127.0.0.1:7411 --join http://127.0.0.1:7400
  keel coord --id c3 --data-dir data/c3 --listen 127.0.0.1:7420 --raft-addr 127.0.0.1:7421 --join http://127.0.0.1:7400`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.ID == "" {
				return errors.New("--id is required: this member's name in the cell, e.g. --id c1")
			}
			if err := coordapi.ValidateMemberID(cfg.ID); err != nil {
				return fmt.Errorf("--id: %w", err)
			}
			if cfg.DataDir == "" {
				return errors.New("--data-dir is required: where this member keeps its raft log and snapshots, e.g. --data-dir data/" + cfg.ID)
			}
			if err := concreteAddr("--raft-addr", cfg.RaftAddr); err != nil {
				return err
			}
			if _, _, err := net.SplitHostPort(cfg.Listen); err != nil {
				return fmt.Errorf("--listen %q: give host:port, e.g. --listen 127.0.0.1:7400", cfg.Listen)
			}
			for _, j := range cfg.Join {
				if !strings.HasPrefix(j, "http://") && !strings.HasPrefix(j, "https://") {
					return fmt.Errorf("--join %q: give a member's API URL, e.g. --join http://127.0.0.1:7400", j)
				}
			}
			if err := cell.Validate(); err != nil {
				return fmt.Errorf("cell configuration flags: %w", err)
			}
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: use debug, info, warn or error", logLevel)
			}
			cfg.Coord = cell
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			s, err := New(cfg)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "keel coord %s: API %s (metrics at /metrics), raft %s; stop with Ctrl-C\n", cfg.ID, s.APIURL(), s.RaftAddr())
			<-ctx.Done()
			cfg.Logger.Info("stopping")
			return s.Close()
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.ID, "id", "", "this member's name in the cell, e.g. c1 (must not change)")
	f.StringVar(&cfg.DataDir, "data-dir", "", "directory for the raft log and snapshots")
	f.StringVar(&cfg.Listen, "listen", "127.0.0.1:7400", "address of the HTTP API (nodes, operators, other members)")
	f.StringVar(&cfg.AdvertiseURL, "advertise", "", "API URL other members and clients use (default http://<listen address>)")
	f.StringVar(&cfg.RaftAddr, "raft-addr", "127.0.0.1:7401", "raft address, bound and advertised to the other members (host:port, not 0.0.0.0)")
	f.StringSliceVar(&cfg.Join, "join", nil, "API URLs of existing members to join (new members only)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	leaseFlags(cmd, &cell)
	return cmd
}

func leaseFlags(cmd *cobra.Command, cell *coordapi.Config) {
	f := cmd.Flags()
	f.Var((*durFlag)(&cell.Lease.Duration), "lease", "node lease duration: how long a silent node keeps its primaries")
	f.Var((*durFlag)(&cell.Lease.Interval), "heartbeat-interval", "how often nodes heartbeat (at most a third of --lease)")
	f.Var((*durFlag)(&cell.Lease.Margin), "lease-margin", "safety margin a node subtracts from its lease")
	f.Float64Var(&cell.Lease.MaxDrift, "max-clock-drift", cell.Lease.MaxDrift, "bound on any clock's rate error, as a fraction (0.01 = 1%)")
	f.Float64Var(&cell.ReserveFraction, "reserve", cell.ReserveFraction, "fraction of each node's capacity kept for re-mirroring; creation is refused before it")
}

// durFlag is a pflag.Value over coordapi.Duration.
type durFlag coordapi.Duration

func (d *durFlag) String() string { return time.Duration(*d).String() }
func (d *durFlag) Type() string   { return "duration" }
func (d *durFlag) Set(s string) error {
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("want a duration such as 10s: %w", err)
	}
	*d = durFlag(v)
	return nil
}

// concreteAddr checks that addr is host:port with a host others can dial
// (raft advertises its bind address).
func concreteAddr(flag, addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || port == "" {
		return fmt.Errorf("%s %q: give host:port, e.g. %s 127.0.0.1:7401", flag, addr, flag)
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		return fmt.Errorf("%s %q: raft advertises this address to the other members, so give a concrete IP such as 127.0.0.1 or 10.0.0.5, not %q", flag, addr, host)
	}
	return nil
}
