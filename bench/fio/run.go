package fio

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"keel/bench/chart"
)

// Config is one run of the suite. The CLI binds its flags to it; tests
// fill it directly.
type Config struct {
	// Targets in run order; default: all of Targets.
	Targets []string
	// Workloads in run order; default: all of Workloads.
	Workloads []string
	Runtime   time.Duration // per workload, after Ramp; default 20 s
	Ramp      time.Duration // fio ramp_time, not measured; 0 for none
	Reps      int           // default 2
	Size      int64         // volume size in bytes; default 4 GiB
	// Dir holds the volume files: it must be on the disk under test, not
	// tmpfs. Default: a fresh directory under /var/tmp, removed afterwards.
	Dir string
	// Unix serves NBD over Unix sockets instead of loopback TCP.
	Unix bool
	// Out receives latest.json, latest.svg and latest.md; "" writes none.
	Out string
	// KeelBin is the keel binary that serves the keel target.
	KeelBin string
	// KeelVariants are more keel builds, each run as a target of its own
	// right after keel (see KeelVariant).
	KeelVariants []KeelVariant
	// FioBin is the fio binary; default "fio" from PATH.
	FioBin string
	// StartTimeout bounds a server's start; StopTimeout its SIGTERM
	// grace (and then SIGKILL's). Defaults 15 s and 10 s.
	StartTimeout, StopTimeout time.Duration
	// Command is recorded in the report (the CLI passes os.Args).
	Command []string
	// Stdout receives the table and the summary; nil discards them.
	Stdout io.Writer
	// Logger receives progress; nil discards it.
	Logger *slog.Logger

	// lookPath finds programs; exec.LookPath unless a test swaps it.
	lookPath func(string) (string, error)
}

