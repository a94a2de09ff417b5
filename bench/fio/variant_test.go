package fio

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParseKeelVariant(t *testing.T) {
	good := []struct {
		in   string
		want KeelVariant
	}{
		{"base=/tmp/keel-base", KeelVariant{Name: "base", Bin: "/tmp/keel-base"}},
		{"aio-off=/tmp/k:KEEL_DIO_AIO=off", KeelVariant{Name: "aio-off", Bin: "/tmp/k", Env: []string{"KEEL_DIO_AIO=off"}}},
		{"v2.1_x=./keel:A=1,B_2=x=y,GOMAXPROCS=1", KeelVariant{Name: "v2.1_x", Bin: "./keel", Env: []string{"A=1", "B_2=x=y", "GOMAXPROCS=1"}}},
		{"e=/k:EMPTY=", KeelVariant{Name: "e", Bin: "/k", Env: []string{"EMPTY="}}},
	}
	for _, c := range good {
		v, err := ParseKeelVariant(c.in)
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if v.Name != c.want.Name || v.Bin != c.want.Bin || !slices.Equal(v.Env, c.want.Env) {
			t.Errorf("%q: got %+v, want %+v", c.in, v, c.want)
		}
		if v.String() != c.in {
			t.Errorf("%q: String() %q", c.in, v.String())
		}
	}
	bad := []struct{ in, why string }{
		{"", "no '='"},
		{"/tmp/keel", "no '='"},
		{"=/tmp/keel", "empty name"},
		{"a b=/tmp/keel", "only letters"},
		{"x/y=/tmp/keel", "only letters"},
		{"keel=/tmp/keel", "a target's own name"},
		{"raw=/tmp/keel", "a target's own name"},
		{"base=", "empty binary path"},
		{"base=:A=1", "empty binary path"},
		{"base=/k:", `item ""`},
		{"base=/k:A", `item "A"`},
		{"base=/k:A=1,", `item ""`},
		{"base=/k:1A=x", `item "1A=x"`},
		{"base=/k:A-B=x", `item "A-B=x"`},
		{"base=/k:=x", `item "=x"`},
	}
	for _, c := range bad {
		_, err := ParseKeelVariant(c.in)
		if err == nil {
			t.Errorf("%q: accepted", c.in)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, c.why) || !strings.Contains(msg, "--keel-variant") || !strings.Contains(msg, "NAME=/path/to/keel") {
			t.Errorf("%q: message %q should say %q, name the flag and show the syntax", c.in, msg, c.why)
		}
	}
}

