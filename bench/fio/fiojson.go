package fio

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
)

// Latency is a completion-latency summary in microseconds.
type Latency struct {
	P50  float64 `json:"p50_us"`
	P99  float64 `json:"p99_us"`
	P999 float64 `json:"p99_9_us"`
	Mean float64 `json:"mean_us"`
}

// Direction is what fio measured for one direction (reads or writes).
type Direction struct {
	IOPS    float64 `json:"iops"`
	BW      float64 `json:"bw_bytes_per_s"`
	IOs     int64   `json:"ios"`
	Latency Latency `json:"clat"`
}

// Figures is one fio job's result, reads and writes apart.
type Figures struct {
	Read  Direction `json:"read"`
	Write Direction `json:"write"`
	// ClientCPU is fio's own CPU use (user + system) in percent of one CPU,
	// summed over its jobs.
	ClientCPU float64 `json:"client_cpu_pct"`
}

// IOPS is reads plus writes per second.
func (f Figures) IOPS() float64 { return f.Read.IOPS + f.Write.IOPS }

// BW is read plus write bandwidth in bytes per second.
func (f Figures) BW() float64 { return f.Read.BW + f.Write.BW }

// fioReport is the part of fio's --output-format=json this package reads.
// fio writes (fio 3.33, trimmed):
//
//	{
//	  "fio version" : "fio-3.33",
//	  "jobs" : [ {
//	      "jobname" : "...", "error" : 0,
//	      "read"  : { "iops" : 1.5, "bw_bytes" : 6144, "total_ios" : 3,
//	                  "clat_ns" : { "mean" : 1.0, "N" : 3,
//	                                "percentile" : { "50.000000" : 72192, ... } } },
//	      "write" : { ... same ... },
//	      "usr_cpu" : 8.4, "sys_cpu" : 18.5
//	  } ]
//	}
//
// With group_reporting there is one entry per group; the suite runs one
// group per invocation.
type fioReport struct {
	Version string   `json:"fio version"`
	Jobs    []fioJob `json:"jobs"`
}

type fioJob struct {
	Name   string  `json:"jobname"`
	Error  int     `json:"error"`
	Read   fioDir  `json:"read"`
	Write  fioDir  `json:"write"`
	UsrCPU float64 `json:"usr_cpu"`
	SysCPU float64 `json:"sys_cpu"`
}

type fioDir struct {
	IOPS     float64 `json:"iops"`
	BWBytes  float64 `json:"bw_bytes"`
	TotalIOs int64   `json:"total_ios"`
	Clat     struct {
		Mean       float64            `json:"mean"`
		N          int64              `json:"N"`
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
}

// errNoJobs means fio's report holds no job, e.g. because every job
// failed to start.
var errNoJobs = errors.New("fio report has no jobs")

// ParseFioJSON reads one fio JSON report and returns its figures and the
// fio version. Anything fio printed before the JSON object (some engines
// print notes to the output file) is skipped. The report must hold exactly
// one job group (run with group_reporting); a job with a nonzero error is
// an error.
func ParseFioJSON(data []byte) (Figures, string, error) {
	start := bytes.IndexByte(data, '{')
	if start < 0 {
		return Figures{}, "", fmt.Errorf("fio report: no JSON object in %d bytes", len(data))
	}
	var r fioReport
	if err := json.Unmarshal(data[start:], &r); err != nil {
		return Figures{}, "", fmt.Errorf("fio report: %w", err)
	}
	switch {
	case len(r.Jobs) == 0:
		return Figures{}, r.Version, errNoJobs
	case len(r.Jobs) > 1:
		return Figures{}, r.Version, fmt.Errorf("fio report has %d job groups, want 1 (group_reporting)", len(r.Jobs))
	}
	j := r.Jobs[0]
	if j.Error != 0 {
		return Figures{}, r.Version, fmt.Errorf("fio job %s failed with error %d", j.Name, j.Error)
	}
	rd, err := direction(j.Read)
	if err != nil {
		return Figures{}, r.Version, fmt.Errorf("fio job %s reads: %w", j.Name, err)
	}
	wr, err := direction(j.Write)
	if err != nil {
		return Figures{}, r.Version, fmt.Errorf("fio job %s writes: %w", j.Name, err)
	}
	return Figures{Read: rd, Write: wr, ClientCPU: j.UsrCPU + j.SysCPU}, r.Version, nil
}

func direction(d fioDir) (Direction, error) {
	out := Direction{IOPS: d.IOPS, BW: d.BWBytes, IOs: d.TotalIOs}
	if d.Clat.N == 0 {
		return out, nil
	}
	out.Latency.Mean = d.Clat.Mean / 1e3
	want := []struct {
		pct float64
		dst *float64
	}{{50, &out.Latency.P50}, {99, &out.Latency.P99}, {99.9, &out.Latency.P999}}
	for _, w := range want {
		v, ok := percentile(d.Clat.Percentile, w.pct)
		if !ok {
			return out, fmt.Errorf("no p%g completion latency (run fio with --percentile_list=50:99:99.9)", w.pct)
		}
		*w.dst = v / 1e3
	}
	return out, nil
}

// percentile finds pct among fio's keys, which are decimal strings such as
// "99.900000".
func percentile(m map[string]float64, pct float64) (float64, bool) {
	for k, v := range m {
		f, err := strconv.ParseFloat(k, 64)
		if err == nil && f > pct-1e-6 && f < pct+1e-6 {
			return v, true
		}
	}
	return 0, false
}
