package repl_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"keel/bench/repl"
)

// TestSmoke runs the real benchmark for a second per workload, one rep, on
// 64 MiB volumes, and checks that all three setups measured non-zero figures
// and that repl-latest.json holds them. It asserts nothing about speed.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: the smoke test starts keel serve and keel up")
	}
	if _, err := exec.LookPath("fio"); err != nil {
		t.Skip("fio not installed")
	}
	if out, _ := exec.Command("fio", "--enghelp=nbd").CombinedOutput(); !bytes.Contains(out, []byte("uri")) {
		t.Skip("fio has no nbd engine")
	}
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Skipf("no go tool: %v", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	if _, err := os.Stat(filepath.Join(root, "main.go")); err != nil {
		t.Skipf("no main.go in %s: no keel binary to run", root)
	}
	bin := filepath.Join(t.TempDir(), "keel")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building keel: %v\n%s", err, out)
	}

	// Volumes on a real disk: the harness refuses tmpfs.
	dir := t.TempDir()
	var fs unix.Statfs_t
	if unix.Statfs(dir, &fs) != nil || fs.Type == unix.TMPFS_MAGIC || fs.Type == unix.RAMFS_MAGIC {
		if dir, err = os.MkdirTemp("/var/tmp", "keel-bench-repl-test-"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	out := t.TempDir()
	var stdout bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, err := repl.Run(ctx, repl.Config{
		Runtime: time.Second, Reps: 1, Size: 64 << 20, Dir: dir, Out: out,
		KeelBin: bin, Stdout: &stdout,
	})
	t.Logf("output:\n%s", stdout.String())
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Errors) > 0 {
		t.Fatalf("errors: %v", r.Errors)
	}

	got, err := os.ReadFile(filepath.Join(out, "repl-latest.json"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(out, "repl-latest.md")); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(got, []byte(`"iops_ratio_qd32"`)) {
		t.Fatalf("repl-latest.json lacks the summary:\n%s", got)
	}
	if len(r.Runs) != 3*len(repl.Workloads) {
		t.Fatalf("%d samples, want %d (unreplicated, replicated, two-unreplicated)", len(r.Runs), 3*len(repl.Workloads))
	}
	for _, s := range r.Runs {
		if s.IOPS <= 0 || s.P50 <= 0 || s.P99 <= 0 || s.Bytes <= 0 || s.CPUSeconds <= 0 {
			t.Errorf("sample %+v: want non-zero IOPS, latency, bytes and CPU", s)
		}
		if s.Setup == repl.Replicated && s.PayloadBytes < float64(s.Bytes) {
			t.Errorf("sample %+v: the primary replicated %v payload bytes of %d written", s, s.PayloadBytes, s.Bytes)
		}
	}
	sum := r.Summary
	if sum.IOPSRatioQD32 <= 0 || sum.CPUPerGiBReplicated <= 0 || sum.CPUPerGiBUnreplicated <= 0 || sum.CeilingRatioQD32 <= 0 {
		t.Errorf("summary %+v: want non-zero ratio and CPU per GiB", sum)
	}
	if len(r.Checks) != 2 || !r.Checks[0].Measured || !r.Checks[1].Measured {
		t.Errorf("checks %+v: want both measured", r.Checks)
	}
}
