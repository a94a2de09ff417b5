package repl

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"keel/bench/fio"
)

// Targets of issue 4.
const (
	// MinIOPSRatio is the least replicated/unreplicated IOPS at QD32.
	MinIOPSRatio = 0.7
	// MaxQD1AddedLatency is the most replicated QD1 p50 write latency may
	// exceed unreplicated's, in µs.
	MaxQD1AddedLatency = 60.0
)

// Report is one run, as written to repl-latest.json.
type Report struct {
	Date     time.Time `json:"date"`
	Command  []string  `json:"command"`
	Kernel   string    `json:"kernel"`
	CPUs     int       `json:"cpus"`
	Fio      string    `json:"fio_version"`
	Dir      string    `json:"dir"`
	Settings Settings  `json:"settings"`
	Runs     []Sample  `json:"runs"`
	Summary  Summary   `json:"summary"`
	Checks   []Check   `json:"checks"`
	Errors   []string  `json:"errors,omitempty"`
}

// Settings are the run's parameters.
type Settings struct {
	Runtime   string     `json:"runtime"`
	Warmup    string     `json:"warmup"`
	Reps      int        `json:"reps"`
	Size      int64      `json:"size_bytes"`
	Replicas  int        `json:"replicas"`
	Workloads []Workload `json:"workloads"`
}

// Sample is one workload in one setup's turn of one rep.
type Sample struct {
	Rep      int     `json:"rep"`
	Setup    string  `json:"setup"`
	Workload string  `json:"workload"`
	IOPS     float64 `json:"iops"`
	P50      float64 `json:"p50_us"`
	P99      float64 `json:"p99_us"`
	Mean     float64 `json:"mean_us"`
	// Bytes is what fio wrote.
	Bytes int64 `json:"bytes_written"`
	// CPUSeconds is utime+stime of keel serve (unreplicated) or of both
	// keel node processes (replicated) over the fio run.
	CPUSeconds float64 `json:"cpu_seconds"`
	// Replicated only: the change of the nodes' copy counters, summed
	// over both nodes.
	PayloadBytes    float64 `json:"repl_payload_bytes,omitempty"`
	UserCopyBytes   float64 `json:"repl_user_copy_bytes"`
	KernelCopyBytes float64 `json:"repl_kernel_copy_bytes"`
	ZeroCopyBytes   float64 `json:"repl_zerocopy_bytes"`
}

// Row is the median over reps of one setup on one workload.
type Row struct {
	Setup    string  `json:"setup"`
	Workload string  `json:"workload"`
	Reps     int     `json:"reps"`
	IOPS     float64 `json:"iops"`
	P50      float64 `json:"p50_us"`
	P99      float64 `json:"p99_us"`
	// CPUPerGiB is CPU seconds per GiB fio wrote.
	CPUPerGiB float64 `json:"cpu_s_per_gib_written"`
	// Replicated only: CPU seconds per GiB of payload sent to the
	// secondary, and copies per replicated byte (NaN-free: 0 when none).
	CPUPerGiBReplicated float64 `json:"cpu_s_per_gib_replicated,omitempty"`
	CopiesPerByte       float64 `json:"copies_per_byte"`
	ZeroCopyShare       float64 `json:"zerocopy_share"`
}

// Summary holds the medians and the headline figures. A figure whose
// inputs were not measured is 0 and its check says so.
type Summary struct {
	Rows []Row `json:"rows"`
	// IOPSRatioQD32 is replicated/unreplicated median IOPS at QD32.
	IOPSRatioQD32 float64 `json:"iops_ratio_qd32"`
	// QD1P50Added and QD1P99Added are replicated minus unreplicated
	// median QD1 latencies in µs.
	QD1P50Added float64 `json:"qd1_p50_added_us"`
	QD1P99Added float64 `json:"qd1_p99_added_us"`
	// CPUPerGiBReplicated is the replicated QD32 row's; CPUPerGiBUnreplicated
	// the unreplicated QD32 row's CPU per GiB written.
	CPUPerGiBReplicated   float64 `json:"cpu_s_per_gib_replicated"`
	CPUPerGiBUnreplicated float64 `json:"cpu_s_per_gib_unreplicated"`
	// CopiesPerByte and ZeroCopyShare are over every replicated run.
	CopiesPerByte float64 `json:"copies_per_byte"`
	ZeroCopyShare float64 `json:"zerocopy_share"`

	// The ceiling (Pair: two unreplicated volumes written at once, the
	// two disk writes of a replicated write and their serving, without
	// the network between them). CeilingRatioQD32 is its per-volume QD32
	// IOPS over unreplicated's; ReplicatedOfCeilingQD32 is replicated's
	// over its; CeilingQD1P50Added its QD1 p50 minus unreplicated's, µs.
	// 0 when the ceiling was not measured.
	CeilingRatioQD32        float64 `json:"ceiling_iops_ratio_qd32,omitempty"`
	ReplicatedOfCeilingQD32 float64 `json:"replicated_of_ceiling_qd32,omitempty"`
	CeilingQD1P50Added      float64 `json:"ceiling_qd1_p50_added_us,omitempty"`
}

