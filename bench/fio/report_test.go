package fio

import (
	"bytes"
	"math"
	"strings"
	"testing"
	"time"
)

func mustTarget(t *testing.T, name string) Target {
	t.Helper()
	x, ok := targetByName(name)
	if !ok {
		t.Fatalf("no target %q", name)
	}
	return x
}

func mustWorkload(t *testing.T, name string) Workload {
	t.Helper()
	w, ok := workloadByName(name)
	if !ok {
		t.Fatalf("no workload %q", name)
	}
	return w
}

// run builds a RunRecord with read IOPS r and write IOPS w and read p50/p99
// in µs.
func run(rep int, target, workload string, r, w, p50, p99 float64) RunRecord {
	return RunRecord{
		Rep: rep, Target: target, Workload: workload,
		Figures: Figures{
			Read:  Direction{IOPS: r, BW: r * 4096, IOs: int64(r), Latency: Latency{P50: p50, P99: p99, P999: 2 * p99}},
			Write: Direction{IOPS: w, BW: w * 4096, IOs: int64(w), Latency: Latency{P50: p50, P99: p99, P999: 2 * p99}},
		},
		ServerCPU: 50,
	}
}

func TestMedianOf(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{nil, 0}, {[]float64{3}, 3}, {[]float64{4, 2}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{9, 1, 2, 8}, 5},
	} {
		in := append([]float64(nil), c.in...)
		if got := medianOf(c.in); got != c.want {
			t.Errorf("medianOf(%v) = %v, want %v", c.in, got, c.want)
		}
		for i := range in {
			if in[i] != c.in[i] {
				t.Errorf("medianOf reordered its input: %v", c.in)
			}
		}
	}
}

// testReport has three reps of raw, keel, qemu-nbd-direct (direct) and
// nbdkit, nbd-server (page-cache) on two workloads.
func testReport(t *testing.T) *Report {
	targets := []Target{mustTarget(t, "keel"), mustTarget(t, "qemu-nbd-direct"), mustTarget(t, "nbdkit"), mustTarget(t, "nbd-server"), mustTarget(t, "raw")}
	workloads := []Workload{mustWorkload(t, "randread-4k-qd32"), mustWorkload(t, "randwrite-4k-qd32")}
	r := &Report{Settings: Settings{Workloads: []string{"randread-4k-qd32", "randwrite-4k-qd32"}, Reps: 3, Size: 4 << 30}}
	for _, x := range targets {
		r.Targets = append(r.Targets, TargetInfo{Name: x.Name, Mode: x.Mode})
	}
	base := map[string]float64{"raw": 100000, "keel": 90000, "qemu-nbd-direct": 60000, "nbdkit": 70000, "nbd-server": 50000}
	for rep := 1; rep <= 3; rep++ {
		// Rep 2 is a slow outlier for everyone: the median ignores it.
		scale := 1.0
		if rep == 2 {
			scale = 0.5
		}
		for _, x := range targets {
			r.Runs = append(r.Runs,
				run(rep, x.Name, "randread-4k-qd32", base[x.Name]*scale, 0, 100*float64(rep), 300),
				run(rep, x.Name, "randwrite-4k-qd32", 0, base[x.Name]*scale*1.1, 100, 300),
			)
			if x.Name != "raw" {
				r.Servers = append(r.Servers, ServerRecord{Rep: rep, Target: x.Name, PeakRSS: int64(rep) << 20})
			}
		}
	}
	r.summarise(targets, workloads)
	return r
}

