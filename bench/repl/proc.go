package repl

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// userHZ is the unit of the CPU times in /proc/PID/stat (USER_HZ, 100 on
// every architecture keel runs on).
const userHZ = 100

// cpuSeconds is the CPU time (utime+stime, own and reaped children's) of
// the processes pids, in seconds.
func cpuSeconds(pids []int) (float64, error) {
	var ticks int64
	for _, pid := range pids {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
		if err != nil {
			return 0, err
		}
		t, err := parseStatCPU(b)
		if err != nil {
			return 0, fmt.Errorf("pid %d: %w", pid, err)
		}
		ticks += t
	}
	return float64(ticks) / userHZ, nil
}

// parseStatCPU returns utime+stime+cutime+cstime (fields 14 to 17) of a
// /proc/PID/stat line. comm (field 2) may hold spaces and parentheses, so
// the fields are counted from the last ')'.
func parseStatCPU(b []byte) (int64, error) {
	end := bytes.LastIndexByte(b, ')')
	if end < 0 {
		return 0, fmt.Errorf("malformed /proc stat %q", b)
	}
	f := strings.Fields(string(b[end+1:]))
	// f[0] is field 3 (state), so field 14 is f[11].
	if len(f) < 15 {
		return 0, fmt.Errorf("malformed /proc stat: %d fields after comm", len(f))
	}
	var n int64
	for _, s := range f[11:15] {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("malformed /proc stat field %q", s)
		}
		n += v
	}
	return n, nil
}

// childrenRunning returns the pids of parent's children whose argv[1] is
// sub (e.g. "node" for keel up's `keel node` children).
func childrenRunning(parent int, sub string) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		end := bytes.LastIndexByte(b, ')')
		f := strings.Fields(string(b[end+1:]))
		if len(f) < 2 || f[1] != strconv.Itoa(parent) {
			continue
		}
		cl, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cl), "\x00")
		if len(args) > 1 && args[1] == sub {
			out = append(out, pid)
		}
	}
	return out
}

// Copy counters read from a node's Prometheus endpoint, summed over labels.
const (
	metricPayload    = "keel_repl_payload_bytes_total"
	metricUserCopy   = "keel_repl_user_copy_bytes_total"
	metricKernelCopy = "keel_repl_kernel_copy_bytes_total"
	metricZeroCopy   = "keel_repl_zerocopy_bytes_total"
)

var copyMetrics = []string{metricPayload, metricUserCopy, metricKernelCopy, metricZeroCopy}

// scrape fetches url (a /metrics endpoint) and sums every sample of each
// of names over its label sets.
func scrape(url string, names []string) (map[string]float64, error) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return sumMetrics(resp.Body, names)
}

// sumMetrics reads the Prometheus text format:
//
//	# HELP name ...
//	# TYPE name counter
//	name{label="v",...} 123
//	name 4.5e+06
//
// and sums the samples of each wanted name (exact name, any labels).
func sumMetrics(r io.Reader, names []string) (map[string]float64, error) {
	want := map[string]bool{}
	out := map[string]float64{}
	for _, n := range names {
		want[n] = true
		out[n] = 0
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest := line, ""
		if i := strings.IndexAny(line, "{ "); i >= 0 {
			name, rest = line[:i], line[i:]
		}
		if !want[name] {
			continue
		}
		if strings.HasPrefix(rest, "{") {
			j := strings.LastIndexByte(rest, '}')
			if j < 0 {
				return nil, fmt.Errorf("malformed sample %q", line)
			}
			rest = rest[j+1:]
		}
		f := strings.Fields(rest)
		if len(f) < 1 {
			return nil, fmt.Errorf("malformed sample %q", line)
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return nil, fmt.Errorf("malformed sample %q: %w", line, err)
		}
		out[name] += v
	}
	return out, sc.Err()
}
