package fio

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Mode says when a target acknowledges a write, so that a table never puts
// a page-cache server next to a direct-I/O one without saying so.
type Mode string

const (
	// ModeDirect: the server writes with O_DIRECT; an acknowledged write
	// has left the host's page cache (the device's own cache still needs
	// FLUSH or FUA).
	ModeDirect Mode = "direct"
	// ModePageCache: the server writes into the host's page cache; an
	// acknowledged write is lost on power failure until a FLUSH.
	ModePageCache Mode = "page-cache"
)

// Target is one thing the suite measures: an NBD server started on a fresh
// file, or the file itself (raw).
type Target struct {
	Name string
	Mode Mode
	// Note says exactly how the target is run and what its mode means.
	Note string
	// Program is what must be installed: looked up in PATH, except for
	// keel (Config.KeelBin) and go-nbd (built from the module cache).
	Program string
	// Install tells the user how to get Program.
	Install string

	// createsFile: the server creates and preallocates its own file (keel,
	// whose file carries a metadata header before the data).
	createsFile bool
	// launch builds the server's command line; nil for raw.
	launch func(l launchSpec) launch
	// variant: a keel build run under its own name (KeelVariant), from
	// program; not a peer.
	variant bool
	program string
}

// Raw reports whether the target is the disk itself rather than a server.
func (t Target) Raw() bool { return t.launch == nil }

// launchSpec is what a target's command line is made from.
type launchSpec struct {
	program string // path of the server binary
	file    string // volume file
	size    int64  // volume size in bytes
	ep      endpoint
	tmp     string // private scratch directory for config and pid files
}

// launch is how to start one server.
type launch struct {
	argv []string
	// daemon: the program forks into the background, writes its pid to
	// pidFile and the started process exits.
	daemon  bool
	pidFile string
	// files are written before the start (path → contents).
	files map[string]string
	// env is added to the harness's environment for the server.
	env []string
}

// exportName is the export every server is told to offer and fio asks for.
const exportName = "bench"

// endpoint is where a server listens: a Unix socket when unix is set, else
// loopback TCP.
type endpoint struct {
	unix string
	host string
	port int
}

func (e endpoint) hostPort() string { return net.JoinHostPort(e.host, strconv.Itoa(e.port)) }

// uri is the NBD URI (the libnbd syntax fio's nbd engine takes).
func (e endpoint) uri() string {
	if e.unix != "" {
		return "nbd+unix:///" + exportName + "?socket=" + e.unix
	}
	return "nbd://" + e.hostPort() + "/" + exportName
}

func (e endpoint) String() string {
	if e.unix != "" {
		return "unix:" + e.unix
	}
	return e.hostPort()
}

const installHint = "install it with `make bench-deps` (scripts/bench-deps.sh, apt)"

// Targets is every target the suite knows, in the default order.
var Targets = []Target{
	{
		Name: "keel", Mode: ModeDirect, Program: "keel",
		Note:        "keel serve: O_DIRECT, no read cache; creates its own file (1 MiB metadata header before the data)",
		Install:     "build it with `make build` and pass --keel-bin",
		createsFile: true,
		launch: func(l launchSpec) launch {
			argv := []string{l.program, "serve", "--file", l.file, "--size", strconv.FormatInt(l.size, 10), "--name", exportName}
			if l.ep.unix != "" {
				argv = append(argv, "--unix", l.ep.unix)
			} else {
				argv = append(argv, "--listen", l.ep.hostPort())
			}
			return launch{argv: argv}
		},
	},
	{
		Name: "nbdkit", Mode: ModePageCache, Program: "nbdkit", Install: installHint,
		Note:   "nbdkit file plugin, defaults: buffered pread/pwrite through the page cache",
		launch: nbdkitLaunch(),
	},
	{
		Name: "nbdkit-cache-none", Mode: ModePageCache, Program: "nbdkit", Install: installHint,
		Note: "nbdkit file plugin cache=none: still buffered pwrite (no O_DIRECT); it starts writeback at once " +
			"(sync_file_range WRITE, not waited for) and drops pages after reads (fadvise DONTNEED), " +
			"so an acknowledged write is not on disk until FLUSH",
		launch: nbdkitLaunch("cache=none"),
	},
	{
		Name: "qemu-nbd", Mode: ModePageCache, Program: "qemu-nbd", Install: installHint,
		Note:   "qemu-nbd defaults (cache=writeback, aio=threads)",
		launch: qemuLaunch(),
	},
	{
		Name: "qemu-nbd-direct", Mode: ModeDirect, Program: "qemu-nbd", Install: installHint,
		Note:   "qemu-nbd --cache=none --aio=native: O_DIRECT with Linux AIO",
		launch: qemuLaunch("--cache=none", "--aio=native"),
	},
	{
		Name: "nbd-server", Mode: ModePageCache, Program: "nbd-server", Install: installHint,
		Note:   "nbd-server from a generated config, defaults (buffered I/O, a forked process per connection)",
		launch: nbdServerLaunch,
	},
	{
		Name: "go-nbd", Mode: ModePageCache, Program: "go-nbd-example-server-file",
		Install: "needs the go tool and github.com/pojntfx/go-nbd@" + goNBDVersion + " in the module cache (`go mod download`)",
		Note:    "go-nbd " + goNBDVersion + " example file server: os.File (buffered), one request at a time per connection",
		launch: func(l launchSpec) launch {
			argv := []string{l.program, "-file", l.file, "-name", exportName}
			if l.ep.unix != "" {
				argv = append(argv, "-network", "unix", "-laddr", l.ep.unix)
			} else {
				argv = append(argv, "-network", "tcp", "-laddr", l.ep.hostPort())
			}
			return launch{argv: argv}
		},
	},
	{
		Name: "raw", Mode: ModeDirect, Program: "fio", Install: installHint,
		Note: "the file itself: fio libaio with O_DIRECT (the limit)",
	},
}

