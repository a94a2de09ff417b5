package fio

import (
	"bytes"
	"context"
	"errors"
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

// userHZ is the unit of the CPU times in /proc/PID/stat. Linux exports
// them in USER_HZ, which is 100 on every architecture keel runs on.
const userHZ = 100

// server is one running NBD server process (and, for forking servers, its
// children).
type server struct {
	pid  int
	argv []string
	log  string // file holding the server's stdout and stderr

	done    chan struct{} // closed when the process has exited
	exitErr error         // set before done is closed

	stopSample chan struct{} // closed to stop the RSS sampler
	sampled    chan struct{} // closed when the sampler has returned
	// peakTreeRSS is the largest sum of VmRSS over the process tree seen by
	// the sampler; written by the sampler, read after sampled is closed.
	peakTreeRSS int64
}

// startServer starts l and returns once the process runs (not yet once it
// accepts connections: see waitReady).
func startServer(ctx context.Context, l launch, logPath string) (*server, error) {
	for path, contents := range l.files {
		if err := os.WriteFile(path, []byte(contents), 0o644); err != nil {
			return nil, fmt.Errorf("writing %s: %w", path, err)
		}
	}
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(l.argv[0], l.argv[1:]...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	if len(l.env) > 0 {
		cmd.Env = append(os.Environ(), l.env...)
	}
	// Kill the server if the harness dies; a daemon escapes this, and
	// stop() reaches it through its pid file.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	s := &server{
		argv:       l.argv,
		log:        logPath,
		done:       make(chan struct{}),
		stopSample: make(chan struct{}),
		sampled:    make(chan struct{}),
	}
	if !l.daemon {
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("starting %s: %w", l.argv[0], err)
		}
		s.pid = cmd.Process.Pid
		go func() {
			s.exitErr = cmd.Wait()
			close(s.done)
		}()
	} else {
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("starting %s: %w%s", l.argv[0], err, logTail(logPath))
		}
		pid, err := readPidFile(ctx, l.pidFile, 10*time.Second)
		if err != nil {
			return nil, fmt.Errorf("%s daemon: %w%s", l.argv[0], err, logTail(logPath))
		}
		s.pid = pid
		go func() {
			// Not our child: poll until it is gone or a zombie.
			for alive(pid) {
				time.Sleep(20 * time.Millisecond)
			}
			s.exitErr = errors.New("daemon exited")
			close(s.done)
		}()
	}
	go s.sample()
	return s, nil
}

func readPidFile(ctx context.Context, path string, timeout time.Duration) (int, error) {
	deadline := time.Now().Add(timeout)
	for {
		b, err := os.ReadFile(path)
		if err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
				return pid, nil
			}
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("no pid in %s after %v", path, timeout)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	st, err := readStat(pid)
	return err == nil && st.state != 'Z'
}

// waitReady polls a connection to ep until it is accepted, the process
// exits or timeout passes.
func (s *server) waitReady(ctx context.Context, ep endpoint, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	network, addr := "tcp", ep.hostPort()
	if ep.unix != "" {
		network, addr = "unix", ep.unix
	}
	for {
		c, err := net.DialTimeout(network, addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not accepting on %s after %v: %w%s", s.argv[0], ep, timeout, err, logTail(s.log))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			return fmt.Errorf("%s exited before accepting: %v%s", s.argv[0], s.exitErr, logTail(s.log))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stop sends SIGTERM, waits up to timeout, then SIGKILLs. It returns the
// peak RSS of the server over its life in bytes: the larger of the root
// process's VmHWM and the largest sampled sum of VmRSS over its tree (which
// counts forked per-connection children).
func (s *server) stop(timeout time.Duration) (peakRSS int64, err error) {
	hwm, _ := vmHWM(s.pid)
	close(s.stopSample)
	<-s.sampled
	peakRSS = max(hwm, s.peakTreeRSS)

	select {
	case <-s.done:
		return peakRSS, fmt.Errorf("%s exited during the run: %v%s", s.argv[0], s.exitErr, logTail(s.log))
	default:
	}
	_ = syscall.Kill(s.pid, syscall.SIGTERM)
	select {
	case <-s.done:
		return peakRSS, nil
	case <-time.After(timeout):
	}
	_ = syscall.Kill(s.pid, syscall.SIGKILL)
	select {
	case <-s.done:
		return peakRSS, fmt.Errorf("%s ignored SIGTERM for %v and was killed", s.argv[0], timeout)
	case <-time.After(timeout):
		return peakRSS, fmt.Errorf("%s (pid %d) survived SIGKILL for %v", s.argv[0], s.pid, timeout)
	}
}

// sample records the peak RSS of the process tree every 200 ms until
// stopSample is closed.
func (s *server) sample() {
	defer close(s.sampled)
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		if rss, err := treeRSS(s.pid); err == nil {
			s.peakTreeRSS = max(s.peakTreeRSS, rss)
		}
		select {
		case <-s.stopSample:
			return
		case <-t.C:
		}
	}
}

// cpuTicks is the CPU time of the server's process tree in USER_HZ ticks.
func (s *server) cpuTicks() (int64, error) { return treeCPU(s.pid) }

// logTail is the end of a server log, formatted to follow an error.
func logTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(bytes.TrimSpace(b)) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 10 {
		lines = lines[len(lines)-10:]
	}
	return "\n  log " + path + ":\n    " + strings.Join(lines, "\n    ")
}

// procStat is what this package reads from /proc/PID/stat.
type procStat struct {
	pid, ppid int
	state     byte
	// utime, stime: the process's own CPU time; cutime, cstime: that of
	// its waited-for children. In USER_HZ ticks.
	utime, stime, cutime, cstime int64
}

func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return procStat{}, err
	}
	return parseStat(b)
}

