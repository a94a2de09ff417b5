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

The lease, reserve and recovery flags set the cell's configuration once,
when its first leader finds none in the replicated state (later, change it
with PUT /v1/config).

Recovery: a replica out of sync is caught up from the primary's
write-intent bitmap when its node returns within --recovery-grace;
otherwise it is given up and the volume re-mirrored to a new node (which
may use the reserve). Copies run only with a slot from the coordinator:
--max-remirrors cluster-wide and --max-remirrors-per-node per node, and
--max-catch-ups-per-node. When --mass-failure-losses replicas are lost
within --mass-failure-window, the cell stops placing replicas and waits
for the previous ones (mass-failure mode) until the losses subside or
--mass-failure-grace passes.`,
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
			if err := validateCellFlags(cell); err != nil {
				return err
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
	r := &cell.Recovery
	f.Var((*durFlag)(&r.Grace), "recovery-grace", "how long an out-of-sync replica may stay away before it is given up and re-mirrored elsewhere")
	f.IntVar(&r.MaxRemirrors, "max-remirrors", r.MaxRemirrors, "re-mirrors running at once, cluster-wide")
	f.IntVar(&r.MaxRemirrorsPerNode, "max-remirrors-per-node", r.MaxRemirrorsPerNode, "re-mirrors one node sends or receives at once")
	f.IntVar(&r.MaxCatchUpsPerNode, "max-catch-ups-per-node", r.MaxCatchUpsPerNode, "catch-ups one node sends or receives at once")
	f.Var((*durFlag)(&r.SlotRetry), "slot-retry", "base wait a refused slot request is told (nodes add backoff and jitter)")
	f.Var((*durFlag)(&r.SlotTTL), "slot-ttl", "a slot whose copy reports no progress for this long is released")
	f.IntVar(&r.MassFailureLosses, "mass-failure-losses", r.MassFailureLosses, "replicas lost within --mass-failure-window that enter mass-failure mode")
	f.Var((*durFlag)(&r.MassFailureWindow), "mass-failure-window", "window over which replica losses are counted")
	f.Var((*durFlag)(&r.MassFailureGrace), "mass-failure-grace", "longest stay in mass-failure mode")
}

// recoveryFlags names, for each recovery field, the flag that sets it and
// its default (the fix a refusal suggests).
func recoveryFlags() map[string][2]string {
	d := coordapi.DefaultRecovery()
	return map[string][2]string{
		"grace":                  {"--recovery-grace", d.Grace.D().String()},
		"max_remirrors":          {"--max-remirrors", fmt.Sprint(d.MaxRemirrors)},
		"max_remirrors_per_node": {"--max-remirrors-per-node", fmt.Sprint(d.MaxRemirrorsPerNode)},
		"max_catch_ups_per_node": {"--max-catch-ups-per-node", fmt.Sprint(d.MaxCatchUpsPerNode)},
		"slot_retry":             {"--slot-retry", d.SlotRetry.D().String()},
		"slot_ttl":               {"--slot-ttl", d.SlotTTL.D().String()},
		"mass_failure_losses":    {"--mass-failure-losses", fmt.Sprint(d.MassFailureLosses)},
		"mass_failure_window":    {"--mass-failure-window", d.MassFailureWindow.D().String()},
		"mass_failure_grace":     {"--mass-failure-grace", d.MassFailureGrace.D().String()},
	}
}

// validateCellFlags checks the cell configuration the flags built; a bad
// recovery value is reported by its flag, with the range and the default.
func validateCellFlags(cell coordapi.Config) error {
	err := cell.Validate()
	if err == nil {
		return nil
	}
	var fe *coordapi.FieldError
	if errors.As(err, &fe) {
		if f, ok := recoveryFlags()[fe.Field]; ok {
			return fmt.Errorf("%s %s: %s; give a value in that range, or leave the flag out for the default (%s %s)", f[0], fe.Value, fe.Range, f[0], f[1])
		}
	}
	return fmt.Errorf("cell configuration flags: %w", err)
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