func TestSummariseMediansAndRatios(t *testing.T) {
	r := testReport(t)
	if len(r.Medians) != 10 {
		t.Fatalf("%d medians, want 10 (5 targets × 2 workloads)", len(r.Medians))
	}
	// Rows follow target order, then workload order.
	if r.Medians[0].Target != "keel" || r.Medians[0].Workload != "randread-4k-qd32" || r.Medians[1].Workload != "randwrite-4k-qd32" {
		t.Errorf("row order: %s/%s, %s/%s", r.Medians[0].Target, r.Medians[0].Workload, r.Medians[1].Target, r.Medians[1].Workload)
	}
	for _, c := range []struct {
		target, workload string
		iops, vsRaw      float64
		bestPeer         string
		vsPeer           float64
	}{
		{"keel", "randread-4k-qd32", 90000, 0.9, "qemu-nbd-direct", 1.5},
		{"keel", "randwrite-4k-qd32", 99000, 0.9, "qemu-nbd-direct", 1.5},
		// qemu-nbd-direct is the only direct peer: nothing to compare with.
		{"qemu-nbd-direct", "randread-4k-qd32", 60000, 0.6, "", 0},
		// nbdkit's best other page-cache peer is nbd-server.
		{"nbdkit", "randread-4k-qd32", 70000, 0.7, "nbd-server", 1.4},
		{"nbd-server", "randread-4k-qd32", 50000, 0.5, "nbdkit", 50.0 / 70},
		// raw is the reference, not compared.
		{"raw", "randread-4k-qd32", 100000, 0, "", 0},
	} {
		m, ok := r.median(c.target, c.workload)
		if !ok {
			t.Fatalf("no median for %s %s", c.target, c.workload)
		}
		if !near(m.Figures.IOPS(), c.iops) || !near(m.VsRaw, c.vsRaw) || m.BestPeer != c.bestPeer || !near(m.VsBestPeer, c.vsPeer) {
			t.Errorf("%s %s: IOPS %v ×raw %v best %q ×%v; want %v, %v, %q, %v",
				c.target, c.workload, m.Figures.IOPS(), m.VsRaw, m.BestPeer, m.VsBestPeer, c.iops, c.vsRaw, c.bestPeer, c.vsPeer)
		}
		if m.Reps != 3 {
			t.Errorf("%s %s: %d reps", c.target, c.workload, m.Reps)
		}
	}
	k, _ := r.median("keel", "randread-4k-qd32")
	if k.Figures.Read.Latency.P50 != 200 {
		t.Errorf("median p50 = %v, want 200 (of 100, 200, 300)", k.Figures.Read.Latency.P50)
	}
	if k.PeakRSS != 3<<20 {
		t.Errorf("peak RSS = %d, want the largest over reps, %d", k.PeakRSS, 3<<20)
	}
}

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

func TestWriteTable(t *testing.T) {
	r := testReport(t)
	var b bytes.Buffer
	if err := WriteTable(&b, r); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(b.String(), "\n"), "\n")
	// header, 5 rows, blank, 5 rows, legend
	if len(lines) != 13 {
		t.Fatalf("%d lines, want 13:\n%s", len(lines), b.String())
	}
	if !strings.HasPrefix(lines[0], "target") || lines[6] != "" {
		t.Errorf("header or workload separator missing:\n%s", b.String())
	}
	fields := strings.Fields(lines[1])
	want := []string{"keel", "direct", "randread-4k-qd32", "90000", "351.6", "200", "300", "600", "50", "0.90", "1.50", "qemu-nbd-direct"}
	if strings.Join(fields, " ") != strings.Join(want, " ") {
		t.Errorf("keel row:\n got %v\nwant %v", fields, want)
	}
	rawRow := strings.Fields(lines[5])
	if rawRow[0] != "raw" || rawRow[8] != "-" || rawRow[9] != "-" || rawRow[11] != "-" {
		t.Errorf("raw row should have no CPU and no ratios: %v", rawRow)
	}
	// Numbers align right: every row ends its IOPS column at the same place.
	end := strings.Index(lines[1], "90000") + len("90000")
	if got := strings.Index(lines[4], "50000") + len("50000"); got != end {
		t.Errorf("IOPS column not right-aligned:\n%s\n%s", lines[1], lines[4])
	}
	for _, l := range lines {
		if strings.HasSuffix(l, " ") {
			t.Errorf("trailing space in %q", l)
		}
	}
}

func TestMarkdown(t *testing.T) {
	r := testReport(t)
	r.Env = Environment{Date: time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC), Command: []string{"/tmp/b/keel", "bench", "fio"}, FioVersion: "fio-3.33", CPUs: 2, Kernel: "6.18"}
	r.Settings.Runtime = "10s"
	r.Checks = checks(r)
	md := Markdown(r)
	for _, want := range []string{
		"Measured 2026-11-27 with `keel bench fio`",
		"| target | mode | workload |",
		"|---|---|---|--:|",
		"| keel | direct | randread-4k-qd32 | 90000 |",
		"Peak server RSS: keel 3.0 MiB",
		"| keel target | result | figure |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	rows := 0
	for l := range strings.SplitSeq(md, "\n") {
		if strings.Contains(l, " | direct | ") || strings.Contains(l, " | page-cache | ") {
			rows++
		}
	}
	if rows != 10 {
		t.Errorf("%d table rows, want 10", rows)
	}
}

func checkByName(t *testing.T, cs []Check, prefix string) Check {
	t.Helper()
	for _, c := range cs {
		if strings.HasPrefix(c.Name, prefix) {
			return c
		}
	}
	t.Fatalf("no check %q in %v", prefix, cs)
	return Check{}
}

