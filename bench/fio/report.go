package fio

import (
	"fmt"
	"io"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"
)

// Report is everything one Run measured. It is what latest.json holds.
type Report struct {
	Env      Environment  `json:"environment"`
	Settings Settings     `json:"settings"`
	Targets  []TargetInfo `json:"targets"`
	Skipped  []Skip       `json:"skipped,omitempty"`
	// Runs holds every fio run: one per target, rep and workload.
	Runs []RunRecord `json:"runs"`
	// Servers holds one record per target and rep.
	Servers []ServerRecord `json:"servers"`
	// Medians holds one row per target and workload, in table order.
	Medians []Median `json:"medians"`
	Checks  []Check  `json:"checks,omitempty"`
	Errors  []string `json:"errors,omitempty"`
}

// Settings are the parameters of the run.
type Settings struct {
	Targets   []string `json:"targets"`
	Workloads []string `json:"workloads"`
	Runtime   string   `json:"runtime"`
	Ramp      string   `json:"ramp"`
	Reps      int      `json:"reps"`
	Size      int64    `json:"size_bytes"`
	Transport string   `json:"transport"` // "tcp" (loopback) or "unix"
}

// TargetInfo describes a target that ran.
type TargetInfo struct {
	Name    string `json:"name"`
	Mode    Mode   `json:"mode"`
	Note    string `json:"note"`
	Version string `json:"version,omitempty"`
	// Command is the server's command line of the first rep.
	Command []string `json:"command,omitempty"`
	// KeelVariant: a keel build under its own name (--keel-variant), not
	// a peer.
	KeelVariant bool `json:"keel_variant,omitempty"`
}

// RunRecord is one fio run.
type RunRecord struct {
	Rep      int     `json:"rep"`
	Target   string  `json:"target"`
	Workload string  `json:"workload"`
	Figures  Figures `json:"figures"`
	// ServerCPU is the server's CPU use over the fio run in percent of
	// one CPU (process tree, user + system); 0 for raw.
	ServerCPU float64 `json:"server_cpu_pct"`
	Seconds   float64 `json:"seconds"` // wall time of the fio process
}

// ServerRecord is one target's turn in one rep.
type ServerRecord struct {
	Rep            int     `json:"rep"`
	Target         string  `json:"target"`
	PeakRSS        int64   `json:"peak_rss_bytes"` // 0 for raw
	PrefillSeconds float64 `json:"prefill_seconds"`
}

// Median is the median over reps of one target on one workload, with its
// ratios. A ratio of 0 means there was nothing to compare with.
type Median struct {
	Target    string  `json:"target"`
	Mode      Mode    `json:"mode"`
	Workload  string  `json:"workload"`
	Reps      int     `json:"reps"`
	Figures   Figures `json:"figures"`
	ServerCPU float64 `json:"server_cpu_pct"`
	// VsRaw is IOPS over raw's IOPS on the same workload.
	VsRaw float64 `json:"vs_raw"`
	// BestPeer is the fastest other server (not raw, not keel) of the same
	// mode on this workload, and VsBestPeer this target's IOPS over its.
	BestPeer   string  `json:"best_peer,omitempty"`
	VsBestPeer float64 `json:"vs_best_peer"`
	PeakRSS    int64   `json:"peak_rss_bytes"` // largest over reps
}

// shownLatency is the latency the table shows: that of reads when the
// workload reads, else that of writes.
func (m Median) shownLatency() Latency {
	if m.Figures.Read.IOs > 0 {
		return m.Figures.Read.Latency
	}
	return m.Figures.Write.Latency
}

// summarise fills r.Medians from r.Runs and r.Servers. targets and
// workloads give the row order.
func (r *Report) summarise(targets []Target, workloads []Workload) {
	r.Medians = r.Medians[:0]
	rss := map[string]int64{}
	for _, s := range r.Servers {
		rss[s.Target] = max(rss[s.Target], s.PeakRSS)
	}
	for _, t := range targets {
		for _, w := range workloads {
			var runs []RunRecord
			for _, x := range r.Runs {
				if x.Target == t.Name && x.Workload == w.Name {
					runs = append(runs, x)
				}
			}
			if len(runs) == 0 {
				continue
			}
			r.Medians = append(r.Medians, Median{
				Target: t.Name, Mode: t.Mode, Workload: w.Name, Reps: len(runs),
				Figures:   medianFigures(runs),
				ServerCPU: median(runs, func(x RunRecord) float64 { return x.ServerCPU }),
				PeakRSS:   rss[t.Name],
			})
		}
	}
	for i := range r.Medians {
		m := &r.Medians[i]
		if m.Target == "raw" {
			continue
		}
		if raw, ok := r.median("raw", m.Workload); ok {
			m.VsRaw = ratio(m.Figures.IOPS(), raw.Figures.IOPS())
		}
		best := -1.0
		for _, o := range r.Medians {
			if o.Workload != m.Workload || o.Mode != m.Mode || o.Target == m.Target || !r.isPeer(o.Target) {
				continue
			}
			if o.Figures.IOPS() > best {
				best, m.BestPeer = o.Figures.IOPS(), o.Target
			}
		}
		if m.BestPeer != "" {
			m.VsBestPeer = ratio(m.Figures.IOPS(), best)
		}
	}
}