func TestAddVariants(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "keel-new")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	noexec := filepath.Join(dir, "keel-noexec")
	if err := os.WriteFile(noexec, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	base := KeelVariant{Name: "base", Bin: bin}
	nw := KeelVariant{Name: "new", Bin: bin, Env: []string{"KEEL_DIO_AIO=off"}}

	keelRawPeer := []Target{mustTarget(t, "keel"), mustTarget(t, "qemu-nbd-direct"), mustTarget(t, "raw")}
	run, skips, err := addVariants(keelRawPeer, names(keelRawPeer), []KeelVariant{base, nw}, true)
	if err != nil || len(skips) != 0 {
		t.Fatal(err, skips)
	}
	if got, want := names(run), []string{"keel", "base", "new", "qemu-nbd-direct", "raw"}; !slices.Equal(got, want) {
		t.Errorf("order %v, want %v (variants right after keel)", got, want)
	}
	if got := names(keelRawPeer); !slices.Equal(got, []string{"keel", "qemu-nbd-direct", "raw"}) {
		t.Errorf("the caller's slice changed: %v", got)
	}
	// Each variant alternates like every target.
	var sched []string
	for _, s := range Schedule(run[:3], 2) {
		sched = append(sched, s.Target.Name)
	}
	if want := []string{"keel", "base", "new", "keel", "base", "new"}; !slices.Equal(sched, want) {
		t.Errorf("schedule %v, want %v", sched, want)
	}
	v := run[2]
	if !v.variant || v.program != bin || v.Mode != ModeDirect || !strings.Contains(v.Note, "KEEL_DIO_AIO=off") {
		t.Errorf("variant target %+v", v)
	}
	l := v.launch(launchSpec{program: bin, file: "/d/v.img", size: 1 << 30, ep: endpoint{host: "127.0.0.1", port: 5}})
	if got := strings.Join(l.argv, " "); got != bin+" serve --file /d/v.img --size 1073741824 --name bench --listen 127.0.0.1:5" {
		t.Errorf("variant argv %s", got)
	}
	if !slices.Equal(l.env, []string{"KEEL_DIO_AIO=off"}) {
		t.Errorf("variant env %v", l.env)
	}
	if l := run[0].launch(launchSpec{program: "/k", ep: endpoint{host: "h", port: 1}}); len(l.env) != 0 {
		t.Errorf("keel itself got env %v", l.env)
	}

	// Without keel, variants come first.
	run, _, err = addVariants([]Target{mustTarget(t, "raw")}, []string{"raw"}, []KeelVariant{base}, true)
	if err != nil || !slices.Equal(names(run), []string{"base", "raw"}) {
		t.Errorf("no keel: %v %v", names(run), err)
	}
	// No nbd engine: skipped like every server.
	run, skips, err = addVariants(nil, nil, []KeelVariant{base}, false)
	if err != nil || len(run) != 0 || len(skips) != 1 || !strings.Contains(skips[0].Reason, "nbd engine") {
		t.Errorf("no nbd engine: %v %v %v", names(run), skips, err)
	}

	for _, c := range []struct {
		names    []string
		variants []KeelVariant
		want     string
	}{
		{nil, []KeelVariant{base, {Name: "base", Bin: bin}}, `"base": name given twice`},
		{[]string{"nbdkit"}, []KeelVariant{{Name: "nbdkit", Bin: bin}}, `"nbdkit": name given twice`},
		{nil, []KeelVariant{{Name: "x", Bin: noexec}}, "not an executable file"},
		{nil, []KeelVariant{{Name: "x", Bin: dir}}, "not an executable file"},
		{nil, []KeelVariant{{Name: "x", Bin: filepath.Join(dir, "missing")}}, "not an executable file"},
	} {
		if _, _, err := addVariants(nil, c.names, c.variants, true); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: error %v, want %q", c.variants, err, c.want)
		}
	}
}

// A keel variant is measured and shown like a target, but is nobody's best
// peer.
func TestVariantIsNotAPeer(t *testing.T) {
	targets := []Target{mustTarget(t, "keel"), variantTarget(KeelVariant{Name: "new", Bin: "/k"}), mustTarget(t, "qemu-nbd-direct"), mustTarget(t, "raw")}
	workloads := []Workload{mustWorkload(t, "randread-4k-qd32")}
	r := &Report{Settings: Settings{Workloads: []string{"randread-4k-qd32"}, Reps: 1}}
	for _, x := range targets {
		r.Targets = append(r.Targets, TargetInfo{Name: x.Name, Mode: x.Mode, KeelVariant: x.variant})
	}
	iops := map[string]float64{"keel": 50000, "new": 90000, "qemu-nbd-direct": 40000, "raw": 100000}
	for _, x := range targets {
		r.Runs = append(r.Runs, run(1, x.Name, "randread-4k-qd32", iops[x.Name], 0, 100, 300))
	}
	r.summarise(targets, workloads)
	for _, name := range []string{"keel", "new"} {
		m, ok := r.median(name, "randread-4k-qd32")
		if !ok || m.BestPeer != "qemu-nbd-direct" {
			t.Errorf("%s: best peer %q, want qemu-nbd-direct", name, m.BestPeer)
		}
	}
	if m, _ := r.median("new", "randread-4k-qd32"); m.VsRaw != 0.9 {
		t.Errorf("variant × raw %v, want 0.9", m.VsRaw)
	}
	if !strings.Contains(Markdown(r), "| new |") {
		t.Errorf("the variant has no row of its own:\n%s", Markdown(r))
	}
}
