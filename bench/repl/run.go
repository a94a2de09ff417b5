package repl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"keel/bench/fio"
)

// Nodes is the replication factor measured: a primary and one secondary.
const Nodes = 2

// Workload is one fio job: 4 KiB random writes at one queue depth.
type Workload struct {
	Name    string `json:"name"`
	IODepth int    `json:"iodepth"`
}

// Workloads are the two this benchmark runs, in order.
var Workloads = []Workload{
	{Name: "randwrite-4k-qd32", IODepth: 32},
	{Name: "randwrite-4k-qd1", IODepth: 1},
}

const blockSize = 4096

// Config is one run. The CLI binds its flags to it; tests fill it directly.
type Config struct {
	Runtime time.Duration // per workload; default 10 s
	// Warmup is an unmeasured QD1 random-write fio run after each start,
	// so that connection set-up (keel up's replication streams open on the
	// first write) falls outside the figures. Default 1 s; negative: none.
	Warmup time.Duration
	Reps   int // default 2
	// NoCeiling skips the two-unreplicated setup (Pair), the measured
	// ceiling of what replication can reach on this machine.
	NoCeiling bool
	Size      int64 // volume size in bytes; default 1 GiB
	// Dir holds the volume files and data directories, on the disk under
	// test (not tmpfs). Default: a fresh directory under /var/tmp, removed
	// afterwards.
	Dir string
	// Out receives repl-latest.json and repl-latest.md; "" writes none.
	Out     string
	KeelBin string // the keel binary both setups run (required)
	FioBin  string // default "fio"
	// StartTimeout bounds a setup's start (default 90 s: keel up waits for
	// its nodes to register and the volume to be served); StopTimeout its
	// SIGTERM grace (default 40 s: keel up stops nodes, then the
	// coordinator).
	StartTimeout, StopTimeout time.Duration
	Command                   []string  // recorded in the report
	Stdout                    io.Writer // table and PASS/MISS lines; nil discards
	Logger                    *slog.Logger
}

func (c *Config) setDefaults() {
	if c.Runtime == 0 {
		c.Runtime = 10 * time.Second
	}
	if c.Warmup == 0 {
		c.Warmup = time.Second
	}
	if c.Reps == 0 {
		c.Reps = 2
	}
	if c.Size == 0 {
		c.Size = 1 << 30
	}
	if c.FioBin == "" {
		c.FioBin = "fio"
	}
	if c.StartTimeout == 0 {
		c.StartTimeout = 90 * time.Second
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = 40 * time.Second
	}
	if c.Stdout == nil {
		c.Stdout = io.Discard
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Run measures both setups on both workloads, Reps times, alternating the
// setups rep by rep. A setup turn that fails is recorded in Report.Errors
// and the run goes on; Run returns an error for bad configuration, a
// cancelled context, or when nothing was measured.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg.setDefaults()
	switch {
	case cfg.Runtime < time.Second/2:
		return nil, fmt.Errorf("runtime %v: want at least 500ms", cfg.Runtime)
	case cfg.Reps < 1:
		return nil, fmt.Errorf("reps %d: want at least 1", cfg.Reps)
	case cfg.Size < 1<<20 || cfg.Size%blockSize != 0:
		return nil, fmt.Errorf("size %d: want a multiple of 4 KiB, at least 1 MiB", cfg.Size)
	case cfg.KeelBin == "":
		return nil, errors.New("no keel binary")
	}
	if _, err := exec.LookPath(cfg.FioBin); err != nil {
		return nil, fmt.Errorf("fio not found (%w): install it with `make bench-deps`", err)
	}
	if out, _ := exec.Command(cfg.FioBin, "--enghelp=nbd").CombinedOutput(); !bytes.Contains(out, []byte("uri")) {
		return nil, errors.New("fio has no nbd engine (fio --enghelp=nbd): install it with `make bench-deps`")
	}
	dir := cfg.Dir
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("/var/tmp", "keel-bench-repl-"); err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return nil, fmt.Errorf("statfs %s: %w", dir, err)
	}
	if fs.Type == unix.TMPFS_MAGIC || fs.Type == unix.RAMFS_MAGIC {
		return nil, fmt.Errorf("%s is on tmpfs/ramfs: volumes must be on the disk under test (use --dir)", dir)
	}

	r := &Report{
		Date: time.Now().UTC().Truncate(time.Second), Command: cfg.Command,
		CPUs: runtime.NumCPU(), Kernel: kernel(), Dir: dir,
		Fio:      firstLine(exec.Command(cfg.FioBin, "--version").Output()),
		Settings: Settings{Runtime: cfg.Runtime.String(), Warmup: max(cfg.Warmup, 0).String(), Reps: cfg.Reps, Size: cfg.Size, Replicas: Nodes, Workloads: Workloads},
	}
	setups := []string{Unreplicated, Replicated}
	if !cfg.NoCeiling {
		setups = append(setups, Pair)
	}
	for rep := range cfg.Reps {
		for _, setup := range setups {
			if err := turn(ctx, &cfg, r, dir, rep+1, setup); err != nil {
				if ctx.Err() != nil {
					return r, ctx.Err()
				}
				cfg.Logger.Error("turn failed", "rep", rep+1, "setup", setup, "err", err)
				r.Errors = append(r.Errors, fmt.Sprintf("rep %d %s: %v", rep+1, setup, err))
			}
		}
	}
	r.Summary = Summarise(r.Runs)
	r.Checks = Checks(r.Summary)
	if err := WriteTable(cfg.Stdout, r); err != nil {
		return r, err
	}
	if cfg.Out != "" {
		if err := WriteFiles(cfg.Out, r); err != nil {
			return r, err
		}
		fmt.Fprintf(cfg.Stdout, "wrote %s, %s\n", filepath.Join(cfg.Out, "repl-latest.json"), filepath.Join(cfg.Out, "repl-latest.md"))
	}
	if len(r.Runs) == 0 {
		return r, errors.New("nothing was measured: see the errors above")
	}
	return r, nil
}

