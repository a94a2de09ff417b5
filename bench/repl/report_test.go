package repl

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestSummariseAndChecks(t *testing.T) {
	runs := []Sample{
		// Two reps each; medians of two are means.
		{Rep: 1, Setup: Unreplicated, Workload: "randwrite-4k-qd32", IOPS: 10000, P50: 3000, P99: 9000, Bytes: gib, CPUSeconds: 4},
		{Rep: 2, Setup: Unreplicated, Workload: "randwrite-4k-qd32", IOPS: 12000, P50: 2000, P99: 7000, Bytes: gib, CPUSeconds: 6},
		{Rep: 1, Setup: Unreplicated, Workload: "randwrite-4k-qd1", IOPS: 5000, P50: 100, P99: 300, Bytes: gib / 2, CPUSeconds: 1},
		{Rep: 2, Setup: Unreplicated, Workload: "randwrite-4k-qd1", IOPS: 5000, P50: 120, P99: 340, Bytes: gib / 2, CPUSeconds: 1},
		{Rep: 1, Setup: Replicated, Workload: "randwrite-4k-qd32", IOPS: 8000, P50: 4000, P99: 10000, Bytes: gib, CPUSeconds: 10,
			PayloadBytes: gib, KernelCopyBytes: gib, ZeroCopyBytes: 0},
		{Rep: 2, Setup: Replicated, Workload: "randwrite-4k-qd32", IOPS: 7400, P50: 4200, P99: 11000, Bytes: gib, CPUSeconds: 12,
			PayloadBytes: gib, KernelCopyBytes: gib / 2, ZeroCopyBytes: gib / 2},
		{Rep: 1, Setup: Replicated, Workload: "randwrite-4k-qd1", IOPS: 3000, P50: 160, P99: 500, Bytes: gib / 4, CPUSeconds: 2,
			PayloadBytes: gib / 4, KernelCopyBytes: gib / 4},
		{Rep: 2, Setup: Replicated, Workload: "randwrite-4k-qd1", IOPS: 3000, P50: 190, P99: 520, Bytes: gib / 4, CPUSeconds: 2,
			PayloadBytes: gib / 4, KernelCopyBytes: gib / 4},
	}
	s := Summarise(runs)
	if len(s.Rows) != 4 {
		t.Fatalf("%d rows, want 4: %+v", len(s.Rows), s.Rows)
	}
	// (8000+7400)/2 / ((10000+12000)/2) = 7700/11000 = 0.7.
	if !near(s.IOPSRatioQD32, 0.7) {
		t.Errorf("IOPS ratio %v, want 0.7", s.IOPSRatioQD32)
	}
	// p50 175 − 110; p99 510 − 320.
	if !near(s.QD1P50Added, 65) || !near(s.QD1P99Added, 190) {
		t.Errorf("QD1 added p50 %v p99 %v, want 65 and 190", s.QD1P50Added, s.QD1P99Added)
	}
	if !near(s.CPUPerGiBReplicated, 11) || !near(s.CPUPerGiBUnreplicated, 5) {
		t.Errorf("CPU/GiB replicated %v unreplicated %v, want 11 and 5", s.CPUPerGiBReplicated, s.CPUPerGiBUnreplicated)
	}
	// Copied 2 GiB of 2.5 GiB payload; zero-copy 0.5 of 2.5.
	if !near(s.CopiesPerByte, 0.8) || !near(s.ZeroCopyShare, 0.2) {
		t.Errorf("copies/byte %v zero-copy share %v, want 0.8 and 0.2", s.CopiesPerByte, s.ZeroCopyShare)
	}
	r32, _ := s.row(Replicated, "randwrite-4k-qd32")
	if !near(r32.CopiesPerByte, 0.75) {
		t.Errorf("QD32 row copies/byte %v, want 0.75", r32.CopiesPerByte)
	}

	cs := Checks(s)
	if len(cs) != 2 {
		t.Fatalf("%d checks", len(cs))
	}
	// Exactly at the ratio target passes; 65 µs added misses.
	if !cs[0].Measured || !cs[0].Pass {
		t.Errorf("ratio check %+v: want measured and pass at exactly 0.7", cs[0])
	}
	if !cs[1].Measured || cs[1].Pass {
		t.Errorf("latency check %+v: want measured and miss at +65 µs", cs[1])
	}
	if !strings.HasPrefix(cs[0].String(), "PASS") || !strings.HasPrefix(cs[1].String(), "MISS") {
		t.Errorf("check lines %q, %q", cs[0], cs[1])
	}

	// Just under the ratio, just within the latency.
	runs[4].IOPS, runs[6].P50, runs[7].P50 = 7999, 120, 160
	cs = Checks(Summarise(runs))
	if cs[0].Pass || !cs[1].Pass {
		t.Errorf("checks %+v: want ratio miss, latency pass", cs)
	}
}