func (c *Config) setDefaults() {
	if len(c.Targets) == 0 {
		c.Targets = TargetNames()
	}
	if len(c.Workloads) == 0 {
		c.Workloads = WorkloadNames()
	}
	if c.Runtime == 0 {
		c.Runtime = 20 * time.Second
	}
	if c.Reps == 0 {
		c.Reps = 2
	}
	if c.Size == 0 {
		c.Size = 4 << 30
	}
	if c.FioBin == "" {
		c.FioBin = "fio"
	}
	if c.StartTimeout == 0 {
		c.StartTimeout = 15 * time.Second
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = 10 * time.Second
	}
	if c.Stdout == nil {
		c.Stdout = io.Discard
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.lookPath == nil {
		c.lookPath = exec.LookPath
	}
}

func (c *Config) validate() ([]Workload, error) {
	if c.Runtime < time.Second/2 {
		return nil, fmt.Errorf("runtime %v: want at least 500ms", c.Runtime)
	}
	if c.Ramp < 0 || c.Reps < 1 {
		return nil, fmt.Errorf("ramp %v, reps %d: want ramp ≥ 0 and reps ≥ 1", c.Ramp, c.Reps)
	}
	if c.Size < 1<<20 || c.Size%4096 != 0 {
		return nil, fmt.Errorf("size %d: want a multiple of 4 KiB, at least 1 MiB", c.Size)
	}
	var ws []Workload
	for _, n := range c.Workloads {
		w, ok := workloadByName(n)
		if !ok {
			return nil, fmt.Errorf("unknown workload %q (known: %s)", n, strings.Join(WorkloadNames(), ", "))
		}
		ws = append(ws, w)
	}
	return ws, nil
}

// goNBDVersion is the go-nbd release keel pins (go.mod) and benchmarks.
const goNBDVersion = "v0.3.2"

// Run measures every selected target on every selected workload, Reps
// times, alternating targets rep by rep. It writes the table and summary to
// Stdout and, when Out is set, latest.json, latest.svg and latest.md there.
//
// A target that cannot start or whose fio run fails is recorded in
// Report.Errors and the suite goes on; Run returns an error for bad
// configuration, for a cancelled context, or when nothing could be
// measured.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg.setDefaults()
	workloads, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	if _, err := cfg.lookPath(cfg.FioBin); err != nil {
		return nil, fmt.Errorf("fio not found (%w): install it with `make bench-deps`", err)
	}

	dir := cfg.Dir
	if dir == "" {
		if dir, err = os.MkdirTemp("/var/tmp", "keel-bench-"); err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := checkNotTmpfs(dir); err != nil {
		return nil, err
	}
	// Sockets, configs, logs and the go-nbd build: short paths (a Unix
	// socket path has 107 bytes at most) that are not measured.
	scratch, err := os.MkdirTemp("", "keel-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(scratch)

	fioNBD := strings.Contains(runQuiet(cfg.FioBin, "--enghelp=nbd"), "uri")
	targets, skips, err := selectTargets(cfg.Targets, cfg.KeelBin, cfg.lookPath, fioNBD)
	if err != nil {
		return nil, err
	}
	targets, vskips, err := addVariants(targets, cfg.Targets, cfg.KeelVariants, fioNBD)
	if err != nil {
		return nil, err
	}
	skips = append(skips, vskips...)
	programs := map[string]string{}
	var ready []Target
	for _, t := range targets {
		prog, err := cfg.program(ctx, t, scratch)
		if err != nil {
			skips = append(skips, Skip{t.Name, err.Error()})
			continue
		}
		programs[t.Name] = prog
		ready = append(ready, t)
	}
	targets = ready
	for _, s := range skips {
		fmt.Fprintln(cfg.Stdout, s)
	}

	r := &Report{
		Env: collectEnv(cfg.FioBin, cfg.Command, dir),
		Settings: Settings{
			Targets: names(targets), Workloads: cfg.Workloads,
			Runtime: cfg.Runtime.String(), Ramp: cfg.Ramp.String(),
			Reps: cfg.Reps, Size: cfg.Size, Transport: "tcp",
		},
		Skipped: skips,
	}
	if cfg.Unix {
		r.Settings.Transport = "unix"
	}
	for _, t := range targets {
		r.Targets = append(r.Targets, TargetInfo{Name: t.Name, Mode: t.Mode, Note: t.Note, KeelVariant: t.variant})
		if v := programVersion(t, programs[t.Name]); v != "" {
			r.Env.Versions[t.Name] = v
		}
	}
	if len(targets) == 0 {
		return r, errors.New("no target can run here")
	}

	runner := &runner{cfg: &cfg, dir: dir, scratch: scratch, programs: programs, workloads: workloads, report: r}
	for _, slot := range Schedule(targets, cfg.Reps) {
		if err := runner.turn(ctx, slot); err != nil {
			if ctx.Err() != nil {
				return r, ctx.Err()
			}
			msg := fmt.Sprintf("rep %d %s: %v", slot.Rep+1, slot.Target.Name, err)
			cfg.Logger.Error("target failed", "rep", slot.Rep+1, "target", slot.Target.Name, "err", err)
			r.Errors = append(r.Errors, msg)
		}
	}
	r.summarise(targets, workloads)
	r.Checks = checks(r)

	if err := WriteTable(cfg.Stdout, r); err != nil {
		return r, err
	}
	if err := WriteSummary(cfg.Stdout, r); err != nil {
		return r, err
	}
	if cfg.Out != "" {
		if err := WriteFiles(cfg.Out, r); err != nil {
			return r, err
		}
		fmt.Fprintf(cfg.Stdout, "wrote %s\n", strings.Join([]string{
			filepath.Join(cfg.Out, "latest.json"), filepath.Join(cfg.Out, "latest.svg"), filepath.Join(cfg.Out, "latest.md"),
		}, ", "))
	}
	if len(r.Runs) == 0 {
		return r, errors.New("nothing was measured: see the errors above")
	}
	return r, nil
}

func names(ts []Target) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = t.Name
	}
	return out
}