// isPeer: a server keel is compared with (not raw, not keel or a keel
// variant).
func (r *Report) isPeer(target string) bool {
	if target == "raw" || target == "keel" {
		return false
	}
	for _, t := range r.Targets {
		if t.Name == target && t.KeelVariant {
			return false
		}
	}
	return true
}

func (r *Report) median(target, workload string) (Median, bool) {
	for _, m := range r.Medians {
		if m.Target == target && m.Workload == workload {
			return m, true
		}
	}
	return Median{}, false
}

func ratio(a, b float64) float64 {
	if b <= 0 {
		return 0
	}
	return a / b
}

// median of f over runs; for an even count the mean of the middle two.
func median(runs []RunRecord, f func(RunRecord) float64) float64 {
	v := make([]float64, len(runs))
	for i, x := range runs {
		v[i] = f(x)
	}
	return medianOf(v)
}

func medianOf(v []float64) float64 {
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

// medianFigures takes the median of every figure on its own: the median
// IOPS and the median p99 may come from different reps.
func medianFigures(runs []RunRecord) Figures {
	dir := func(get func(RunRecord) Direction) Direction {
		m := func(f func(Direction) float64) float64 {
			return median(runs, func(x RunRecord) float64 { return f(get(x)) })
		}
		return Direction{
			IOPS: m(func(d Direction) float64 { return d.IOPS }),
			BW:   m(func(d Direction) float64 { return d.BW }),
			IOs:  int64(math.Round(m(func(d Direction) float64 { return float64(d.IOs) }))),
			Latency: Latency{
				P50:  m(func(d Direction) float64 { return d.Latency.P50 }),
				P99:  m(func(d Direction) float64 { return d.Latency.P99 }),
				P999: m(func(d Direction) float64 { return d.Latency.P999 }),
				Mean: m(func(d Direction) float64 { return d.Latency.Mean }),
			},
		}
	}
	return Figures{
		Read:      dir(func(x RunRecord) Direction { return x.Figures.Read }),
		Write:     dir(func(x RunRecord) Direction { return x.Figures.Write }),
		ClientCPU: median(runs, func(x RunRecord) float64 { return x.Figures.ClientCPU }),
	}
}

// tableRow is one rendered line of the table.
func tableRow(m Median) []string {
	lat := m.shownLatency()
	ratioCell := func(v float64) string {
		if v == 0 {
			return "-"
		}
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	cpu := "-"
	if m.Target != "raw" {
		cpu = strconv.FormatFloat(m.ServerCPU, 'f', 0, 64)
	}
	return []string{
		m.Target, string(m.Mode), m.Workload,
		strconv.FormatFloat(m.Figures.IOPS(), 'f', 0, 64),
		strconv.FormatFloat(m.Figures.BW()/(1<<20), 'f', 1, 64),
		strconv.FormatFloat(lat.P50, 'f', 0, 64),
		strconv.FormatFloat(lat.P99, 'f', 0, 64),
		strconv.FormatFloat(lat.P999, 'f', 0, 64),
		cpu,
		ratioCell(m.VsRaw),
		ratioCell(m.VsBestPeer),
		or(m.BestPeer, "-"),
	}
}

var tableHeader = []string{"target", "mode", "workload", "IOPS", "MiB/s", "p50 µs", "p99 µs", "p99.9 µs", "srv CPU %", "× raw", "× best peer", "best peer (same mode)"}

func or(s, dflt string) string {
	if s == "" {
		return dflt
	}
	return s
}

const tableLegend = "Latency is completion latency of reads (of writes for write-only workloads); medians over reps. " +
	"× raw: IOPS over raw's. × best peer: IOPS over the fastest other server of the same durability mode."

// WriteTable writes the medians as an aligned text table, rows grouped by
// workload so that targets compare line by line.
func WriteTable(w io.Writer, r *Report) error {
	ms := byWorkload(r)
	rows := [][]string{tableHeader}
	for _, m := range ms {
		rows = append(rows, tableRow(m))
	}
	width := make([]int, len(tableHeader))
	for _, row := range rows {
		for i, c := range row {
			width[i] = max(width[i], utf8.RuneCountInString(c))
		}
	}
	var b strings.Builder
	for j, row := range rows {
		if j > 1 && ms[j-1].Workload != ms[j-2].Workload {
			b.WriteString("\n")
		}
		var line strings.Builder
		for i, c := range row {
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(c))
			if i > 0 {
				line.WriteString("  ")
			}
			if leftAligned(i) {
				line.WriteString(c + pad)
			} else {
				line.WriteString(pad + c)
			}
		}
		b.WriteString(strings.TrimRight(line.String(), " ") + "\n")
	}
	b.WriteString(tableLegend + "\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// leftAligned: the text columns (target, mode, workload, best peer);
// numbers align right.
func leftAligned(col int) bool { return col < 3 || col == len(tableHeader)-1 }

// byWorkload orders the medians by workload (suite order), then target
// (run order).
func byWorkload(r *Report) []Median {
	wi := map[string]int{}
	for i, w := range r.Settings.Workloads {
		wi[w] = i
	}
	ti := map[string]int{}
	for i, t := range r.Targets {
		ti[t.Name] = i
	}
	out := slices.Clone(r.Medians)
	slices.SortStableFunc(out, func(a, b Median) int {
		if c := wi[a.Workload] - wi[b.Workload]; c != 0 {
			return c
		}
		return ti[a.Target] - ti[b.Target]
	})
	return out
}

// Markdown renders the table for the README: a line saying when, where and
// with which command it was measured, the table, the peak RSS per server
// and the target checks.
func Markdown(r *Report) string {
	var b strings.Builder
	e := r.Env
	fmt.Fprintf(&b, "Measured %s with `%s`: %s, %d CPUs (%s), kernel %s, %s on %s (%s); %s per workload, median of %d reps, %s.\n\n",
		e.Date.Format(time.DateOnly), commandText(e.Command), e.FioVersion, e.CPUs, e.CPUModel, e.Kernel,
		FormatSize(r.Settings.Size)+" file", e.Disk.Device, e.Disk.Filesystem,
		r.Settings.Runtime, r.Settings.Reps, transportText(r.Settings.Transport))
	b.WriteString("| " + strings.Join(tableHeader, " | ") + " |\n|")
	for i := range tableHeader {
		if leftAligned(i) {
			b.WriteString("---|")
		} else {
			b.WriteString("--:|")
		}
	}
	b.WriteString("\n")
	for _, m := range byWorkload(r) {
		b.WriteString("| " + strings.Join(tableRow(m), " | ") + " |\n")
	}
	b.WriteString("\n" + tableLegend + "\n")
	if rows := rssRows(r); len(rows) > 0 {
		b.WriteString("\nPeak server RSS: " + strings.Join(rows, ", ") + ".\n")
	}
	if len(r.Checks) > 0 {
		b.WriteString("\n| keel target | result | figure |\n|---|---|---|\n")
		for _, c := range r.Checks {
			fmt.Fprintf(&b, "| %s | %s | %s |\n", c.Name, c.Status, c.Detail)
		}
	}
	return b.String()
}

// commandText is the command line as a reader would type it: the program
// by its base name ("keel", not /tmp/x/keel).
func commandText(argv []string) string {
	if len(argv) == 0 {
		return ""
	}
	return strings.Join(append([]string{filepath.Base(argv[0])}, argv[1:]...), " ")
}

func transportText(t string) string {
	if t == "unix" {
		return "NBD over a Unix socket"
	}
	return "NBD over loopback TCP"
}

func rssRows(r *Report) []string {
	var rows []string
	for _, t := range r.Targets {
		if t.Name == "raw" {
			continue
		}
		var peak int64
		for _, s := range r.Servers {
			if s.Target == t.Name {
				peak = max(peak, s.PeakRSS)
			}
		}
		rows = append(rows, fmt.Sprintf("%s %s MiB", t.Name, formatMiB(peak)))
	}
	return rows
}

// WriteSummary writes the skipped targets, errors, peak RSS and the target
// checks as text.
func WriteSummary(w io.Writer, r *Report) error {
	for _, s := range r.Skipped {
		fmt.Fprintln(w, s)
	}
	for _, e := range r.Errors {
		fmt.Fprintln(w, "error:", e)
	}
	if rows := rssRows(r); len(rows) > 0 {
		fmt.Fprintln(w, "peak server RSS:", strings.Join(rows, ", "))
	}
	if len(r.Checks) == 0 {
		return nil
	}
	fmt.Fprintln(w, "keel targets (issue 7; reporting, not an assertion):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, c := range r.Checks {
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", c.Status, c.Name, c.Detail)
	}
	return tw.Flush()
}