// turn is one setup's turn in one rep: fresh storage, a fresh server,
// every workload, then stop and delete.
func turn(ctx context.Context, cfg *Config, r *Report, dir string, rep int, setup string) error {
	log := cfg.Logger.With("rep", rep, "setup", setup)
	tdir, err := os.MkdirTemp(dir, setup+"-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tdir)
	start := startUnreplicated
	switch setup {
	case Replicated:
		start = startReplicated
	case Pair:
		start = startPair
	}
	srv, err := start(ctx, cfg, tdir)
	if err != nil {
		return err
	}
	stopped := false
	defer func() {
		if !stopped {
			_ = srv.stop(cfg.StopTimeout)
		}
	}()
	log.Info("serving", "uri", srv.uri, "cpu_pids", srv.cpuPids)
	if cfg.Warmup > 0 {
		if _, err := runFio(ctx, cfg, srv.targets(), tdir, Workload{Name: "warmup", IODepth: 1}, cfg.Warmup); err != nil {
			return fmt.Errorf("warmup: %w", err)
		}
	}
	for _, w := range Workloads {
		run, err := measure(ctx, cfg, srv, tdir, w)
		if err != nil {
			return fmt.Errorf("%s: %w", w.Name, err)
		}
		run.Rep, run.Setup = rep, setup
		r.Runs = append(r.Runs, run)
		log.Info(w.Name, "iops", int(run.IOPS), "p50_us", run.P50, "p99_us", run.P99, "cpu_s", run.CPUSeconds)
	}
	stopped = true
	return srv.stop(cfg.StopTimeout)
}

// measure runs one workload against srv and records fio's figures, the
// CPU the serving processes used meanwhile and the copy counters' change.
func measure(ctx context.Context, cfg *Config, srv *server, dir string, w Workload) (Sample, error) {
	var m0, m1 map[string]float64
	var err error
	if srv.metricsURLs != nil {
		if m0, err = srv.copies(); err != nil {
			return Sample{}, fmt.Errorf("metrics: %w", err)
		}
	}
	cpu0, err := srv.cpu()
	if err != nil {
		return Sample{}, fmt.Errorf("server CPU: %w", err)
	}
	uris := srv.targets()
	fig, err := runFio(ctx, cfg, uris, dir, w, cfg.Runtime)
	if err != nil {
		return Sample{}, err
	}
	cpu1, err := srv.cpu()
	if err != nil {
		return Sample{}, fmt.Errorf("server CPU: %w", err)
	}
	if srv.metricsURLs != nil {
		if m1, err = srv.copies(); err != nil {
			return Sample{}, fmt.Errorf("metrics: %w", err)
		}
	}
	run := Sample{
		Workload: w.Name, IOPS: fig.Write.IOPS / float64(len(uris)), // per volume
		P50: fig.Write.Latency.P50, P99: fig.Write.Latency.P99, Mean: fig.Write.Latency.Mean,
		Bytes: fig.Write.IOs * blockSize, CPUSeconds: cpu1 - cpu0,
	}
	if m0 != nil {
		run.PayloadBytes = m1[metricPayload] - m0[metricPayload]
		run.UserCopyBytes = m1[metricUserCopy] - m0[metricUserCopy]
		run.KernelCopyBytes = m1[metricKernelCopy] - m0[metricKernelCopy]
		run.ZeroCopyBytes = m1[metricZeroCopy] - m0[metricZeroCopy]
	}
	return run, nil
}

// runFio runs w against every URI of uris at once, one job each, for
// runtime and parses fio's JSON report (the jobs reported as one group:
// IOPS summed, latency percentiles over every I/O).
func runFio(ctx context.Context, cfg *Config, uris []string, dir string, w Workload, runtime time.Duration) (fio.Figures, error) {
	output := filepath.Join(dir, "fio.json")
	_ = os.Remove(output)
	args := []string{ // global options, before the first job
		"--rw=randwrite", "--bs=" + strconv.Itoa(blockSize),
		"--iodepth=" + strconv.Itoa(w.IODepth), "--numjobs=1", "--group_reporting=1",
		"--time_based=1", "--runtime=" + strconv.FormatInt(runtime.Milliseconds(), 10) + "ms",
		"--norandommap=1", "--percentile_list=50:99:99.9",
		"--output-format=json", "--output=" + output,
		"--ioengine=nbd",
	}
	for i, uri := range uris {
		args = append(args, "--name="+w.Name+"-"+strconv.Itoa(i+1), "--uri="+uri)
	}
	fctx, cancel := context.WithTimeout(ctx, runtime+60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(fctx, cfg.FioBin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fio.Figures{}, fmt.Errorf("fio: %w: %s", err, strings.TrimSpace(out.String()))
	}
	b, err := os.ReadFile(output)
	if err != nil {
		return fio.Figures{}, fmt.Errorf("fio wrote no report: %w", err)
	}
	fig, _, err := fio.ParseFioJSON(b)
	return fig, err
}

func kernel() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

func firstLine(b []byte, _ error) string {
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return s
}

// WriteFiles writes repl-latest.json and repl-latest.md into dir, each
// through a temporary file and a rename.
func WriteFiles(dir string, r *Report) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	for name, data := range map[string][]byte{
		"repl-latest.json": append(js, '\n'),
		"repl-latest.md":   []byte(Markdown(r)),
	} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path+".tmp", data, 0o644); err != nil {
			return err
		}
		if err := os.Rename(path+".tmp", path); err != nil {
			return err
		}
	}
	return nil
}