// program returns the path of t's server binary, building go-nbd's example
// server into scratch.
func (c *Config) program(ctx context.Context, t Target, scratch string) (string, error) {
	switch {
	case t.Raw():
		return "", nil
	case t.variant:
		return t.program, nil
	case t.Name == "keel":
		return c.KeelBin, nil
	case t.Name == "go-nbd":
		return buildGoNBD(ctx, scratch)
	}
	return c.lookPath(t.Program)
}

// buildGoNBD builds go-nbd's example file server from the module cache.
// It builds inside go-nbd's own module, whose go.sum covers the example's
// dependencies (keel's go.sum lacks go-udev, which go-nbd's client
// package imports), so keel's go.mod stays untouched.
func buildGoNBD(ctx context.Context, scratch string) (string, error) {
	dir := strings.TrimSpace(runIn(ctx, "", "go", "list", "-m", "-f", "{{.Dir}}", "github.com/pojntfx/go-nbd"))
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); dir == "" || err != nil {
		cache := strings.TrimSpace(runIn(ctx, "", "go", "env", "GOMODCACHE"))
		dir = filepath.Join(cache, "github.com", "pojntfx", "go-nbd@"+goNBDVersion)
	}
	if _, err := os.Stat(filepath.Join(dir, "cmd", "go-nbd-example-server-file")); err != nil {
		return "", fmt.Errorf("go-nbd %s is not in the module cache (%v): run `go mod download github.com/pojntfx/go-nbd` in keel's tree", goNBDVersion, err)
	}
	out := filepath.Join(scratch, "go-nbd-example-server-file")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/go-nbd-example-server-file")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly -buildvcs=false", "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building go-nbd's example server in %s: %v: %s", dir, err, bytes.TrimSpace(b))
	}
	return out, nil
}

// runIn runs a command in dir and returns its stdout, "" on failure.
func runIn(ctx context.Context, dir, name string, args ...string) string {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		return ""
	}
	return string(out)
}

// runner carries the state of one Run across target turns.
type runner struct {
	cfg       *Config
	dir       string
	scratch   string
	programs  map[string]string
	workloads []Workload
	report    *Report
}

// turn is one target's turn in one rep: a fresh file, a fresh server, the
// prefill, every workload, then stop and delete.
func (rn *runner) turn(ctx context.Context, slot Slot) error {
	t, cfg := slot.Target, rn.cfg
	log := cfg.Logger.With("rep", slot.Rep+1, "target", t.Name)
	file := filepath.Join(rn.dir, fmt.Sprintf("%s-rep%d.img", t.Name, slot.Rep+1))
	_ = os.Remove(file)
	defer os.Remove(file)
	if !t.createsFile {
		if err := createFile(file, cfg.Size); err != nil {
			return err
		}
	}
	rec := ServerRecord{Rep: slot.Rep + 1, Target: t.Name}

	if t.Raw() {
		spec := jobSpec{file: file, size: cfg.Size}
		var err error
		if rec.PrefillSeconds, err = rn.prefill(ctx, spec, file); err != nil {
			return err
		}
		log.Info("prefilled", "seconds", rec.PrefillSeconds)
		for _, w := range rn.workloads {
			if err := rn.measure(ctx, slot, w, spec, nil, log); err != nil {
				return err
			}
		}
		rn.report.Servers = append(rn.report.Servers, rec)
		return nil
	}

	tmp, err := os.MkdirTemp(rn.scratch, t.Name+"-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	ep, err := rn.endpoint(tmp)
	if err != nil {
		return err
	}
	l := t.launch(launchSpec{program: rn.programs[t.Name], file: file, size: cfg.Size, ep: ep, tmp: tmp})
	if slot.Rep == 0 {
		for i := range rn.report.Targets {
			if rn.report.Targets[i].Name == t.Name {
				rn.report.Targets[i].Command = l.argv
			}
		}
	}
	srv, err := startServer(ctx, l, filepath.Join(tmp, "server.log"))
	if err != nil {
		return err
	}
	stopped := false
	defer func() {
		if !stopped {
			_, _ = srv.stop(cfg.StopTimeout)
		}
	}()
	if err := srv.waitReady(ctx, ep, cfg.StartTimeout); err != nil {
		return err
	}
	log.Info("serving", "endpoint", ep.String(), "pid", srv.pid)

	spec := jobSpec{uri: ep.uri(), size: cfg.Size}
	if rec.PrefillSeconds, err = rn.prefill(ctx, spec, file); err != nil {
		return err
	}
	log.Info("prefilled", "seconds", rec.PrefillSeconds)
	for _, w := range rn.workloads {
		if err := rn.measure(ctx, slot, w, spec, srv, log); err != nil {
			return err
		}
	}
	stopped = true
	rec.PeakRSS, err = srv.stop(cfg.StopTimeout)
	rn.report.Servers = append(rn.report.Servers, rec)
	log.Info("stopped", "peak_rss_mib", formatMiB(rec.PeakRSS))
	return err
}

// endpoint picks a free loopback port, or a socket path in tmp.
func (rn *runner) endpoint(tmp string) (endpoint, error) {
	if rn.cfg.Unix {
		return endpoint{unix: filepath.Join(tmp, "nbd.sock")}, nil
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return endpoint{}, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return endpoint{host: "127.0.0.1", port: port}, nil
}

// createFile creates path with size bytes preallocated (fallocate mode 0:
// allocated, unwritten extents).
func createFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
		f.Close()
		return &os.PathError{Op: "fallocate", Path: path, Err: err}
	}
	return f.Close()
}

