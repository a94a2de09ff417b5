package fio_test

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"keel/bench/fio"
)

// benchDir is a directory on a real disk: the harness refuses tmpfs.
func benchDir(t *testing.T) string {
	dir := t.TempDir()
	var fs unix.Statfs_t
	if unix.Statfs(dir, &fs) == nil && fs.Type != unix.TMPFS_MAGIC && fs.Type != unix.RAMFS_MAGIC {
		return dir
	}
	dir, err := os.MkdirTemp("/var/tmp", "keel-bench-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// keelBinary builds the keel binary into a temporary directory when the
// tree has one (main.go at the module root); "" when it does not yet.
func keelBinary(t *testing.T) string {
	t.Helper()
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Logf("no go tool (%v): keel target skipped", err)
		return ""
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	if _, err := os.Stat(filepath.Join(root, "main.go")); err != nil {
		t.Logf("no main.go in %s yet: keel target skipped", root)
		return ""
	}
	bin := filepath.Join(t.TempDir(), "keel")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building keel: %v\n%s", err, out)
	}
	return bin
}

// TestSmoke runs the real harness for a second per workload on a 64 MiB
// file: raw, and keel when the tree builds a keel binary. It checks that the
// run measured something everywhere and wrote its files; it asserts nothing
// about speed.
func TestSmoke(t *testing.T) {
	if _, err := exec.LookPath("fio"); err != nil {
		t.Skip("fio not installed (make bench-deps)")
	}
	targets := []string{"raw"}
	keel := keelBinary(t)
	if keel != "" {
		if err := exec.Command("fio", "--enghelp=nbd").Run(); err != nil {
			t.Fatalf("fio has no nbd engine, cannot reach keel: %v", err)
		}
		targets = []string{"keel", "raw"}
	}
	out := t.TempDir()
	var stdout, log bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, err := fio.Run(ctx, fio.Config{
		Targets: targets,
		Runtime: time.Second,
		Reps:    1,
		Size:    64 << 20,
		Dir:     benchDir(t),
		Out:     out,
		KeelBin: keel,
		Command: []string{"go", "test", "-run", "TestSmoke"},
		Stdout:  &stdout,
		Logger:  slog.New(slog.NewTextHandler(&log, nil)),
	})
	t.Logf("stdout:\n%s\nlog:\n%s", stdout.String(), log.String())
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Errors) > 0 || len(r.Skipped) > 0 {
		t.Fatalf("errors %v, skipped %v", r.Errors, r.Skipped)
	}
	nw := len(fio.Workloads)
	if len(r.Runs) != nw*len(targets) || len(r.Medians) != nw*len(targets) {
		t.Fatalf("%d runs and %d medians, want %d", len(r.Runs), len(r.Medians), nw*len(targets))
	}
	for _, x := range r.Runs {
		f := x.Figures
		if f.IOPS() <= 0 || f.BW() <= 0 || x.Seconds <= 0 {
			t.Errorf("%s %s: IOPS %v, BW %v, %v s", x.Target, x.Workload, f.IOPS(), f.BW(), x.Seconds)
		}
		for _, d := range []fio.Direction{f.Read, f.Write} {
			if d.IOs > 0 && (d.Latency.P50 <= 0 || d.Latency.P99 < d.Latency.P50) {
				t.Errorf("%s %s: latency %+v", x.Target, x.Workload, d.Latency)
			}
		}
		if x.Target == "keel" && x.ServerCPU <= 0 {
			t.Errorf("keel %s: server CPU %v%%", x.Workload, x.ServerCPU)
		}
	}
	for _, s := range r.Servers {
		if s.Target == "keel" && s.PeakRSS <= 0 {
			t.Errorf("keel peak RSS %d", s.PeakRSS)
		}
	}
	if keel != "" && len(r.Checks) == 0 {
		t.Error("keel ran but no target check was reported")
	}
	if r.Env.FioVersion == "" || r.Env.Kernel == "" || r.Env.Disk.Filesystem == "" {
		t.Errorf("environment incomplete: %+v", r.Env)
	}

	back, err := fio.ReadReport(filepath.Join(out, "latest.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(back.Runs) != len(r.Runs) || back.Settings.Size != 64<<20 {
		t.Errorf("latest.json holds %d runs, size %d", len(back.Runs), back.Settings.Size)
	}
	svg, err := os.ReadFile(filepath.Join(out, "latest.svg"))
	if err != nil || !bytes.Contains(svg, []byte("<svg")) || !bytes.Contains(svg, []byte("raw (direct)")) {
		t.Errorf("latest.svg: %v, %d bytes", err, len(svg))
	}
	md, err := os.ReadFile(filepath.Join(out, "latest.md"))
	if err != nil || !bytes.Contains(md, []byte("| raw | direct | randread-4k-qd1 |")) {
		t.Errorf("latest.md: %v\n%s", err, md)
	}
	if !strings.Contains(stdout.String(), "randread-4k-qd1") {
		t.Errorf("no table on stdout")
	}
}
