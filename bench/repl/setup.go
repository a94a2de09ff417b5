package repl

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Setup names, as they appear in the report.
const (
	Unreplicated = "unreplicated"
	Replicated   = "replicated"
	// Pair is the ceiling: two `keel serve` volumes written at once by two
	// fio jobs, no replication. Its figures are per volume.
	Pair = "two-unreplicated"
)

// exportName is what `keel serve` exports and `keel up` names its volume.
const exportName = "bench"

// proc is one started child process.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when it exited
	err  error         // its exit, set before done is closed
}

func startProc(argv []string, logPath string) (*proc, error) {
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer lf.Close() // the child has its own copy
	p := &proc{name: filepath.Base(argv[0]) + " " + argv[1], cmd: exec.Command(argv[0], argv[1:]...), log: logPath, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = lf, lf
	// SIGTERM, not SIGKILL, if the harness dies: keel up then stops its
	// nodes and coordinator instead of orphaning them.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", p.name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits up to grace before SIGKILL. An exit before
// stop is an error: the process died during the run.
func (p *proc) stop(grace time.Duration) error {
	if p.exited() {
		return fmt.Errorf("%s exited during the run: %v%s", p.name, p.err, logTail(p.log))
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		return nil
	case <-t.C:
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	return fmt.Errorf("%s ignored SIGTERM for %v and was killed", p.name, grace)
}

func logTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(strings.TrimSpace(string(b))) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 10 {
		lines = lines[len(lines)-10:]
	}
	return "\n  log " + path + ":\n    " + strings.Join(lines, "\n    ")
}

// server is one running setup.
type server struct {
	p   *proc
	uri string
	// Pair only: the second keel serve and both URIs (fio writes to
	// every URI at once, one job each).
	p2   *proc
	uris []string
	// cpuPids are the processes whose CPU is counted.
	cpuPids []int
	// metricsURLs are the nodes' /metrics endpoints (replicated only).
	metricsURLs []string
}

func (s *server) cpu() (float64, error) { return cpuSeconds(s.cpuPids) }

// copies sums the copy counters over every node.
func (s *server) copies() (map[string]float64, error) {
	sum := map[string]float64{}
	for _, u := range s.metricsURLs {
		m, err := scrape(u, copyMetrics)
		if err != nil {
			return nil, err
		}
		for k, v := range m {
			sum[k] += v
		}
	}
	return sum, nil
}

// freePorts returns the first of n consecutive loopback TCP ports that are
// free now (a race with other programs remains; the start then fails).
func freePorts(n int) (int, error) {
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		base := l.Addr().(*net.TCPAddr).Port
		held := []net.Listener{l}
		ok := base+n-1 <= 65535
		for i := 1; ok && i < n; i++ {
			li, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(base+i))
			if err != nil {
				ok = false
				break
			}
			held = append(held, li)
		}
		for _, h := range held {
			h.Close()
		}
		if ok {
			return base, nil
		}
	}
	return 0, fmt.Errorf("no %d consecutive free loopback ports", n)
}

// startUnreplicated runs `keel serve` on a fresh file in dir.
func startUnreplicated(ctx context.Context, cfg *Config, dir string) (*server, error) {
	port, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	argv := []string{cfg.KeelBin, "serve", "--file", filepath.Join(dir, "serve.vol"),
		"--size", strconv.FormatInt(cfg.Size, 10), "--name", exportName, "--listen", addr}
	p, err := startProc(argv, filepath.Join(dir, "serve.log"))
	if err != nil {
		return nil, err
	}
	s := &server{p: p, uri: "nbd://" + addr + "/" + exportName, cpuPids: []int{p.cmd.Process.Pid}}
	if err := waitFor(ctx, p, cfg.StartTimeout, "accepting on "+addr, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}); err != nil {
		_ = p.stop(cfg.StopTimeout)
		return nil, err
	}
	return s, nil
}

