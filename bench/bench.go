// Package bench is keel's benchmark harness: the `keel bench` command tree.
// It binds flags to the Config structs of the libraries under it (bench/fio,
// with bench/chart for plots) and runs them; the measuring lives in those
// packages so that tests and other tools can drive them without a CLI.
//
// bench is the top layer below the keel binary: it may import any keel
// package, and nothing but main imports it.
package bench

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"keel/bench/fio"
	"keel/bench/repl"
	"keel/ctl/coordapi"
)

// Command returns the `keel bench` command and its subcommands.
func Command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Benchmarks: keel against its peers and the disk itself",
	}
	cmd.AddCommand(fioCommand(), replCommand())
	return cmd
}

func fioCommand() *cobra.Command {
	var (
		cfg       fio.Config
		size      string
		peers     string
		workloads string
		markdown  string
		variants  []string
		quiet     bool
	)
	cmd := &cobra.Command{
		Use:   "fio",
		Short: "Run the fio suite over NBD against keel, nbdkit, qemu-nbd, nbd-server, go-nbd and the raw file",
		Long: `Run the same fio suite (engine nbd, over loopback TCP or a Unix socket)
against keel and its peers, each on a fresh preallocated file on the same
disk, and against that file directly with O_DIRECT (raw, the limit). Targets
alternate rep by rep. Prints a table and issue 7's target checks, and writes
latest.json, latest.svg and latest.md into --out.

Targets: ` + strings.Join(fio.TargetNames(), ", ") + `
Workloads: ` + strings.Join(fio.WorkloadNames(), ", ") + `

Missing peers are skipped; install them with ` + "`make bench-deps`" + `.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if markdown != "" {
				r, err := fio.ReadReport(markdown)
				if err != nil {
					return err
				}
				_, err = fmt.Fprint(cmd.OutOrStdout(), fio.Markdown(r))
				return err
			}
			n, err := coordapi.ParseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			cfg.Size = n
			cfg.Targets = splitList(peers)
			cfg.Workloads = splitList(workloads)
			cfg.KeelBin = keelBin(cfg.KeelBin)
			for _, s := range variants {
				v, err := fio.ParseKeelVariant(s)
				if err != nil {
					return err
				}
				cfg.KeelVariants = append(cfg.KeelVariants, v)
			}
			cfg.Command = os.Args
			cfg.Stdout = cmd.OutOrStdout()
			cfg.Logger = logger(cmd, quiet)
			return runUntilSignal(cmd, "target", func(ctx context.Context) (int, error) {
				r, err := fio.Run(ctx, cfg)
				if err != nil {
					return 0, err
				}
				return len(r.Errors), nil
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&peers, "peers", strings.Join(fio.TargetNames(), ","), "targets to run, comma-separated, in this order")
	f.StringVar(&workloads, "workloads", strings.Join(fio.WorkloadNames(), ","), "workloads to run, comma-separated")
	f.DurationVar(&cfg.Runtime, "runtime", 20*time.Second, "measured time per workload")
	f.DurationVar(&cfg.Ramp, "ramp", time.Second, "unmeasured fio ramp time before each workload")
	f.IntVar(&cfg.Reps, "reps", 2, "repetitions; targets alternate within each")
	f.StringVar(&size, "size", "4G", "volume size (K, M, G, T suffixes are binary)")
	f.StringVar(&cfg.Dir, "dir", "", "directory for the volume files, on the disk under test, never tmpfs (default: a new directory under /var/tmp)")
	f.BoolVar(&cfg.Unix, "unix", false, "serve NBD on Unix sockets instead of loopback TCP")
	f.StringVar(&cfg.Out, "out", "bench/results", "directory for latest.json, latest.svg and latest.md (empty: write none)")
	f.StringVar(&cfg.KeelBin, "keel-bin", "", "keel binary serving the keel target (default: this executable)")
	f.StringArrayVar(&variants, "keel-variant", nil, "NAME=/path/to/keel[:ENV=VAL,...]: one more keel build (and environment) run as target NAME right after keel, alternating like every target (repeatable)")
	f.StringVar(&cfg.FioBin, "fio", "fio", "fio binary")
	f.StringVar(&markdown, "markdown", "", "print the Markdown table of an existing report (e.g. bench/results/latest.json) and exit")
	f.BoolVarP(&quiet, "quiet", "q", false, "log no progress to stderr, only failures")
	return cmd
}

func replCommand() *cobra.Command {
	var (
		cfg     repl.Config
		size    string
		quiet   bool
		ceiling bool
	)
	cmd := &cobra.Command{
		Use:   "repl",
		Short: "Measure two-way replication against unreplicated keel: IOPS ratio, added latency, CPU and copies per byte",
		Long: `Run 4 KiB random writes (fio, nbd engine) at QD32 and QD1 against keel serve
(unreplicated) and against a volume with 2 replicas (keel up --nodes 2
--replicas 2, on loopback), alternating the setups rep by rep. With
--ceiling (the default) a third setup writes two keel serve volumes at once,
one fio job each: the two disk writes of a replicated write and their
serving without the network between them, which is as far as replication
can go on a machine whose replicas share its CPUs and disk. Prints a table,
the QD32 IOPS ratio, the QD1 latency added, the ceiling, CPU seconds per GiB
replicated, copies per replicated byte and issue 4's PASS/MISS lines, and
writes repl-latest.json and repl-latest.md into --out.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			n, err := coordapi.ParseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			cfg.Size = n
			cfg.NoCeiling = !ceiling
			cfg.KeelBin = keelBin(cfg.KeelBin)
			cfg.Command = os.Args
			cfg.Stdout = cmd.OutOrStdout()
			cfg.Logger = logger(cmd, quiet)
			return runUntilSignal(cmd, "setup", func(ctx context.Context) (int, error) {
				r, err := repl.Run(ctx, cfg)
				if err != nil {
					return 0, err
				}
				return len(r.Errors), nil
			})
		},
	}
	f := cmd.Flags()
	f.DurationVar(&cfg.Runtime, "runtime", 10*time.Second, "measured time per workload")
	f.DurationVar(&cfg.Warmup, "warmup", time.Second, "unmeasured QD1 write run after each start (negative: none)")
	f.IntVar(&cfg.Reps, "reps", 2, "repetitions; the setups alternate within each")
	f.BoolVar(&ceiling, "ceiling", true, "also measure the ceiling: two keel serve volumes written at once by two fio jobs (no replication)")
	f.StringVar(&size, "size", "1G", "volume size (K, M, G, T suffixes are binary)")
	f.StringVar(&cfg.Dir, "dir", "", "directory for volume files and data directories, on the disk under test, never tmpfs (default: a new directory under /var/tmp)")
	f.StringVar(&cfg.Out, "out", "bench/results", "directory for repl-latest.json and repl-latest.md (empty: write none)")
	f.StringVar(&cfg.KeelBin, "keel-bin", "", "keel binary both setups run (default: this executable)")
	f.StringVar(&cfg.FioBin, "fio", "fio", "fio binary")
	f.BoolVarP(&quiet, "quiet", "q", false, "log no progress to stderr, only failures")
	return cmd
}

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var out []string
	for p := range strings.SplitSeq(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// keelBin is the keel binary the harness starts: the flag's, or the
// running executable.
func keelBin(flag string) string {
	if flag == "" {
		if exe, err := os.Executable(); err == nil {
			return exe
		}
	}
	return flag
}

// logger logs progress to the command's stderr; quiet keeps warnings only.
func logger(cmd *cobra.Command, quiet bool) *slog.Logger {
	level := slog.LevelInfo
	if quiet {
		level = slog.LevelWarn
	}
	return slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: level}))
}

// runUntilSignal runs a harness until it ends or SIGINT/SIGTERM cancels it,
// and fails when any of its turns (of the named kind) failed.
func runUntilSignal(cmd *cobra.Command, kind string, run func(context.Context) (failed int, err error)) error {
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	failed, err := run(ctx)
	if err != nil {
		return err
	}
	if failed > 0 {
		return fmt.Errorf("%d %s turn(s) failed: see the errors above", failed, kind)
	}
	return nil
}