// Check is one target's verdict.
type Check struct {
	Name     string  `json:"name"`
	Target   string  `json:"target"`
	Value    float64 `json:"value"`
	Measured bool    `json:"measured"`
	Pass     bool    `json:"pass"`
}

func (c Check) String() string {
	switch {
	case !c.Measured:
		return fmt.Sprintf("MISS %s: not measured (target %s)", c.Name, c.Target)
	case c.Pass:
		return fmt.Sprintf("PASS %s: %s (target %s)", c.Name, formatCheck(c), c.Target)
	}
	return fmt.Sprintf("MISS %s: %s (target %s)", c.Name, formatCheck(c), c.Target)
}

func formatCheck(c Check) string {
	if strings.Contains(c.Target, "µs") {
		return fmt.Sprintf("%+.1f µs", c.Value)
	}
	return fmt.Sprintf("%.3f", c.Value)
}

const gib = 1 << 30

// Summarise computes the medians over reps and the headline figures.
func Summarise(runs []Sample) Summary {
	var s Summary
	var payload, copied, zc float64
	for _, setup := range []string{Unreplicated, Replicated, Pair} {
		for _, w := range Workloads {
			var iops, p50, p99, cpuGiB, cpuRepl, cpb, zcs []float64
			for _, r := range runs {
				if r.Setup != setup || r.Workload != w.Name {
					continue
				}
				iops, p50, p99 = append(iops, r.IOPS), append(p50, r.P50), append(p99, r.P99)
				if r.Bytes > 0 {
					cpuGiB = append(cpuGiB, r.CPUSeconds/(float64(r.Bytes)/gib))
				}
				if r.PayloadBytes > 0 {
					cpuRepl = append(cpuRepl, r.CPUSeconds/(r.PayloadBytes/gib))
					cpb = append(cpb, (r.UserCopyBytes+r.KernelCopyBytes)/r.PayloadBytes)
					zcs = append(zcs, r.ZeroCopyBytes/r.PayloadBytes)
					payload += r.PayloadBytes
					copied += r.UserCopyBytes + r.KernelCopyBytes
					zc += r.ZeroCopyBytes
				}
			}
			if len(iops) == 0 {
				continue
			}
			s.Rows = append(s.Rows, Row{
				Setup: setup, Workload: w.Name, Reps: len(iops),
				IOPS: median(iops), P50: median(p50), P99: median(p99), CPUPerGiB: median(cpuGiB),
				CPUPerGiBReplicated: median(cpuRepl), CopiesPerByte: median(cpb), ZeroCopyShare: median(zcs),
			})
		}
	}
	if payload > 0 {
		s.CopiesPerByte = copied / payload
		s.ZeroCopyShare = zc / payload
	}
	u32, ok1 := s.row(Unreplicated, Workloads[0].Name)
	r32, ok2 := s.row(Replicated, Workloads[0].Name)
	if ok1 && ok2 && u32.IOPS > 0 {
		s.IOPSRatioQD32 = r32.IOPS / u32.IOPS
	}
	if ok1 {
		s.CPUPerGiBUnreplicated = u32.CPUPerGiB
	}
	if ok2 {
		s.CPUPerGiBReplicated = r32.CPUPerGiBReplicated
	}
	if c32, ok := s.row(Pair, Workloads[0].Name); ok && c32.IOPS > 0 {
		if u32.IOPS > 0 {
			s.CeilingRatioQD32 = c32.IOPS / u32.IOPS
		}
		s.ReplicatedOfCeilingQD32 = r32.IOPS / c32.IOPS
	}
	u1, ok1 := s.row(Unreplicated, Workloads[1].Name)
	r1, ok2 := s.row(Replicated, Workloads[1].Name)
	if ok1 && ok2 {
		s.QD1P50Added = r1.P50 - u1.P50
		s.QD1P99Added = r1.P99 - u1.P99
	}
	if c1, ok := s.row(Pair, Workloads[1].Name); ok && ok1 {
		s.CeilingQD1P50Added = c1.P50 - u1.P50
	}
	return s
}

// ceilingLine says what the ceiling setup measured, "" when it did not
// run.
func (s Summary) ceilingLine() string {
	if s.CeilingRatioQD32 == 0 {
		return ""
	}
	return fmt.Sprintf("ceiling on this machine (two unreplicated volumes written at once, no replication): per-volume QD32 IOPS %.3f of unreplicated, QD1 p50 %+.1f µs; replicated reaches %.2f of that ceiling",
		s.CeilingRatioQD32, s.CeilingQD1P50Added, s.ReplicatedOfCeilingQD32)
}

func (s Summary) row(setup, workload string) (Row, bool) {
	for _, r := range s.Rows {
		if r.Setup == setup && r.Workload == workload {
			return r, true
		}
	}
	return Row{}, false
}

