package fio

import (
	"slices"
	"strings"
	"testing"
	"time"
)

func TestFormatSize(t *testing.T) {
	for _, c := range []struct {
		in   int64
		want string
	}{
		{4 << 30, "4G"}, {64 << 20, "64M"}, {1 << 40, "1T"}, {512 << 10, "512K"}, {4<<30 + 4096, "4194308K"}, {1000, "1000"},
	} {
		if got := FormatSize(c.in); got != c.want {
			t.Errorf("FormatSize(%d) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestWorkloadNamesStable(t *testing.T) {
	// These names key the JSON and the README: changing one is a format
	// change.
	want := []string{"randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32", "randrw70-64k-qd16", "seqread-1m-qd8", "seqwrite-1m-qd8", "multiconn-4x8-randrw"}
	if got := WorkloadNames(); !slices.Equal(got, want) {
		t.Errorf("workloads %v, want %v", got, want)
	}
	for _, w := range Workloads {
		if !w.Reads() && !w.Writes() {
			t.Errorf("%s neither reads nor writes", w.Name)
		}
		if (w.RW == "randrw") != (w.MixRead > 0) {
			t.Errorf("%s: rwmixread only for randrw", w.Name)
		}
	}
}

func TestFioArgs(t *testing.T) {
	mc := mustWorkload(t, "multiconn-4x8-randrw")
	nbd := fioArgs(mc, jobSpec{uri: "nbd://127.0.0.1:1/bench", size: 1 << 30, runtime: 1500 * time.Millisecond, ramp: time.Second, output: "/o.json"})
	for _, want := range []string{
		"--name=multiconn-4x8-randrw", "--rw=randrw", "--rwmixread=50", "--bs=4096", "--iodepth=8", "--numjobs=4",
		"--group_reporting=1", "--time_based=1", "--runtime=1500ms", "--ramp_time=1000ms",
		"--output-format=json", "--output=/o.json", "--percentile_list=50:99:99.9",
		"--ioengine=nbd", "--uri=nbd://127.0.0.1:1/bench",
	} {
		if !slices.Contains(nbd, want) {
			t.Errorf("nbd args lack %s: %v", want, nbd)
		}
	}
	for _, a := range nbd {
		if strings.HasPrefix(a, "--filename") || strings.HasPrefix(a, "--direct") {
			t.Errorf("nbd job with file option %s", a)
		}
	}

	raw := fioArgs(mustWorkload(t, "seqread-1m-qd8"), jobSpec{file: "/d/raw.img", size: 64 << 20, runtime: time.Second, output: "/o.json"})
	for _, want := range []string{"--rw=read", "--bs=1048576", "--ioengine=libaio", "--direct=1", "--filename=/d/raw.img", "--size=67108864"} {
		if !slices.Contains(raw, want) {
			t.Errorf("raw args lack %s: %v", want, raw)
		}
	}
	for _, a := range raw {
		if strings.HasPrefix(a, "--ramp_time") || strings.HasPrefix(a, "--rwmixread") {
			t.Errorf("unexpected %s", a)
		}
	}

	pre := prefillArgs(jobSpec{uri: "nbd://h:1/bench", size: 1 << 30, output: "/p.json"})
	for _, want := range []string{"--rw=write", "--size=1073741824", "--ioengine=nbd"} {
		if !slices.Contains(pre, want) {
			t.Errorf("prefill args lack %s: %v", want, pre)
		}
	}
	for _, a := range pre {
		if strings.HasPrefix(a, "--time_based") {
			t.Error("prefill must write the volume once, not for a time")
		}
	}
}