// prefill writes the whole volume once through the target, then syncs the
// file and drops it from the page cache, so that every target starts its
// workloads with written blocks and a cold cache.
func (rn *runner) prefill(ctx context.Context, spec jobSpec, file string) (float64, error) {
	spec.output = filepath.Join(rn.scratch, "prefill.json")
	start := time.Now()
	if _, err := rn.fio(ctx, prefillArgs(spec), spec.output, rn.cfg.Size/(50<<20)+120); err != nil {
		return 0, fmt.Errorf("prefill: %w", err)
	}
	if err := dropCache(file); err != nil {
		return 0, fmt.Errorf("prefill: %w", err)
	}
	return time.Since(start).Seconds(), nil
}

// dropCache makes file's data durable and evicts its pages, from any
// process's writes: page cache servers wrote through their own descriptors.
func dropCache(file string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return &os.PathError{Op: "fdatasync", Path: file, Err: err}
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return &os.PathError{Op: "fadvise", Path: file, Err: err}
	}
	return nil
}

// measure runs one workload and records it. srv is nil for raw.
func (rn *runner) measure(ctx context.Context, slot Slot, w Workload, spec jobSpec, srv *server, log *slog.Logger) error {
	cfg := rn.cfg
	spec.runtime, spec.ramp = cfg.Runtime, cfg.Ramp
	spec.output = filepath.Join(rn.scratch, "job.json")
	var cpu0 int64
	var err error
	if srv != nil {
		if cpu0, err = srv.cpuTicks(); err != nil {
			return fmt.Errorf("%s: server CPU: %w", w.Name, err)
		}
	}
	start := time.Now()
	budget := int64((cfg.Runtime+cfg.Ramp)/time.Second) + 60
	fig, err := rn.fio(ctx, fioArgs(w, spec), spec.output, budget)
	if err != nil {
		return fmt.Errorf("%s: %w", w.Name, err)
	}
	elapsed := time.Since(start)
	rec := RunRecord{Rep: slot.Rep + 1, Target: slot.Target.Name, Workload: w.Name, Figures: fig, Seconds: elapsed.Seconds()}
	if srv != nil {
		cpu1, err := srv.cpuTicks()
		if err != nil {
			return fmt.Errorf("%s: server CPU: %w", w.Name, err)
		}
		rec.ServerCPU = float64(cpu1-cpu0) / userHZ / elapsed.Seconds() * 100
	}
	rn.report.Runs = append(rn.report.Runs, rec)
	attrs := []any{"iops", math.Round(fig.IOPS()), "mib_s", math.Round(fig.BW() / (1 << 20)), "p50_us", shownP50(fig)}
	if srv != nil {
		attrs = append(attrs, "server_cpu_pct", math.Round(rec.ServerCPU))
	}
	log.Info(w.Name, attrs...)
	return nil
}

