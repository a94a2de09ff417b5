package fio

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestScheduleAlternates(t *testing.T) {
	ts := []Target{mustTarget(t, "keel"), mustTarget(t, "nbdkit"), mustTarget(t, "raw")}
	var got []string
	for _, s := range Schedule(ts, 3) {
		got = append(got, s.Target.Name+"@"+string(rune('0'+s.Rep)))
	}
	want := []string{"keel@0", "nbdkit@0", "raw@0", "keel@1", "nbdkit@1", "raw@1", "keel@2", "nbdkit@2", "raw@2"}
	if !slices.Equal(got, want) {
		t.Errorf("schedule %v, want %v", got, want)
	}
	if n := len(Schedule(ts, 0)); n != 0 {
		t.Errorf("0 reps scheduled %d turns", n)
	}
}

// fakePath finds only the programs in have.
func fakePath(have ...string) func(string) (string, error) {
	return func(name string) (string, error) {
		if slices.Contains(have, name) {
			return "/usr/bin/" + name, nil
		}
		return "", errors.New("not found")
	}
}

func TestSelectTargetsSkips(t *testing.T) {
	keel := filepath.Join(t.TempDir(), "keel")
	if err := os.WriteFile(keel, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	notExec := filepath.Join(t.TempDir(), "keel-noexec")
	if err := os.WriteFile(notExec, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	all := TargetNames()
	cases := []struct {
		name    string
		keelBin string
		path    []string
		fioNBD  bool
		run     []string
		skipped map[string]string // target → part of the reason
	}{
		{
			name: "everything present", keelBin: keel, fioNBD: true,
			path: []string{"nbdkit", "qemu-nbd", "nbd-server", "go", "fio"},
			run:  all,
		},
		{
			name: "peers missing", keelBin: keel, fioNBD: true,
			path: []string{"go", "fio"},
			run:  []string{"keel", "go-nbd", "raw"},
			skipped: map[string]string{
				"nbdkit": "make bench-deps", "nbdkit-cache-none": "nbdkit not found",
				"qemu-nbd": "qemu-nbd not found", "qemu-nbd-direct": "make bench-deps", "nbd-server": "nbd-server not found",
			},
		},
		{
			name: "no keel binary, no go", keelBin: "", fioNBD: true,
			path:    []string{"nbdkit", "qemu-nbd", "nbd-server", "fio"},
			run:     []string{"nbdkit", "nbdkit-cache-none", "qemu-nbd", "qemu-nbd-direct", "nbd-server", "raw"},
			skipped: map[string]string{"keel": "make build", "go-nbd": "go tool"},
		},
		{
			name: "keel binary not executable", keelBin: notExec, fioNBD: true,
			path:    []string{"nbdkit", "qemu-nbd", "nbd-server", "go", "fio"},
			run:     []string{"nbdkit", "nbdkit-cache-none", "qemu-nbd", "qemu-nbd-direct", "nbd-server", "go-nbd", "raw"},
			skipped: map[string]string{"keel": "not an executable"},
		},
		{
			name: "fio without nbd engine", keelBin: keel, fioNBD: false,
			path: []string{"nbdkit", "qemu-nbd", "nbd-server", "go", "fio"},
			run:  []string{"raw"},
			skipped: map[string]string{
				"keel": "nbd engine", "nbdkit": "nbd engine", "nbdkit-cache-none": "nbd engine", "qemu-nbd": "nbd engine",
				"qemu-nbd-direct": "nbd engine", "nbd-server": "nbd engine", "go-nbd": "nbd engine",
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			run, skips, err := selectTargets(all, c.keelBin, fakePath(c.path...), c.fioNBD)
			if err != nil {
				t.Fatal(err)
			}
			if got := names(run); !slices.Equal(got, c.run) {
				t.Errorf("run %v, want %v", got, c.run)
			}
			if len(skips) != len(c.skipped) {
				t.Errorf("skips %v, want %d", skips, len(c.skipped))
			}
			for _, s := range skips {
				want, ok := c.skipped[s.Target]
				if !ok || !strings.Contains(s.Reason, want) {
					t.Errorf("skip %v: want reason containing %q", s, want)
				}
				if !strings.HasPrefix(s.String(), "skip "+s.Target+": ") {
					t.Errorf("skip line %q", s)
				}
			}
		})
	}
}

func TestSelectTargetsErrors(t *testing.T) {
	if _, _, err := selectTargets([]string{"raw", "nope"}, "", fakePath("fio"), true); err == nil || !strings.Contains(err.Error(), `unknown target "nope"`) {
		t.Errorf("unknown target: %v", err)
	}
	if _, _, err := selectTargets([]string{"raw", "raw"}, "", fakePath("fio"), true); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("duplicate target: %v", err)
	}
	// Order is the caller's.
	run, _, err := selectTargets([]string{"raw", "nbdkit"}, "", fakePath("fio", "nbdkit"), true)
	if err != nil || !slices.Equal(names(run), []string{"raw", "nbdkit"}) {
		t.Errorf("order: %v %v", names(run), err)
	}
}

func TestTargetsAreLabelled(t *testing.T) {
	for _, x := range Targets {
		if x.Mode != ModeDirect && x.Mode != ModePageCache {
			t.Errorf("%s: mode %q", x.Name, x.Mode)
		}
		if x.Note == "" || x.Install == "" || x.Program == "" {
			t.Errorf("%s: note, install hint and program must be set", x.Name)
		}
		if x.Raw() != (x.Name == "raw") {
			t.Errorf("%s: only raw has no server", x.Name)
		}
	}
	// Honest labels: nbdkit's cache=none is not O_DIRECT.
	if mustTarget(t, "nbdkit-cache-none").Mode != ModePageCache {
		t.Error("nbdkit cache=none labelled direct")
	}
}

func TestLaunchCommands(t *testing.T) {
	tcp := endpoint{host: "127.0.0.1", port: 10809}
	unix := endpoint{unix: "/tmp/s/nbd.sock"}
	spec := func(ep endpoint) launchSpec {
		return launchSpec{program: "/bin/x", file: "/d/v.img", size: 4 << 30, ep: ep, tmp: "/tmp/s"}
	}
	cases := []struct {
		target string
		ep     endpoint
		want   string
	}{
		{"keel", tcp, "/bin/x serve --file /d/v.img --size 4294967296 --name bench --listen 127.0.0.1:10809"},
		{"keel", unix, "/bin/x serve --file /d/v.img --size 4294967296 --name bench --unix /tmp/s/nbd.sock"},
		{"nbdkit", tcp, "/bin/x -f --exit-with-parent -i 127.0.0.1 -p 10809 -e bench file file=/d/v.img"},
		{"nbdkit-cache-none", unix, "/bin/x -f --exit-with-parent -U /tmp/s/nbd.sock -e bench file file=/d/v.img cache=none"},
		{"qemu-nbd", tcp, "/bin/x -f raw -t -e 8 -x bench -b 127.0.0.1 -p 10809 /d/v.img"},
		{"qemu-nbd-direct", unix, "/bin/x -f raw -t -e 8 -x bench -k /tmp/s/nbd.sock --cache=none --aio=native /d/v.img"},
		{"nbd-server", tcp, "/bin/x -C /tmp/s/nbd-server.conf -p /tmp/s/nbd-server.pid"},
		{"go-nbd", tcp, "/bin/x -file /d/v.img -name bench -network tcp -laddr 127.0.0.1:10809"},
		{"go-nbd", unix, "/bin/x -file /d/v.img -name bench -network unix -laddr /tmp/s/nbd.sock"},
	}
	for _, c := range cases {
		l := mustTarget(t, c.target).launch(spec(c.ep))
		if got := strings.Join(l.argv, " "); got != c.want {
			t.Errorf("%s on %s:\n got %s\nwant %s", c.target, c.ep, got, c.want)
		}
	}

	l := nbdServerLaunch(spec(tcp))
	conf := l.files["/tmp/s/nbd-server.conf"]
	for _, want := range []string{"[generic]", "listenaddr = 127.0.0.1", "port = 10809", "[bench]", "exportname = /d/v.img"} {
		if !strings.Contains(conf, want) {
			t.Errorf("nbd-server config lacks %q:\n%s", want, conf)
		}
	}
	if !l.daemon || l.pidFile != "/tmp/s/nbd-server.pid" {
		t.Errorf("nbd-server must be followed through its pid file: %+v", l)
	}
	if conf := nbdServerLaunch(spec(unix)).files["/tmp/s/nbd-server.conf"]; !strings.Contains(conf, "unixsock = /tmp/s/nbd.sock") || strings.Contains(conf, "port =") {
		t.Errorf("nbd-server unix config:\n%s", conf)
	}
}

func TestEndpointURI(t *testing.T) {
	if got := (endpoint{host: "127.0.0.1", port: 5}).uri(); got != "nbd://127.0.0.1:5/bench" {
		t.Errorf("tcp uri %q", got)
	}
	if got := (endpoint{unix: "/tmp/a.sock"}).uri(); got != "nbd+unix:///bench?socket=/tmp/a.sock" {
		t.Errorf("unix uri %q", got)
	}
}