// parseStat decodes /proc/PID/stat:
//
//	pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt
//	majflt cmajflt utime stime cutime cstime ...
//
// comm may hold spaces and parentheses, so the fields after it are found
// from the last ')'.
func parseStat(b []byte) (procStat, error) {
	open := bytes.IndexByte(b, '(')
	end := bytes.LastIndexByte(b, ')')
	if open < 1 || end < open {
		return procStat{}, fmt.Errorf("malformed /proc stat %q", truncate(b))
	}
	var st procStat
	pid, err := strconv.Atoi(strings.TrimSpace(string(b[:open])))
	if err != nil {
		return procStat{}, fmt.Errorf("malformed /proc stat pid %q", truncate(b))
	}
	st.pid = pid
	f := strings.Fields(string(b[end+1:]))
	// f[0] is field 3 (state); utime is field 14, so f[11].
	// The state is one letter (R, S, D, Z, T, ...).
	if len(f) < 15 || len(f[0]) != 1 || !('A' <= f[0][0] && f[0][0] <= 'Z' || 'a' <= f[0][0] && f[0][0] <= 'z') {
		return procStat{}, fmt.Errorf("malformed /proc stat fields %q", truncate(b))
	}
	st.state = f[0][0]
	ints := []*int64{nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, &st.utime, &st.stime, &st.cutime, &st.cstime}
	if st.ppid, err = strconv.Atoi(f[1]); err != nil {
		return procStat{}, fmt.Errorf("malformed /proc stat ppid %q", f[1])
	}
	for i, dst := range ints {
		if dst == nil {
			continue
		}
		if *dst, err = strconv.ParseInt(f[i], 10, 64); err != nil {
			return procStat{}, fmt.Errorf("malformed /proc stat field %d %q", i+3, f[i])
		}
	}
	return st, nil
}

func truncate(b []byte) []byte {
	if len(b) > 80 {
		return b[:80]
	}
	return b
}

// tree returns root and its live descendants (zombies included: their
// times still count until reaped, then they land in the parent's cutime).
func tree(root int) ([]procStat, error) {
	rootSt, err := readStat(root)
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	children := map[int][]procStat{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == root {
			continue
		}
		st, err := readStat(pid)
		if err != nil {
			continue // exited meanwhile
		}
		children[st.ppid] = append(children[st.ppid], st)
	}
	out := []procStat{rootSt}
	for i := 0; i < len(out); i++ {
		out = append(out, children[out[i].pid]...)
	}
	return out, nil
}

// treeCPU is the CPU time of root's tree in USER_HZ ticks: for each live
// process its own time plus that of its reaped children. A child reaped
// between two calls moves from its own entry into its parent's cutime, so
// differences between calls stay right.
func treeCPU(root int) (int64, error) {
	ps, err := tree(root)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, p := range ps {
		n += p.utime + p.stime + p.cutime + p.cstime
	}
	return n, nil
}

// treeRSS is the sum of VmRSS over root's tree in bytes.
func treeRSS(root int) (int64, error) {
	ps, err := tree(root)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, p := range ps {
		v, err := statusField(p.pid, "VmRSS")
		if err == nil {
			n += v
		}
	}
	return n, nil
}

func vmHWM(pid int) (int64, error) { return statusField(pid, "VmHWM") }

// statusField reads a "Name:   1234 kB" line of /proc/PID/status, in bytes.
func statusField(pid int, name string) (int64, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, err
	}
	return parseStatusField(b, name)
}

func parseStatusField(b []byte, name string) (int64, error) {
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || k != name {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("malformed status line %q", line)
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("malformed status line %q", line)
		}
		return n << 10, nil
	}
	return 0, fmt.Errorf("no %s in status", name)
}