// TargetNames lists the names of Targets in default order.
func TargetNames() []string {
	names := make([]string, len(Targets))
	for i, t := range Targets {
		names[i] = t.Name
	}
	return names
}

func targetByName(name string) (Target, bool) {
	for _, t := range Targets {
		if t.Name == name {
			return t, true
		}
	}
	return Target{}, false
}

func nbdkitLaunch(params ...string) func(launchSpec) launch {
	return func(l launchSpec) launch {
		// -f: stay in the foreground; --exit-with-parent: never outlive
		// the harness.
		argv := []string{l.program, "-f", "--exit-with-parent"}
		if l.ep.unix != "" {
			argv = append(argv, "-U", l.ep.unix)
		} else {
			argv = append(argv, "-i", l.ep.host, "-p", strconv.Itoa(l.ep.port))
		}
		argv = append(argv, "-e", exportName, "file", "file="+l.file)
		return launch{argv: append(argv, params...)}
	}
}

func qemuLaunch(opts ...string) func(launchSpec) launch {
	return func(l launchSpec) launch {
		// -t: keep serving after a client leaves (the readiness probe and
		// the prefill connect first); -e 8: accept the multi-conn jobs.
		argv := []string{l.program, "-f", "raw", "-t", "-e", "8", "-x", exportName}
		if l.ep.unix != "" {
			argv = append(argv, "-k", l.ep.unix)
		} else {
			argv = append(argv, "-b", l.ep.host, "-p", strconv.Itoa(l.ep.port))
		}
		argv = append(argv, opts...)
		return launch{argv: append(argv, l.file)}
	}
}

// nbdServerLaunch writes a config file and starts nbd-server as it runs in
// production: daemonised, forking a child per connection (its -d flag
// serves a single connection and exits, which multi-conn cannot use). The
// harness follows the daemon through its pid file.
func nbdServerLaunch(l launchSpec) launch {
	conf := filepath.Join(l.tmp, "nbd-server.conf")
	pid := filepath.Join(l.tmp, "nbd-server.pid")
	var b strings.Builder
	b.WriteString("[generic]\n")
	if l.ep.unix != "" {
		fmt.Fprintf(&b, "    unixsock = %s\n", l.ep.unix)
	} else {
		fmt.Fprintf(&b, "    listenaddr = %s\n    port = %d\n", l.ep.host, l.ep.port)
	}
	fmt.Fprintf(&b, "[%s]\n    exportname = %s\n", exportName, l.file)
	return launch{
		argv:    []string{l.program, "-C", conf, "-p", pid},
		daemon:  true,
		pidFile: pid,
		files:   map[string]string{conf: b.String()},
	}
}

// Skip is a target that was asked for but cannot run here.
type Skip struct {
	Target string `json:"target"`
	Reason string `json:"reason"`
}

func (s Skip) String() string { return "skip " + s.Target + ": " + s.Reason }

// selectTargets resolves names to targets, dropping (with a Skip saying
// why and how to install) those whose program cannot be found. lookPath is
// exec.LookPath outside tests; keelBin is the keel binary to run.
func selectTargets(names []string, keelBin string, lookPath func(string) (string, error), fioNBD bool) ([]Target, []Skip, error) {
	var run []Target
	var skips []Skip
	seen := map[string]bool{}
	for _, n := range names {
		t, ok := targetByName(n)
		if !ok {
			return nil, nil, fmt.Errorf("unknown target %q (known: %s)", n, strings.Join(TargetNames(), ", "))
		}
		if seen[n] {
			return nil, nil, fmt.Errorf("target %q given twice", n)
		}
		seen[n] = true
		if !t.Raw() && !fioNBD {
			skips = append(skips, Skip{n, "fio has no nbd engine (fio --enghelp=nbd fails); " + installHint})
			continue
		}
		switch t.Name {
		case "keel":
			if keelBin == "" {
				skips = append(skips, Skip{n, "no keel binary: " + t.Install})
				continue
			}
			if fi, err := os.Stat(keelBin); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
				skips = append(skips, Skip{n, fmt.Sprintf("keel binary %s is not an executable file: %s", keelBin, t.Install)})
				continue
			}
		case "go-nbd":
			if _, err := lookPath("go"); err != nil {
				skips = append(skips, Skip{n, "the go tool is not in PATH: " + t.Install})
				continue
			}
		default:
			if _, err := lookPath(t.Program); err != nil {
				skips = append(skips, Skip{n, t.Program + " not found in PATH: " + t.Install})
				continue
			}
		}
		run = append(run, t)
	}
	return run, skips, nil
}

// Slot is one turn of one target in the schedule.
type Slot struct {
	Rep    int // 0-based
	Target Target
}

// Schedule alternates targets rep by rep (A B C A B C ...), so that drift
// on a shared machine (other load, thermal state, page cache) falls on
// every target alike instead of on whichever ran last.
func Schedule(targets []Target, reps int) []Slot {
	out := make([]Slot, 0, len(targets)*reps)
	for r := range reps {
		for _, t := range targets {
			out = append(out, Slot{Rep: r, Target: t})
		}
	}
	return out
}