func TestSummariseCeiling(t *testing.T) {
	runs := []Sample{
		{Rep: 1, Setup: Unreplicated, Workload: "randwrite-4k-qd32", IOPS: 20000, Bytes: gib, CPUSeconds: 1},
		{Rep: 1, Setup: Unreplicated, Workload: "randwrite-4k-qd1", IOPS: 8000, P50: 100, Bytes: gib, CPUSeconds: 1},
		{Rep: 1, Setup: Replicated, Workload: "randwrite-4k-qd32", IOPS: 9000, Bytes: gib, CPUSeconds: 1, PayloadBytes: gib},
		{Rep: 1, Setup: Replicated, Workload: "randwrite-4k-qd1", IOPS: 4000, P50: 200, Bytes: gib, CPUSeconds: 1, PayloadBytes: gib},
	}
	s := Summarise(runs)
	if s.CeilingRatioQD32 != 0 || s.ceilingLine() != "" {
		t.Errorf("no ceiling run: ratio %v, line %q; want none", s.CeilingRatioQD32, s.ceilingLine())
	}
	runs = append(runs,
		Sample{Rep: 1, Setup: Pair, Workload: "randwrite-4k-qd32", IOPS: 10000, Bytes: gib, CPUSeconds: 1},
		Sample{Rep: 1, Setup: Pair, Workload: "randwrite-4k-qd1", IOPS: 6000, P50: 150, Bytes: gib, CPUSeconds: 1},
	)
	s = Summarise(runs)
	if len(s.Rows) != 6 {
		t.Fatalf("%d rows, want 6", len(s.Rows))
	}
	// Per-volume 10000 of 20000; replicated 9000 of 10000; 150 − 100 µs.
	if !near(s.CeilingRatioQD32, 0.5) || !near(s.ReplicatedOfCeilingQD32, 0.9) || !near(s.CeilingQD1P50Added, 50) {
		t.Errorf("ceiling ratio %v, replicated of ceiling %v, QD1 added %v; want 0.5, 0.9, 50",
			s.CeilingRatioQD32, s.ReplicatedOfCeilingQD32, s.CeilingQD1P50Added)
	}
	if l := s.ceilingLine(); !strings.Contains(l, "0.500 of unreplicated") || !strings.Contains(l, "0.90 of that ceiling") {
		t.Errorf("ceiling line %q", l)
	}
	// The targets stay replicated against unreplicated.
	if !near(s.IOPSRatioQD32, 0.45) {
		t.Errorf("IOPS ratio %v, want 0.45", s.IOPSRatioQD32)
	}
}