// Checks compares a summary with issue 4's targets.
func Checks(s Summary) []Check {
	u32, ok1 := s.row(Unreplicated, Workloads[0].Name)
	_, ok2 := s.row(Replicated, Workloads[0].Name)
	ratio := Check{
		Name: "replicated QD32 IOPS / unreplicated", Target: fmt.Sprintf("≥ %.2f", MinIOPSRatio),
		Value: s.IOPSRatioQD32, Measured: ok1 && ok2 && u32.IOPS > 0,
	}
	ratio.Pass = ratio.Measured && ratio.Value >= MinIOPSRatio
	_, ok1 = s.row(Unreplicated, Workloads[1].Name)
	_, ok2 = s.row(Replicated, Workloads[1].Name)
	lat := Check{
		Name: "replicated QD1 p50 latency − unreplicated", Target: fmt.Sprintf("≤ +%.0f µs", MaxQD1AddedLatency),
		Value: s.QD1P50Added, Measured: ok1 && ok2,
	}
	lat.Pass = lat.Measured && lat.Value <= MaxQD1AddedLatency
	return []Check{ratio, lat}
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Clone(v)
	slices.Sort(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

// WriteTable writes the medians, the headline figures and the checks.
func WriteTable(w io.Writer, r *Report) error {
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "setup\tworkload\treps\tIOPS\tp50 µs\tp99 µs\tCPU s/GiB written\tCPU s/GiB replicated\tcopies/byte\t\n")
	for _, row := range r.Summary.Rows {
		repl, cpb := "-", "-"
		if row.Setup == Replicated {
			repl, cpb = fmt.Sprintf("%.2f", row.CPUPerGiBReplicated), fmt.Sprintf("%.2f", row.CopiesPerByte)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%.0f\t%.1f\t%.1f\t%.2f\t%s\t%s\t\n",
			row.Setup, row.Workload, row.Reps, row.IOPS, row.P50, row.P99, row.CPUPerGiB, repl, cpb)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	s := r.Summary
	fmt.Fprintf(w, "\nQD32 IOPS ratio replicated/unreplicated: %.3f\n", s.IOPSRatioQD32)
	fmt.Fprintf(w, "QD1 latency added by replication: p50 %+.1f µs, p99 %+.1f µs\n", s.QD1P50Added, s.QD1P99Added)
	fmt.Fprintf(w, "CPU per GiB (QD32): replicated %.2f s/GiB replicated (both nodes), unreplicated %.2f s/GiB written\n",
		s.CPUPerGiBReplicated, s.CPUPerGiBUnreplicated)
	fmt.Fprintf(w, "copies per replicated byte (user + kernel send): %.2f; sent zero-copy: %.0f%%\n", s.CopiesPerByte, 100*s.ZeroCopyShare)
	if l := s.ceilingLine(); l != "" {
		fmt.Fprintln(w, l)
	}
	for _, c := range r.Checks {
		fmt.Fprintln(w, c)
	}
	for _, e := range r.Errors {
		fmt.Fprintln(w, "error:", e)
	}
	return nil
}

// Markdown renders the report as the table for the README or an issue.
func Markdown(r *Report) string {
	var b strings.Builder
	fmt.Fprintf(&b, "keel bench repl, %s, %d replicas on loopback vs keel serve, %s volume, %s per workload, median of %d reps, %d CPUs, kernel %s, %s\n\n",
		r.Date.Format(time.DateOnly), r.Settings.Replicas, fio.FormatSize(r.Settings.Size), r.Settings.Runtime, r.Settings.Reps, r.CPUs, r.Kernel, r.Fio)
	b.WriteString("| setup | workload | IOPS | p50 µs | p99 µs | CPU s/GiB written | CPU s/GiB replicated | copies/byte |\n")
	b.WriteString("|---|---|--:|--:|--:|--:|--:|--:|\n")
	for _, row := range r.Summary.Rows {
		repl, cpb := "–", "–"
		if row.Setup == Replicated {
			repl, cpb = fmt.Sprintf("%.2f", row.CPUPerGiBReplicated), fmt.Sprintf("%.2f", row.CopiesPerByte)
		}
		fmt.Fprintf(&b, "| %s | %s | %.0f | %.1f | %.1f | %.2f | %s | %s |\n",
			row.Setup, row.Workload, row.IOPS, row.P50, row.P99, row.CPUPerGiB, repl, cpb)
	}
	s := r.Summary
	fmt.Fprintf(&b, "\n- QD32 IOPS ratio replicated/unreplicated: %.3f\n", s.IOPSRatioQD32)
	fmt.Fprintf(&b, "- QD1 latency added: p50 %+.1f µs, p99 %+.1f µs\n", s.QD1P50Added, s.QD1P99Added)
	fmt.Fprintf(&b, "- copies per replicated byte (user space + kernel send copy; the receiver's recv copy is not counted): %.2f; sent zero-copy: %.0f%%\n",
		s.CopiesPerByte, 100*s.ZeroCopyShare)
	if l := s.ceilingLine(); l != "" {
		fmt.Fprintf(&b, "- %s\n", l)
	}
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "- %s\n", c)
	}
	for _, e := range r.Errors {
		fmt.Fprintf(&b, "- error: %s\n", e)
	}
	return b.String()
}