func TestChecks(t *testing.T) {
	if cs := checks(&Report{}); cs != nil {
		t.Fatalf("checks without keel: %v", cs)
	}
	// The check names are stable whatever was measured: the same list,
	// all n/a, when keel ran a single workload.
	only := checks(&Report{Medians: []Median{{Target: "keel", Workload: "seqread-1m-qd8"}}})
	full := checks(testReport(t))
	if len(only) != len(full) {
		t.Fatalf("%d checks with one workload, %d with two", len(only), len(full))
	}
	for i := range only {
		if only[i].Name != full[i].Name {
			t.Errorf("check %d named %q and %q", i, only[i].Name, full[i].Name)
		}
		if only[i].Status != NA && !strings.HasPrefix(only[i].Name, "server RSS") {
			t.Errorf("%+v: want n/a", only[i])
		}
	}
	r := testReport(t)
	cs := checks(r)
	// keel 90k vs qemu-nbd-direct 60k: 1.5× ≥ 1.1×.
	if c := checkByName(t, cs, "randread-4k-qd32 ≥ 1.1× qemu-nbd-direct"); c.Status != Pass || !near(c.Value, 1.5) {
		t.Errorf("%+v", c)
	}
	// nbdkit-cache-none did not run.
	if c := checkByName(t, cs, "randread-4k-qd32 ≥ 1.1× nbdkit-cache-none"); c.Status != NA {
		t.Errorf("%+v", c)
	}
	// 0.9 of raw ≥ 0.8.
	if c := checkByName(t, cs, "randwrite-4k-qd32 ≥ 0.8× raw"); c.Status != Pass || !near(c.Value, 0.9) {
		t.Errorf("%+v", c)
	}
	if c := checkByName(t, cs, "seqread-1m-qd8"); c.Status != NA {
		t.Errorf("unmeasured workload: %+v", c)
	}
	if c := checkByName(t, cs, "server RSS"); c.Status != Pass || c.Value != 3 {
		t.Errorf("%+v", c)
	}

	// Make keel slower than qemu-nbd-direct: MISS with the ratio.
	for i := range r.Runs {
		if r.Runs[i].Target == "keel" {
			r.Runs[i].Figures.Read.IOPS /= 2
		}
	}
	r.summarise([]Target{mustTarget(t, "keel"), mustTarget(t, "qemu-nbd-direct"), mustTarget(t, "raw")},
		[]Workload{mustWorkload(t, "randread-4k-qd32")})
	c := checkByName(t, checks(r), "randread-4k-qd32 ≥ 1.1× qemu-nbd-direct")
	if c.Status != Miss || !near(c.Value, 0.75) || !strings.Contains(c.Detail, "0.75×") {
		t.Errorf("%+v", c)
	}
}

func TestQD1AndMultiConnChecks(t *testing.T) {
	r := &Report{Medians: []Median{
		{Target: "keel", Workload: "randread-4k-qd1", Figures: Figures{Read: Direction{IOPS: 20000, IOs: 1, Latency: Latency{P50: 40, P99: 90}}}},
		{Target: "nbdkit", Workload: "randread-4k-qd1", Figures: Figures{Read: Direction{IOPS: 15000, IOs: 1, Latency: Latency{P50: 47, P99: 80}}}},
		{Target: "qemu-nbd-direct", Workload: "randread-4k-qd1", Figures: Figures{Read: Direction{IOPS: 14000, IOs: 1, Latency: Latency{P50: 50}}}},
		{Target: "raw", Workload: "randread-4k-qd1", Figures: Figures{Read: Direction{IOPS: 30000, IOs: 1, Latency: Latency{P50: 25}}}},
		{Target: "keel", Workload: "randread-4k-qd32", Figures: Figures{Read: Direction{IOPS: 80000}}},
		{Target: "keel", Workload: "randwrite-4k-qd32", Figures: Figures{Write: Direction{IOPS: 120000}}},
		{Target: "keel", Workload: "multiconn-4x8-randrw", Figures: Figures{Read: Direction{IOPS: 45000}, Write: Direction{IOPS: 45000}}},
	}}
	cs := checks(r)
	// Best peer is nbdkit at 47 µs (raw is not a peer): 40/47.
	if c := checkByName(t, cs, "randread-4k-qd1 p50"); c.Status != Pass || !near(c.Value, 40.0/47) || !strings.Contains(c.Detail, "nbdkit") {
		t.Errorf("%+v", c)
	}
	// p99 90 > 2 × 40.
	if c := checkByName(t, cs, "randread-4k-qd1 p99"); c.Status != Miss || !near(c.Value, 90.0/40) {
		t.Errorf("%+v", c)
	}
	// One connection on a 50/50 mix: 1 / (0.5/80k + 0.5/120k) = 96k; 90k/96k.
	if c := checkByName(t, cs, "multiconn"); c.Status != Miss || !near(c.Value, 90000.0/96000) {
		t.Errorf("%+v", c)
	}
}