func shownP50(f Figures) float64 {
	if f.Read.IOs > 0 {
		return f.Read.Latency.P50
	}
	return f.Write.Latency.P50
}

// fio runs fio with args, which write the JSON report to output, and parses
// it. budget is a hard limit in seconds, after which fio is killed.
func (rn *runner) fio(ctx context.Context, args []string, output string, budget int64) (Figures, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(budget)*time.Second)
	defer cancel()
	_ = os.Remove(output)
	cmd := exec.CommandContext(ctx, rn.cfg.FioBin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Stdout = &stderr
	if err := cmd.Run(); err != nil {
		return Figures{}, fmt.Errorf("fio: %w: %s", err, lastLines(stderr.String(), 6))
	}
	b, err := os.ReadFile(output)
	if err != nil {
		return Figures{}, fmt.Errorf("fio wrote no report: %w: %s", err, lastLines(stderr.String(), 6))
	}
	fig, version, err := ParseFioJSON(b)
	if err != nil {
		return Figures{}, err
	}
	if rn.report.Env.FioVersion == "" {
		rn.report.Env.FioVersion = version
	}
	return fig, nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// WriteFiles writes latest.json, latest.svg and latest.md into dir, each
// through a temporary file and a rename so that a reader never sees half a
// file.
func WriteFiles(dir string, r *Report) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	var svg bytes.Buffer
	if err := chart.WriteSVG(&svg, ChartBars(r)); err != nil {
		return err
	}
	for name, data := range map[string][]byte{
		"latest.json": append(js, '\n'),
		"latest.svg":  svg.Bytes(),
		"latest.md":   []byte(Markdown(r)),
	} {
		if err := writeAtomic(filepath.Join(dir, name), data); err != nil {
			return err
		}
	}
	return nil
}

func writeAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ReadReport reads a report written by WriteFiles.
func ReadReport(path string) (*Report, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Report
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &r, nil
}

// ChartBars is the report's chart: for every workload, each target's median
// IOPS relative to raw's (or, when raw did not run, to the fastest
// target's).
func ChartBars(r *Report) chart.Bars {
	b := chart.Bars{Groups: r.Settings.Workloads}
	_, haveRaw := r.anyMedian("raw")
	for _, t := range r.Targets {
		s := chart.Series{Name: fmt.Sprintf("%s (%s)", t.Name, t.Mode), Values: make([]float64, len(b.Groups))}
		for i, w := range b.Groups {
			s.Values[i] = math.NaN()
			m, ok := r.median(t.Name, w)
			if !ok {
				continue
			}
			ref := 0.0
			if haveRaw {
				if raw, ok := r.median("raw", w); ok {
					ref = raw.Figures.IOPS()
				}
			} else {
				for _, o := range r.Medians {
					if o.Workload == w {
						ref = max(ref, o.Figures.IOPS())
					}
				}
			}
			if ref > 0 {
				s.Values[i] = m.Figures.IOPS() / ref
			}
		}
		b.Series = append(b.Series, s)
	}
	how := "fastest target"
	if haveRaw {
		how = "raw O_DIRECT file (the limit)"
	}
	b.YLabel = "IOPS relative to " + how
	b.RefLine = 1
	b.Title = fmt.Sprintf("keel bench fio, %s, %s %s file, %s per workload, median of %d (%s)",
		transportText(r.Settings.Transport), FormatSize(r.Settings.Size), r.Env.Disk.Filesystem,
		r.Settings.Runtime, r.Settings.Reps, r.Env.Date.Format(time.DateOnly))
	return b
}
