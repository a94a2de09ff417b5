//go:build linux

package node_test

import (
	"bufio"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// freeBase returns a port p such that p..p+n-1 can all be listened on now.
func freeBase(t *testing.T, n int) int {
	t.Helper()
	for range 100 {
		base := 20000 + rand.IntN(30000)
		ok := true
		var ls []net.Listener
		for i := range n {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", base+i))
			if err != nil {
				ok = false
				break
			}
			ls = append(ls, l)
		}
		for _, l := range ls {
			l.Close()
		}
		if ok {
			return base
		}
	}
	t.Fatal("no free port range")
	return 0
}

// upRun is one `keel up`.
type upRun struct {
	cmd  *exec.Cmd
	out  *lockedBuffer
	uri  chan string
	done chan error
}

func startUp(t *testing.T, dir string, base int) *upRun {
	t.Helper()
	u := &upRun{out: &lockedBuffer{}, uri: make(chan string, 1), done: make(chan error, 1)}
	u.cmd = exec.Command(keelBin(t), "up", "--data-dir", dir, "--nodes", "3", "--replicas", "2", "--size", "64M",
		"--coord-listen", fmt.Sprintf("127.0.0.1:%d", base), "--raft-listen", fmt.Sprintf("127.0.0.1:%d", base+1),
		"--nbd-port", fmt.Sprint(base+10), "--repl-port", fmt.Sprint(base+20), "--metrics-port", fmt.Sprint(base+30), "--lease", "2s")
	u.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	pr, pw := io.Pipe()
	u.cmd.Stdout, u.cmd.Stderr = pw, pw
	if err := u.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`NBD URI: (nbd://\S+)`)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			u.out.Write([]byte(sc.Text() + "\n"))
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case u.uri <- m[1]:
				default:
				}
			}
		}
	}()
	go func() {
		err := u.cmd.Wait()
		pw.Close()
		u.done <- err
	}()
	t.Cleanup(func() {
		if u.cmd.ProcessState == nil {
			u.cmd.Process.Kill()
			<-u.done
		}
		if t.Failed() {
			t.Logf("keel up output:\n%s", u.out.String())
			for _, f := range []string{"coord", "n1", "n2", "n3"} {
				t.Logf("--- %s.log:\n%s", f, tailFile(filepath.Join(dir, "logs", f+".log"), 30))
			}
		}
	})
	return u
}

func tailFile(path string, n int) string {
	out, _ := exec.Command("tail", "-n", fmt.Sprint(n), path).CombinedOutput()
	return string(out)
}

func (u *upRun) waitURI(t *testing.T) string {
	t.Helper()
	select {
	case uri := <-u.uri:
		return uri
	case err := <-u.done:
		t.Fatalf("keel up exited before printing the NBD URI: %v", err)
	case <-time.After(90 * time.Second):
		t.Fatal("keel up printed no NBD URI within 90s")
	}
	return ""
}

// stop sends SIGTERM and expects a clean exit.
func (u *upRun) stop(t *testing.T) {
	t.Helper()
	u.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-u.done:
		if err != nil {
			t.Fatalf("keel up exited with %v after SIGTERM", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("keel up did not stop within 90s of SIGTERM")
	}
}

// TestUp: `keel up` starts a cluster, prints a URI that qemu-io can write
// through, shows the status line, stops cleanly on SIGTERM (no process or
// port left), and a second run on the same directory finds the volume and
// its data.
func TestUp(t *testing.T) {
	need(t, "qemu-io")
	dir := filepath.Join(filepath.Dir(volFile(t)), "up")
	base := freeBase(t, 33)
	u := startUp(t, dir, base)
	uri := u.waitURI(t)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 1M", uri)
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(u.out.String(), "default: ok, epoch 1") { // the status line, printed each change
		if time.Now().After(deadline) {
			t.Fatalf("no status line saying ok:\n%s", u.out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	u.stop(t)
	for i := range 3 {
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", base+10+i), time.Second); err == nil {
			c.Close()
			t.Fatalf("node %d still listens after keel up stopped", i+1)
		}
	}
	if !strings.Contains(tailFile(filepath.Join(dir, "logs", "n1.log"), 5), "marked clean") {
		t.Errorf("n1 did not stop cleanly:\n%s", tailFile(filepath.Join(dir, "logs", "n1.log"), 10))
	}

	u = startUp(t, dir, base)
	uri = u.waitURI(t)
	out := run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 1M", uri)
	if strings.Contains(out, "verification failed") {
		t.Fatalf("data written in the first run is gone: %s", out)
	}
	u.stop(t)
}

func TestNodeAndUpBadFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"node", "--data-dir", "/tmp/x", "--coord", "http://127.0.0.1:1"}, "--id is required"},
		{[]string{"node", "--id", "n1", "--coord", "http://127.0.0.1:1", "--primary-listen", "127.0.0.1:0", "--repl-listen", "127.0.0.1:0"}, "--data-dir is required"},
		{[]string{"node", "--id", "n1", "--data-dir", "/tmp/x", "--primary-listen", "127.0.0.1:0", "--repl-listen", "127.0.0.1:0"}, "--coord is required"},
		{[]string{"node", "--id", "n1", "--data-dir", "/tmp/x", "--coord", "127.0.0.1:7400"}, "give coordinator API URLs"},
		{[]string{"node", "--id", "n1", "--data-dir", "/tmp/x", "--coord", "http://127.0.0.1:1"}, "--primary-listen and --repl-listen are required"},
		{[]string{"node", "--id", "n1", "--data-dir", "/tmp/x", "--coord", "http://127.0.0.1:1", "--primary-listen", "127.0.0.1:0", "--repl-listen", "127.0.0.1:0", "--capacity", "lots"}, "--capacity"},
		{[]string{"up", "--nodes", "2", "--replicas", "3"}, "--replicas 3"},
		{[]string{"up", "--size", "1000"}, "multiple of 4 KiB"},
		{[]string{"up", "--volume", "vol-3"}, "--volume"},
	} {
		out, err := exec.Command(keelBin(t), c.args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("keel %v: err %v, output %q; want an error containing %q", c.args, err, out, c.want)
		}
	}
}