// startPair runs two `keel serve` on fresh files in dir: the same
// work as a replicated write's two disk writes and their serving, with no
// replication between them.
func startPair(ctx context.Context, cfg *Config, dir string) (*server, error) {
	var srvs [2]*server
	for i := range srvs {
		sub := filepath.Join(dir, fmt.Sprintf("v%d", i+1))
		err := os.MkdirAll(sub, 0o755)
		if err == nil {
			srvs[i], err = startUnreplicated(ctx, cfg, sub)
		}
		if err != nil {
			if i == 1 {
				_ = srvs[0].p.stop(cfg.StopTimeout)
			}
			return nil, err
		}
	}
	return &server{
		p: srvs[0].p, p2: srvs[1].p, uri: srvs[0].uri,
		uris:    []string{srvs[0].uri, srvs[1].uri},
		cpuPids: append(srvs[0].cpuPids, srvs[1].cpuPids...),
	}, nil
}

// targets are the URIs fio writes to: one, or both of a pair.
func (s *server) targets() []string {
	if s.uris != nil {
		return s.uris
	}
	return []string{s.uri}
}

// stop stops every process of the setup.
func (s *server) stop(grace time.Duration) error {
	err := s.p.stop(grace)
	if s.p2 != nil {
		if err2 := s.p2.stop(grace); err == nil {
			err = err2
		}
	}
	return err
}

// startReplicated runs `keel up --nodes 2 --replicas 2` on a fresh data
// directory in dir and waits for the NBD URI it prints.
func startReplicated(ctx context.Context, cfg *Config, dir string) (*server, error) {
	var ports [5]int
	for i, n := range []int{1, 1, Nodes, Nodes, Nodes} {
		p, err := freePorts(n)
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	argv := []string{cfg.KeelBin, "up", "--nodes", strconv.Itoa(Nodes), "--replicas", strconv.Itoa(Nodes),
		"--data-dir", filepath.Join(dir, "up"), "--size", strconv.FormatInt(cfg.Size, 10), "--volume", exportName,
		"--coord-listen", "127.0.0.1:" + strconv.Itoa(ports[0]), "--raft-listen", "127.0.0.1:" + strconv.Itoa(ports[1]),
		"--nbd-port", strconv.Itoa(ports[2]), "--repl-port", strconv.Itoa(ports[3]), "--metrics-port", strconv.Itoa(ports[4])}
	logPath := filepath.Join(dir, "up.log")
	p, err := startProc(argv, logPath)
	if err != nil {
		return nil, err
	}
	s := &server{p: p}
	for i := range Nodes {
		s.metricsURLs = append(s.metricsURLs, fmt.Sprintf("http://127.0.0.1:%d/metrics", ports[4]+i))
	}
	// keel up reports its volume served, with its URI, once the primary
	// answers an NBD handshake.
	err = waitFor(ctx, p, cfg.StartTimeout, "keel up printing the NBD URI", func() bool {
		s.uri = findURI(logPath)
		return s.uri != ""
	})
	if err == nil {
		s.cpuPids = childrenRunning(p.cmd.Process.Pid, "node")
		if len(s.cpuPids) != Nodes {
			err = fmt.Errorf("found %d keel node children of keel up (pid %d), want %d", len(s.cpuPids), p.cmd.Process.Pid, Nodes)
		}
	}
	if err != nil {
		_ = p.stop(cfg.StopTimeout)
		return nil, err
	}
	return s, nil
}

// findURI returns the URI of keel up's "  NBD URI: nbd://..." line, "" if
// it has not printed it yet.
func findURI(logPath string) string {
	f, err := os.Open(logPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if _, rest, ok := strings.Cut(sc.Text(), "NBD URI: "); ok {
			if uri, _, _ := strings.Cut(strings.TrimSpace(rest), " "); strings.HasPrefix(uri, "nbd://") {
				return uri
			}
		}
	}
	return ""
}

// waitFor polls ready every 50 ms until it holds, p exits, ctx ends or
// timeout passes.
func waitFor(ctx context.Context, p *proc, timeout time.Duration, what string, ready func() bool) error {
	deadline := time.Now().Add(timeout)
	for !ready() {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not %s after %v%s", p.name, what, timeout, logTail(p.log))
		}
		t := time.NewTimer(50 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-p.done:
			t.Stop()
			return fmt.Errorf("%s exited before %s: %v%s", p.name, what, p.err, logTail(p.log))
		case <-t.C:
		}
	}
	return nil
}