func TestChecksUnmeasured(t *testing.T) {
	// Only the unreplicated setup ran: nothing to compare, both miss.
	s := Summarise([]Sample{
		{Rep: 1, Setup: Unreplicated, Workload: "randwrite-4k-qd32", IOPS: 100, Bytes: 4096, CPUSeconds: 1},
		{Rep: 1, Setup: Unreplicated, Workload: "randwrite-4k-qd1", IOPS: 100, Bytes: 4096, CPUSeconds: 1},
	})
	for _, c := range Checks(s) {
		if c.Measured || c.Pass {
			t.Errorf("check %+v: want unmeasured and not passed", c)
		}
		if !strings.Contains(c.String(), "not measured") {
			t.Errorf("line %q", c)
		}
	}
}

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1}, 3}, {[]float64{9, 1, 4}, 4}} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestSumMetrics(t *testing.T) {
	text := `# HELP keel_repl_payload_bytes_total Payload bytes replicated.
# TYPE keel_repl_payload_bytes_total counter
keel_repl_payload_bytes_total{peer="n2"} 4096
keel_repl_payload_bytes_total{peer="n3"} 1.2288e+04
keel_repl_payload_bytes_total_other 7
keel_repl_user_copy_bytes_total{side="receive"} 0
keel_repl_user_copy_bytes_total{side="send"} 0
keel_repl_kernel_copy_bytes_total{peer="a}b"} 100
go_goroutines 12
`
	m, err := sumMetrics(strings.NewReader(text), copyMetrics)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{metricPayload: 16384, metricUserCopy: 0, metricKernelCopy: 100, metricZeroCopy: 0}
	for k, v := range want {
		if got, ok := m[k]; !ok || got != v {
			t.Errorf("%s = %v (present %v), want %v", k, got, ok, v)
		}
	}
	if _, err := sumMetrics(strings.NewReader("keel_repl_payload_bytes_total{peer=\"x\" 3\n"), copyMetrics); err == nil {
		t.Error("unclosed labels: no error")
	}
	if _, err := sumMetrics(strings.NewReader("keel_repl_payload_bytes_total abc\n"), copyMetrics); err == nil {
		t.Error("bad value: no error")
	}
}

func TestParseStatCPU(t *testing.T) {
	// Field 14..17 = 11 22 33 44; comm with spaces and a ')'.
	line := []byte("1234 (keel (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 11 22 33 44 20 0 9 0 100 0 0\n")
	n, err := parseStatCPU(line)
	if err != nil || n != 110 {
		t.Fatalf("parseStatCPU = %d, %v; want 110", n, err)
	}
	if _, err := parseStatCPU([]byte("1 (x) S 1 2")); err == nil {
		t.Error("short line: no error")
	}
	if _, err := parseStatCPU([]byte("1 x S")); err == nil {
		t.Error("no comm: no error")
	}
	// Our own process: readable, and the figure is finite.
	if _, err := cpuSeconds([]int{os.Getpid()}); err != nil {
		t.Fatal(err)
	}
}

func TestFindURI(t *testing.T) {
	p := filepath.Join(t.TempDir(), "up.log")
	if findURI(p) != "" {
		t.Error("missing file: want no URI")
	}
	log := "keel up: starting a coordinator\n\nvolume bench (vol-1): 64 MiB, 2 replicas\n" +
		"  NBD URI: nbd://127.0.0.1:10809/bench   (the primary's; it moves when another node is promoted)\n"
	if err := os.WriteFile(p, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := findURI(p); got != "nbd://127.0.0.1:10809/bench" {
		t.Errorf("findURI = %q", got)
	}
}

func TestMarkdownAndTable(t *testing.T) {
	r := &Report{Settings: Settings{Size: 64 << 20, Replicas: 2, Reps: 1, Runtime: "1s"}}
	r.Summary = Summarise([]Sample{
		{Rep: 1, Setup: Unreplicated, Workload: "randwrite-4k-qd32", IOPS: 100, Bytes: 4096, CPUSeconds: 1},
		{Rep: 1, Setup: Replicated, Workload: "randwrite-4k-qd32", IOPS: 80, Bytes: 4096, CPUSeconds: 1, PayloadBytes: 4096, KernelCopyBytes: 4096},
	})
	r.Checks = Checks(r.Summary)
	md := Markdown(r)
	for _, want := range []string{"| replicated | randwrite-4k-qd32 | 80 |", "PASS replicated QD32 IOPS", "MISS replicated QD1 p50 latency", "64M volume"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	var b bytes.Buffer
	if err := WriteTable(&b, r); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "QD32 IOPS ratio replicated/unreplicated: 0.800") {
		t.Errorf("table:\n%s", b.String())
	}
}
