package fio

import (
	"strconv"
	"time"
)

// Workload is one fio job shape. Name is stable: it keys the JSON report
// and the README table, so renaming one breaks comparisons across runs.
type Workload struct {
	Name      string
	RW        string // fio rw=: randread, randwrite, randrw, read, write
	BlockSize int64  // bytes per request
	IODepth   int    // requests in flight per job
	Jobs      int    // fio numjobs; with the nbd engine each job is one connection
	MixRead   int    // rwmixread percentage for randrw, 0 otherwise
}

// Reads reports whether the workload issues reads.
func (w Workload) Reads() bool { return w.RW == "randread" || w.RW == "read" || w.RW == "randrw" }

// Writes reports whether the workload issues writes.
func (w Workload) Writes() bool {
	return w.RW == "randwrite" || w.RW == "write" || w.RW == "randrw"
}

// Workloads is the suite, in the order it runs against each target.
var Workloads = []Workload{
	{Name: "randread-4k-qd1", RW: "randread", BlockSize: 4 << 10, IODepth: 1, Jobs: 1},
	{Name: "randread-4k-qd32", RW: "randread", BlockSize: 4 << 10, IODepth: 32, Jobs: 1},
	{Name: "randwrite-4k-qd32", RW: "randwrite", BlockSize: 4 << 10, IODepth: 32, Jobs: 1},
	{Name: "randrw70-64k-qd16", RW: "randrw", BlockSize: 64 << 10, IODepth: 16, Jobs: 1, MixRead: 70},
	{Name: "seqread-1m-qd8", RW: "read", BlockSize: 1 << 20, IODepth: 8, Jobs: 1},
	{Name: "seqwrite-1m-qd8", RW: "write", BlockSize: 1 << 20, IODepth: 8, Jobs: 1},
	// Four connections of QD8 each, half reads and half writes. The
	// multi-conn target compares it with the single-connection QD32 figures
	// mixed in the same proportion (see Check).
	{Name: "multiconn-4x8-randrw", RW: "randrw", BlockSize: 4 << 10, IODepth: 8, Jobs: 4, MixRead: 50},
}

// WorkloadNames lists the names of Workloads in suite order.
func WorkloadNames() []string {
	names := make([]string, len(Workloads))
	for i, w := range Workloads {
		names[i] = w.Name
	}
	return names
}

func workloadByName(name string) (Workload, bool) {
	for _, w := range Workloads {
		if w.Name == name {
			return w, true
		}
	}
	return Workload{}, false
}

// jobSpec is everything that differs between the fio invocations of one
// workload against different targets.
type jobSpec struct {
	// Exactly one of uri (nbd engine) and file (libaio, O_DIRECT) is set.
	uri  string
	file string
	size int64 // bytes of the file; the nbd engine asks the server instead

	runtime time.Duration
	ramp    time.Duration
	output  string // path fio writes its JSON report to
}

// fioArgs is the fio command line for w. Both engines get the same job
// options; only the engine lines differ. randrepeat stays at fio's default
// (on), so every target sees the same sequence of offsets.
func fioArgs(w Workload, s jobSpec) []string {
	args := []string{
		"--name=" + w.Name,
		"--rw=" + w.RW,
		"--bs=" + strconv.FormatInt(w.BlockSize, 10),
		"--iodepth=" + strconv.Itoa(w.IODepth),
		"--numjobs=" + strconv.Itoa(w.Jobs),
		"--group_reporting=1",
		"--time_based=1",
		"--runtime=" + fioDuration(s.runtime),
		"--norandommap=1",
		"--percentile_list=50:99:99.9",
		"--output-format=json",
		"--output=" + s.output,
	}
	if s.ramp > 0 {
		args = append(args, "--ramp_time="+fioDuration(s.ramp))
	}
	if w.MixRead > 0 {
		args = append(args, "--rwmixread="+strconv.Itoa(w.MixRead))
	}
	return append(args, engineArgs(s)...)
}

// prefillArgs writes the whole volume once, sequentially, so that the timed
// reads hit allocated, written blocks: reading holes or unwritten extents
// costs nothing and would compare nothing.
func prefillArgs(s jobSpec) []string {
	args := []string{
		"--name=prefill",
		"--rw=write",
		"--bs=1M",
		"--iodepth=8",
		"--numjobs=1",
		"--output-format=json",
		"--output=" + s.output,
	}
	if s.uri != "" {
		// The nbd engine learns the export size from the server, but a
		// write job without a size has nothing to do.
		args = append(args, "--size="+strconv.FormatInt(s.size, 10))
	}
	return append(args, engineArgs(s)...)
}

func engineArgs(s jobSpec) []string {
	if s.uri != "" {
		return []string{"--ioengine=nbd", "--uri=" + s.uri}
	}
	return []string{
		"--ioengine=libaio",
		"--direct=1",
		"--filename=" + s.file,
		"--size=" + strconv.FormatInt(s.size, 10),
	}
}

// fioDuration renders d in fio's time syntax, to the millisecond.
func fioDuration(d time.Duration) string {
	return strconv.FormatInt(d.Milliseconds(), 10) + "ms"
}

// FormatSize renders n with the largest binary suffix that divides it.
func FormatSize(n int64) string {
	for _, u := range []struct {
		shift  uint
		suffix string
	}{{40, "T"}, {30, "G"}, {20, "M"}, {10, "K"}} {
		if n >= 1<<u.shift && n%(1<<u.shift) == 0 {
			return strconv.FormatInt(n>>u.shift, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}
