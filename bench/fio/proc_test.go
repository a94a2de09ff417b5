package fio

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseStat(t *testing.T) {
	// comm may hold spaces and parentheses.
	line := "4242 (a (b) c) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 130 7 3 20 0 4 0 12345 1000000 200 18446744073709551615\n"
	st, err := parseStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	want := procStat{pid: 4242, ppid: 17, state: 'S', utime: 250, stime: 130, cutime: 7, cstime: 3}
	if st != want {
		t.Errorf("got %+v, want %+v", st, want)
	}
	for _, bad := range []string{"", "1 (x", "1 (x) S 2", "x (y) S 1 1 1 0 -1 0 0 0 0 0 a b c d", "1 (x) S p 1 1 0 -1 0 0 0 0 0 1 2 3 4"} {
		if _, err := parseStat([]byte(bad)); err == nil {
			t.Errorf("parseStat(%q) accepted", bad)
		}
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte("4242 (a (b) c) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 130 7 3 20 0 4 0 12345 1000000 200\n"))
	f.Add([]byte("1 (x) Z 0"))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := parseStat(b)
		if err == nil && st.state == 0 {
			t.Errorf("accepted %q with no state: %+v", b, st)
		}
	})
}

func TestParseStatusField(t *testing.T) {
	status := "Name:\tfio\nVmPeak:\t  123 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\nThreads:\t4\n"
	if n, err := parseStatusField([]byte(status), "VmHWM"); err != nil || n != 2048<<10 {
		t.Errorf("VmHWM = %d, %v", n, err)
	}
	if _, err := parseStatusField([]byte(status), "VmSwap"); err == nil {
		t.Error("missing field accepted")
	}
	if _, err := parseStatusField([]byte(status), "Threads"); err == nil {
		t.Error("field without kB accepted")
	}
}

// TestTreeMeasuresChildren runs a shell that forks a busy child and checks
// that the tree's CPU time and RSS include it: nbd-server forks a process
// per connection, and its CPU must not vanish from the table.
func TestTreeMeasuresChildren(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	ready := filepath.Join(t.TempDir(), "ready")
	// The child spins until killed; the parent waits for it.
	cmd := exec.Command(sh, "-c", `sh -c 'touch `+ready+`; while :; do :; done' & wait`)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		ps, _ := tree(cmd.Process.Pid)
		for _, p := range ps[1:] {
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	deadline := time.Now().Add(10 * time.Second)
	var ps []procStat
	for {
		ps, err = tree(cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		if _, statErr := os.Stat(ready); statErr == nil && len(ps) >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("child never appeared in the tree: %+v", ps)
		}
		time.Sleep(10 * time.Millisecond) // polling an external process
	}
	if ps[0].pid != cmd.Process.Pid || ps[1].ppid != cmd.Process.Pid {
		t.Errorf("tree %+v: want the root first, then its child", ps)
	}
	// The child burns CPU: the tree's ticks must grow while the root's own
	// stay put.
	before, err := treeCPU(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	for {
		after, err := treeCPU(cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		if after > before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tree CPU stayed at %d ticks with a spinning child", before)
		}
		time.Sleep(10 * time.Millisecond) // polling an external process
	}
	rss, err := treeRSS(cmd.Process.Pid)
	if err != nil || rss <= 0 {
		t.Errorf("tree RSS %d, %v", rss, err)
	}
	if _, err := treeCPU(1 << 30); err == nil {
		t.Error("tree of a missing pid")
	}
}

// TestServerLifecycle starts a real process through startServer, waits for
// it to accept on a Unix socket, and stops it with SIGTERM.
func TestServerLifecycle(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("no python3 to play a server")
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	script := `import socket,sys,signal
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)
while True:
    c,_=s.accept(); c.close()
`
	srv, err := startServer(context.Background(), launch{argv: []string{py, "-c", script, sock}}, filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.waitReady(context.Background(), endpoint{unix: sock}, 20*time.Second); err != nil {
		srv.stop(time.Second)
		t.Fatal(err)
	}
	if _, err := srv.cpuTicks(); err != nil {
		t.Error(err)
	}
	rss, err := srv.stop(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if rss <= 0 {
		t.Errorf("peak RSS %d", rss)
	}
	select {
	case <-srv.done:
	default:
		t.Error("stop returned with the process alive")
	}
}

// TestServerExitsEarly: a server that dies before accepting is reported
// with its log, not waited on until the timeout.
func TestServerExitsEarly(t *testing.T) {
	dir := t.TempDir()
	srv, err := startServer(context.Background(), launch{argv: []string{"sh", "-c", "echo cannot bind >&2; exit 3"}}, filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = srv.waitReady(context.Background(), endpoint{unix: filepath.Join(dir, "none.sock")}, time.Minute)
	if err == nil || !strings.Contains(err.Error(), "exited before accepting") || !strings.Contains(err.Error(), "cannot bind") {
		t.Fatalf("err = %v", err)
	}
	if time.Since(start) > 30*time.Second {
		t.Error("waited for the timeout after the process died")
	}
	if _, err := srv.stop(time.Second); err == nil {
		t.Error("stop of a dead server reported no error")
	}
}

func TestFindMount(t *testing.T) {
	mi := `22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
23 22 0:21 / /proc rw - proc proc rw
30 22 0:30 / /dev/shm rw - tmpfs tmpfs rw
31 22 254:0 /srv /data rw,noatime - ext4 /dev/vda rw
`
	m, ok := findMount([]byte(mi), "254:0", "/data/bench")
	if !ok || m.point != "/data" || m.fstype != "ext4" || m.source != "/dev/vda" || m.opts != "rw,noatime" {
		t.Errorf("got %+v, %v", m, ok)
	}
	if m, ok := findMount([]byte(mi), "254:0", "/var/tmp/x"); !ok || m.point != "/" {
		t.Errorf("root mount: %+v %v", m, ok)
	}
	if m, ok := findMount([]byte(mi), "254:0", "/database"); !ok || m.point != "/" {
		t.Errorf("/database is not under /data: %+v %v", m, ok)
	}
	if _, ok := findMount([]byte(mi), "9:9", "/x"); ok {
		t.Error("unknown device found")
	}
}

func TestCheckNotTmpfs(t *testing.T) {
	var fs unix.Statfs_t
	if unix.Statfs("/dev/shm", &fs) == nil && fs.Type == unix.TMPFS_MAGIC {
		if err := checkNotTmpfs("/dev/shm"); err == nil || !strings.Contains(err.Error(), "tmpfs") {
			t.Errorf("/dev/shm (tmpfs) accepted: %v", err)
		}
	}
	if err := checkNotTmpfs("/"); unix.Statfs("/", &fs) == nil && fs.Type != unix.TMPFS_MAGIC && err != nil {
		t.Errorf("/ refused: %v", err)
	}
	if err := checkNotTmpfs(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("missing directory accepted")
	}
}
